import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from training import FeatureKind, FeatureSpec, MLPOverArch, MoLOverArch, TwoTower
from training._models import FeatureEmbedder

import training

# the tiny config's sizes, so the compiled programs are shared with the other tests
CFG = training.tiny_config().tower
OA = training.tiny_config().overarch
D = CFG.out_dim


def _feats(ds, side, rows):
    src = ds.user_features if side == "user" else ds.item_features
    return {k: jnp.asarray(v[rows]) for k, v in src.items()}


def test_tower_shapes_and_norms(tiny_dataset):
    d = tiny_dataset
    m = TwoTower(d.schema.user, d.schema.item, 2, CFG, rngs=nnx.Rngs(0))
    u = m.user_tower(_feats(d, "user", np.arange(5)))
    i = m.item_tower(_feats(d, "item", np.arange(7)))
    assert u.shape == (2, 5, D) and u.dtype == jnp.float32 and i.shape == (7, D)
    np.testing.assert_allclose(jnp.linalg.norm(u, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(i, axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(u[0], u[1])        # task heads are distinct
    np.testing.assert_allclose(m.inv_temperature(), 1 / CFG.temperature, rtol=1e-5)


def test_multi_valued_pooling_ignores_padding():
    spec = FeatureSpec("g", FeatureKind.MULTI, 5, ("a", "b", "c", "d"), max_len=3)
    e = FeatureEmbedder([spec], 4, rngs=nnx.Rngs(0))
    table = e.tables["g"].embedding[...]
    out = e({"g": jnp.array([[1, 3, 0], [2, 0, 0], [0, 0, 0]])})
    np.testing.assert_allclose(out[0], (table[1] + table[3]) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[1], table[2], rtol=1e-6)
    np.testing.assert_allclose(out[2], 0.0)


@pytest.mark.parametrize("cls", [MoLOverArch, MLPOverArch])
def test_overarch_shapes_and_jit_with_pure_params(cls):
    oa = cls(2, D, OA, rngs=nnx.Rngs(0))
    graph, state = nnx.split(oa)
    params = nnx.to_pure_dict(state)
    u = jax.random.normal(jax.random.key(0), (2, 3, D))
    i = jax.random.normal(jax.random.key(1), (3, 5, D))
    f = jax.jit(lambda p, u, i: nnx.merge(graph, p)(u, i))
    out = f(params, u, i)
    assert out.shape == (3, 5, 2) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, oa(u, i), rtol=1e-5, atol=1e-5)
    # the logit of a candidate does not depend on the other candidates of its row
    np.testing.assert_allclose(f(params, u, i[:, :2]), out[:, :2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="f32\\[T, B, D\\]"):
        oa(u, i[:2])


def test_mol_is_a_mixture_of_its_logits():
    oa = MoLOverArch(1, D, OA, rngs=nnx.Rngs(0))
    oa.scale[...] = jnp.ones((1,))
    u = jax.random.normal(jax.random.key(0), (1, 2, D))
    i = jax.random.normal(jax.random.key(1), (2, 3, D))
    out = oa(u, i)[..., 0]
    # every component logit is a cosine (|.| <= 1) or a dot of the given vectors: a convex
    # mixture stays within the min/max component
    dots = jnp.einsum("bd,bcd->bc", u[0], i)
    bound = jnp.maximum(1.0, jnp.abs(dots))
    assert (jnp.abs(out) <= bound + 1e-5).all()
