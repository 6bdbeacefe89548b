"""Training: two-tower phase, then OverArch phase on retrieved hard candidates; checkpoints.

With `overarch.holdout = k > 0`, the last k training interactions of every user are held out
of phase 1 and are the OverArch's positives in phase 2 (otherwise both phases use all training
interactions).

Phase 1 (steps [0, S1)): the towers learn with the in-batch sampled softmax (log-Q corrected),
AdamW. Phase 2 (steps [S1, S1 + S2)): towers frozen; item and user embeddings are computed once;
every user's top-`hard_pool` dot-product items (the towers' training items masked) form a
hard-candidate pool; each step takes a batch of positives, `num_hard` negatives from ranks
[`hard_rank_min`, `hard_pool`) of the user's pool and `num_random` uniform negatives, and fits the
OverArch with per-task sigmoid cross-entropy plus a listwise softmax term. Phase 3 (steps
[S1 + S2, S1 + S2 + S3), S3 = `overarch.refresh_steps`): OverArch frozen, the towers continue
(same AdamW state) on all training interactions, so they also learn every user's latest items.

Why the holdout: trained on the towers' own training items, the OverArch sees positives whose dot
products the towers memorised and "negatives" from the top of the pool that include the users'
future items; on MovieLens-100K that re-ranking helped the test split but hurt the validation
split. Training it on the next items the towers did not see mirrors its use at serving time.

Determinism: batch b of step s is drawn from numpy generators seeded by (seed, phase, s or epoch),
never from state carried across steps, so resuming from a checkpoint at step s reproduces the
uninterrupted run exactly. The hot loops are plain `jax.jit` functions over pure pytrees
(`nnx.merge` inside), not `nnx.jit`.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from training import _io
from training._config import TrainConfig
from training._data import Csr, Dataset, Interactions, _csr, load_dataset
from training._losses import overarch_loss, sampled_softmax_loss
from training._trained import Graphs, TrainedModel, build_modules, split_params
from training._value_model import ValueModel


class CheckpointMismatchError(RuntimeError):
    """`out_dir` holds checkpoints of a different configuration."""


class ModelNotFoundError(FileNotFoundError):
    """`load(out_dir)` found no trained model there."""


StepCallback = Callable[[int, dict], None]


def dataset_for(config: TrainConfig) -> Dataset:
    return load_dataset(config.data.name, config.data.synthetic)


# ---------------------------------------------------------------------------------------------
# jitted steps
# ---------------------------------------------------------------------------------------------

def _gather(features: dict, rows):
    return {k: v[rows] for k, v in features.items()}


def _optax_step(loss_fn, tx):
    """``jit(params, opt_state, *batch) -> (params, opt_state, loss, per_task)``: one Optax
    update of ``loss_fn(params, *batch) -> (loss, per_task)``."""

    @jax.jit
    def step(params, opt_state, *batch):
        (loss, per_task), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, per_task

    return step


def make_two_tower_step(graphs: Graphs, tx, task_weights: jax.Array, learn_temperature: bool):
    """jit(params, opt_state, user_feats, item_feats, log_q_all, users i32[B], items i32[B],
    labels f32[B, T]) -> (params, opt_state, loss f32[], per_task f32[T])."""

    def loss_fn(params, uf, itf, log_q_all, users, items, labels):
        u = nnx.merge(graphs.user_tower, params["user_tower"])(_gather(uf, users))
        i = nnx.merge(graphs.item_tower, params["item_tower"])(_gather(itf, items))
        t = params["log_inv_temperature"]
        if not learn_temperature:
            t = jax.lax.stop_gradient(t)
        inv_t = jnp.exp(jnp.clip(t, 0.0, jnp.log(100.0)))
        return sampled_softmax_loss(u, i, items, log_q_all[items], labels, inv_t, task_weights)

    return _optax_step(loss_fn, tx)


def make_overarch_step(graphs: Graphs, tx, listwise_weight: float,
                       listwise_all_tasks: bool = False):
    """jit(params, opt_state, user_emb f32[T, U, D], item_emb f32[N, D], users i32[B],
    cands i32[B, C], labels f32[B, C, T], weights f32[B, C]) -> (params, opt_state, loss, per_task)."""

    def loss_fn(params, user_emb, item_emb, users, cands, labels, weights):
        logits = nnx.merge(graphs.overarch, params)(user_emb[:, users], item_emb[cands])
        return overarch_loss(logits, labels, weights, listwise_weight, listwise_all_tasks)

    return _optax_step(loss_fn, tx)


@functools.lru_cache(maxsize=16)
def _two_tower_step_cached(graphs, lr, wd, task_weights, learn_temperature):
    return make_two_tower_step(graphs, optax.adamw(lr, weight_decay=wd),
                               jnp.asarray(task_weights, jnp.float32), learn_temperature)


def _overarch_tx(lr: float, decay_steps: int):
    """AdamW; with ``decay_steps > 0`` the learning rate follows a cosine from ``lr`` to 0 over
    that many steps."""
    if decay_steps > 0:
        lr = optax.cosine_decay_schedule(lr, decay_steps)
    return optax.adamw(lr, weight_decay=1e-4)


@functools.lru_cache(maxsize=16)
def _overarch_step_cached(graphs, lr, decay_steps, listwise_weight, listwise_all_tasks=False):
    return make_overarch_step(graphs, _overarch_tx(lr, decay_steps), listwise_weight,
                              listwise_all_tasks)


def two_tower_optimizer(config: TrainConfig):
    return optax.adamw(config.learning_rate, weight_decay=config.weight_decay)


def overarch_optimizer(config: TrainConfig):
    oa = config.overarch
    return _overarch_tx(oa.learning_rate, oa.steps if oa.cosine_decay else 0)



# ---------------------------------------------------------------------------------------------
# deterministic batches
# ---------------------------------------------------------------------------------------------

class _EpochBatches:
    """Batch of step s = rows of a per-epoch permutation seeded by (seed, phase, epoch)."""

    def __init__(self, n: int, batch: int, seed: int, phase: int = 1):
        self.n, self.batch, self.seed, self.phase = n, min(batch, n), seed, phase
        self.per_epoch = max(1, n // self.batch)
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, self.phase, epoch]).permutation(self.n)
            self._epoch = epoch
        return self._perm[j * self.batch:(j + 1) * self.batch]


@functools.partial(jax.jit, static_argnames="k")
def _masked_topk(u, items, mask, k):
    return jax.lax.top_k(jnp.where(mask, -jnp.inf, u @ items.T), k)[1]


def overarch_holdout(train: Interactions, num_users: int, holdout: int) -> np.ndarray:
    """bool[E]: True for the last `holdout` training interactions of each user in (timestamp,
    item) order, at most all but the user's first one (every user keeps a tower interaction).

    Args: train: the E training interactions (any row order); num_users: U; holdout: >= 0.
    """
    n = len(train)
    if holdout <= 0 or n == 0:
        return np.zeros(n, bool)
    order = np.lexsort((train.item, train.timestamp, train.user))
    users = train.user[order]
    counts = np.bincount(users, minlength=num_users)
    pos = np.arange(n) - (np.cumsum(counts) - counts)[users]          # rank within the user
    from_end = counts[users] - 1 - pos
    out = np.zeros(n, bool)
    out[order] = from_end < np.minimum(holdout, counts[users] - 1)
    return out


def hard_candidate_pool(user_emb: np.ndarray, item_emb: np.ndarray, seen: Csr, pool: int,
                        chunk: int = 4096) -> np.ndarray:
    """i32[U, H]: each user's top-H items by task-0 dot product, `seen` items masked.

    Args: user_emb f32[T, U, D]; item_emb f32[N, D]; seen: per-user items to mask; pool: H
    (capped at N).
    """
    num_users, num_items = user_emb.shape[1], item_emb.shape[0]
    h = min(pool, num_items)
    items = jnp.asarray(item_emb)
    topk = functools.partial(_masked_topk, k=h)
    out = []
    for s in range(0, num_users, chunk):
        rows = np.arange(s, min(s + chunk, num_users))
        mask = seen.dense_mask(rows, num_items)
        out.append(np.asarray(topk(jnp.asarray(user_emb[0, rows]), items, jnp.asarray(mask))))
    return np.concatenate(out).astype(np.int32)


class _OverArchBatches:
    """Batch of OverArch step s, seeded by (seed, 2, s): positives + pool / uniform negatives.

    Positives are drawn uniformly from `positives`; hard negatives from pool ranks
    [cfg.hard_rank_min, H); negatives that are training items of the user get weight 0.
    """

    def __init__(self, dataset: Dataset, positives: Interactions, pool: np.ndarray, cfg,
                 seed: int):
        self.d, self.pos, self.pool, self.cfg, self.seed = dataset, positives, pool, cfg, seed
        tr = dataset.train
        self.keys = np.unique(tr.user.astype(np.int64) * dataset.num_items + tr.item)

    def __call__(self, step: int):
        """-> users i32[B], cands i32[B, C] (column 0 = positive), labels f32[B, C, T],
        weights f32[B, C]."""
        c, d, tr = self.cfg, self.d, self.pos
        rng = np.random.default_rng([self.seed, 2, step])
        b = min(c.batch_size, len(tr))
        pos = rng.integers(0, len(tr), size=b)
        users, items = tr.user[pos], tr.item[pos]
        lo = min(c.hard_rank_min, self.pool.shape[1] - 1)
        hard = self.pool[users[:, None], rng.integers(lo, self.pool.shape[1], size=(b, c.num_hard))]
        rand = rng.integers(0, d.num_items, size=(b, c.num_random))
        cands = np.concatenate([items[:, None], hard, rand], axis=1).astype(np.int32)
        keys = users[:, None].astype(np.int64) * d.num_items + cands
        is_pos = np.isin(keys, self.keys)
        weights = np.where(is_pos[:, 1:], 0.0, 1.0)                 # drop false negatives
        weights = np.concatenate([np.ones((b, 1)), weights], axis=1).astype(np.float32)
        labels = np.zeros((b, cands.shape[1], len(d.tasks)), np.float32)
        labels[:, 0] = tr.labels[pos]
        return users.astype(np.int32), cands, labels, weights


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------

class _Progress:
    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.t0, self.s0 = time.perf_counter(), initial

    def update(self, step: int, n: int, phase: str, loss: float, examples_per_step: int):
        if self.bar is None:
            return
        self.bar.update(n)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(phase=phase, loss=f"{loss:.4f}",
                             **{"ex/s": f"{(step + 1 - self.s0) * examples_per_step / dt:,.0f}"})

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train(config: TrainConfig, *, dataset: Dataset | None = None,
          callback: StepCallback | None = None) -> TrainedModel:
    """Trains towers then OverArch; resumes from `config.out_dir` checkpoints when present.

    Args:
      config: the TrainConfig.
      dataset: an already loaded dataset matching `config.data` (optional, saves a reload).
      callback: called as `callback(step, metrics)` after every step (`metrics` holds `phase`
        and, every `log_every` steps, `loss`); an exception raised there stops training (the
        checkpoints written so far stay, so a later `train` call resumes).
    Returns: the TrainedModel (also written to `out_dir/model` with `config.json`).
    Raises:
      CheckpointMismatchError: `out_dir` has checkpoints from a different configuration.
      CorruptModelError: every step checkpoint in `out_dir` is damaged (a damaged newest one
        is moved to `out_dir/damaged_checkpoints/` with a RuntimeWarning, and training
        resumes from the one before).
    """
    ds = dataset if dataset is not None else dataset_for(config)
    vm = ValueModel.parse(config.value_formula, ds.tasks)
    tt, oa = build_modules(ds, config)
    graphs, params = split_params(tt, oa)
    tw = np.asarray(config.tower.task_weights or (1.0,) * len(ds.tasks), np.float32)
    if tw.shape != (len(ds.tasks),):
        raise ValueError(f"tower.task_weights needs {len(ds.tasks)} values (tasks {ds.tasks}), "
                         f"got {config.tower.task_weights}")
    tx_tt, tx_oa = two_tower_optimizer(config), overarch_optimizer(config)
    tt_keys = ("user_tower", "item_tower", "log_inv_temperature")
    state = {"tt_params": {k: params[k] for k in tt_keys}, "tt_opt": None,
             "oa_params": params.get("overarch"), "oa_opt": None}
    state["tt_opt"] = tx_tt.init(state["tt_params"])
    if oa is not None:
        state["oa_opt"] = tx_oa.init(state["oa_params"])
    s1 = config.steps
    s2 = config.overarch.steps if oa is not None else 0
    total = s1 + s2
    s3 = config.overarch.refresh_steps if oa is not None else 0
    total3 = total + s3

    mngr, start = None, 0
    if config.out_dir:
        os.makedirs(config.out_dir, exist_ok=True)
        cfg_path = os.path.join(config.out_dir, "config.json")
        if os.path.exists(cfg_path):
            old = TrainConfig.from_json(_io.read_json(cfg_path))
            if old.training_fingerprint() != config.training_fingerprint():
                raise CheckpointMismatchError(
                    f"{config.out_dir} holds a run with a different configuration; use another "
                    f"--out directory or delete it (differences: "
                    f"{_diff(old.training_fingerprint(), config.training_fingerprint())})")
        _io.write_json_atomic(cfg_path, config.to_json())
        ckpt_dir = os.path.abspath(os.path.join(config.out_dir, "checkpoints"))
        mngr = ocp.CheckpointManager(
            ckpt_dir,
            options=ocp.CheckpointManagerOptions(max_to_keep=config.max_to_keep, create=True))
        latest, flat = _io.restore_latest_good(
            mngr, ckpt_dir, os.path.join(os.path.abspath(config.out_dir), "damaged_checkpoints"))
        if latest is not None:
            tmpl = {k: v for k, v in state.items() if v is not None}
            restored = _io.unflatten(tmpl, flat)
            state.update(restored)
            start = latest

    def save(step):
        if mngr is not None:
            _io.save_step(mngr, ckpt_dir, step,
                          _io.flatten({k: v for k, v in state.items() if v is not None}))

    ds_j = {"uf": {k: jnp.asarray(v) for k, v in ds.user_features.items()},
            "itf": {k: jnp.asarray(v) for k, v in ds.item_features.items()}}
    held = overarch_holdout(ds.train, ds.num_users, config.overarch.holdout if oa is not None
                            else 0)
    tower_train = ds.train.take(~held)                        # phase 1 trains on these
    oa_positives = ds.train.take(held) if held.any() else ds.train    # phase 2 positives

    def log_q_of(pop: np.ndarray) -> jax.Array:
        """f32[N] log sampling probability of each item (zeros without log-Q correction)."""
        if not config.tower.logq_correction:
            return jnp.zeros(pop.shape, jnp.float32)
        return jnp.asarray(np.log(np.maximum(pop, 1.0) / max(pop.sum(), 1.0)), jnp.float32)

    log_q = log_q_of(np.bincount(tower_train.item, minlength=ds.num_items).astype(np.float32))
    progress = _Progress(total3, start, config.progress)
    history = []
    try:
        step_fn_tt = None
        if start < s1 or (start < total3 and s3 > 0):
            step_fn_tt = _two_tower_step_cached(graphs, config.learning_rate,
                                                config.weight_decay, tuple(float(x) for x in tw),
                                                config.tower.learn_temperature)

        def after_step(s: int, offset: int, last: int, name: str, loss, per_task,
                       examples: int) -> None:
            """Log, progress bar, checkpoint and callback after run step ``s`` (0-based) of
            a phase spanning steps [offset, last); the state holds the step's parameters."""
            m = {"phase": name}
            k = s + 1 - offset
            if k % config.log_every == 0 or s + 1 == last:
                m["loss"] = float(loss)
                m["per_task"] = {t: float(x) for t, x in zip(ds.tasks, per_task)}
                history.append({"step": s + 1, **m})
                progress.update(s, config.log_every if k % config.log_every == 0
                                else k % config.log_every, name, m["loss"], examples)
            if (s + 1) % config.checkpoint_every == 0 or s + 1 == last:
                save(s + 1)
            if callback is not None:
                callback(s + 1, m)

        def tower_phase(first: int, last: int, offset: int, tr, lq, batches, name: str):
            """Two-tower steps [first, last) of the run (batch `s - offset` of `batches`)."""
            p, o = state["tt_params"], state["tt_opt"]
            for s in range(first, last):
                idx = batches(s - offset)
                p, o, loss, per_task = step_fn_tt(p, o, ds_j["uf"], ds_j["itf"], lq,
                                                  jnp.asarray(tr.user[idx]),
                                                  jnp.asarray(tr.item[idx]),
                                                  jnp.asarray(tr.labels[idx]))
                state["tt_params"], state["tt_opt"] = p, o
                after_step(s, offset, last, name, loss, per_task, len(idx))

        # ---- phase 1: two towers (without the OverArch holdout)
        if start < s1:
            tower_phase(start, s1, 0, tower_train, log_q,
                        _EpochBatches(len(tower_train), config.batch_size, config.seed),
                        "two_tower")
        # ---- phase 2: OverArch on frozen embeddings
        if oa is not None and start < total and s2 > 0:
            tmp = TrainedModel(config, ds, graphs, {**state["tt_params"],
                                                    "overarch": state["oa_params"]}, vm)
            item_emb = tmp.item_embeddings()
            user_emb = tmp.users_embeddings_by_row(np.arange(ds.num_users))
            seen = _csr(tower_train.user, tower_train.item, ds.num_users)
            pool = hard_candidate_pool(user_emb, item_emb, seen, config.overarch.hard_pool)
            batches = _OverArchBatches(ds, oa_positives, pool, config.overarch, config.seed)
            step_fn = _overarch_step_cached(graphs, config.overarch.learning_rate,
                                            s2 if config.overarch.cosine_decay else 0,
                                            config.overarch.listwise_weight,
                                            config.overarch.listwise_all_tasks)
            ue, ie = jnp.asarray(user_emb), jnp.asarray(item_emb)
            p, o = state["oa_params"], state["oa_opt"]
            for s in range(max(start, s1), total):
                users, cands, labels, weights = batches(s - s1)
                p, o, loss, per_task = step_fn(p, o, ue, ie, jnp.asarray(users),
                                               jnp.asarray(cands), jnp.asarray(labels),
                                               jnp.asarray(weights))
                state["oa_params"], state["oa_opt"] = p, o
                after_step(s, s1, total, "overarch", loss, per_task, cands.size)
        # ---- phase 3: towers refreshed on all training interactions, OverArch frozen
        if s3 > 0 and start < total3:
            tower_phase(max(start, total), total3, total, ds.train,
                        log_q_of(ds.item_popularity()),
                        _EpochBatches(len(ds.train), config.batch_size, config.seed, phase=3),
                        "tower_refresh")
    finally:
        progress.close()
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()

    final = {**state["tt_params"]}
    if state["oa_params"] is not None:
        final["overarch"] = state["oa_params"]
    model = TrainedModel(config, ds, graphs, final, vm)
    if config.out_dir:
        _io.save_tree(os.path.join(config.out_dir, "model"), final)
        _io.write_json_atomic(os.path.join(config.out_dir, "train_log.json"),
                              {"history": history, "dataset": ds.summary()})
        if config.evaluate_at_end:
            from training._evaluate import evaluate
            _io.write_json_atomic(os.path.join(config.out_dir, "metrics.json"),
                                  evaluate(model, ds))
    return model


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def load(out_dir: str, *, dataset: Dataset | None = None) -> TrainedModel:
    """Loads what `train` (or `st-jax train`) wrote to `out_dir`.

    Raises: ModelNotFoundError when `out_dir` holds no finished model.
    """
    cfg_path = os.path.join(out_dir, "config.json")
    model_path = os.path.join(out_dir, "model")
    if not (os.path.exists(cfg_path) and os.path.isdir(model_path)):
        raise ModelNotFoundError(
            f"no trained model in {out_dir!r} (expected config.json and model/); train one with "
            f"`st-jax train --out {out_dir}` or training.train(config)")
    config = TrainConfig.from_json(_io.read_json(cfg_path))
    ds = dataset if dataset is not None else dataset_for(config)
    tt, oa = build_modules(ds, config)
    graphs, params = split_params(tt, oa)
    params = _io.unflatten(params, _io.load_flat(model_path))
    return TrainedModel(config, ds, graphs, params, ValueModel.parse(config.value_formula,
                                                                     ds.tasks))
