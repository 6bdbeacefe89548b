"""Bit-sliced Bloom + exact filter index, and exact filter evaluation.

Layout (BitFunnel-style bit slicing; rows = bit positions, columns = items, 32 items per
``u32`` word, item ``i`` = bit ``i % 32`` of word ``i // 32``)::

    rows[0]                      ZERO row   (all 0)            -> constant FALSE
    rows[1]                      VALID row  (1 for real items) -> constant TRUE
    rows[2 : 2+E]                EXACT rows, one per frequent term (bitmap of its items)
    rows[2+E : 2+E+M]            BLOOM rows, M bits per item; a long-tail term (field, value)
                                 sets K distinct bits h_1..h_K in the signature of each item
                                 that has it

plus a compact forward list (CSR) of each item's *Bloom* term ids, sorted, used only to
verify uncertain items exactly.

Exactness:
- exact by construction: EXACT rows, the ZERO/VALID rows, terms absent from the index
  (folded to FALSE at compile time), padded items (always 0), and every item in the
  interval bounds' ``lower`` set or outside their ``upper`` set;
- verified: items in ``upper & ~lower`` (possible only when a Bloom term is involved): the
  whole program is re-evaluated for each such item against its term list (Bloom terms:
  binary search in the CSR list; exact terms: bit lookup in their row).

Interval evaluation (``pallas_kernels.filter_eval``): each sub-expression yields masks
``lower ⊆ truth ⊆ upper``: exact term -> (row, row); Bloom term -> (∅, AND of its K rows)
(a Bloom filter has no false negatives); NOT (l, u) -> (~u, ~l); AND / OR componentwise.
The invariant holds by induction, so ``lower`` is certainly eligible, ``~upper`` certainly
not, including under NOT (where the paper's Bloom-only evaluation produces false negatives).

Verification work = items whose status depends on a Bloom term: that term's true matches
that survive the rest of the program (a Bloom term's lower bound is empty) plus its false
positives (~ FPR * N). Giving every term with >= N/256 items an EXACT row bounds the first;
the Bloom size bounds the second. The rounds are in ``lax.while_loop``: any count is exact.

Co-design (SilverTorch Algorithm 1): ``filter_mask(..., word_ids=)`` evaluates and verifies
only selected words (e.g. those of each query's probed IVF clusters).

Hash: ``blake2b(b"st_jax.bloom\\0" + field + b"\\0" + tag + value, key=seed (8 bytes LE),
digest_size=64, salt=block)`` read as little-endian ``uint64`` words; position j is the j-th
distinct value of ``word mod M`` (so the K positions of a term are distinct). ``tag`` is
``b"s"`` + UTF-8 for str values, ``b"i"`` + decimal for ints. Stable across runs/platforms.

Sizing rule (``bloom_bits=None``): ``M = round_up(3 * K * n99, 32)`` clamped to [64, 8192],
where ``n99`` is the 99th percentile of Bloom-hashed values per item (after frequent terms
were moved to EXACT rows). This is the paper's "values per item x K x 3" with a percentile
instead of the maximum (one item with 500 tags would otherwise size every item's
signature); items above it just have more uncertain candidates, which verification resolves.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import filter_eval, native
from pallas_kernels._ffi import native_cpu_primitive
from pallas_kernels.int8_topk import dispatch
from st_jax._filter_lang import (AND, NOT, OR, TERM_BLOOM, TERM_EXACT, F, FilterError,
                                 FilterProgram, compile_filter, parse_filter)

ZERO_ROW = 0
VALID_ROW = 1
FIRST_EXACT_ROW = 2

__all__ = ["FilterSchema", "FilterIndex", "FilterProgram", "build_filter_index", "compile_filter",
           "filter_bounds", "filter_mask", "bloom_stats", "bloom_positions", "parse_filter", "F",
           "FilterError"]


# ----------------------------------------------------------------------------- hashing


_U64X8 = struct.Struct("<8Q")


def _value_bytes(value: str | int) -> bytes:
    if isinstance(value, str):
        return b"s" + value.encode("utf-8")
    return b"i" + str(int(value)).encode("ascii")


def bloom_positions(field: str, value: str | int, num_bits: int, num_hashes: int,
                    seed: int = 0) -> tuple[int, ...]:
    """The K distinct Bloom bit positions (in ``[0, num_bits)``) of term ``field:value``."""
    if num_hashes > num_bits:
        raise ValueError(f"num_hashes={num_hashes} > bloom_bits={num_bits}")
    data = b"st_jax.bloom\0" + field.encode("utf-8") + b"\0" + _value_bytes(value)
    key = int(seed).to_bytes(8, "little", signed=True)
    out: dict[int, None] = {}
    block = 0
    while len(out) < num_hashes:
        h = hashlib.blake2b(data, digest_size=64, key=key, salt=block.to_bytes(16, "little"))
        out.update(dict.fromkeys(w % num_bits for w in _U64X8.unpack(h.digest())))
        block += 1
    return tuple(list(out)[:num_hashes])


# ----------------------------------------------------------------------------- schema


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class FilterSchema:
    """Host-side term dictionary of a :class:`FilterIndex` (static pytree metadata).

    Hash and equality use ``fingerprint`` (a digest of the whole table), so jit caches hit
    for equal indexes and hashing is O(1).

    Attributes:
      field_types: field -> ``"str"`` | ``"int"`` | ``"any"`` (no values seen).
      vocab: field -> {value: term id}.
      term_field / term_value: field and value of each term id.
      term_op: ``i32[T]`` TERM_EXACT or TERM_BLOOM.
      term_rows: ``i32[T, K]`` rows ANDed for the term (exact: [row, VALID, ...]).
      term_df: ``i64[T]`` items having the term.
    """

    field_types: dict[str, str]
    vocab: dict[str, dict[Any, int]]
    term_op: np.ndarray
    term_rows: np.ndarray
    term_df: np.ndarray
    num_items: int
    n_pad: int
    num_exact: int
    bloom_bits: int
    num_hashes: int
    seed: int
    max_bloom_per_item: int
    fingerprint: str
    term_field: list[str]
    term_value: list[Any]

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FilterSchema) and other.fingerprint == self.fingerprint

    @property
    def zero_row(self) -> int:
        return ZERO_ROW

    @property
    def valid_row(self) -> int:
        return VALID_ROW

    @property
    def num_rows(self) -> int:
        return FIRST_EXACT_ROW + self.num_exact + self.bloom_bits

    @property
    def num_terms(self) -> int:
        return int(self.term_op.shape[0])

    def resolve(self, field: str, value: str | int) -> tuple[int, tuple[int, ...], int]:
        t = self.vocab[field].get(value)
        if t is None:  # no item has it: exactly FALSE
            return TERM_EXACT, (ZERO_ROW,), -1
        op = int(self.term_op[t])
        rows = self.term_rows[t]
        return op, tuple(int(r) for r in (rows[:1] if op == TERM_EXACT else rows)), int(t)

    def __repr__(self) -> str:
        return self.describe()

    def to_json(self) -> str:
        """Serialise (for bundles: the arrays of :class:`FilterIndex` go to Orbax, this
        static part as a JSON string)."""
        return json.dumps({
            "version": 1, "field_types": self.field_types, "term_field": self.term_field,
            "term_value": self.term_value, "term_op": self.term_op.tolist(),
            "term_rows": self.term_rows.tolist(), "term_df": self.term_df.tolist(),
            "num_items": self.num_items, "n_pad": self.n_pad, "num_exact": self.num_exact,
            "bloom_bits": self.bloom_bits, "num_hashes": self.num_hashes, "seed": self.seed,
            "max_bloom_per_item": self.max_bloom_per_item, "fingerprint": self.fingerprint})

    @classmethod
    def from_json(cls, text: str) -> "FilterSchema":
        d = json.loads(text)
        if d.pop("version") != 1:
            raise ValueError("unknown FilterSchema version")
        K = d["num_hashes"]
        vocab: dict[str, dict[Any, int]] = {f: {} for f in d["field_types"]}
        for t, (f, v) in enumerate(zip(d["term_field"], d["term_value"])):
            vocab[f][v] = t
        return cls(vocab=vocab, term_op=np.asarray(d.pop("term_op"), np.int32),
                   term_rows=np.asarray(d.pop("term_rows"), np.int32).reshape(-1, K),
                   term_df=np.asarray(d.pop("term_df"), np.int64), **d)

    def describe(self) -> str:
        return (f"FilterSchema({len(self.field_types)} fields, {self.num_terms} terms: "
                f"{self.num_exact} exact rows + Bloom M={self.bloom_bits} K={self.num_hashes})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FilterIndex:
    """Bit-sliced filter index over ``n_pad`` item rows (first ``num_items`` real).

    Attributes:
      rows: ``u32[R, W]`` bit-sliced rows (layout in the module docstring), ``W = n_pad/32``,
        ``R = 2 + E + M``.
      item_offsets: ``i32[n_pad + 1]`` CSR offsets of each item's Bloom term list.
      item_terms: ``i32[nnz + 1]`` Bloom term ids, sorted within each item; one trailing
        sentinel ``-2``.
      schema: static :class:`FilterSchema` (term dictionary, sizes).
    """

    rows: jax.Array
    item_offsets: jax.Array
    item_terms: jax.Array
    schema: FilterSchema = dataclasses.field(metadata=dict(static=True))

    @property
    def num_words(self) -> int:
        return int(self.rows.shape[1])

    def nbytes(self) -> dict[str, int]:
        """Device memory of the index parts, in bytes."""
        return {"rows": int(self.rows.size) * 4, "item_offsets": int(self.item_offsets.size) * 4,
                "item_terms": int(self.item_terms.size) * 4}


# ----------------------------------------------------------------------------- build


def _field_pairs(name: str, values: Sequence[Any], num_items: int
                 ) -> tuple[str, list[Any], np.ndarray, np.ndarray]:
    """(type, vocabulary, item idx i64[E], local value idx i64[E]) for one field."""
    if len(values) != num_items:
        raise ValueError(f"attribute '{name}' has {len(values)} values, expected {num_items}")
    arr = values if isinstance(values, np.ndarray) else None
    if arr is not None and arr.ndim == 1 and arr.dtype.kind in "iuU":
        vocab_arr, inv = np.unique(arr, return_inverse=True)
        ftype = "int" if arr.dtype.kind in "iu" else "str"
        vocab = [int(v) if ftype == "int" else str(v) for v in vocab_arr]
        return ftype, vocab, np.arange(num_items, dtype=np.int64), inv.astype(np.int64)
    # fast path: flatten in C (chain / dict.fromkeys / map), type-check distinct values only
    multi = (list, tuple, set, frozenset, np.ndarray)
    counts = np.fromiter((0 if v is None else len(v) if isinstance(v, multi) else 1
                          for v in values), np.int64, num_items)
    flat = list(itertools.chain.from_iterable(
        v if isinstance(v, multi) else () if v is None else (v,) for v in values))
    try:
        keys = list(dict.fromkeys(flat))
    except TypeError:                      # an unhashable value (a dict, a nested list)
        return _field_pairs_slow(name, values)
    types = set(map(type, keys))
    if all(t is str for t in types) or all(t is int for t in types):
        ftype = "any" if not types else ("str" if str in types else "int")
        index = {k: j for j, k in enumerate(keys)}
        local = np.fromiter(map(index.__getitem__, flat), np.int64, len(flat))
        return ftype, keys, np.repeat(np.arange(num_items, dtype=np.int64), counts), local
    return _field_pairs_slow(name, values)


def _field_pairs_slow(name: str, values: Sequence[Any]
                      ) -> tuple[str, list[Any], np.ndarray, np.ndarray]:
    """Per-value loop: numpy scalars, None inside lists, precise error messages."""
    index: dict[Any, int] = {}
    items: list[int] = []
    local: list[int] = []
    seen_type: str | None = None
    for i, v in enumerate(values):
        if v is None:
            continue
        vs = v if isinstance(v, (list, tuple, set, frozenset, np.ndarray)) else (v,)
        for x in vs:
            if x is None:
                continue
            if isinstance(x, str):
                t, x = "str", str(x)
            elif isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)):
                t, x = "int", int(x)
            else:
                raise ValueError(f"attribute '{name}', item {i}: value {x!r} must be str or int, "
                                 f"not {type(x).__name__}")
            if seen_type is None:
                seen_type = t
            elif t != seen_type:
                raise ValueError(f"attribute '{name}' mixes {seen_type} and {t} values "
                                 f"(item {i} has {x!r})")
            j = index.get(x)
            if j is None:
                j = index[x] = len(index)
            items.append(i)
            local.append(j)
    return (seen_type or "any", list(index), np.asarray(items, np.int64),
            np.asarray(local, np.int64))


def segment_positions(start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Host: the positions ``i64[sum(length)]`` of CSR segments ``[start, start + length)``,
    concatenated in order (e.g. the Bloom term lists of some items in ``item_terms``)."""
    start = np.asarray(start, np.int64)
    length = np.asarray(length, np.int64)
    first = np.repeat(start - (np.cumsum(length) - length), length)
    return first + np.arange(int(length.sum()), dtype=np.int64)


