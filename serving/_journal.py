"""The update journal: acknowledged item updates survive restarts and compactions.

A served bundle changes between publishes through ``Retriever.add_items / update_items /
delete_items`` (``POST /v1/items``). With ``durable=True`` each update is appended to the
bundle's journal and fsynced *before* it becomes visible to queries (and before the caller is
told it succeeded); a retriever that loads the bundle later replays the journal, so a restart
(or a crash) loses no acknowledged update.

Layout (beside ``CURRENT`` and ``versions/``)::

    BUNDLE/journal/000000000001.log     records 1 .. (segment named by its first sequence number)
    BUNDLE/journal/000000000042.log     records 42 .. (a new segment per writer session)
    BUNDLE/journal/LOCK                  held (flock) by the one process that writes

One record per line: ``<crc32 of the JSON, 8 hex digits> <JSON>\\n`` with a global,
contiguous sequence number ``seq``. A line is acknowledged only once it is fsynced, so a torn
or corrupt *last* line of a segment (a crash while writing) is an update nobody was told
about and is ignored; a bad line anywhere else is corruption (:class:`JournalError`).

Which records a version needs: its manifest's ``journal_seq`` says through which sequence
number the journal is already folded into it. ``serving.compact`` writes the sequence number
of the last update it folded (updates acknowledged while it ran are replayed on top of the
new version); ``serving.publish`` writes the journal's end when it starts — a publish from a
catalogue supersedes the updates made before it (they are expected to be in that
catalogue). Segments every kept version has folded are deleted when a version is written.

Records carry the embeddings the item tower produced (float32, base64), so a replay does not
depend on the tower running bit-identically again, and the attributes and titles as given.
"""
from __future__ import annotations

import atexit
import base64
import fcntl
import json
import os
import threading
import time
import zlib
from collections.abc import Iterator, Mapping

import numpy as np

from serving._store import StoreError
from st_jax._atomic import _json_default

JOURNAL = "journal"
LOCK = "LOCK"
_SUFFIX = ".log"


class JournalError(StoreError):
    """The journal is corrupt, or another process writes to it."""


def journal_dir(root: str) -> str:
    return os.path.join(root, JOURNAL)


def _segments(root: str) -> list[tuple[int, str]]:
    """``[(first seq, path)]`` sorted by first seq."""
    d = journal_dir(root)
    if not os.path.isdir(d):
        return []
    out = []
    for name in os.listdir(d):
        stem = name[:-len(_SUFFIX)]
        if name.endswith(_SUFFIX) and stem.isdigit():
            out.append((int(stem), os.path.join(d, name)))
    return sorted(out)


def _encode(record: Mapping) -> bytes:
    body = json.dumps(record, separators=(",", ":"), default=_json_default).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode(line: bytes) -> dict | None:
    """A record, or None when the line is torn or fails its checksum."""
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        rec = json.loads(body)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("seq"), int) else None


def read_records(root: str, after: int = 0) -> Iterator[dict]:
    """The records of ``root``'s journal with ``seq > after``, in order.

    Raises:
      JournalError: a corrupt record that is not the last line of its segment, or sequence
        numbers out of order.
    """
    last = None
    for first, path in _segments(root):
        with open(path, "rb") as f:
            lines = f.readlines()
        for n, line in enumerate(lines):
            rec = _decode(line)
            if rec is None:
                if n == len(lines) - 1:          # torn tail: written, never acknowledged
                    break
                raise JournalError(f"{path}: record {n + 1} is corrupt (checksum or format); "
                                   "the journal cannot be replayed safely — restore the file "
                                   "or republish the bundle")
            seq = rec["seq"]
            if (last is not None and seq != last + 1) or (last is None and seq < first):
                raise JournalError(f"{path}: record {n + 1} has seq {seq} after {last}; "
                                   "the journal is out of order")
            last = seq
            if seq > after:
                yield rec


def end_seq(root: str) -> int:
    """The sequence number of the last acknowledged record (0: none)."""
    last = 0
    for rec in read_records(root):
        last = rec["seq"]
    return last


def collect(root: str, keep_from: int) -> None:
    """Deletes segments whose records are all ``<= keep_from`` (folded into every kept version),
    never the newest segment (a writer may be appending to it)."""
    segs = _segments(root)
    for (first, path), (nxt, _) in zip(segs, segs[1:]):
        if nxt - 1 <= keep_from:
            os.unlink(path)


# ----------------------------------------------------------------------------- writing

