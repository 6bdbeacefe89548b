"""Flax NNX modules: feature embedder, user tower (multi-task), item tower, OverArch (MLP, MoL).

Every module holds only `nnx.Param` variables, so `nnx.split(module)` gives a (graphdef, state)
pair whose state converts to a plain pytree with `nnx.to_pure_dict`; `nnx.merge(graphdef,
pure_dict)` rebuilds the module inside `jax.jit` (see `training._apply`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from training._schema import FeatureKind, FeatureSpec


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / max(|x|, eps) along the last axis."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """Two-tower sizes and loss settings.

    Attributes:
      embed_dim: width of every feature embedding table.
      user_hidden: hidden widths of each task head of the user tower.
      item_hidden: hidden widths of the item tower MLP.
      out_dim: D, the embedding width shared by user and item towers.
      temperature: initial softmax temperature (logits = cos / temperature).
      learn_temperature: learn the temperature (clipped to [0.01, 1]) or keep it fixed.
      logq_correction: subtract log q(item) from in-batch logits (sampling-bias correction).
      task_weights: loss weight per task (empty = all 1).
    """

    embed_dim: int = 64
    user_hidden: tuple[int, ...] = (128,)
    item_hidden: tuple[int, ...] = (128,)
    out_dim: int = 64
    temperature: float = 0.1
    learn_temperature: bool = True
    logq_correction: bool = True
    task_weights: tuple[float, ...] = ()


class FeatureEmbedder(nnx.Module):
    """Feature dict -> f32[B, F]: one table per embedded feature (multi-valued: masked mean),
    numeric features through one linear layer; all parts concatenated."""

    def __init__(self, specs: Sequence[FeatureSpec], embed_dim: int, *, rngs: nnx.Rngs):
        self.specs = tuple(specs)
        init = nnx.initializers.normal(stddev=0.1)
        self.tables = nnx.Dict({
            s.name: nnx.Embed(s.cardinality, embed_dim, embedding_init=init, rngs=rngs)
            for s in self.specs if s.embedded})
        self.numeric_names = tuple(s.name for s in self.specs if not s.embedded)
        self.numeric = (nnx.Linear(len(self.numeric_names), embed_dim, rngs=rngs)
                        if self.numeric_names else None)
        self.out_dim = embed_dim * (len(self.tables) + (1 if self.numeric_names else 0))

    def __call__(self, features: Mapping[str, jax.Array]) -> jax.Array:
        parts = []
        for s in self.specs:  # static loop over the schema's fields, not over data
            if not s.embedded:
                continue
            x = jnp.asarray(features[s.name])
            e = self.tables[s.name](x)
            if s.kind is FeatureKind.MULTI:
                m = (x > 0).astype(e.dtype)[..., None]
                e = jnp.sum(e * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1.0)
            parts.append(e)
        if self.numeric is not None:
            num = jnp.stack([jnp.asarray(features[n], jnp.float32) for n in self.numeric_names],
                            axis=-1)
            parts.append(self.numeric(num))
        return jnp.concatenate(parts, axis=-1)


class TaskMLP(nnx.Module):
    """T independent MLPs applied to one shared input, batched over tasks (no loop over tasks).

    x: f32[B, I] -> f32[T, B, O]. Weights of layer l: f32[T, I_l, O_l].
    """

    def __init__(self, num_tasks: int, in_dim: int, widths: Sequence[int], *, rngs: nnx.Rngs):
        dims = (in_dim, *widths)
        init = nnx.initializers.lecun_normal()
        self.kernels = nnx.List([
            nnx.Param(jax.vmap(lambda k, a=a, b=b: init(k, (a, b)))(
                jax.random.split(rngs.params(), num_tasks)))
            for a, b in zip(dims[:-1], dims[1:])])
        self.biases = nnx.List([nnx.Param(jnp.zeros((num_tasks, b))) for b in dims[1:]])

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.einsum("bi,tio->tbo", x, self.kernels[0][...]) + self.biases[0][...][:, None]
        for w, b in zip(list(self.kernels)[1:], list(self.biases)[1:]):
            h = jnp.einsum("tbi,tio->tbo", jax.nn.gelu(h), w[...]) + b[...][:, None]
        return h


class MLP(nnx.Module):
    """Dense stack with GELU between layers (none after the last): f32[..., I] -> f32[..., O]."""

    def __init__(self, in_dim: int, widths: Sequence[int], *, rngs: nnx.Rngs):
        dims = (in_dim, *widths)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            if i:
                x = jax.nn.gelu(x)
            x = layer(x)
        return x


class UserTower(nnx.Module):
    """Shared embedding tables -> one MLP head per task -> L2-normalised f32[T, B, D]."""

    def __init__(self, specs: Sequence[FeatureSpec], num_tasks: int, cfg: TowerConfig, *,
                 rngs: nnx.Rngs):
        self.embedder = FeatureEmbedder(specs, cfg.embed_dim, rngs=rngs)
        self.heads = TaskMLP(num_tasks, self.embedder.out_dim, (*cfg.user_hidden, cfg.out_dim),
                             rngs=rngs)

    def __call__(self, features: Mapping[str, jax.Array]) -> jax.Array:
        return l2_normalize(self.heads(self.embedder(features)))


class ItemTower(nnx.Module):
    """Id + attribute embeddings -> MLP -> L2-normalised f32[N, D] (shared by all tasks)."""

    def __init__(self, specs: Sequence[FeatureSpec], cfg: TowerConfig, *, rngs: nnx.Rngs):
        self.embedder = FeatureEmbedder(specs, cfg.embed_dim, rngs=rngs)
        self.mlp = MLP(self.embedder.out_dim, (*cfg.item_hidden, cfg.out_dim), rngs=rngs)

    def __call__(self, features: Mapping[str, jax.Array]) -> jax.Array:
        return l2_normalize(self.mlp(self.embedder(features)))


class TwoTower(nnx.Module):
    """User tower + item tower + (log) inverse temperature."""

    def __init__(self, user_specs, item_specs, num_tasks: int, cfg: TowerConfig, *,
                 rngs: nnx.Rngs):
        self.user_tower = UserTower(user_specs, num_tasks, cfg, rngs=rngs)
        self.item_tower = ItemTower(item_specs, cfg, rngs=rngs)
        self.log_inv_temperature = nnx.Param(jnp.asarray(-jnp.log(cfg.temperature), jnp.float32))
        self.learn_temperature = cfg.learn_temperature

    def inv_temperature(self) -> jax.Array:
        t = self.log_inv_temperature[...]
        if not self.learn_temperature:
            t = jax.lax.stop_gradient(t)
        return jnp.exp(jnp.clip(t, 0.0, jnp.log(100.0)))


# ---------------------------------------------------------------------------------------------
# OverArch: user embeddings f32[T, B, D], candidate item embeddings f32[B, C, D] -> f32[B, C, T]
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OverArchConfig:
    """OverArch architecture and its training recipe.

    Attributes:
      kind: "mol" (Mixture of Logits), "mlp", or "none" (no OverArch; dot product only).
      hidden: hidden widths of the MLP (kind "mlp") or of the gating network (kind "mol").
      user_components / item_components / component_dim: MoL P x Q embedding pairs of width Dc.
      steps: training steps (towers frozen); batch_size: positives per step.
      learning_rate: AdamW learning rate (weight decay 1e-4).
      cosine_decay: the learning rate decays to 0 along a cosine over the `steps` (False: it
        stays constant). At a constant rate the re-ranking quality of the last step swings by
        several points of Recall@20 from one hundred steps to the next; the decay settles it.
      hard_pool: the top-`hard_pool` dot-product items per user form the hard-candidate pool.
      hard_rank_min: hard negatives are drawn from the pool ranks [hard_rank_min, hard_pool)
        (0: the whole pool; larger values skip the very top, where the user's future positives
        concentrate).
      num_hard / num_random: negatives per positive drawn from the pool / uniformly.
      holdout: the last `holdout` training interactions of every user (time order; at most all
        but one) are kept from the two towers and are the OverArch's positives, with the pool
        retrieved by the towers with only the earlier items masked, as at serving time, where
        the OverArch re-ranks retrieved candidates for the user's *next* item. 0: the towers
        see all training interactions and the OverArch trains on them too.
      refresh_steps: after the OverArch phase, the towers train this many more steps on all
        training interactions (the holdout included; OverArch frozen), so the served towers
        know every user's latest items; a short refresh keeps the embeddings close to those the
        OverArch was trained on.
      listwise_weight: weight of the softmax loss over [positive, negatives] added to the
        per-task binary cross-entropy.
      listwise_all_tasks: the listwise term for every task (rows whose positive has the task's
        label) instead of the first task only.
      rerank_top: how many dot-product candidates the OverArch re-scores at evaluation.
    """

    kind: str = "mol"
    hidden: tuple[int, ...] = (128, 64)
    user_components: int = 4
    item_components: int = 4
    component_dim: int = 32
    steps: int = 1500
    batch_size: int = 256
    learning_rate: float = 2e-3
    cosine_decay: bool = True
    hard_pool: int = 200
    hard_rank_min: int = 0
    num_hard: int = 16
    num_random: int = 16
    listwise_weight: float = 1.0
    listwise_all_tasks: bool = False
    rerank_top: int = 200
    holdout: int = 10
    refresh_steps: int = 500

    def __post_init__(self):
        if self.kind not in ("mol", "mlp", "none"):
            raise ValueError(f"OverArchConfig.kind must be 'mol', 'mlp' or 'none', got "
                             f"{self.kind!r}")
        for name in ("hard_pool", "batch_size", "rerank_top"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"OverArchConfig.{name} must be a positive int, got {v!r}")
        for name in ("hard_rank_min", "num_hard", "num_random", "holdout", "refresh_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"OverArchConfig.{name} must be an int >= 0, got {v!r}")
        if not isinstance(self.cosine_decay, bool):
            raise ValueError(f"OverArchConfig.cosine_decay must be a bool, got "
                             f"{self.cosine_decay!r}")
        if self.hard_rank_min >= self.hard_pool:
            raise ValueError(f"OverArchConfig.hard_rank_min ({self.hard_rank_min}) must be < "
                             f"hard_pool ({self.hard_pool})")


def _pair_inputs(user_emb: jax.Array, item_emb: jax.Array):
    """u: f32[T, B, D], i: f32[B, C, D] -> (u f32[B, T, D], None, dots f32[B, C, T])."""
    if user_emb.ndim != 3 or item_emb.ndim != 3 or user_emb.shape[1] != item_emb.shape[0] \
            or user_emb.shape[2] != item_emb.shape[2]:
        raise ValueError(f"OverArch needs user_emb f32[T, B, D] and item_emb f32[B, C, D], got "
                         f"{user_emb.shape} and {item_emb.shape}")
    u = jnp.transpose(user_emb, (1, 0, 2))                       # [B, T, D]
    dots = jnp.einsum("btd,bcd->bct", u, item_emb)                # [B, C, T]
    return u, None, dots


class MLPOverArch(nnx.Module):
    """logit_t = MLP([u_1..u_T, i, u_t * i, u_t . i])_t + a_t * (u_t . i) + b_t."""

    def __init__(self, num_tasks: int, dim: int, cfg: OverArchConfig, *, rngs: nnx.Rngs):
        h0 = cfg.hidden[0] if cfg.hidden else num_tasks
        # first layer split by input: the user part runs once per user, not per pair
        self.first_user = nnx.Linear(num_tasks * dim, h0, rngs=rngs)
        self.first_pair = nnx.Linear(num_tasks * dim + dim + num_tasks, h0, use_bias=False,
                                     rngs=rngs)
        self.mlp = MLP(h0, (*cfg.hidden[1:], num_tasks), rngs=rngs) if cfg.hidden else None
        self.dot_scale = nnx.Param(jnp.full((num_tasks,), 5.0))
        self.bias = nnx.Param(jnp.zeros((num_tasks,)))

    def __call__(self, user_emb: jax.Array, item_emb: jax.Array) -> jax.Array:
        u, _, dots = _pair_inputs(user_emb, item_emb)
        b, c, t = dots.shape
        prod = (u[:, None] * item_emb[:, :, None]).reshape(b, c, -1)   # [B, C, T*D]
        h = self.first_user(u.reshape(b, 1, -1)) + self.first_pair(
            jnp.concatenate([item_emb, prod, dots], axis=-1))
        h = self.mlp(jax.nn.gelu(h)) if self.mlp is not None else h
        return h + self.dot_scale[...] * dots + self.bias[...]


class MoLOverArch(nnx.Module):
    """Mixture of Logits.

    P user component embeddings (from all task embeddings) and Q item component embeddings give
    P*Q cosine logits; the T task dot products are T more components. A gating MLP over
    [user, item, component logits] outputs, per task, softmax weights over the K = P*Q + T
    components: logit_t = s_t * sum_k g_tk * l_k + b_t.
    """

    def __init__(self, num_tasks: int, dim: int, cfg: OverArchConfig, *, rngs: nnx.Rngs):
        p, q, dc = cfg.user_components, cfg.item_components, cfg.component_dim
        self.p, self.q, self.dc, self.t = p, q, dc, num_tasks
        self.user_proj = nnx.Linear(num_tasks * dim, p * dc, rngs=rngs)
        self.item_proj = nnx.Linear(dim, q * dc, rngs=rngs)
        k = p * q + num_tasks
        h0 = cfg.hidden[0] if cfg.hidden else num_tasks * k
        # first gate layer split by input so the user part runs once per user, not per pair
        self.gate_user = nnx.Linear(num_tasks * dim, h0, rngs=rngs)
        self.gate_item = nnx.Linear(dim, h0, use_bias=False, rngs=rngs)
        self.gate_logits = nnx.Linear(k, h0, use_bias=False, rngs=rngs)
        self.gate = MLP(h0, (*cfg.hidden[1:], num_tasks * k), rngs=rngs) if cfg.hidden else None
        self.scale = nnx.Param(jnp.full((num_tasks,), 5.0))
        self.bias = nnx.Param(jnp.zeros((num_tasks,)))

    def __call__(self, user_emb: jax.Array, item_emb: jax.Array) -> jax.Array:
        u, _, dots = _pair_inputs(user_emb, item_emb)
        b, c, t = dots.shape
        uc = l2_normalize(self.user_proj(u.reshape(b, -1)).reshape(b, self.p, self.dc))
        ic = l2_normalize(self.item_proj(item_emb).reshape(b, c, self.q, self.dc))
        comp = jnp.einsum("bpd,bcqd->bcpq", uc, ic).reshape(b, c, self.p * self.q)
        logits = jnp.concatenate([comp, dots], axis=-1)                 # [B, C, K]
        h = (self.gate_user(u.reshape(b, 1, -1)) + self.gate_item(item_emb)
             + self.gate_logits(logits))
        g = self.gate(jax.nn.gelu(h)) if self.gate is not None else h
        g = jax.nn.softmax(g.reshape(b, c, t, -1), axis=-1)             # [B, C, T, K]
        mixed = jnp.einsum("bctk,bck->bct", g, logits)
        return self.scale[...] * mixed + self.bias[...]


def make_overarch(num_tasks: int, dim: int, cfg: OverArchConfig, *, rngs: nnx.Rngs):
    """Builds the OverArch named by `cfg.kind` (None for "none")."""
    if cfg.kind == "none":
        return None
    cls = MoLOverArch if cfg.kind == "mol" else MLPOverArch
    return cls(num_tasks, dim, cfg, rngs=rngs)
