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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orbax.checkpoint as ocp

from st_jax._atomic import write_json_atomic

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


FILES_SUFFIX = ".files.json"    # beside an arrays directory: its files' sizes and sha256


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


def check_files(root: str, stated: Mapping[str, list]) -> None:
    """Checks the files under ``root`` against :func:`file_digests`' record ``stated``.

    Raises:
      TamperedError: a file is missing, unexpected, or has another size or content.
    """
    have = _files_under(root)
    missing = sorted(set(stated) - set(have))
    extra = sorted(set(have) - set(stated))
    changed = [r for r in have if r in stated and os.path.getsize(os.path.join(root, r))
               != int(stated[r][0])]
    if not (missing or extra or changed):
        same_size = [r for r in have if r in stated]
        changed = [r for r, (_, h) in zip(same_size, _hash_files(root, same_size))
                   if h != stated[r][1]]
    if missing or extra or changed:
        what = "; ".join(f"{name}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
                         for name, v in (("missing", missing), ("unexpected", extra),
                                         ("changed", changed)) if v)
        raise TamperedError(f"the files in {root!r} are not the ones written ({what}): they "
                            "were modified, truncated or lost after writing; republish (or "
                            "restore this version directory from a copy)")


def save_arrays(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Saves a flat ``{key: array}`` with Orbax (zero-size arrays, which Orbax refuses, are
    rebuilt from the manifest's table by :func:`load_arrays`), then records the size and
    sha256 of every file Orbax wrote in ``path + FILES_SUFFIX``."""
    tree = {k: np.asarray(v) for k, v in arrays.items() if np.asarray(v).size}
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(os.path.abspath(path), tree)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()
    write_json_atomic(path.rstrip("/" + os.sep) + FILES_SUFFIX,
                      {"sha256": file_digests(path)})


def load_arrays(path: str, table: Mapping[str, list]) -> dict[str, np.ndarray]:
    """Restores arrays saved by :func:`save_arrays` and checks them against ``table``.

    The files are first checked against the record :func:`save_arrays` wrote (when there is
    one: stores written before it was kept load without), so damaged files are reported by
    name and never handed to Orbax.

    Raises:
      TamperedError: a file differs from what was written.
      StoreError: an array is missing, unexpected, or has another shape or dtype.
    """
    record = path.rstrip("/" + os.sep) + FILES_SUFFIX
    if os.path.exists(record):
        try:
            with open(record) as f:
                stated = json.load(f)["sha256"]
            if not isinstance(stated, dict) or not all(
                    isinstance(v, list) and len(v) == 2 and isinstance(v[0], int)
                    and isinstance(v[1], str) for v in stated.values()):
                raise TypeError("'sha256' is not a {path: [size, sha256 hex]} table")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TamperedError(f"{record!r} is unreadable ({e}); republish (or restore "
                                "this version directory from a copy)") from None
        check_files(path, stated)
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
