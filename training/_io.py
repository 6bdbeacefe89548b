"""Disk I/O: atomic JSON, Orbax trees keyed by flat path strings (robust to int keys and optax
namedtuples: the template tree gives the structure back on restore)."""

from __future__ import annotations

import json
import os
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp


def write_json_atomic(path: str, obj) -> None:
    """Writes JSON to a temporary file in the same directory, fsyncs, then renames over `path`."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp creates 0600; use the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


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
