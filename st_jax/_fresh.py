"""Fresh index: in-place updates of a published index, and the merged main + fresh search.

SilverTorch §5 keeps a *fresh index with the same layout* as the main one, updated while
serving, and merges both result lists before the OverArch. Here:

- :class:`FreshIndex` is a fixed-capacity item store (a flat :class:`~st_jax.Index` over
  ``capacity`` slots, padded) plus the id look-up of the main index it belongs to. All
  arrays have static shapes, so every update below keeps shapes and dtypes: nothing that
  consumes the indexes recompiles while the capacity lasts.
- :func:`add`, :func:`delete`, :func:`update` are pure functions ``(main, fresh, ...) ->
  (main, fresh)``. A delete is a *tombstone*: the item's bit in ``main.live`` (main items)
  or in the fresh store's ``live`` words (fresh items) is cleared, so it disappears from
  both :func:`search_fresh` and a plain :func:`~st_jax.search` on the returned main index at
  once. An update of a main item tombstones it in main and writes the new version into a
  fresh slot; an update of a fresh item rewrites its slot. Slots are never reused before
  :func:`compact` (deleted slots stay used), so ``capacity`` bounds the number of writes
  between two compactions; past it :class:`IndexFullError` asks to compact / republish.
- :func:`search_fresh` searches both indexes (the main one with its own ``search`` core:
  flat or IVF, filters, allow masks, rerank) and merges the two top-k lists into one,
  reporting per result where it came from (``source``: 0 main, 1 fresh). Every id is live
  in at most one of the two indexes (``add`` refuses live ids, ``update`` tombstones the
  main version), so the merge has no duplicates and no stale versions.
- :func:`compact` builds a new main index from all live items (main minus tombstones, plus
  fresh); pair it with a new :func:`create_fresh`.

Filters on fresh items (exact, including values the main index has never seen):

- The fresh store has its own bit-sliced filter index with the main index's Bloom
  parameters (M bits, K hashes, seed) and **every term as a Bloom term**: no exact rows, so
  adding an item only sets the K bits of each of its values in its slot's column (plus the
  VALID bit). Bloom bits are a function of ``(field, value)`` alone, so a brand-new value
  needs no row of its own.
- Exactness comes from the same verification as the main index: each slot keeps the sorted
  list of its term ids (fixed width ``max_terms_per_item``, padded with ``INT32_MAX``), and
  every Bloom-uncertain slot is re-checked against it, so there are no false positives and
  (Bloom filters having none) no false negatives, under NOT too.
- Term ids come from :class:`FreshVocab`, an **append-only intern table** seeded with the
  main index's term dictionary: a value the main index knows keeps its main term id; a new
  value gets the next free id the first time it is seen, by an ``add``/``update`` *or by a
  filter* compiled against the fresh index. Ids are never reassigned, so a filter program
  compiled (and possibly baked into a jitted function) at any time stays valid for every
  later version of the fresh index. The table is shared by all versions of one fresh index
  (it is static pytree metadata compared by identity), so growing it never retriggers jit.
  A filter is therefore compiled twice, host side and cheaply: against the main schema
  (unknown values fold to FALSE there, which is exact for main) and against the table.

Shapes below: ``C`` = capacity, ``Cp`` = padded capacity (multiple of 1024, the store's
rows), ``L`` = ``max_terms_per_item``, ``D`` / ``Dp`` = dim / padded dim, ``N`` main items.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._select import top_k
from pallas_kernels.int8_topk import NEG_INF, pack_mask, padded_rows
from st_jax._filter_index import (FIRST_EXACT_ROW, VALID_ROW, FilterIndex, FilterSchema,
                                  _field_pairs, bloom_positions, compile_filter,
                                  segment_positions)
from st_jax._filter_lang import TERM_BLOOM, TERM_EXACT
from st_jax._index import CACHE_DTYPES, Index, build_index
from st_jax._quant import quantize_int8
from st_jax import _compiled
from st_jax._search import (_search_core, allow_array, check_max_nprobe,
                            check_min_eligible_factor, check_options, check_queries,
                            eligibility_words, empty_result, filter_program, float_scores)
from st_jax._types import Int8Matrix, _static, pytree_dataclass

__all__ = ["FreshIndex", "FreshVocab", "FreshSearchResult", "IndexFullError", "UnknownIdError",
           "DuplicateIdError", "create_fresh", "add", "delete", "update", "search_fresh",
           "compact", "compile_fresh_filter"]

SOURCE_MAIN, SOURCE_FRESH = 0, 1
_PAD_TERM = np.iinfo(np.int32).max          # pads a slot's sorted term list (never a term id)
_MIN_BATCH = 32


# ----------------------------------------------------------------------------- errors


class IndexFullError(RuntimeError):
    """The fresh index has no free slot left for this write."""


class UnknownIdError(KeyError):
    """``delete`` / ``update`` of ids that are not live in the main or the fresh index."""

    def __str__(self) -> str:                 # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateIdError(ValueError):
    """``add`` of ids that are already live (in main or fresh), or repeated in one call."""


# ----------------------------------------------------------------------------- vocabulary


class FreshVocab:
    """Append-only term intern table of a fresh index (host side, thread safe).

    Term ids ``0 .. T-1`` are the main index's (same ``(field, value)`` -> id); new values
    get ids ``T, T+1, ...`` in order of first appearance. Implements the ``TermResolver``
    protocol of :func:`~st_jax._filter_lang.compile_filter`: every term resolves to a Bloom
    term (rows ``2 + bloom_positions``) of the fresh store's filter index, interning unseen
    values, so nothing is folded to a constant that a later ``add`` could invalidate.

    Equality and hash are identity (the default): every version of one fresh index shares
    this object, so jit caches keyed on a :class:`FreshIndex` hit across updates.
    """

    zero_row = 0
    valid_row = VALID_ROW

    def __init__(self, main_schema: FilterSchema):
        self.main_schema = main_schema
        self.num_hashes = int(main_schema.num_hashes)
        self.bloom_bits = int(main_schema.bloom_bits)
        self.seed = int(main_schema.seed)
        self.field_types = dict(main_schema.field_types)
        self._fields = sorted(self.field_types)
        self._field_index = {f: i for i, f in enumerate(self._fields)}
        self._base = int(main_schema.num_terms)
        self._extra: dict[str, dict[Any, int]] = {f: {} for f in self._fields}
        self._extra_field: list[int] = []
        self._extra_value: list[Any] = []
        self._pos: dict[int, np.ndarray] = {}
        self._main_field: np.ndarray | None = None
        self._lock = threading.RLock()

    # -- compile_filter protocol
    def resolve(self, field: str, value: Any) -> tuple[int, tuple[int, ...], int]:
        t = self.term_id(field, value)
        return TERM_BLOOM, tuple(int(r) for r in FIRST_EXACT_ROW + self.positions(t)), t

    # -- interning
    @property
    def num_terms(self) -> int:
        return self._base + len(self._extra_value)

    def term_id(self, field: str, value: Any) -> int:
        """The id of ``field:value``, interning it if new (never fails for a known field)."""
        t = self.main_schema.vocab[field].get(value)
        if t is not None:
            return int(t)
        with self._lock:
            t = self._extra[field].get(value)
            if t is None:
                t = self._extra[field][value] = self.num_terms
                self._extra_field.append(self._field_index[field])
                self._extra_value.append(value)
            return t

    def positions(self, t: int) -> np.ndarray:
        """``i32[K]`` Bloom bit positions of term ``t`` (cached)."""
        p = self._pos.get(t)
        if p is None:
            field, value = self.term(t)
            p = np.asarray(bloom_positions(field, value, self.bloom_bits, self.num_hashes,
                                           self.seed), np.int32)
            self._pos[t] = p
        return p

    def term(self, t: int) -> tuple[str, Any]:
        """``(field, value)`` of term id ``t``."""
        t = int(t)
        if t < self._base:
            return self.main_schema.term_field[t], self.main_schema.term_value[t]
        return self._fields[self._extra_field[t - self._base]], self._extra_value[t - self._base]

    def field_of(self, terms: np.ndarray) -> np.ndarray:
        """Field index (into ``sorted(field_types)``) of each term id, ``i64[P]``."""
        if self._main_field is None:
            self._main_field = np.asarray(
                [self._field_index[f] for f in self.main_schema.term_field], np.int64)
        terms = np.asarray(terms, np.int64)
        with self._lock:
            extra = np.asarray(self._extra_field, np.int64)
        main = terms < self._base
        out = np.empty(terms.shape, np.int64)
        out[main] = self._main_field[terms[main]]
        out[~main] = extra[terms[~main] - self._base]
        return out

    def check_type(self, field: str, ftype: str) -> None:
        if field not in self.field_types:
            known = ", ".join(self._fields) or "(none)"
            raise ValueError(f"unknown attribute field {field!r}; the fresh index has the main "
                             f"index's fields ({known}): rebuild the main index to add fields")
        with self._lock:
            have = self.field_types[field]
            if ftype == "any" or have == ftype:
                return
            if have == "any":            # no item had a value yet: the first add fixes it
                self.field_types[field] = ftype
                return
        raise ValueError(f"attribute {field!r} holds {have} values in the index; got {ftype} "
                         "values")

    def __repr__(self) -> str:
        return (f"FreshVocab({len(self._fields)} fields, {self._base} main terms + "
                f"{len(self._extra_value)} new, Bloom M={self.bloom_bits} K={self.num_hashes})")


def _store_schema(n_pad: int, vocab: FreshVocab, max_terms: int) -> FilterSchema:
    """Static schema of the fresh store's filter index: only what ``filter_mask`` reads
    (sizes); term resolution goes through the :class:`FreshVocab`."""
    M, K = vocab.bloom_bits, vocab.num_hashes
    return FilterSchema(field_types={}, vocab={}, term_op=np.zeros(0, np.int32),
                        term_rows=np.zeros((0, K), np.int32), term_df=np.zeros(0, np.int64),
                        num_items=n_pad, n_pad=n_pad, num_exact=0, bloom_bits=M, num_hashes=K,
                        seed=vocab.seed, max_bloom_per_item=max_terms,
                        fingerprint=f"fresh-store/{n_pad}/{M}/{K}/{vocab.seed}/{max_terms}",
                        term_field=[], term_value=[])


# ----------------------------------------------------------------------------- pytrees


@pytree_dataclass
class FreshIndex:
    """A fixed-capacity store of new / updated items next to a main :class:`~st_jax.Index`.

    Attributes:
      store: a flat :class:`~st_jax.Index` over ``Cp`` slots: ``items`` (codes
        ``i8[Cp, Dp]``, scale ``f32[Cp]``), ``ids`` (``i32/i64[Cp]`` id per slot, -1 free or
        deleted), ``live`` (``u32[Cp / 32]`` live slots), ``cache`` (``[Cp, D]`` in the main
        index's cache dtype, or None), ``filters`` (:class:`FilterIndex` with ``rows
        u32[2 + M, Cp / 32]``, ``item_offsets = L * arange(Cp + 1)``, ``item_terms
        i32[Cp * L + 1]``: each slot's sorted term ids), or None without attributes.
      count: ``i32[]`` slots used so far (next free slot).
      main_ids: ``i32/i64[N]`` the main index's ids, sorted; main_rows: ``i32[N]`` the
        storage row of each (id look-up for delete / update).
      vocab: static :class:`FreshVocab` (None when the main index has no attributes).
      capacity: static C, the writes allowed before compaction; max_terms: static L.
    """

    store: Index
    count: Any
    main_ids: Any
    main_rows: Any
    vocab: Any = _static(default=None)
    capacity: int = _static(default=0)
    max_terms: int = _static(default=0)

    @property
    def num_used(self) -> int:
        """Slots written so far (host sync)."""
        return int(self.count)

    @property
    def num_live(self) -> int:
        """Live fresh items (host sync)."""
        return int(np.bitwise_count(np.asarray(self.store.live)).sum())

    @property
    def slot_ids(self) -> jax.Array:
        """``i32/i64[Cp]`` id held by each slot (-1: free or deleted); index ``fresh_allow``
        masks of :func:`search_fresh` with it."""
        return self.store.ids


@pytree_dataclass
class FreshSearchResult:
    """Result of :func:`search_fresh`.

    Attributes:
      ids: ``i32[B, k]`` (or i64) item ids, best first, -1 padded.
      scores: ``f32[B, k]`` Int8 scores (exact with rerank), -inf padded.
      count: ``i32[B]`` valid entries per row.
      path: ``i32[B]`` how the main index served each query (see ``SearchResult.path``).
      source: ``i32[B, k]`` 0 = main index, 1 = fresh index, -1 = padding.
    """

    ids: jax.Array
    scores: jax.Array
    count: jax.Array
    path: jax.Array
    source: jax.Array


# ----------------------------------------------------------------------------- creation


def _with_live(index: Index) -> Index:
    """``index`` with explicit live words (a flat index built without deletions has None:
    the first N rows)."""
    if index.live is not None:
        return index
    live = pack_mask(jnp.arange(index.num_rows) < index.num_items)
    return dataclasses.replace(index, live=live)


def create_fresh(main: Index, capacity: int, *, max_terms_per_item: int = 32) -> FreshIndex:
    """An empty fresh index for ``main``.

    Args:
      main: the published :class:`~st_jax.Index` (flat or IVF).
      capacity: C, items that can be written (added or updated) before :func:`compact`.
      max_terms_per_item: L, attribute values (over all fields) one fresh item may hold.
    Returns:
      :class:`FreshIndex` with the main index's dim, id dtype, cache dtype and filter
      schema (fields and their types, Bloom M / K / seed, term dictionary).
    Raises:
      ValueError: bad capacity / L.
    """
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ValueError(f"capacity must be a positive int; got {capacity!r}")
    if not isinstance(max_terms_per_item, (int, np.integer)) or max_terms_per_item < 1:
        raise ValueError(f"max_terms_per_item must be a positive int; got {max_terms_per_item!r}")
    cp, L = padded_rows(int(capacity)), int(max_terms_per_item)
    d_pad = main.items.codes.shape[1]
    id_dtype = jnp.int32 if main.ids is None else main.ids.dtype
    cache = None if main.cache is None else jnp.zeros((cp, main.dim), main.cache.dtype)
    vocab = filters = None
    if main.filters is not None:
        vocab = FreshVocab(main.filters.schema)
        rows = jnp.zeros((FIRST_EXACT_ROW + vocab.bloom_bits, cp // 32), jnp.uint32)
        filters = FilterIndex(rows=rows, item_offsets=jnp.arange(cp + 1, dtype=jnp.int32) * L,
                              item_terms=jnp.concatenate([
                                  jnp.full((cp * L,), _PAD_TERM, jnp.int32),
                                  jnp.full((1,), -2, jnp.int32)]),
                              schema=_store_schema(cp, vocab, L))
    store = Index(items=Int8Matrix(codes=jnp.zeros((cp, d_pad), jnp.int8),
                                   scale=jnp.zeros((cp,), jnp.float32)),
                  ids=jnp.full((cp,), -1, id_dtype), live=jnp.zeros((cp // 32,), jnp.uint32),
                  cache=cache, filters=filters, num_items=cp, dim=main.dim)
    # id look-up of the main index (host, once): sorted ids and the row holding each
    n = main.num_items
    pos_ids = np.arange(n) if main.ids is None else np.asarray(main.ids)
    if main.perm is None:
        row_of_pos = np.arange(n, dtype=np.int32)
    else:
        perm = np.asarray(main.perm)
        row_of_pos = np.zeros(n, np.int32)
        real = perm >= 0
        row_of_pos[perm[real]] = np.flatnonzero(real)
    order = np.argsort(pos_ids, kind="stable")
    return FreshIndex(store=store, count=jnp.zeros((), jnp.int32),
                      main_ids=jnp.asarray(pos_ids[order].astype(np.dtype(id_dtype))),
                      main_rows=jnp.asarray(row_of_pos[order]), vocab=vocab,
                      capacity=int(capacity), max_terms=L)


# ----------------------------------------------------------------------------- jitted cores


def _slot_bits(slots, n_rows):
    """``slots i32[n]`` (``n_rows`` = padding) -> (word i32[n], bit u32[n], touched u32[W])."""
    w_total = n_rows // 32
    ok = slots < n_rows
    word = jnp.where(ok, slots // 32, w_total)
    bit = jnp.where(ok, jnp.left_shift(jnp.uint32(1), (slots % 32).astype(jnp.uint32)),
                    jnp.uint32(0))
    touched = jnp.zeros((w_total,), jnp.uint32).at[word].add(bit, mode="drop")  # distinct bits
    return word, bit, touched


def _live_bit(live, rows):
    safe = jnp.clip(rows, 0, live.shape[0] * 32 - 1)
    return ((live[safe // 32] >> (safe % 32).astype(jnp.uint32)) & 1) == 1


@jax.jit
def _lookup_core(main_live, main_ids, main_rows, slot_ids, slot_live, q):
    """-> (main row i32[n] or -1, fresh slot i32[n] or -1) of the *live* holder of each id."""
    n_main = main_ids.shape[0]
    p = jnp.clip(jnp.searchsorted(main_ids, q), 0, n_main - 1)
    row = main_rows[p]
    in_main = (main_ids[p] == q) & _live_bit(main_live, row)
    order = jnp.argsort(slot_ids)
    sids = slot_ids[order]
    s = jnp.clip(jnp.searchsorted(sids, q), 0, sids.shape[0] - 1)
    slot = order[s]
    in_fresh = (sids[s] == q) & _live_bit(slot_live, slot)
    return (jnp.where(in_main, row, -1).astype(jnp.int32),
            jnp.where(in_fresh, slot, -1).astype(jnp.int32))


@jax.jit
def _tombstone_core(live, rows):
    """Clears the live bits of ``rows i32[n]`` (``32 * W`` = padding)."""
    _, _, touched = _slot_bits(rows, live.shape[0] * 32)
    return live & ~touched


@jax.jit
def _write_core(store: Index, slots, codes, scale, cache, ids, terms, bpos):
    """Writes items into ``slots i32[n]`` (``Cp`` = padding, dropped) and marks them live.

    ``codes i8[n, Dp]``, ``scale f32[n]``, ``cache [n, D]`` or None, ``ids [n]``,
    ``terms i32[n, L]`` (sorted, ``INT32_MAX`` padded), ``bpos i32[n, L * K]`` Bloom bit
    positions to set (-1 padded). Slots must be distinct.
    """
    cp = store.num_rows
    word, bit, touched = _slot_bits(slots, cp)
    items = Int8Matrix(codes=store.items.codes.at[slots].set(codes, mode="drop"),
                       scale=store.items.scale.at[slots].set(scale, mode="drop"))
    new_cache = None
    if store.cache is not None:
        new_cache = store.cache.at[slots].set(cache.astype(store.cache.dtype), mode="drop")
    filters = store.filters
    if filters is not None:
        r = filters.rows.shape[0]
        n = slots.shape[0]
        cols = jnp.zeros((r, n), jnp.uint32).at[VALID_ROW].set(bit)
        prow = jnp.where(bpos >= 0, FIRST_EXACT_ROW + bpos, r)
        cols = cols.at[prow, jnp.arange(n)[:, None]].set(
            jnp.broadcast_to(bit[:, None], prow.shape), mode="drop")
        # the slots' bits are cleared first, so adding distinct bits per word is an OR
        rows = (filters.rows & ~touched[None, :]).at[:, word].add(cols, mode="drop")
        L = terms.shape[1]
        body = filters.item_terms[:-1].reshape(cp, L).at[slots].set(terms, mode="drop")
        filters = dataclasses.replace(filters, rows=rows, item_terms=jnp.concatenate(
            [body.reshape(-1), filters.item_terms[-1:]]))
    return dataclasses.replace(store, items=items, cache=new_cache, filters=filters,
                               ids=store.ids.at[slots].set(ids, mode="drop"),
                               live=store.live | touched)


@jax.jit
def _clear_core(store: Index, slots):
    """Deletes the items of ``slots i32[n]`` (``Cp`` = padding): live bit, id, filter column
    and term list cleared (the slot stays used until compaction)."""
    cp = store.num_rows
    _, _, touched = _slot_bits(slots, cp)
    filters = store.filters
    if filters is not None:
        L = filters.schema.max_bloom_per_item
        body = filters.item_terms[:-1].reshape(cp, L).at[slots].set(_PAD_TERM, mode="drop")
        filters = dataclasses.replace(filters, rows=filters.rows & ~touched[None, :],
                                      item_terms=jnp.concatenate(
                                          [body.reshape(-1), filters.item_terms[-1:]]))
    return dataclasses.replace(store, filters=filters, live=store.live & ~touched,
                               ids=store.ids.at[slots].set(-1, mode="drop"))


@jax.jit
def _gather_core(main: Index, store: Index, main_rows, slots):
    """Current vectors of items living at ``main_rows`` (>= 0) or else ``slots``:
    ``(codes i8[n, Dp], scale f32[n], cache [n, D] f32 or None)``."""
    from_main = main_rows >= 0
    mr, fs = jnp.maximum(main_rows, 0), jnp.maximum(slots, 0)
    codes = jnp.where(from_main[:, None], main.items.codes[mr], store.items.codes[fs])
    scale = jnp.where(from_main, main.items.scale[mr], store.items.scale[fs])
    cache = None
    if store.cache is not None:
        cache = jnp.where(from_main[:, None], main.cache[mr].astype(jnp.float32),
                          store.cache[fs].astype(jnp.float32))
    return codes, scale, cache


# ----------------------------------------------------------------------------- host helpers


def _bucket(n: int) -> int:
    """Batch sizes are padded to powers of two (>= 32): few distinct write shapes."""
    return max(_MIN_BATCH, 1 << max(0, n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("axis",))
def _take_core(x, idx, axis: int):
    return jnp.take(x, idx, axis=axis)


def _take(x, idx, axis: int = 0) -> np.ndarray:
    """``x`` gathered at ``idx`` along ``axis``, on device, as numpy: ``idx`` is padded to a
    :func:`_bucket` size so that host-side lookups of any size compile a few shapes only."""
    idx = np.asarray(idx, np.int64).reshape(-1)
    n = idx.size
    pad = np.zeros(_bucket(n), np.int32)
    pad[:n] = idx
    out = np.asarray(_take_core(x, jnp.asarray(pad), axis=axis))
    return out[(slice(None),) * axis + (slice(0, n),)]


def _pad_rows(x, nb: int, value=0):
    x = jnp.asarray(x)
    return jnp.pad(x, [(0, nb - x.shape[0])] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def _check_same_main(main: Index, fresh: FreshIndex) -> None:
    if fresh.main_ids.shape[0] != main.num_items or fresh.store.dim != main.dim or \
            (fresh.vocab is None) != (main.filters is None) or \
            (fresh.vocab is not None and fresh.vocab.main_schema != main.filters.schema):
        raise ValueError("this fresh index was created for another main index: "
                         "create_fresh(main, capacity) for this one")


def _as_ids(fresh: FreshIndex, ids, what: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{what}: ids must be a 1-D integer array; got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: ids must be integers; got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what}: ids must be >= 0 (-1 marks empty result slots)")
    dt = np.dtype(fresh.main_ids.dtype)
    if arr.size and arr.max() > np.iinfo(dt).max:
        raise ValueError(f"{what}: ids exceed the {dt} range of this index; build the main "
                         "index with 64-bit ids (jax_enable_x64) to use them")
    vals, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise DuplicateIdError(f"{what}: ids repeated in one call: "
                               f"{vals[counts > 1][:10].tolist()}")
    return arr.astype(dt)


def _lookup(main: Index, fresh: FreshIndex, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Host ``(main_row i32[n], fresh_slot i32[n])``, -1 where the id is not live there."""
    nb = _bucket(ids.size)
    q = jnp.asarray(np.pad(ids, (0, nb - ids.size), constant_values=-1))
    mrow, slot = _lookup_core(_with_live(main).live, fresh.main_ids, fresh.main_rows,
                              fresh.store.ids, fresh.store.live, q)
    return np.asarray(mrow)[:ids.size], np.asarray(slot)[:ids.size]


def _check_capacity(fresh: FreshIndex, needed: int, what: str) -> int:
    used = fresh.num_used
    if used + needed > fresh.capacity:
        raise IndexFullError(
            f"{what}: the fresh index is full: {used} of {fresh.capacity} slots used (deleted "
            f"and updated items keep their slot until compaction), {needed} more needed. "
            "Compact it into a new main index (compact(main, fresh), then create_fresh) and "
            "republish, or create the fresh index with a larger capacity")
    return used


def _attr_pairs(fresh: FreshIndex, attributes, n: int, what: str):
    """``{field: n values}`` -> (fields set, item i64[P], term i64[P]) (interning values)."""
    if attributes is None:
        return set(), np.zeros(0, np.int64), np.zeros(0, np.int64)
    if fresh.vocab is None:
        raise ValueError(f"{what}: attributes need a main index built with attributes "
                         "(build_index(..., attributes={field: values}))")
    if not hasattr(attributes, "items"):
        raise ValueError(f"{what}: attributes must be a mapping {{field: one value per item}}")
    vocab = fresh.vocab
    items, terms = [], []
    for field, values in attributes.items():
        vals = values if isinstance(values, np.ndarray) else list(values)
        if len(vals) != n:
            raise ValueError(f"{what}: attributes[{field!r}] has {len(vals)} values for {n} items")
        ftype, distinct, it, local = _field_pairs(field, vals, n)
        vocab.check_type(field, ftype)
        tid = np.asarray([vocab.term_id(field, v) for v in distinct], np.int64)
        items.append(it)
        terms.append(tid[local] if tid.size else np.zeros(0, np.int64))
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
    return set(attributes), cat(items), cat(terms)


@functools.lru_cache(maxsize=16)
def _exact_term_of_row(schema: FilterSchema) -> np.ndarray:
    """``i64[E]``: term id of each EXACT row of a main filter index."""
    out = np.zeros(schema.num_exact, np.int64)
    ex = np.flatnonzero(schema.term_op == TERM_EXACT)
    out[schema.term_rows[ex, 0] - FIRST_EXACT_ROW] = ex
    return out


def _main_pairs(main: Index, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Term ids of the main items at storage ``rows i64[n]`` -> (item i64[P], term i64[P])."""
    fi = main.filters
    s = fi.schema
    n = rows.size
    items, terms = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if n and s.num_exact:
        w = _take(fi.rows, rows // 32, axis=1)[FIRST_EXACT_ROW:FIRST_EXACT_ROW + s.num_exact]
        has = ((w >> (rows % 32).astype(np.uint32)) & 1).astype(bool)     # [E, n]
        e, j = np.nonzero(has)
        items.append(j.astype(np.int64))
        terms.append(_exact_term_of_row(s)[e])
    if n:
        bounds = _take(fi.item_offsets, np.concatenate([rows, rows + 1])).astype(np.int64)
        start, length = bounds[:n], bounds[n:] - bounds[:n]
        if length.sum():
            items.append(np.repeat(np.arange(n, dtype=np.int64), length))
            terms.append(_take(fi.item_terms, segment_positions(start, length)
                               ).astype(np.int64))
    return np.concatenate(items), np.concatenate(terms)


def _fresh_pairs(fresh: FreshIndex, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Term ids of the fresh items in ``slots`` -> (item i64[P], term i64[P])."""
    L = fresh.max_terms
    slots = np.asarray(slots, np.int64)
    mat = _take(fresh.store.filters.item_terms,
                (slots[:, None] * L + np.arange(L)).reshape(-1)).reshape(slots.size, L)
    j, c = np.nonzero(mat != _PAD_TERM)
    return j.astype(np.int64), mat[j, c].astype(np.int64)


def _term_rows(fresh: FreshIndex, items, terms, n: int, ids: np.ndarray, nb: int, what: str):
    """Pairs -> ``(terms i32[nb, L], bpos i32[nb, L * K])`` of the batch."""
    L = fresh.max_terms
    if fresh.vocab is None:
        return None, None
    K = fresh.vocab.num_hashes
    key = np.unique(items * (1 << 32) + terms)          # sorted by item, then term; deduped
    items, terms = key >> 32, key & 0xFFFFFFFF
    counts = np.bincount(items, minlength=n)
    if counts.size and counts.max() > L:
        bad = np.flatnonzero(counts > L)
        raise ValueError(f"{what}: items {ids[bad][:10].tolist()} have {counts[bad][:10].tolist()}"
                         f" attribute values; a fresh item holds at most {L} "
                         "(create_fresh(..., max_terms_per_item=))")
    rank = np.arange(items.size) - (np.cumsum(counts) - counts)[items]
    mat = np.full((nb, L), _PAD_TERM, np.int32)
    mat[items, rank] = terms
    bpos = np.full((nb, L * K), -1, np.int32)
    if terms.size:
        uniq, inv = np.unique(terms, return_inverse=True)
        pos = np.stack([fresh.vocab.positions(int(t)) for t in uniq])      # [U, K]
        bpos[items[:, None], rank[:, None] * K + np.arange(K)] = pos[inv]
    return jnp.asarray(mat), jnp.asarray(bpos)


def _write(fresh: FreshIndex, slots: np.ndarray, ids: np.ndarray, codes, scale, cache,
           items, terms, what: str) -> FreshIndex:
    n = ids.size
    nb = _bucket(n)
    cp = fresh.store.num_rows
    tmat, bpos = _term_rows(fresh, items, terms, n, ids, nb, what)
    store = _write_core(
        fresh.store, jnp.asarray(np.pad(slots.astype(np.int32), (0, nb - n), constant_values=cp)),
        _pad_rows(codes, nb), _pad_rows(scale, nb),
        None if fresh.store.cache is None else _pad_rows(cache, nb),
        _pad_rows(jnp.asarray(ids), nb, -1), tmat, bpos)
    count = jnp.maximum(fresh.count, jnp.int32(int(slots.max()) + 1 if n else 0))
    return dataclasses.replace(fresh, store=store, count=count)


def _encode_embeddings(fresh: FreshIndex, embeddings, n: int, what: str):
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape != (n, fresh.store.dim):
        raise ValueError(f"{what}: embeddings must be f32[{n}, {fresh.store.dim}] (one row per "
                         f"id); got shape {x.shape}")
    m = quantize_int8(x)                     # validates dtype / finiteness, names bad rows
    d_pad = fresh.store.items.codes.shape[1]
    codes = jnp.pad(m.codes, ((0, 0), (0, d_pad - x.shape[1])))
    cache = None if fresh.store.cache is None else jnp.asarray(x.astype(np.float32))
    return codes, m.scale, cache


# ----------------------------------------------------------------------------- updates


def add(main: Index, fresh: FreshIndex, ids, embeddings, attributes=None) -> FreshIndex:
    """Adds new items to the fresh index.

    Args:
      main: the main index (its live ids are checked, it is not changed).
      fresh: from :func:`create_fresh` (or a previous update).
      ids: ``int[n]`` new ids, not live in ``main`` or ``fresh`` (a deleted id may be re-added).
      embeddings: ``f32[n, D]``, finite.
      attributes: optional ``{field: n values}`` as in ``build_index`` (str / int, a list
        for several values, None / [] for none); fields must be the main index's (values it
        has never seen are fine: they are filterable exactly). Missing fields: no value.
    Returns:
      the new :class:`FreshIndex` (same shapes).
    Raises:
      DuplicateIdError: ids already live, or repeated. IndexFullError: no room.
      ValueError: shapes, dtypes, NaN/Inf, unknown fields, wrong value types, too many values.
    """
    _check_same_main(main, fresh)
    ids = _as_ids(fresh, ids, "add")
    n = ids.size
    if n == 0:
        return fresh
    codes, scale, cache = _encode_embeddings(fresh, embeddings, n, "add")
    mrow, slot = _lookup(main, fresh, ids)
    live = (mrow >= 0) | (slot >= 0)
    if live.any():
        raise DuplicateIdError(f"add: ids already live in the index: {ids[live][:10].tolist()}; "
                               "use update() to change them")
    used = _check_capacity(fresh, n, "add")
    _, items, terms = _attr_pairs(fresh, attributes, n, "add")
    return _write(fresh, used + np.arange(n), ids, codes, scale, cache, items, terms, "add")


def delete(main: Index, fresh: FreshIndex, ids) -> tuple[Index, FreshIndex]:
    """Deletes live items wherever they live (tombstones, honoured at once by both indexes).

    Args:
      ids: ``int[n]`` ids live in ``main`` or ``fresh``.
    Returns:
      ``(main, fresh)``: ``main`` with the deleted rows' ``live`` bits cleared (``live``
      materialised if it was None), ``fresh`` with the deleted slots cleared.
    Raises:
      UnknownIdError: ids not live anywhere (never added, or already deleted).
    """
    _check_same_main(main, fresh)
    ids = _as_ids(fresh, ids, "delete")
    main = _with_live(main)
    if ids.size == 0:
        return main, fresh
    mrow, slot = _lookup(main, fresh, ids)
    unknown = (mrow < 0) & (slot < 0)
    if unknown.any():
        raise UnknownIdError(f"delete: ids not live in the main or fresh index: "
                             f"{ids[unknown][:10].tolist()}")
    nb = _bucket(ids.size)
    if (mrow >= 0).any():
        rows = np.where(mrow >= 0, mrow, main.num_rows)
        main = dataclasses.replace(main, live=_tombstone_core(
            main.live, jnp.asarray(np.pad(rows, (0, nb - rows.size),
                                          constant_values=main.num_rows))))
    if (slot >= 0).any():
        cp = fresh.store.num_rows
        s = np.where(slot >= 0, slot, cp)
        fresh = dataclasses.replace(fresh, store=_clear_core(
            fresh.store, jnp.asarray(np.pad(s, (0, nb - s.size), constant_values=cp))))
    return main, fresh


def update(main: Index, fresh: FreshIndex, ids, embeddings=None, attributes=None
           ) -> tuple[Index, FreshIndex]:
    """Updates the embeddings and/or attributes of live items.

    An item of the main index is tombstoned there and its new version written to a new
    fresh slot (its unchanged embedding / attributes copied from main: the Int8 codes,
    scale and float cache rows as stored, the term ids exactly); an item of the fresh index
    is rewritten in its slot.

    Args:
      ids: ``int[n]`` live ids (each once).
      embeddings: ``f32[n, D]`` new embeddings, or None to keep them.
      attributes: ``{field: n values}``: each named field is *replaced* (None / [] clears
        it); fields not named keep their values. None keeps all attributes.
    Returns:
      ``(main, fresh)`` (``main.live`` materialised).
    Raises:
      UnknownIdError: ids not live anywhere. IndexFullError: not enough free slots for the
      main items being moved. ValueError: as :func:`add`.
    """
    _check_same_main(main, fresh)
    ids = _as_ids(fresh, ids, "update")
    main = _with_live(main)
    n = ids.size
    if n == 0:
        return main, fresh
    if embeddings is None and attributes is None:
        raise ValueError("update: give new embeddings and/or attributes")
    mrow, slot = _lookup(main, fresh, ids)
    unknown = (mrow < 0) & (slot < 0)
    if unknown.any():
        raise UnknownIdError(f"update: ids not live in the main or fresh index: "
                             f"{ids[unknown][:10].tolist()}; use add() for new items")
    in_main = mrow >= 0
    used = _check_capacity(fresh, int(in_main.sum()), "update")
    new_slot = slot.copy()
    new_slot[in_main] = used + np.arange(int(in_main.sum()))
    if embeddings is not None:
        codes, scale, cache = _encode_embeddings(fresh, embeddings, n, "update")
    else:
        codes, scale, cache = _gather_core(main, fresh.store, jnp.asarray(mrow), jnp.asarray(slot))
    items = terms = np.zeros(0, np.int64)
    if fresh.vocab is not None:
        fields, new_items, new_terms = _attr_pairs(fresh, attributes, n, "update")
        mi, mt = _main_pairs(main, mrow[in_main].astype(np.int64))
        fi_, ft = _fresh_pairs(fresh, slot[~in_main])
        old_items = np.concatenate([np.flatnonzero(in_main)[mi], np.flatnonzero(~in_main)[fi_]])
        old_terms = np.concatenate([mt, ft])
        if fields:                                   # drop the replaced fields' old values
            drop = np.isin(fresh.vocab.field_of(old_terms),
                           [fresh.vocab._field_index[f] for f in fields])
            old_items, old_terms = old_items[~drop], old_terms[~drop]
        items = np.concatenate([old_items, new_items])
        terms = np.concatenate([old_terms, new_terms])
    elif attributes is not None:
        _attr_pairs(fresh, attributes, n, "update")            # raises the clear error
    new_fresh = _write(fresh, new_slot, ids, codes, scale, cache, items, terms, "update")
    if in_main.any():
        nb = _bucket(n)
        rows = np.where(in_main, mrow, main.num_rows)
        main = dataclasses.replace(main, live=_tombstone_core(
            main.live, jnp.asarray(np.pad(rows, (0, nb - n), constant_values=main.num_rows))))
    return main, new_fresh


# ----------------------------------------------------------------------------- search


def compile_fresh_filter(fresh: FreshIndex, filter, batch_size: int | None = None):
    """Compiles a filter against the fresh index (host side; interns unseen values)."""
    if fresh.vocab is None:
        raise ValueError("filter needs an index built with attributes: "
                         "build_index(..., attributes={field: values})")
    return compile_filter(fresh.vocab, filter, batch_size=batch_size)


def _fresh_allow_words(store: Index, capacity: int, allow, batch: int):
    if allow is None:
        return None
    a = jnp.asarray(allow_array(allow, "fresh_allow"))
    cp, w = store.num_rows, store.num_words
    if a.dtype == jnp.bool_:
        if a.shape[-1:] not in ((cp,), (capacity,)) or a.shape[:-1] not in ((), (batch,)):
            raise ValueError(f"fresh_allow must be bool[{capacity}] or "
                             f"bool[{batch}, {capacity}] by slot (or padded to {cp}); "
                             f"got shape {a.shape}")
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, cp - a.shape[-1])])
        return pack_mask(a)
    # packed uint32 words (allow_array refused any other dtype)
    if a.shape not in ((w,), (batch, w)):
        raise ValueError(f"packed fresh_allow must be u32[{w}] or u32[{batch}, {w}]; "
                         f"got {a.shape}")
    return a