def _pack_bits(row_idx: np.ndarray, item_idx: np.ndarray, num_rows: int, n_pad: int,
               chunk: int = 1 << 15) -> np.ndarray:
    """Set bits (row, item) of a bit-sliced ``u32[num_rows, n_pad // 32]`` matrix."""
    out = np.zeros((num_rows, n_pad // 32), np.uint32)
    if row_idx.size == 0:
        return out
    order = np.argsort(item_idx, kind="stable")
    row_idx, item_idx = row_idx[order], item_idx[order]
    bounds = np.searchsorted(item_idx, np.arange(0, n_pad + chunk, chunk))
    buf = np.zeros((num_rows, chunk), np.bool_)
    for c, c0 in enumerate(range(0, n_pad, chunk)):
        lo, hi = bounds[c], bounds[c + 1]
        if lo == hi:
            continue
        width = min(chunk, n_pad - c0)
        buf[:] = False
        buf[row_idx[lo:hi], item_idx[lo:hi] - c0] = True
        packed = np.packbits(buf[:, :width], axis=1, bitorder="little")
        out[:, c0 // 32:(c0 + width) // 32] = packed.view("<u4")
    return out


def build_filter_index(attributes: Mapping[str, Sequence[Any]], num_items: int, n_pad: int, *,
                       bloom_bits: int | None = None, num_hashes: int = 5, seed: int = 0,
                       exact_min_frac: float = 1 / 256, max_exact_rows: int = 256,
                       exact_fields: Sequence[str] = ()) -> FilterIndex:
    """Build the bit-sliced filter index from per-item attributes (host side, numpy).

    Args:
      attributes: field -> one value per item, in index row order: a str or int, a list of
        them (multi-valued field), or ``None`` / ``[]`` (missing). A 1-D numpy int or str
        array is taken as a single-valued field (fast path).
      num_items: N, real items; ``n_pad``: padded rows (multiple of 32; bits >= N are 0).
      bloom_bits: M, Bloom bits per item; ``None`` applies the sizing rule (module doc).
      num_hashes: K, bits per Bloom term.
      seed: hash seed.
      exact_min_frac, max_exact_rows: a term gets its own EXACT row if it is among the
        ``max_exact_rows`` most frequent terms and at least ``exact_min_frac * N`` items have
        it. A row costs 1 bit/item (<= 32 B/item at the defaults), takes that term's load off
        the Bloom signatures, and makes the term certain: a Bloom term's own matches are
        uncertain (its lower bound is empty) and go through verification, so the threshold
        also caps the verification work per Bloom term at ``exact_min_frac * N`` items.
      exact_fields: fields all of whose terms get EXACT rows (e.g. low-cardinality fields).

    Returns:
      :class:`FilterIndex`.
    """
    if n_pad % 32 or n_pad < num_items or num_items < 0:
        raise ValueError(f"n_pad={n_pad} must be a multiple of 32 and >= num_items={num_items}")
    if num_hashes < 1:
        raise ValueError(f"num_hashes must be >= 1, got {num_hashes}")
    unknown = set(exact_fields) - set(attributes)
    if unknown:
        raise ValueError(f"exact_fields {sorted(unknown)} are not attributes")
    field_types: dict[str, str] = {}
    vocab: dict[str, dict[Any, int]] = {}
    term_field: list[str] = []
    term_value: list[Any] = []
    all_items, all_terms = [], []
    for name in sorted(attributes):
        if not isinstance(name, str) or not name:
            raise ValueError(f"field names must be non-empty str, got {name!r}")
        ftype, values, items, local = _field_pairs(name, attributes[name], num_items)
        base = len(term_field)
        # dedupe repeated values within an item
        V = max(len(values), 1)
        if items.size and np.any(items[1:] == items[:-1]):  # multi-valued: sort + drop repeats
            key = np.sort(items * V + local)
            key = key[np.concatenate([[True], key[1:] != key[:-1]])]
            items, local = key // V, key % V
        field_types[name] = ftype
        vocab[name] = {v: base + j for j, v in enumerate(values)}
        term_field += [name] * len(values)
        term_value += values
        all_items.append(items)
        all_terms.append(local + base)
    T = len(term_field)
    items = np.concatenate(all_items) if all_items else np.zeros(0, np.int64)
    terms = np.concatenate(all_terms) if all_terms else np.zeros(0, np.int64)
    df = np.bincount(terms, minlength=T).astype(np.int64)

    # --- exact rows: most frequent terms (and whole exact_fields)
    forced = np.zeros(T, bool)
    for f in exact_fields:
        forced[list(vocab[f].values())] = True
    order = np.argsort(-df, kind="stable")
    frequent = np.zeros(T, bool)
    top = order[:max_exact_rows]
    frequent[top[df[top] >= max(1.0, exact_min_frac * num_items)]] = True
    is_exact = forced | frequent
    exact_ids = np.flatnonzero(is_exact)
    exact_ids = exact_ids[np.argsort(-df[exact_ids], kind="stable")]
    E = exact_ids.size
    exact_row = np.full(T, -1, np.int64)
    exact_row[exact_ids] = FIRST_EXACT_ROW + np.arange(E)

    # --- Bloom load per item and sizing rule
    bloom_pair = ~is_exact[terms] if T else np.zeros(0, bool)
    b_items, b_terms = items[bloom_pair], terms[bloom_pair]
    per_item = np.bincount(b_items, minlength=n_pad)[:n_pad]
    max_per_item = int(per_item.max()) if per_item.size else 0
    if bloom_bits is None:
        n99 = float(np.percentile(per_item[:num_items], 99)) if num_items else 0.0
        bloom_bits = int(min(8192, max(64, math.ceil(3 * num_hashes * max(n99, 1.0) / 32) * 32)))
    M = int(bloom_bits)
    if M < num_hashes:
        raise ValueError(f"bloom_bits={M} must be >= num_hashes={num_hashes}")
    term_rows = np.full((T, num_hashes), VALID_ROW, np.int32)
    term_op = np.where(is_exact, TERM_EXACT, TERM_BLOOM).astype(np.int32)
    term_rows[exact_ids, 0] = exact_row[exact_ids]
    bloom_ids = np.flatnonzero(~is_exact)
    base = FIRST_EXACT_ROW + E
    if bloom_ids.size:
        pos = np.array([bloom_positions(term_field[t], term_value[t], M, num_hashes, seed)
                        for t in bloom_ids.tolist()], np.int64)
        term_rows[bloom_ids] = base + pos

    # --- bit-sliced rows
    R = FIRST_EXACT_ROW + E + M
    ex_pair = ~bloom_pair
    row_idx = np.concatenate([
        np.full(num_items, VALID_ROW, np.int64),
        exact_row[terms[ex_pair]],
        term_rows[b_terms].astype(np.int64).reshape(-1),
    ])
    item_idx = np.concatenate([np.arange(num_items, dtype=np.int64), items[ex_pair],
                               np.repeat(b_items, num_hashes)])
    rows = _pack_bits(row_idx, item_idx, R, n_pad)

    # --- CSR of Bloom term ids per item (sorted)
    order = np.lexsort((b_terms, b_items))
    flat = np.concatenate([b_terms[order].astype(np.int32), np.array([-2], np.int32)])
    offsets = np.zeros(n_pad + 1, np.int64)
    np.cumsum(per_item, out=offsets[1:])
    if offsets[-1] >= 2**31 - 1:
        raise ValueError("more than 2^31 Bloom (item, term) pairs; shard the index")

    h = hashlib.blake2b(digest_size=16)
    h.update(repr((sorted(field_types.items()), num_items, n_pad, M, num_hashes, seed, E)).encode())
    h.update(repr(list(zip(term_field, term_value))).encode())
    h.update(term_rows.tobytes())
    schema = FilterSchema(field_types=field_types, vocab=vocab, term_op=term_op,
                          term_rows=term_rows, term_df=df, num_items=num_items, n_pad=n_pad,
                          num_exact=E, bloom_bits=M, num_hashes=num_hashes, seed=seed,
                          max_bloom_per_item=max_per_item, fingerprint=h.hexdigest(),
                          term_field=term_field, term_value=term_value)
    return FilterIndex(rows=jnp.asarray(rows), item_offsets=jnp.asarray(offsets.astype(np.int32)),
                       item_terms=jnp.asarray(flat), schema=schema)


# ----------------------------------------------------------------------------- evaluation


def _word_ids(fi: FilterIndex, word_ids: Any) -> jax.Array | None:
    if word_ids is None:
        return None
    w = jnp.asarray(word_ids)
    if w.ndim not in (1, 2) or not jnp.issubdtype(w.dtype, jnp.integer):
        raise ValueError(f"word_ids must be i32[NW] or i32[B, NW], got {w.dtype}{list(w.shape)}")
    return (w[None] if w.ndim == 1 else w).astype(jnp.int32)


def _bounds(rows, ops, rowids, lengths, wids, *, num_hashes: int, stack_depth: int,
            backend: str):
    """:func:`filter_bounds` on arrays: ``(lower, upper)`` with padded items and out-of-range
    words cleared."""
    W = rows.shape[1]
    if W == 0:                                  # no items: every word is out of range
        shape = (ops.shape[0], 0) if wids is None else (max(ops.shape[0], wids.shape[0]),
                                                        wids.shape[1])
        return jnp.zeros(shape, jnp.uint32), jnp.zeros(shape, jnp.uint32)
    lo, up = filter_eval.filter_bounds(rows, ops, rowids, lengths, wids, num_hashes=num_hashes,
                                       stack_depth=stack_depth, backend=backend)
    if wids is None:
        valid = rows[VALID_ROW]
    else:
        valid = jnp.where((wids >= 0) & (wids < W), rows[VALID_ROW][jnp.clip(wids, 0, W - 1)],
                          jnp.uint32(0))
    return lo & valid, up & valid


def filter_bounds(fi: FilterIndex, prog: FilterProgram, *, word_ids: Any = None,
                  backend: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Interval bounds ``lower ⊆ eligible ⊆ upper`` before verification (jittable).

    Returns ``(lower, upper)``, each ``u32[Bp, W]`` — or ``u32[Bo, NW]`` for the selected
    ``word_ids`` (see :func:`filter_mask`); bits of padded items / out-of-range words are 0.
    """
    _check(fi, prog)
    return _bounds(fi.rows, prog.ops, prog.rowids, prog.lengths, _word_ids(fi, word_ids),
                   num_hashes=prog.num_hashes, stack_depth=prog.stack_depth, backend=backend)


def _check(fi: FilterIndex, prog: FilterProgram) -> None:
    if prog.num_hashes != fi.schema.num_hashes:
        raise FilterError(f"program compiled for K={prog.num_hashes} hashes, index has "
                          f"K={fi.schema.num_hashes}; compile it against this index")


class _Lists(NamedTuple):
    """What exact verification reads: the bit-sliced ``rows u32[R, W]``, each item's sorted
    Bloom term list (``offsets i32[32 W + 1]``, ``terms i32[nnz + 1]``) and the binary
    search's static step count (``log2(longest list) + 1``)."""

    rows: jax.Array
    offsets: jax.Array
    terms: jax.Array
    steps: int


def _csr_contains(lists: _Lists, items: jax.Array, term: jax.Array) -> jax.Array:
    """Does item ``items[...]`` have Bloom term ``term[...]`` (broadcast)? -> bool.
    Binary search in the item's sorted CSR segment, ``lists.steps`` static steps."""
    lo = lists.offsets[items]
    end = lists.offsets[items + 1]
    hi = end
    for _ in range(lists.steps):
        active = lo < hi
        mid = (lo + hi) // 2
        less = lists.terms[mid] < term
        lo = jnp.where(active & less, mid + 1, lo)
        hi = jnp.where(active & ~less, mid, hi)
    return (lo < end) & (lists.terms[lo] == term)


def _eval_items(lists: _Lists, ops: jax.Array, rowids: jax.Array, terms: jax.Array,
                lengths: jax.Array, stack_depth: int, items: jax.Array, prog_row: jax.Array
                ) -> jax.Array:
    """Exact evaluation of program ``prog_row[c]`` on item ``items[c]``.

    Args:
      ops, rowids, terms, lengths: program arrays (see FilterProgram), ``Bp`` rows.
      items: ``i32[C]`` item rows (in range); prog_row: ``i32[C]`` program of each item.
    Returns:
      ``bool[C]``.
    """
    C = items.shape[0]
    S = stack_depth
    word, bit = items // 32, (items % 32).astype(jnp.uint32)
    slots = jnp.arange(S)[:, None]
    cidx = jnp.arange(C)
    n_steps = jnp.clip(jnp.max(lengths), 0, ops.shape[1])   # (as the bounds: at most P)

    def body(p, carry):
        sp, stack = carry                                   # i32[C], bool[S, C]
        op = ops[prog_row, p]
        exact_bit = ((lists.rows[rowids[prog_row, p, 0], word] >> bit) & 1).astype(bool)
        bloom_has = jax.lax.cond(
            jnp.any(op == TERM_BLOOM),
            lambda: _csr_contains(lists, items, terms[prog_row, p]),
            lambda: jnp.zeros((C,), bool))
        t1 = stack[jnp.clip(sp - 1, 0, S - 1), cidx]
        t2 = stack[jnp.clip(sp - 2, 0, S - 1), cidx]
        val = jnp.where(op == TERM_EXACT, exact_bit, bloom_has)
        val = jnp.where(op == AND, t1 & t2, val)
        val = jnp.where(op == OR, t1 | t2, val)
        val = jnp.where(op == NOT, ~t1, val)
        is_term = (op == TERM_EXACT) | (op == TERM_BLOOM)
        binop = (op == AND) | (op == OR)
        dst = jnp.where(is_term, sp, jnp.where(binop, sp - 2, jnp.where(op == NOT, sp - 1, S)))
        stack = jnp.where(slots == dst[None, :], val[None, :], stack)
        sp = sp + jnp.where(is_term, 1, jnp.where(binop, -1, 0))
        return sp, stack

    init = (jnp.zeros((C,), jnp.int32), jnp.zeros((S, C), bool))
    _, stack = jax.lax.fori_loop(0, n_steps, body, init)
    return stack[0]


def _verify(lists: _Lists, ops, rowids, terms, lengths, stack_depth: int,
            uncertain: jax.Array, word_ids: jax.Array | None, capacity: int) -> jax.Array:
    """Exactly resolve the ``uncertain`` bits (``u32[Bo, NW]``) -> ``u32[Bo, NW]`` eligible.

    ``ops, rowids, terms, lengths``: the program arrays (``Bp`` = 1 or ``Bo`` rows).
    ``word_ids`` (``i32[Bo, NW]`` or None = all words) gives each column's word in the index.
    The batch is flattened, so the work follows the total number of uncertain items, not
    ``Bo`` times the worst row. Each round: the first ``min(Bo*NW, capacity)`` non-zero
    words (``jnp.nonzero(size=)``), their first ``capacity`` set bits compacted into an item
    buffer (rank = cumsum of bits), each item evaluated exactly with its row's program, the
    verified bits scattered back and the processed bits cleared. Rounds repeat
    (``lax.while_loop``) until nothing is uncertain, so any number of uncertain items is
    resolved exactly; the cost grows with ceil(uncertain / capacity)."""
    Bo, NW = uncertain.shape
    W = lists.rows.shape[1]
    T = Bo * NW
    cw = int(min(capacity, T))
    ci = int(capacity)
    lanes = jnp.arange(32, dtype=jnp.uint32)
    Bp = ops.shape[0]

    def pack(bits):  # bool[cw, 32] -> u32[cw]
        return jnp.sum(jnp.where(bits, jnp.uint32(1) << lanes, jnp.uint32(0)), axis=-1,
                       dtype=jnp.uint32)

    def cond(state):
        unc, _ = state
        return jnp.max(unc) != 0

    def body(state):
        unc, acc = state                                            # u32[T] each
        idx = jnp.nonzero(unc != 0, size=cw, fill_value=T)[0]       # [cw]
        safe = jnp.minimum(idx, T - 1)
        words = jnp.where(idx < T, unc[safe], jnp.uint32(0))
        row, col = safe // NW, safe % NW
        widx = col if word_ids is None else jnp.clip(word_ids[row, col], 0, W - 1)
        bits = ((words[:, None] >> lanes) & 1) == 1                 # [cw, 32]
        rank = jnp.cumsum(bits.reshape(-1)).reshape(cw, 32) - 1
        take = bits & (rank < ci)
        dest = jnp.where(take, rank, ci)
        item = widx[:, None] * 32 + lanes.astype(jnp.int32)
        buf = jnp.full((ci,), 32 * W - 1, jnp.int32).at[dest].set(item, mode="drop")
        prow = jnp.zeros((ci,), jnp.int32)
        if Bp > 1:
            prow = prow.at[dest].set(jnp.broadcast_to(row[:, None], (cw, 32)), mode="drop")
        truth = _eval_items(lists, ops, rowids, terms, lengths, stack_depth, buf, prow)
        ok = take & truth[jnp.clip(rank, 0, ci - 1)]
        acc = acc.at[idx].set(acc[safe] | pack(ok), mode="drop")
        unc = unc.at[idx].set(words & ~pack(take), mode="drop")
        return unc, acc

    unc0 = uncertain.reshape(-1)
    _, acc = jax.lax.while_loop(cond, body, (unc0, jnp.zeros_like(unc0)))
    return acc.reshape(Bo, NW)


def _mask_arrays(rows, offsets, item_terms, ops, rowids, terms, lengths, word_ids, *,
                 num_hashes: int, stack_depth: int, dense: int, max_bloom: int,
                 verify_capacity: int, bounds_backend: str = "xla"):
    """The exact mask on arrays (the XLA path; ``bounds_backend`` evaluates the interval
    bounds): ``(u32[Bp, W],)`` when ``dense`` (``word_ids`` ignored), else
    ``(u32[Bo, NW],)``. The operands and params of the native kernel's primitive."""
    wids = None if dense else word_ids
    lo, up = _bounds(rows, ops, rowids, lengths, wids, num_hashes=num_hashes,
                     stack_depth=stack_depth, backend=bounds_backend)
    if lo.size == 0 or rows.shape[1] == 0:      # no programs, words or items: all zero
        return (lo,)
    if wids is not None:
        wids = jnp.broadcast_to(wids, lo.shape)
    lists = _Lists(rows, offsets, item_terms, max(1, int(max_bloom).bit_length() + 1))
    return (lo | _verify(lists, ops, rowids, terms, lengths, stack_depth, up & ~lo, wids,
                         verify_capacity),)


def _mask_shape(rows, offsets, item_terms, ops, rowids, terms, lengths, word_ids, *, dense,
                **_):
    bo = ops.shape[0] if dense else max(ops.shape[0], word_ids.shape[0])
    return [((bo, rows.shape[1] if dense else word_ids.shape[1]), jnp.uint32)]


# On CPU: one custom call (pallas_kernels/native/filter_mask_cpu.cc) where the native library
# is available and the program is not lowered for jax.export, else the XLA path's ops.
_mask_cpu_p = native_cpu_primitive("st_filter_mask_cpu", native.FILTER_MASK_TARGET,
                                   _mask_arrays, _mask_shape)


def _mask_operands(fi: FilterIndex, prog: FilterProgram, wids):
    dummy = jnp.zeros((1, 0), jnp.int32)
    return ((fi.rows, fi.item_offsets.astype(jnp.int32), fi.item_terms.astype(jnp.int32),
             prog.ops.astype(jnp.int32), prog.rowids.astype(jnp.int32),
             prog.terms.astype(jnp.int32), prog.lengths.astype(jnp.int32),
             dummy if wids is None else wids),
            dict(num_hashes=prog.num_hashes, stack_depth=prog.stack_depth,
                 dense=int(wids is None), max_bloom=int(fi.schema.max_bloom_per_item)))


def filter_mask_native(fi: FilterIndex, prog: FilterProgram, *, word_ids: Any = None
                       ) -> jax.Array:
    """:func:`filter_mask` by the native CPU kernel (C++ XLA FFI handler,
    :mod:`pallas_kernels.native`); the same bits. CPU only.

    Raises:
      pallas_kernels.native.NativeUnavailable: the library cannot be built or loaded (when
        the program is lowered); ``backend="auto"`` then takes the XLA path instead.
    """
    return _filter_mask(fi, prog, word_ids=word_ids, backend="native", verify_capacity=2048)


@functools.partial(jax.jit, static_argnames=("backend", "verify_capacity"))
def filter_mask(fi: FilterIndex, prog: FilterProgram, *, word_ids: Any = None,
                backend: str = "auto", verify_capacity: int = 2048) -> jax.Array:
    """Exact eligibility mask (jittable): 0 false positives, 0 false negatives.

    Args:
      fi: the index; prog: from :func:`compile_filter` against ``fi`` (or an equal schema).
      word_ids: optional ``i32[NW]`` or ``i32[B, NW]``: evaluate only these words of the
        index (32 item rows each), e.g. the words of each query's probed IVF clusters
        (SilverTorch's filter/ANN co-design). Out-of-range ids (e.g. -1 padding) give 0.
      backend: ``"auto"`` (chosen when lowered: the Pallas bounds kernel for CUDA; on CPU the
        native kernel, one custom call, where it can be built and not in ``jax.export``
        artifacts; the XLA path elsewhere) | ``"pallas"`` | ``"xla"`` | ``"interpret"``
        (these three: the bounds by that backend, then the XLA verification).
      verify_capacity: uncertain items verified per round and row by the XLA verification
        (static; the native kernel verifies each uncertain word in place).

    Returns:
      Without ``word_ids``: ``u32[W]`` for a shared program, ``u32[B, W]`` per query; bit
      ``i % 32`` of word ``i // 32`` is 1 iff item row ``i`` satisfies the filter; padding
      bits are 0. With ``word_ids``: ``u32[NW]`` (shared program and 1-D ``word_ids``) or
      ``u32[Bo, NW]``, column j holding word ``word_ids[.., j]``.
    """
    return _filter_mask(fi, prog, word_ids=word_ids, backend=backend,
                        verify_capacity=verify_capacity)


def _filter_mask(fi, prog, *, word_ids, backend: str, verify_capacity: int):
    if backend not in filter_eval.BACKENDS + ("native",):
        raise ValueError(f"backend must be one of {filter_eval.BACKENDS}; got {backend!r}")
    _check(fi, prog)
    wids = _word_ids(fi, word_ids)
    if wids is not None:
        bp, bw = prog.ops.shape[0], wids.shape[0]
        if bp != bw and 1 not in (bp, bw):
            raise ValueError(f"{bp} programs vs {bw} word lists: need equal or 1")
    operands, params = _mask_operands(fi, prog, wids)
    params["verify_capacity"] = int(verify_capacity)

    def xla_path(*ops, bounds_backend="xla"):
        return _mask_arrays(*ops, bounds_backend=bounds_backend, **params)[0]

    def kernel(*ops, interpret=False):          # the Pallas bounds kernel, XLA verification
        return xla_path(*ops, bounds_backend="interpret" if interpret else "pallas")

    def cpu(*ops, require_native=False):
        return _mask_cpu_p.bind(*ops, require_native=require_native, **params)[0]

    if backend == "native":
        out = cpu(*operands, require_native=True)
    else:
        out = dispatch(backend, operands, twin=xla_path, kernel=kernel, cpu=cpu)
    shared = not prog.per_query and (word_ids is None or jnp.ndim(word_ids) == 1)
    return out[0] if shared else out


# ----------------------------------------------------------------------------- stats


def _popcount(x: np.ndarray) -> int:
    return int(np.bitwise_count(x).sum())


def _bits_per_item(rows: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Set bits per item (column) of bit-sliced ``u32[R, W]`` rows -> ``i64[32 W]``."""
    W = rows.shape[1]
    count = np.zeros((W, 32), np.int64)
    lanes = np.arange(32, dtype=np.uint32)
    for c in range(0, rows.shape[0], chunk):
        blk = rows[c:c + chunk]
        count += ((blk[:, :, None] >> lanes) & 1).sum(axis=0, dtype=np.int64)
    return count.reshape(-1)


def bloom_stats(fi: FilterIndex, *, max_terms: int | None = None, seed: int = 0,
                prog: FilterProgram | None = None, chunk: int = 64) -> dict[str, Any]:
    """Bloom false-positive rate *before* verification, measured vs theory (host side).

    For each Bloom term t (all, or a random sample of ``max_terms``): its Bloom upper set is
    the AND of its K rows; a Bloom filter has no false negatives, so the false positives are
    ``FP_t = |upper_t| - df_t`` and ``FPR_t = FP_t / (N - df_t)``. ``fpr`` pools them
    (sum FP / sum negatives). Theory for an item holding n Bloom values:
    ``(1 - exp(-K n / M))^K``; ``theory`` is its mean over the items (the expected pooled
    FPR), ``theory_at_mean_load`` uses the mean n. That classic formula draws the K query
    positions with replacement; ours are K *distinct* positions, for which an item with b
    set bits matches with probability ``C(b, K) / C(M, K)`` (smaller for small b):
    ``theory_from_signatures`` is its mean over the items, from the actual signatures.
    FPs are rare events and a few terms whose
    positions overlap a popular Bloom term's can dominate them (``fp_top_term_share``), so
    measure many terms when the FPR is tiny.

    With ``prog``, also reports lower / upper / uncertain counts of that program's bounds.
    """
    s = fi.schema
    rows = np.asarray(fi.rows)
    offsets = np.asarray(fi.item_offsets).astype(np.int64)
    N, M, K = s.num_items, s.bloom_bits, s.num_hashes
    per_item = np.diff(offsets)[:N]
    out: dict[str, Any] = {"num_items": N, "bloom_bits": M, "num_hashes": K,
                           "num_exact_rows": s.num_exact,
                           "num_bloom_terms": int((s.term_op == TERM_BLOOM).sum()),
                           "mean_bloom_values_per_item": float(per_item.mean()) if N else 0.0,
                           "max_bloom_values_per_item": int(s.max_bloom_per_item)}
    if M and N:
        out["theory"] = float(np.mean((1 - np.exp(-K * per_item / M)) ** K))
        out["theory_at_mean_load"] = float((1 - math.exp(-K * per_item.mean() / M)) ** K)
        # from the actual signatures: item i with b_i set bits matches K distinct random
        # positions with probability C(b_i, K) / C(M, K)
        bits = _bits_per_item(rows[FIRST_EXACT_ROW + s.num_exact:])[:N].astype(np.float64)
        ratio = np.ones(N)
        for j in range(K):
            ratio *= np.clip(bits - j, 0, None) / (M - j)
        out["theory_from_signatures"] = float(ratio.mean())
        out["mean_bits_set_per_item"] = float(bits.mean())
    bloom_ids = np.flatnonzero(s.term_op == TERM_BLOOM)
    if max_terms is not None and bloom_ids.size > max_terms:
        rng = np.random.default_rng(seed)
        bloom_ids = np.sort(rng.choice(bloom_ids, max_terms, replace=False))
    upper = np.zeros(bloom_ids.size, np.int64)
    for c in range(0, bloom_ids.size, chunk):
        ids = bloom_ids[c:c + chunk]
        up = np.bitwise_and.reduce(rows[s.term_rows[ids]], axis=1)  # [c, W]
        upper[c:c + chunk] = np.bitwise_count(up).sum(axis=1)
    df = s.term_df[bloom_ids]
    fp = upper - df
    assert (fp >= 0).all(), "Bloom rows miss an item's own term (corrupt index)"
    neg = N - df
    out["terms_measured"] = int(bloom_ids.size)
    out["false_positives"] = int(fp.sum())
    out["negatives"] = int(neg.sum())
    out["fpr"] = float(fp.sum() / neg.sum()) if neg.sum() else 0.0
    out["terms_with_fp"] = int((fp > 0).sum())
    out["fp_top_term_share"] = float(fp.max() / fp.sum()) if fp.sum() else 0.0
    out["per_term"] = [{"term": int(t), "field": s.term_field[t], "value": s.term_value[t],
                        "fp": int(f), "fpr": float(f / n) if n else 0.0}
                       for t, f, n in zip(bloom_ids, fp, neg)]
    if "theory" in out and out["theory"] > 0:
        out["fpr_over_theory"] = out["fpr"] / out["theory"]
    if prog is not None:
        lo, up = filter_bounds(fi, prog, backend="xla")
        lo, up = np.asarray(lo), np.asarray(up)
        out["program_lower"] = [_popcount(r) for r in lo]
        out["program_upper"] = [_popcount(r) for r in up]
        out["program_uncertain"] = [_popcount(u & ~l) for l, u in zip(lo, up)]
    return out