class Writer:
    """The process's appender to one bundle's journal (shared by every retriever of the
    bundle in this process: see :func:`writer`). Thread-safe; holds ``journal/LOCK`` from the
    first append on, so two processes cannot interleave records."""

    def __init__(self, root: str):
        self.root = root
        self._mutex = threading.Lock()
        self._lock_fd: int | None = None
        self._file = None
        self._next: int | None = None

    def _open(self) -> None:
        d = journal_dir(self.root)
        os.makedirs(d, exist_ok=True)
        fd = os.open(os.path.join(d, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(f"another process writes item updates to {self.root!r} (it "
                               f"holds {os.path.join(d, LOCK)}); send updates to that "
                               "process, or stop it first") from None
        self._lock_fd = fd
        self._next = end_seq(self.root) + 1
        path = os.path.join(d, f"{self._next:012d}{_SUFFIX}")
        self._file = open(path, "ab")
        dfd = os.open(d, os.O_RDONLY)               # the new segment's name is durable too
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def append(self, record: dict, after: int | None = None) -> int:
        """Appends ``record`` (its ``seq`` is assigned here), fsyncs; returns the seq.
        On failure the segment is cut back to its previous end and the error raised.

        ``after``: the last seq the caller has applied; refused (:class:`JournalError`) if the
        journal holds later records (the caller must catch up first, or it would journal an
        update on a state that misses them)."""
        with self._mutex:
            if self._file is None:
                self._open()
            seq = self._next
            if after is not None and seq != after + 1:
                raise JournalError(f"the journal of {self.root!r} holds updates up to {seq - 1}"
                                   f" that this retriever (at {after}) has not applied; call "
                                   "catch_up() first (or load the bundle again)")
            line = _encode({"seq": seq, "time": round(time.time(), 3), **record})
            pos = self._file.tell()
            try:
                self._file.write(line)
                self._file.flush()
                os.fsync(self._file.fileno())
            except BaseException:
                try:
                    self._file.truncate(pos)
                    self._file.seek(pos)
                except OSError:
                    pass
                raise
            self._next = seq + 1
            return seq

    def close(self) -> None:
        """Closes the segment and releases ``journal/LOCK`` (a later append opens them
        again). Called for every writer at interpreter exit."""
        with self._mutex:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)             # (closing the fd releases the flock)
                self._lock_fd = None
            self._next = None


_WRITERS: dict[str, Writer] = {}
_WRITERS_LOCK = threading.Lock()


@atexit.register
def _close_writers() -> None:
    with _WRITERS_LOCK:
        for w in _WRITERS.values():
            w.close()


def writer(root: str) -> Writer:
    """The process-wide :class:`Writer` of bundle ``root`` (one per real path)."""
    key = os.path.realpath(root)
    with _WRITERS_LOCK:
        w = _WRITERS.get(key)
        if w is None:
            w = _WRITERS[key] = Writer(key)
        return w


# ----------------------------------------------------------------------------- records

def pack_embeddings(emb: np.ndarray) -> dict:
    e = np.ascontiguousarray(emb, np.float32)
    return {"shape": list(e.shape), "f32": base64.b64encode(e.tobytes()).decode()}


def unpack_embeddings(obj: Mapping) -> np.ndarray:
    return np.frombuffer(base64.b64decode(obj["f32"]), np.float32).reshape(obj["shape"]).copy()


def _plain_value(v):
    """One item's attribute value, JSON-able: a set becomes a sorted list (its order is
    irrelevant to filtering; sorted, so a replay rebuilds the same index)."""
    if isinstance(v, (set, frozenset)):
        try:
            return sorted(v)
        except TypeError:                  # mixed or unorderable: validated (and refused) later
            return list(v)
    return v


def plain_attributes(attributes) -> dict | None:
    """``{field: values}`` with numpy values and sets made JSON-able (lists of str/int).

    Raises:
      ValueError: a value JSON cannot hold (the filter index takes str or int values, or
        lists / sets of them), naming the field and the item.
    """
    if attributes is None:
        return None
    out = {}
    for f, vals in attributes.items():
        vals = [_plain_value(v) for v in (vals if isinstance(vals, np.ndarray) else list(vals))]
        try:
            out[str(f)] = json.loads(json.dumps(vals, default=_json_default))
        except (TypeError, ValueError):
            for i, v in enumerate(vals):
                try:
                    json.dumps(v, default=_json_default)
                except (TypeError, ValueError):
                    raise ValueError(f"attribute {str(f)!r}, item {i}: value {v!r} must be str "
                                     "or int, or a list / set of them") from None
            raise
    return out