@functools.partial(jax.jit, static_argnames=("k", "nprobe", "rerank", "min_eligible_factor",
                                             "backend", "capacity", "max_nprobe"))
def _merged_core(main: Index, store: Index, q, allow, prog, fresh_allow, fprog, *, k: int,
                 nprobe: int, rerank: int, min_eligible_factor: float, backend: str,
                 capacity: int, max_nprobe: int = 0) -> FreshSearchResult:
    """:func:`search_fresh` after validation, as one jitted function (as ``search``: the
    packing of both allow masks, both searches, the merge and the ids fuse; shape errors in
    the masks are raised while tracing). ``capacity``: the fresh index's (static)."""
    b = q.shape[0]
    main = _with_live(main)
    mask = eligibility_words(main, allow, b)
    fmask = _fresh_allow_words(store, capacity, fresh_allow, b)
    q = jnp.pad(q, ((0, 0), (0, main.items.codes.shape[1] - main.dim)))
    kk = k * max(rerank, 1)
    kw = dict(k=kk, rerank=0, min_eligible_factor=min_eligible_factor, backend=backend)
    mv, mr, path = _search_core(main, q, mask, prog, nprobe=nprobe, max_nprobe=max_nprobe, **kw)
    fv, fr, _ = _search_core(store, q, fmask, fprog, nprobe=0, **kw)
    mpos = mr if main.perm is None else jnp.where(mr >= 0, main.perm[jnp.maximum(mr, 0)], -1)
    mids = mpos if main.ids is None else jnp.where(mpos >= 0, main.ids[jnp.maximum(mpos, 0)], -1)
    fids = jnp.where(fr >= 0, store.ids[jnp.maximum(fr, 0)], -1)
    vals = jnp.concatenate([mv, fv], axis=1)                             # [B, 2 kk]
    ids = jnp.concatenate([mids.astype(store.ids.dtype), fids], axis=1)
    src = jnp.concatenate([jnp.zeros_like(mr), jnp.ones_like(fr)], axis=1)
    top, pos = top_k(vals, kk)             # the kk best Int8 candidates (ties: main first)
    ids = jnp.take_along_axis(ids, pos, axis=1)
    src = jnp.take_along_axis(src, pos, axis=1)
    if rerank:                                 # as search(): exact scores of those kk, top k
        qf = q[:, :main.dim].astype(jnp.float32)
        ex_m = float_scores(main.cache, mr, qf)
        ex_f = float_scores(store.cache, fr, qf)
        exact = jnp.take_along_axis(jnp.concatenate([ex_m, ex_f], axis=1), pos, axis=1)
        exact = jnp.where(top > NEG_INF, exact, NEG_INF)
        top, p2 = top_k(exact, k)
        ids = jnp.take_along_axis(ids, p2, axis=1)
        src = jnp.take_along_axis(src, p2, axis=1)
    ok = top > NEG_INF
    ids = jnp.where(ok, ids, -1)
    return FreshSearchResult(ids=ids, scores=top,
                             count=jnp.sum(ids >= 0, axis=1, dtype=jnp.int32), path=path,
                             source=jnp.where(ok, src, -1))


