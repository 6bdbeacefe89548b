"""Filter-program evaluation over bit-sliced rows: Pallas (Triton) kernel + XLA twin.

Each program is a postfix list of instructions (see ``st_jax._filter_lang``) evaluated
by a stack machine on *interval* masks: every stack slot holds ``(lower, upper)`` words,
``lower ⊆ truth ⊆ upper``, 32 items per ``u32``::

    TERM_EXACT  push (AND rows, AND rows)      exact bitmap row -> exact
    TERM_BLOOM  push (0,        AND rows)      Bloom term: no false negatives
    AND / OR    pop 2, push componentwise &, |
    NOT         (l, u) -> (~u, ~l)
    NOP         nothing

Public entry points (same signature)::

    filter_bounds_pallas(rows, ops, rowids, lengths, *, num_hashes, stack_depth, ...)
    filter_bounds_xla(rows, ops, rowids, lengths, *, num_hashes, stack_depth)
    filter_bounds(..., backend="auto" | "pallas" | "xla" | "interpret")

    rows     u32[R, W]        bit-sliced rows (any R; W words = 32 items each)
    ops      i32[Bp, P]       op codes; P a power of two
    rowids   i32[Bp, P, KP]   rows ANDed per instruction (KP power of two >= num_hashes;
                              only the first num_hashes are read)
    lengths  i32[Bp]          instructions used per program
    word_ids i32[Bp, NW]      optional: evaluate only these words (in range), e.g. the
                              words of each query's probed IVF clusters (co-design)
    ->       (lower, upper)   u32[Bp, W] (or u32[Bp, NW]) each (bits of padded items are
                              unspecified: mask them with the VALID row)

Kernel: grid ``(Bp, cdiv(W, block_words))``; each step evaluates one program over one
block of words with a ``lax.fori_loop`` over the program's own length (dynamic trip
count), the stack held in ``S`` registers of ``block_words`` words (slots chosen with
selects, no dynamic register indexing), rows gathered by dynamic row index from the
``(R, block_words)`` block. The ``word_ids`` variant gathers ``rows_ref[r, wids]`` (a Ref
gather with an index vector) from the whole ``(R, W)`` array; its word list is padded to
whole blocks with in-range ids so no lane reads out of bounds. Every in-kernel array is
power-of-two sized.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

NOP, TERM_EXACT, TERM_BLOOM, AND, OR, NOT = 0, 1, 2, 3, 4, 5

BACKENDS = ("auto", "pallas", "xla", "interpret")


@dataclasses.dataclass(frozen=True)
class FilterBlockSizes:
    """Kernel tunables. ``block_words`` u32 words (32 items each) per grid step."""

    block_words: int = 128
    num_warps: int = 4
    num_stages: int = 1


def _validate(rows, ops, rowids, lengths, num_hashes, stack_depth, word_ids=None):
    if rows.ndim != 2 or rows.dtype != jnp.uint32:
        raise ValueError(f"rows must be u32[R, W], got {rows.dtype}{list(rows.shape)}")
    if ops.ndim != 2 or rowids.ndim != 3 or lengths.ndim != 1:
        raise ValueError(f"bad program shapes ops{list(ops.shape)} rowids{list(rowids.shape)} "
                         f"lengths{list(lengths.shape)}")
    Bp, P = ops.shape
    if rowids.shape[:2] != (Bp, P) or lengths.shape[0] != Bp:
        raise ValueError("ops, rowids and lengths disagree on the program batch / length")
    KP = rowids.shape[2]
    if not 1 <= num_hashes <= KP:
        raise ValueError(f"num_hashes={num_hashes} must be in [1, {KP}]")
    if stack_depth < 1:
        raise ValueError(f"stack_depth must be >= 1, got {stack_depth}")
    if word_ids is not None and (word_ids.ndim != 2 or word_ids.shape[0] != Bp):
        raise ValueError(f"word_ids must be i32[Bp={Bp}, NW], got {list(word_ids.shape)}")


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


# ----------------------------------------------------------------------------- XLA twin


# Per-query programs over every word: queries evaluated this many at a time (lax.map), so a
# group's stack (2 x group x stack_depth x W words) stays in cache instead of the whole
# batch's being rewritten by every instruction (1M items, 64 one-term programs, AMD EPYC,
# 2 cores: 77 ms for the whole batch at once, 16 ms one at a time, 9 ms four at a time).
_GROUP = 4


@functools.partial(jax.jit, static_argnames=("num_hashes", "stack_depth", "group"))
def filter_bounds_xla(rows, ops, rowids, lengths, word_ids=None, *, num_hashes: int,
                      stack_depth: int, group: int = _GROUP):
    """Plain-XLA twin of :func:`filter_bounds_pallas` (same signature and results).

    ``group``: with more than ``group`` programs and no ``word_ids``, the programs are
    evaluated ``group`` at a time in a loop (same results)."""
    _validate(rows, ops, rowids, lengths, num_hashes, stack_depth, word_ids)
    Bp = ops.shape[0]
    if word_ids is not None or Bp <= group:
        return _bounds_xla(rows, ops, rowids, lengths, word_ids, num_hashes=num_hashes,
                           stack_depth=stack_depth)
    pad = -Bp % group
    ops = jnp.pad(ops, ((0, pad), (0, 0)))                  # NOP programs of length 0
    rowids = jnp.pad(rowids, ((0, pad), (0, 0), (0, 0)))
    lengths = jnp.pad(lengths, (0, pad))
    lo, up = lax.map(lambda a: _bounds_xla(rows, *a, None, num_hashes=num_hashes,
                                           stack_depth=stack_depth),
                     (ops.reshape(-1, group, ops.shape[1]),
                      rowids.reshape(-1, group, *rowids.shape[1:]),
                      lengths.reshape(-1, group)))
    w = rows.shape[1]
    return lo.reshape(-1, w)[:Bp], up.reshape(-1, w)[:Bp]


def _bounds_xla(rows, ops, rowids, lengths, word_ids, *, num_hashes: int, stack_depth: int):
    """:func:`filter_bounds_xla` for one group of programs."""
    Bp, P = ops.shape
    W = rows.shape[1]
    if word_ids is None:
        load = lambda r: rows[r]  # noqa: E731  r: i32[Bp] -> u32[Bp, W]
    else:
        wids = jnp.clip(word_ids.astype(jnp.int32), 0, W - 1)
        W = wids.shape[1]
        load = lambda r: rows[r[:, None], wids]  # noqa: E731
    S = stack_depth
    bidx = jnp.arange(Bp)
    ops = ops.astype(jnp.int32)
    rowids = rowids.astype(jnp.int32)

    def body(p, carry):
        sp, lo_st, up_st = carry
        op = ops[:, p]
        leaf = load(rowids[:, p, 0])
        for k in range(1, num_hashes):
            leaf = leaf & load(rowids[:, p, k])
        i1 = jnp.clip(sp - 1, 0, S - 1)
        i2 = jnp.clip(sp - 2, 0, S - 1)
        l1, u1 = lo_st[bidx, i1], up_st[bidx, i1]
        l2, u2 = lo_st[bidx, i2], up_st[bidx, i2]
        lo, up, dst, sp = _interval_step(op, op[:, None], leaf, l1, u1, l2, u2, sp, S)
        lo_st = lo_st.at[bidx, dst].set(lo, mode="drop")
        up_st = up_st.at[bidx, dst].set(up, mode="drop")
        return sp, lo_st, up_st

    z = jnp.zeros((Bp, S, W), jnp.uint32)
    init = (jnp.zeros((Bp,), jnp.int32), z, z)
    n = jnp.minimum(jnp.max(lengths), P)
    _, lo_st, up_st = lax.fori_loop(0, n, body, init)
    return lo_st[:, 0], up_st[:, 0]


def _interval_step(op, o, leaf, l1, u1, l2, u2, sp, S):
    """One postfix instruction on interval bounds — shared by the XLA twin and the kernel.

    ``op``: opcode (scalar, or ``[Bp]`` in the twin); ``o``: ``op`` broadcastable against the
    words; ``leaf``: AND of the instruction's rows; ``(l1, u1)``, ``(l2, u2)``: the top two
    stack entries; ``sp``: stack pointer. Returns ``(lower, upper, destination slot, new sp)``
    (destination ``S`` = nothing written).
    """
    lo = jnp.where(o == TERM_EXACT, leaf, jnp.zeros_like(leaf))  # Bloom term: (empty, rows)
    up = leaf
    lo = jnp.where(o == AND, l1 & l2, lo)
    up = jnp.where(o == AND, u1 & u2, up)
    lo = jnp.where(o == OR, l1 | l2, lo)
    up = jnp.where(o == OR, u1 | u2, up)
    lo = jnp.where(o == NOT, ~u1, lo)                             # NOT swaps the bounds
    up = jnp.where(o == NOT, ~l1, up)
    is_term = (op == TERM_EXACT) | (op == TERM_BLOOM)
    binop = (op == AND) | (op == OR)
    dst = jnp.where(is_term, sp, jnp.where(binop, sp - 2, jnp.where(op == NOT, sp - 1, S)))
    # (selects between sp +- 1 rather than between literals: the Triton lowering of a
    # select of two constants fails)
    return lo, up, dst, jnp.where(is_term, sp + 1, jnp.where(binop, sp - 1, sp))


# ----------------------------------------------------------------------------- Pallas kernel


def _stack_eval(load, ops_ref, rid_ref, n, lo_ref, up_ref, *, num_hashes: int, kp: int,
                stack_depth: int, block_words: int):
    """Run one program (``n`` instructions) on one block; ``load(r)`` -> row r's words."""
    S = stack_depth
    zeros = jnp.zeros((block_words,), jnp.uint32)

    def pick(stack, idx):
        out = zeros
        for j in range(S):
            out = jnp.where(idx == j, stack[j], out)
        return out

    def body(p, carry):
        sp, los, ups = carry
        op = ops_ref[p]
        leaf = load(rid_ref[p * kp])
        for k in range(1, num_hashes):
            leaf = leaf & load(rid_ref[p * kp + k])
        l1, u1 = pick(los, sp - 1), pick(ups, sp - 1)
        l2, u2 = pick(los, sp - 2), pick(ups, sp - 2)
        lo, up, dst, sp = _interval_step(op, op, leaf, l1, u1, l2, u2, sp, S)
        los = tuple(jnp.where(dst == j, lo, los[j]) for j in range(S))
        ups = tuple(jnp.where(dst == j, up, ups[j]) for j in range(S))
        return sp, los, ups

    init = (jnp.int32(0), (zeros,) * S, (zeros,) * S)
    _, los, ups = lax.fori_loop(0, n, body, init)
    lo_ref[...] = los[0]
    up_ref[...] = ups[0]


