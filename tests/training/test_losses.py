import jax.numpy as jnp
import numpy as np

from training import overarch_loss, sampled_softmax_loss


def _reference(u, i, rows, log_q, labels, inv_t, w):
    t, b, _ = u.shape
    per = []
    for tt in range(t):
        losses, n = 0.0, 0
        for r in range(b):
            if labels[r, tt] == 0:
                continue
            logits = [(u[tt, r] @ i[c]) * inv_t - log_q[c] for c in range(b)
                      if c == r or rows[c] != rows[r]]
            pos = (u[tt, r] @ i[r]) * inv_t - log_q[r]
            losses += -(pos - np.log(np.sum(np.exp(logits))))
            n += 1
        per.append(losses / max(n, 1))
    per = np.array(per)
    return (w * per).sum() / w.sum(), per


def test_sampled_softmax_matches_reference():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(2, 6, 4)).astype(np.float32)
    i = rng.normal(size=(6, 4)).astype(np.float32)
    rows = np.array([0, 1, 2, 1, 3, 4])                   # item 1 twice: not its own negative
    log_q = np.log(rng.random(6) + 0.1).astype(np.float32)
    labels = np.stack([np.ones(6), [1, 0, 1, 1, 0, 0]], 1).astype(np.float32)
    w = np.array([1.0, 0.5], np.float32)
    total, per = sampled_softmax_loss(jnp.asarray(u), jnp.asarray(i), jnp.asarray(rows),
                                      jnp.asarray(log_q), jnp.asarray(labels), 3.0,
                                      jnp.asarray(w))
    ref_total, ref_per = _reference(u, i, rows, log_q, labels, 3.0, w)
    np.testing.assert_allclose(per, ref_per, rtol=1e-5)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)


def test_logq_correction_favours_rare_items_less():
    """With log-Q, a popular in-batch negative is penalised less (its logit is lowered)."""
    u = jnp.ones((1, 2, 2)) / jnp.sqrt(2.0)
    i = jnp.ones((2, 2)) / jnp.sqrt(2.0)
    labels = jnp.ones((2, 1))
    no_q, _ = sampled_softmax_loss(u, i, jnp.array([0, 1]), jnp.zeros(2), labels, 1.0,
                                   jnp.ones(1))
    q, _ = sampled_softmax_loss(u, i, jnp.array([0, 1]), jnp.log(jnp.array([0.9, 0.1])),
                                labels, 1.0, jnp.ones(1))
    np.testing.assert_allclose(no_q, np.log(2.0), rtol=1e-6)
    assert not np.isclose(q, no_q)


def test_overarch_loss_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 4, 2)).astype(np.float32)
    labels = np.zeros((3, 4, 2), np.float32)
    labels[:, 0, 0] = 1
    labels[:, 0, 1] = [1, 0, 1]
    weights = np.ones((3, 4), np.float32)
    weights[1, 2] = 0
    total, per = overarch_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights),
                               0.5)
    z, y = logits, labels
    bce = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    ref_per = (bce * weights[..., None]).sum((0, 1)) / weights.sum()
    lw = np.where(weights > 0, logits[..., 0], -1e9)
    lse = np.log(np.exp(lw - lw.max(1, keepdims=True)).sum(1)) + lw.max(1)
    ref = ref_per.sum() + 0.5 * np.mean(-(lw[:, 0] - lse))
    np.testing.assert_allclose(per, ref_per, rtol=1e-5)
    np.testing.assert_allclose(total, ref, rtol=1e-5)


def test_overarch_listwise_all_tasks_uses_rows_with_the_label():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 4, 2)).astype(np.float32)
    labels = np.zeros((3, 4, 2), np.float32)
    labels[:, 0, 0] = 1
    labels[:, 0, 1] = [1, 0, 0]
    weights = np.ones((3, 4), np.float32)
    bce_only, per = overarch_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights),
                                  0.0, True)
    total, _ = overarch_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights),
                             1.0, True)

    def row_loss(z):
        return -(z[0] - np.log(np.exp(z).sum()))

    lw0 = np.mean([row_loss(logits[b, :, 0]) for b in range(3)])
    lw1 = row_loss(logits[0, :, 1])                     # only row 0 is liked
    np.testing.assert_allclose(total - bce_only, lw0 + lw1, rtol=1e-5)
