import jax.numpy as jnp
import numpy as np
import pytest

import st_jax as st
from st_jax._quant import quantize_rows


def test_roundtrip_error_bound(rng):
    x = rng.standard_normal((257, 67)).astype(np.float32) * rng.uniform(0.01, 10, (257, 1))
    m = st.quantize_int8(x)
    assert m.codes.dtype == jnp.int8 and m.codes.shape == x.shape
    assert m.scale.dtype == jnp.float32 and m.scale.shape == (257,)
    err = np.abs(np.asarray(st.dequantize(m)) - x)
    bound = np.asarray(m.scale)[:, None] / 2
    assert (err <= bound * (1 + 1e-6) + 1e-12).all()
    # the scale maps each row's largest magnitude to exactly +-127
    assert (np.abs(np.asarray(m.codes)).max(axis=1) == 127).all()


def test_zero_rows_are_exact():
    x = np.zeros((3, 8), np.float32)
    x[1, 2] = -3.0
    m = st.quantize_int8(x)
    np.testing.assert_array_equal(np.asarray(st.dequantize(m)), x)
    assert float(m.scale[0]) == 0.0


def test_score_error_bound_holds(rng):
    x = rng.standard_normal((300, 48)).astype(np.float32)
    q = rng.standard_normal((7, 48)).astype(np.float32)
    m = st.quantize_int8(x)
    qc, qs = quantize_rows(jnp.asarray(q))
    int8_scores = (np.asarray(qc, np.float64) @ np.asarray(m.codes, np.float64).T
                   ) * np.asarray(m.scale)[None, :] * np.asarray(qs)[:, None]
    true = q.astype(np.float64) @ x.astype(np.float64).T
    bound = np.asarray(st.score_error_bound(jnp.asarray(q), m))
    assert (np.abs(int8_scores - true) <= bound * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_are_named(bad):
    x = np.ones((20, 4), np.float32)
    x[3, 1] = bad
    x[17, 0] = bad
    with pytest.raises(ValueError, match=r"2 row\(s\): 3, 17"):
        st.quantize_int8(x)


def test_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="2-D"):
        st.quantize_int8(np.ones(5, np.float32))
    with pytest.raises(ValueError, match="floating"):
        st.quantize_int8(np.ones((2, 2), np.int32))
