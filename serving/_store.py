"""Atomic, versioned directories of arrays + JSON, with content hashes.

Layout of a store root (a bundle or an export)::

    ROOT/CURRENT                 {"version": "v000002"}  (replaced atomically)
    ROOT/versions/v000001/...    the previous version (kept for roll-back)
    ROOT/versions/v000002/...    the live version: manifest.json, arrays/ (Orbax),
                                 arrays.files.json (size + sha256 of every file in arrays/),
                                 extra files

A writer fills ``versions/.tmp-<random>/``, fsyncs it, renames it to its version name and
only then switches ``CURRENT`` (one ``os.replace``). A crash at any point leaves the previous
version loadable; stale temporary directories are removed by the next write.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping

import numpy as np
import orbax.checkpoint as ocp

from st_jax._atomic import file_record_problem, write_file_record, write_json_atomic

CURRENT = "CURRENT"
VERSIONS = "versions"
JOURNAL = "journal"      # item updates since the live version (serving._journal)
KEEP_VERSIONS = 2


class StoreError(RuntimeError):
    """A store directory is missing, incomplete or not a store."""


class TamperedError(StoreError):
    """Stored content does not match what was written (its file record or content hash)."""


def current_version(root: str) -> str:
    """Path of the live version directory of ``root``.

    Raises:
      StoreError: ``root`` holds no complete version.
    """
    pointer = os.path.join(root, CURRENT)
    if not os.path.isfile(pointer):
        raise StoreError(f"{root!r} is not a bundle/export directory (no {CURRENT} file); "
                         "create one with serving.publish / Retriever.export")
    try:
        with open(pointer) as f:
            version = json.load(f)["version"]
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{pointer} is corrupt ({e}); restore it or republish") from None
    path = os.path.join(root, VERSIONS, str(version))
    if not os.path.isdir(path):
        raise StoreError(f"{pointer} names version {version!r}, which is missing under "
                         f"{os.path.join(root, VERSIONS)}")
    return path


def _fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_version(root: str, fill: Callable[[str], None],
                  on_stage: Callable[[str], None] | None = None) -> str:
    """Writes a new version of ``root`` atomically; returns its directory.

    ``fill(tmp_dir)`` writes the content. ``root`` may not exist yet, or must be a store (an
    empty directory is accepted); anything else is refused so nothing is overwritten.
    ``on_stage(name)`` is called at "filled" and "renamed" (for crash tests).
    """
    os.makedirs(root, exist_ok=True)
    vdir = os.path.join(root, VERSIONS)
    entries = set(os.listdir(root))
    if entries - {CURRENT, VERSIONS, JOURNAL}:
        raise StoreError(f"{root!r} exists and is not a bundle/export directory "
                         f"(it holds {sorted(entries)[:5]}); choose an empty or new path")
    os.makedirs(vdir, exist_ok=True)
    for name in os.listdir(vdir):                   # leftovers of crashed writers
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(vdir, name), ignore_errors=True)
    numbers = [int(n[1:]) for n in os.listdir(vdir) if n.startswith("v") and n[1:].isdigit()]
    version = f"v{max(numbers, default=0) + 1:06d}"
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=vdir)
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if on_stage:
            on_stage("filled")
        final = os.path.join(vdir, version)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if on_stage:
        on_stage("renamed")
    write_json_atomic(os.path.join(root, CURRENT), {"version": version})
    keep = sorted((n for n in os.listdir(vdir) if n.startswith("v") and n[1:].isdigit()),
                  key=lambda n: int(n[1:]))[-KEEP_VERSIONS:]
    for name in os.listdir(vdir):
        if name.startswith("v") and name not in keep:
            shutil.rmtree(os.path.join(vdir, name), ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- arrays

def array_table(arrays: Mapping[str, np.ndarray]) -> dict[str, list]:
    """``{key: [shape, dtype name]}`` for a manifest."""
    return {k: [list(np.shape(v)), np.asarray(v).dtype.name] for k, v in sorted(arrays.items())}


def content_hash(arrays: Mapping[str, np.ndarray], *blobs: bytes) -> str:
    """sha256 over every array (key, dtype, shape, bytes; sorted by key) and extra blobs."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(a.dtype.name.encode())
        h.update(repr(a.shape).encode())
        h.update(memoryview(a.reshape(-1).view(np.uint8)) if a.size else b"")
    for b in blobs:
        h.update(b)
    return h.hexdigest()


def save_arrays(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Saves a flat ``{key: array}`` with Orbax (zero-size arrays, which Orbax refuses, are
    rebuilt from the manifest's table by :func:`load_arrays`), then records the size and
    sha256 of every file Orbax wrote in ``path + ".files.json"``."""
    tree = {k: np.asarray(v) for k, v in arrays.items() if np.asarray(v).size}
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(os.path.abspath(path), tree)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()
    write_file_record(path)


def load_arrays(path: str, table: Mapping[str, list]) -> dict[str, np.ndarray]:
    """Restores arrays saved by :func:`save_arrays` and checks them against ``table``.

    The files are first checked against the record :func:`save_arrays` wrote (when there is
    one: stores written before it was kept load without), so damaged files are reported by
    name and never handed to Orbax.

    Raises:
      TamperedError: a file differs from what was written.
      StoreError: an array is missing, unexpected, or has another shape or dtype.
    """
    problem = file_record_problem(path)
    if problem:
        raise TamperedError(f"the files in {path!r} are not the ones written ({problem}): they "
                            "were modified, truncated or lost after writing; republish (or "
                            "restore this version directory from a copy)")
    ckptr = ocp.StandardCheckpointer()
    try:
        got = dict(ckptr.restore(os.path.abspath(path)))
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for broken files
        raise StoreError(f"cannot read the arrays in {path!r}: {e}") from None
    finally:
        ckptr.close()
    out = {}
    for k, (shape, dtype) in table.items():
        if int(np.prod(shape)) == 0:
            out[k] = np.zeros(shape, dtype)
            continue
        if k not in got:
            raise StoreError(f"array {k!r} is missing from {path!r}")
        a = np.asarray(got.pop(k))
        if list(a.shape) != list(shape) or a.dtype.name != dtype:
            raise StoreError(f"array {k!r} in {path!r} is {a.dtype.name}{list(a.shape)}, "
                             f"the manifest says {dtype}{list(shape)}")
        out[k] = a
    if got:
        raise StoreError(f"{path!r} holds arrays its manifest does not list: {sorted(got)[:5]}")
    return out


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
