"""Disk I/O: atomic JSON, Orbax trees keyed by flat path strings (robust to int keys and optax
namedtuples: the template tree gives the structure back on restore)."""

from __future__ import annotations

import json
import os
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from st_jax._atomic import file_record_problem, record_path, write_file_record
from st_jax._atomic import write_json_atomic  # noqa: F401  (re-exported)


class CorruptModelError(RuntimeError):
    """A saved model's files are damaged, truncated or missing (retrain, or restore them)."""


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _key(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(parts) or "_root"


def flatten(tree) -> dict[str, np.ndarray]:
    """pytree -> {path string: np.ndarray} (None leaves dropped)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_key(p): np.asarray(v) for p, v in leaves}


def unflatten(template, flat: dict) -> object:
    """Inverse of `flatten`, given a tree with the same structure (leaves replaced)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    missing = [_key(p) for p, _ in leaves if _key(p) not in flat]
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} arrays, e.g. {missing[:3]}")
    out = []
    for p, t in leaves:
        v = np.asarray(flat[_key(p)])
        if np.shape(t) != v.shape:
            raise ValueError(f"checkpoint array {_key(p)} has shape {v.shape}, "
                             f"the model expects {np.shape(t)}")
        out.append(jax.numpy.asarray(v, dtype=np.asarray(t).dtype if hasattr(t, "dtype") else None))
    return jax.tree_util.tree_unflatten(treedef, out)


def save_tree(path: str, tree) -> None:
    """Saves one pytree with Orbax (atomic: Orbax writes a temporary directory and renames),
    then records the size and sha256 of its files beside it (``path + ".files.json"``; an
    older record is removed first, so a crash mid-way leaves no stale one)."""
    if os.path.exists(record_path(path)):
        os.remove(record_path(path))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(path), flatten(tree), force=True)
    ckptr.wait_until_finished()
    ckptr.close()
    write_file_record(path)


def load_flat(path: str) -> dict[str, np.ndarray]:
    """Restores a tree saved by :func:`save_tree` as ``{path string: array}``; its files are
    checked against their record first (damaged files never reach Orbax).

    Raises:
      CorruptModelError: the files differ from what was saved, or Orbax cannot read them.
    """
    problem = file_record_problem(path)
    if problem:
        raise CorruptModelError(f"the model files in {path!r} are not the ones saved "
                                f"({problem}): retrain, or restore them from a copy")
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(os.path.abspath(path))
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for broken files
        raise CorruptModelError(f"cannot read the model in {path!r}: {e}") from None
    finally:
        ckptr.close()


def step_item_dir(ckpt_dir: str, step: int) -> str:
    """The folder holding step ``step``'s arrays in an Orbax ``CheckpointManager`` directory
    (a single ``StandardSave`` item: ``<step>/default``); its file record lies beside it."""
    return os.path.join(ckpt_dir, str(int(step)), "default")


def save_step(mngr, ckpt_dir: str, step: int, flat: dict) -> None:
    """Saves a training checkpoint through ``mngr`` (Orbax: temporary folder + rename), waits
    for it and records its files (``<step>/default.files.json``, inside the step's folder, so
    the manager's clean-up of old steps removes it too)."""
    mngr.save(step, args=ocp.args.StandardSave(flat), force=True)
    mngr.wait_until_finished()
    item = step_item_dir(ckpt_dir, step)
    if os.path.isdir(item):
        write_file_record(item)


def restore_latest_good(mngr, ckpt_dir: str, quarantine: str):
    """``(step, flat arrays)`` of the newest checkpoint whose files are intact, or ``(None,
    None)`` when there is none yet.

    A newer checkpoint whose files differ from their record (or that Orbax cannot read) is
    moved into ``quarantine`` (kept for inspection, out of the manager's way: training
    continues from the older step and saves the later steps again, to the same values) with
    a ``RuntimeWarning`` naming it and what is wrong.

    Raises:
      CorruptModelError: every checkpoint is damaged (nothing to resume from).
    """
    damaged = []
    found = flat = None
    for step in sorted(mngr.all_steps(), reverse=True):
        problem = file_record_problem(step_item_dir(ckpt_dir, step))
        if problem is None:
            try:
                flat = mngr.restore(step, args=ocp.args.StandardRestore())
            except Exception as e:  # noqa: BLE001 - Orbax raises many types for broken files
                problem = f"Orbax cannot read it: {type(e).__name__}: {str(e)[:300]}"
        if problem is None:
            found = step
            break
        damaged.append((step, problem))
    if not damaged:
        return found, flat
    listing = "; ".join(f"step {s}: {p}" for s, p in damaged)
    if found is None:
        raise CorruptModelError(f"every checkpoint in {ckpt_dir!r} is damaged ({listing}): "
                                f"restore them from a copy, or delete {ckpt_dir!r} to train "
                                f"from the start")
    os.makedirs(quarantine, exist_ok=True)
    moved = []
    for step, _ in damaged:
        dst = os.path.join(quarantine, str(step))
        n = 1
        while os.path.exists(dst):                  # an earlier quarantine of the same step
            dst = os.path.join(quarantine, f"{step}.{n}")
            n += 1
        os.replace(os.path.join(ckpt_dir, str(step)), dst)
        moved.append(dst)
    mngr.reload()
    warnings.warn(f"resuming from checkpoint step {found}: newer checkpoints are damaged "
                  f"({listing}); moved to {', '.join(moved)}", RuntimeWarning, stacklevel=3)
    return found, flat