def search_fresh(main: Index, fresh: FreshIndex, queries, k: int, allow=None, *,
                 fresh_allow=None, filter=None, nprobe: int | None = None,
                 rerank: int | None = None, min_eligible_factor: float = 16.0,
                 max_nprobe: int | None = None, backend: str = "auto") -> FreshSearchResult:
    """Top-k over the live items of ``main`` and ``fresh`` together.

    Args:
      main, fresh: the main index (as returned by the last :func:`delete` / :func:`update`)
        and its fresh index.
      queries: ``f32[B, D]`` / ``bf16[B, D]``; k: ``1 <= k <= 65536``.
      allow: eligibility in the main index, as for :func:`~st_jax.search` (``bool[N]`` /
        ``bool[B, N]`` by main position, or packed ``u32`` words over main rows).
      fresh_allow: eligibility in the fresh index: ``bool[C]`` / ``bool[B, C]`` by slot
        (``fresh.slot_ids`` gives each slot's id) or packed ``u32[Cp / 32]`` words; None: all
        live fresh items.
      filter: as for ``search`` (str, ``F`` expression, or a list of B); evaluated exactly on
        both indexes (values only fresh items have included).
      nprobe, rerank, min_eligible_factor, max_nprobe, backend: as for ``search`` (nprobe
        and max_nprobe apply to an IVF main index; the fresh store is always scanned exactly).
    Returns:
      :class:`FreshSearchResult`: ``ids``, ``scores``, ``count``, ``path`` (main's) and
      ``source i32[B, k]`` (0 main, 1 fresh, -1 padding).
    Raises:
      ValueError / FilterError: as ``search``.

    Works eagerly and inside ``jax.jit`` (k, nprobe, rerank, backend and the filter static).
    """
    _check_same_main(main, fresh)
    nprobe = check_options(backend, k, main.ivf, nprobe, main.cache, rerank)
    q = check_queries(queries, main.dim)
    b = q.shape[0]
    prog = filter_program(main.filters, filter, b)
    fprog = None if prog is None else compile_fresh_filter(fresh, filter, batch_size=b)
    allow, fresh_allow = allow_array(allow), allow_array(fresh_allow, "fresh_allow")
    if b == 0:                  # no queries: empty results (allow still checked)
        eligibility_words(main, allow, 0)
        e = empty_result(main.ids, int(k))
        return FreshSearchResult(ids=e.ids, scores=e.scores, count=e.count, path=e.path,
                                 source=jnp.zeros((0, int(k)), jnp.int32))
    return _compiled.call(_merged_core, main, fresh.store, q, allow, prog, fresh_allow, fprog,
                          k=int(k), nprobe=int(nprobe), rerank=int(rerank or 0),
                          min_eligible_factor=check_min_eligible_factor(min_eligible_factor),
                          backend=backend, capacity=fresh.capacity,
                          max_nprobe=check_max_nprobe(main.ivf, nprobe, max_nprobe))


