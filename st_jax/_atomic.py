"""Atomic file writes (a temporary file in the same directory, fsync, then rename) and file
records (the size and sha256 of every file of a directory, checked before reading it)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np


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


# ----------------------------------------------------------------------------- file records

RECORD_SUFFIX = ".files.json"    # beside a directory: its files' sizes and sha256


def _files_under(root: str) -> list[str]:
    """Relative paths (``/``-separated, sorted) of the regular files under ``root``."""
    out = []
    for d, _, names in os.walk(root):
        rel = os.path.relpath(d, root)
        out += [n if rel == "." else f"{rel}/{n}".replace(os.sep, "/") for n in names]
    return sorted(out)


def _sha256_file(path: str) -> tuple[int, str]:
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest()


def _hash_files(root: str, rels: list[str]) -> list[tuple[int, str]]:
    """``(size, sha256 hex)`` of each file, hashed on a few threads (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda r: _sha256_file(os.path.join(root, r)), rels))


def file_digests(root: str) -> dict[str, list]:
    """``{relative path: [size, sha256 hex]}`` of every file under ``root``."""
    rels = _files_under(root)
    return {r: [size, h] for r, (size, h) in zip(rels, _hash_files(root, rels))}


def record_path(root: str) -> str:
    return root.rstrip("/" + os.sep) + RECORD_SUFFIX


def write_file_record(root: str) -> None:
    """Records the size and sha256 of every file under ``root`` in ``root + RECORD_SUFFIX``
    (atomically)."""
    write_json_atomic(record_path(root), {"sha256": file_digests(root)})


def file_record_problem(root: str) -> str | None:
    """Checks the files under ``root`` against their record: None when they match or there is
    no record (written before records were kept), else what differs, e.g. ``"changed:
    d/0b23..."`` or ``"its record '...' is unreadable (...)"``."""
    record = record_path(root)
    if not os.path.exists(record):
        return None
    try:
        with open(record) as f:
            stated = json.load(f)["sha256"]
        if not isinstance(stated, dict) or not all(
                isinstance(v, list) and len(v) == 2 and isinstance(v[0], int)
                and isinstance(v[1], str) for v in stated.values()):
            raise TypeError("'sha256' is not a {path: [size, sha256 hex]} table")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its record {record!r} is unreadable ({e})"
    return _mismatch(root, stated)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:                        # e.g. a dangling link: reported as changed
        return -1


def _mismatch(root: str, stated: Mapping[str, list]) -> str | None:
    have = _files_under(root)
    missing = sorted(set(stated) - set(have))
    extra = sorted(set(have) - set(stated))
    changed = [r for r in have if r in stated and _size(os.path.join(root, r)) != stated[r][0]]
    if not (missing or extra or changed):
        same_size = [r for r in have if r in stated]
        changed = [r for r, (_, h) in zip(same_size, _hash_files(root, same_size))
                   if h != stated[r][1]]
    if not (missing or extra or changed):
        return None
    return "; ".join(f"{name}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
                     for name, v in (("missing", missing), ("unexpected", extra),
                                     ("changed", changed)) if v)