def _filter_kernel(len_ref, ops_ref, rid_ref, rows_ref, lo_ref, up_ref, **kw):
    """Dense: one program x one block of contiguous words. Refs: len (1,), ops (P,),
    rid (P*KP,), rows (R, block_words); outputs lo/up (block_words,)."""
    _stack_eval(lambda r: rows_ref[r, :], ops_ref, rid_ref, len_ref[0], lo_ref, up_ref, **kw)


def _filter_gather_kernel(len_ref, ops_ref, rid_ref, wid_ref, rows_ref, lo_ref, up_ref, **kw):
    """Selected words (co-design: only words of probed clusters). wid (block_words,) word
    indices (in range); rows (R, W) whole array, gathered with the index vector."""
    wids = wid_ref[...]
    _stack_eval(lambda r: rows_ref[r, wids], ops_ref, rid_ref, len_ref[0], lo_ref, up_ref, **kw)


@functools.partial(jax.jit, static_argnames=("num_hashes", "stack_depth", "block_sizes",
                                             "interpret"))
def filter_bounds_pallas(rows, ops, rowids, lengths, word_ids=None, *, num_hashes: int,
                         stack_depth: int, block_sizes: FilterBlockSizes = FilterBlockSizes(),
                         interpret: bool = False):
    """Pallas (Triton) kernel; see the module docstring for shapes."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    _validate(rows, ops, rowids, lengths, num_hashes, stack_depth, word_ids)
    R, W = rows.shape
    Bp, P = ops.shape
    KP = rowids.shape[2]
    if not (_pow2(P) and _pow2(KP)):
        raise ValueError(f"program length P={P} and KP={KP} must be powers of two")
    bw = block_sizes.block_words
    if not _pow2(bw):
        raise ValueError(f"block_words={bw} must be a power of two")
    NW = W if word_ids is None else word_ids.shape[1]
    bw = min(bw, 1 << max(0, (NW - 1).bit_length()))  # no larger than needed
    kw = dict(num_hashes=num_hashes, kp=KP, stack_depth=stack_depth, block_words=bw)
    params = None if interpret else pltriton.CompilerParams(
        num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages)
    lengths = jnp.minimum(lengths.astype(jnp.int32), P).reshape(Bp, 1)
    prog_specs = [pl.BlockSpec((None, 1), lambda b, j: (b, 0)),
                  pl.BlockSpec((None, P), lambda b, j: (b, 0)),
                  pl.BlockSpec((None, P * KP), lambda b, j: (b, 0))]
    prog_args = (lengths, ops.astype(jnp.int32), rowids.astype(jnp.int32).reshape(Bp, P * KP))
    if word_ids is None:
        out = jax.ShapeDtypeStruct((Bp, W), jnp.uint32)
        return pl.pallas_call(
            functools.partial(_filter_kernel, **kw),
            grid=(Bp, pl.cdiv(W, bw)),
            in_specs=prog_specs + [pl.BlockSpec((R, bw), lambda b, j: (0, j))],
            out_specs=[pl.BlockSpec((None, bw), lambda b, j: (b, j))] * 2,
            out_shape=[out, out], interpret=interpret, compiler_params=params,
            name="st_filter_eval",
        )(*prog_args, rows)
    # gather variant: pad the word list to whole blocks (in-range ids) so that no lane loads
    # out of bounds, then drop the padding
    nwp = pl.cdiv(NW, bw) * bw
    wids = jnp.clip(word_ids.astype(jnp.int32), 0, W - 1)
    wids = jnp.pad(wids, ((0, 0), (0, nwp - NW)))
    out = jax.ShapeDtypeStruct((Bp, nwp), jnp.uint32)
    lo, up = pl.pallas_call(
        functools.partial(_filter_gather_kernel, **kw),
        grid=(Bp, nwp // bw),
        in_specs=prog_specs + [pl.BlockSpec((None, bw), lambda b, j: (b, j)),
                               pl.BlockSpec((R, W), lambda b, j: (0, 0))],
        out_specs=[pl.BlockSpec((None, bw), lambda b, j: (b, j))] * 2,
        out_shape=[out, out], interpret=interpret, compiler_params=params,
        name="st_filter_eval_gather",
    )(*prog_args, wids, rows)
    return lo[:, :NW], up[:, :NW]


def filter_bounds(rows, ops, rowids, lengths, word_ids=None, *, num_hashes: int,
                  stack_depth: int, backend: str = "auto",
                  block_sizes: FilterBlockSizes = FilterBlockSizes()):
    """Dispatcher: ``"auto"`` = Pallas kernel on GPU, XLA twin elsewhere.

    ``word_ids`` (optional, ``i32[NW]`` or ``i32[B, NW]``): evaluate only these words (e.g.
    the words of the probed IVF clusters, SilverTorch's filter/ANN co-design); results are
    then ``u32[Bo, NW]`` with ``Bo = max(Bp, B)`` (a shared program or a shared word list is
    broadcast). Ids are clamped into range (mask out-of-range ones yourself)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "pallas" if jax.default_backend() == "gpu" else "xla"
    if word_ids is not None:
        word_ids = jnp.asarray(word_ids)
        if word_ids.ndim == 1:
            word_ids = word_ids[None]
        Bp, Bw = ops.shape[0], word_ids.shape[0]
        if Bp != Bw and 1 not in (Bp, Bw):
            raise ValueError(f"{Bp} programs vs {Bw} word lists: need equal or 1")
        Bo = max(Bp, Bw)
        ops = jnp.broadcast_to(ops, (Bo,) + ops.shape[1:])
        rowids = jnp.broadcast_to(rowids, (Bo,) + rowids.shape[1:])
        lengths = jnp.broadcast_to(lengths, (Bo,))
        word_ids = jnp.broadcast_to(word_ids, (Bo, word_ids.shape[1]))
    if backend == "xla":
        return filter_bounds_xla(rows, ops, rowids, lengths, word_ids, num_hashes=num_hashes,
                                 stack_depth=stack_depth)
    return filter_bounds_pallas(rows, ops, rowids, lengths, word_ids, num_hashes=num_hashes,
                                stack_depth=stack_depth, block_sizes=block_sizes,
                                interpret=backend == "interpret")