# ----------------------------------------------------------------------------- compaction


def _live_rows(index: Index) -> np.ndarray:
    live = np.asarray(_with_live(index).live)
    bits = np.unpackbits(live.view(np.uint8), bitorder="little").astype(bool)
    return np.flatnonzero(bits[:index.num_rows])


def compact(main: Index, fresh: FreshIndex, **build_kwargs) -> Index:
    """A new main index holding every live item: main minus tombstones, plus fresh.

    Items keep their ids; main items come first (in position order), then fresh items (in
    slot order). The Int8 codes and scales are carried over bit for bit, so scores do not
    change; the float cache rows (or, without a cache, the dequantised Int8 rows) feed the
    IVF k-means and the new cache. Attributes are rebuilt from the stored term ids (every
    field as a list of values: same filter results).

    Args:
      build_kwargs: passed to :func:`~st_jax.build_index`; defaults keep the main index's
        settings: ``store_embeddings`` (cache dtype), ``num_clusters`` (its IVF size, at most
        the item count) and ``ivf_block``, ``bloom_bits``, ``num_hashes``, ``seed``.
    Returns:
      :class:`~st_jax.Index` (pair it with a new ``create_fresh``).
    Raises:
      ValueError: no live item left.
    """
    _check_same_main(main, fresh)
    mrows = _live_rows(main)
    fslots = _live_rows(fresh.store)
    n_m, n = mrows.size, mrows.size + fslots.size
    if n == 0:
        raise ValueError("compact: every item is deleted; nothing to build an index from")
    if main.perm is None:
        mpos = mrows
    else:
        mpos = np.asarray(main.perm)[mrows]
    mids = mpos if main.ids is None else np.asarray(main.ids)[mpos]
    ids = np.concatenate([mids.astype(np.int64), np.asarray(fresh.store.ids)[fslots]])

    def vectors(index: Index, rows):
        if index.cache is not None:
            return np.asarray(index.cache[rows].astype(jnp.float32))
        codes = np.asarray(index.items.codes[rows][:, :index.dim], np.float32)
        return codes * np.asarray(index.items.scale[rows])[:, None]

    emb = np.concatenate([vectors(main, mrows), vectors(fresh.store, fslots)])
    kw: dict[str, Any] = {}
    if main.cache is not None:
        kw["store_embeddings"] = {jnp.dtype(v): k for k, v in CACHE_DTYPES.items()}[
            jnp.dtype(main.cache.dtype)]
    if main.ivf is not None:
        kw["num_clusters"] = min(main.ivf.num_clusters, n)
        kw["ivf_block"] = main.ivf.block
    attributes = None
    if main.filters is not None:
        s = main.filters.schema
        kw.update(bloom_bits=s.bloom_bits, num_hashes=s.num_hashes, seed=s.seed)
        vocab = fresh.vocab
        mi, mt = _main_pairs(main, mrows.astype(np.int64))
        fi_, ft = _fresh_pairs(fresh, fslots)
        items = np.concatenate([mi, fi_ + n_m])
        terms = np.concatenate([mt, ft])
        order = np.lexsort((terms, items))
        items, terms = items[order], terms[order]
        fields = vocab.field_of(terms)
        uniq, inv = np.unique(terms, return_inverse=True)
        values = np.empty(uniq.size, dtype=object)
        values[:] = [vocab.term(int(t))[1] for t in uniq]
        values = values[inv]
        attributes = {}
        for fidx, field in enumerate(sorted(vocab.field_types)):
            sel = fields == fidx
            counts = np.bincount(items[sel], minlength=n)
            attributes[field] = [a.tolist() for a in np.split(values[sel], np.cumsum(counts)[:-1])]
    kw.update(build_kwargs)
    new = build_index(emb, ids=ids, attributes=attributes, **kw)
    # keep the stored Int8 codes and scales bit for bit (re-quantising the dequantised or
    # cached floats could move a scale by an ulp)
    codes = jnp.concatenate([main.items.codes[mrows], fresh.store.items.codes[fslots]])
    scale = jnp.concatenate([main.items.scale[mrows], fresh.store.items.scale[fslots]])
    pos = jnp.arange(new.num_rows) if new.perm is None else new.perm
    real = (pos >= 0) & (pos < n)
    safe = jnp.clip(pos, 0, n - 1)
    items = Int8Matrix(codes=jnp.where(real[:, None], codes[safe], 0).astype(jnp.int8),
                       scale=jnp.where(real, scale[safe], 0.0).astype(jnp.float32))
    return dataclasses.replace(new, items=items)
