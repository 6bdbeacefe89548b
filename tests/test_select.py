"""Selection helpers of the XLA twins: the threshold top-k equals lax.top_k exactly (values,
positions, ties, -inf, -0.0, the fallback), and the int8 GEMM row dots are exact."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pallas_kernels._select import _plan, ordered_keys, threshold_top_k, top_k
from pallas_kernels.int8_topk import gathered_row_dots, int8_row_dots


def rows(rng, kind, b, n):
    x = rng.standard_normal((b, n)).astype(np.float32)
    if kind == "ties":                       # few distinct values: ties at every threshold
        x = np.round(x * 3)
    elif kind == "ivf":                      # blocks of similar scores, a -inf tail
        x = np.sort(x, axis=1)[:, ::-1].copy()
        x[:, int(0.7 * n):] = -np.inf
    elif kind == "sparse":                   # rows with fewer finite entries than k
        x[:, 50:] = -np.inf
        x[1] = -np.inf
        x[2, 10:] = -np.inf
    elif kind == "zeros":                    # -0.0 and +0.0 (XLA orders -0.0 lower)
        x = np.where(rng.random((b, n)) < 0.5, np.float32(-0.0), np.float32(0.0))
        x[:, ::7] = 1.0
    return jnp.asarray(x)


@pytest.mark.parametrize("kind", ["random", "ties", "ivf", "sparse", "zeros"])
@pytest.mark.parametrize("n,k", [(600, 96), (15360, 100), (4096, 256), (3001, 400),
                                 (8192, 1024), (1000, 900), (70000, 1024), (140000, 2048)])
def test_threshold_top_k_equals_lax_top_k(rng, kind, n, k):
    x = rows(rng, kind, 6, n)
    want = lax.top_k(x, k)
    got = jax.jit(threshold_top_k, static_argnums=1)(x, k)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_threshold_top_k_falls_back_when_the_threshold_keeps_too_many(rng):
    """A row of one repeated value passes the sampled threshold everywhere (> cap): the
    exact lax.top_k branch answers, still equal."""
    x = rows(rng, "random", 4, 4096).at[2].set(0.5)
    k = 300
    assert _plan(k, 4096)[3] < 4096
    got = threshold_top_k(x, k)
    want = lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_top_k_dispatch_and_keys(rng):
    x = rows(rng, "random", 3, 5000)
    for k in (10, 512):                        # lax.top_k below MIN_THRESHOLD_K, threshold above
        got = jax.jit(lambda x, k=k: top_k(x, k))(x)
        want = lax.top_k(x, k)
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    v = jnp.asarray([-np.inf, -3.0, -0.0, 0.0, 1e-30, 2.0, np.inf], jnp.float32)
    assert np.all(np.diff(np.asarray(ordered_keys(v)).astype(np.int64)) > 0)


@pytest.mark.parametrize("d", [40, 128, 1500])
def test_int8_row_dots_are_exact(rng, d):
    """The GEMM behind the row dots accumulates in int32: exact beyond D = 1024, where an
    f32 sum of int8 products would not be."""
    x = rng.integers(-127, 128, (3, 50, d), dtype=np.int8)
    x[0] = 127
    qc = rng.integers(-127, 128, (3, d), dtype=np.int8)
    qc[0] = 127
    want = np.einsum("smd,sd->sm", x.astype(np.int64), qc.astype(np.int64))
    got = np.asarray(int8_row_dots(jnp.asarray(x), jnp.asarray(qc)))
    np.testing.assert_array_equal(got.astype(np.int64), want)
    codes = jnp.asarray(x.reshape(-1, d))
    r = jnp.asarray(rng.integers(0, 150, (3, 20)).astype(np.int32))
    got = np.asarray(gathered_row_dots(codes, r, jnp.asarray(qc)))
    want = np.einsum("smd,sd->sm", x.reshape(-1, d)[np.asarray(r)].astype(np.int64),
                     qc.astype(np.int64))
    np.testing.assert_array_equal(got.astype(np.int64), want)


@pytest.mark.parametrize("step_rows", [1, 40, 64, 100, 10_000])
def test_gathered_row_dots_groups(rng, step_rows):
    """Queries grouped per loop step (g = step_rows // M, the batch padded to a multiple
    of g) give the same exact dots as the einsum, whatever the grouping."""
    codes = rng.integers(-127, 128, (300, 24), dtype=np.int8)
    qc = rng.integers(-127, 128, (7, 24), dtype=np.int8)
    r = rng.integers(0, 300, (7, 20)).astype(np.int32)
    got = np.asarray(gathered_row_dots(jnp.asarray(codes), jnp.asarray(r), jnp.asarray(qc),
                                       step_rows=step_rows))
    want = np.einsum("bmd,bd->bm", codes[r].astype(np.int64), qc.astype(np.int64))
    assert got.shape == (7, 20)
    np.testing.assert_array_equal(got.astype(np.int64), want)
