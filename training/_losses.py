"""Losses: in-batch sampled softmax with log-Q correction (two towers), OverArch losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def sampled_softmax_loss(user_emb: jax.Array, item_emb: jax.Array, item_rows: jax.Array,
                         log_q: jax.Array, labels: jax.Array, inv_temperature: jax.Array,
                         task_weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """In-batch sampled softmax, one per task.

    Row b of the batch is a positive (user b, item b); the other items of the batch are its
    negatives. Logits are `cos(u_t, i) * inv_temperature - log q(i)` (log-Q correction: the
    in-batch sampling probability q of an item is its share of training interactions; pass zeros
    to disable). Off-diagonal copies of row b's own item are masked (not negatives). A task's loss
    averages over the rows where its label is 1.

    Args:
      user_emb: f32[T, B, D]; item_emb: f32[B, D]; item_rows: i32[B]; log_q: f32[B];
      labels: f32[B, T]; inv_temperature: f32[]; task_weights: f32[T].
    Returns: (weighted total f32[], per-task losses f32[T]).
    """
    b = item_emb.shape[0]
    logits = jnp.einsum("tbd,cd->tbc", user_emb, item_emb) * inv_temperature - log_q[None, None]
    same = (item_rows[:, None] == item_rows[None, :]) & ~jnp.eye(b, dtype=bool)
    logits = jnp.where(same[None], -1e9, logits)
    logp = jnp.diagonal(logits, axis1=1, axis2=2) - jax.nn.logsumexp(logits, axis=-1)  # [T, B]
    w = labels.T
    per_task = -jnp.sum(w * logp, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return jnp.sum(task_weights * per_task) / jnp.sum(task_weights), per_task


def overarch_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                  listwise_weight: float, listwise_all_tasks: bool = False
                  ) -> tuple[jax.Array, jax.Array]:
    """Per-task sigmoid cross-entropy plus a listwise softmax term.

    Candidate 0 of every row is the positive; the others are negatives. The listwise term is a
    softmax over each row's candidates for task 0 (every row), or for every task t over the rows
    whose positive has label t = 1 (`listwise_all_tasks`).

    Args:
      logits: f32[B, C, T]; labels: f32[B, C, T]; weights: f32[B, C] (0 = ignore candidate).
    Returns: (total f32[], per-task BCE f32[T]).
    """
    bce = optax.sigmoid_binary_cross_entropy(logits, labels)           # [B, C, T]
    per_task = jnp.sum(bce * weights[..., None], axis=(0, 1)) / jnp.maximum(jnp.sum(weights), 1.0)
    lw = jnp.where(weights[..., None] > 0, logits, -1e9)                # [B, C, T]
    row = -(lw[:, 0] - jax.nn.logsumexp(lw, axis=1))                    # [B, T]
    if listwise_all_tasks:
        pos = labels[:, 0]                                              # [B, T]
        listwise = jnp.sum(jnp.sum(row * pos, 0) / jnp.maximum(jnp.sum(pos, 0), 1.0))
    else:
        listwise = jnp.mean(row[:, 0])
    return jnp.sum(per_task) + listwise_weight * listwise, per_task
