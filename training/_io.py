"""Disk I/O: atomic JSON, Orbax trees keyed by flat path strings (robust to int keys and optax
namedtuples: the template tree gives the structure back on restore)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from st_jax._atomic import write_json_atomic  # noqa: F401  (re-exported)


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
    """Saves one pytree with Orbax (atomic: Orbax writes a temporary directory and renames)."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(path), flatten(tree), force=True)
    ckptr.wait_until_finished()
    ckptr.close()


def load_flat(path: str) -> dict[str, np.ndarray]:
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(os.path.abspath(path))
    finally:
        ckptr.close()
