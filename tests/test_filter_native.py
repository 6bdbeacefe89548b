"""The native CPU filter mask (C++ XLA FFI handler): bit-identical to the XLA path (interval
bounds + verification) and to a reference evaluation, dense and on selected words, shared and
per-query programs; never inside jax.export artifacts; replaced by the XLA path when the
library cannot be built."""
import dataclasses
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels import native
from st_jax._filter_index import (build_filter_index, compile_filter, filter_mask,
                                  filter_mask_native)
from st_jax._filter_lang import And, Const, FilterProgram, Not, Or, Term, parse_filter

from .test_filter_index import unpack

needs_compiler = pytest.mark.skipif(native._compiler() is None,
                                    reason="no C++ compiler on this machine")

# 40,000 items: 1,250 words, three chunks of the kernel's 512 words, a partial last word
N = 40_000
N_PAD = 40_000


def catalogue(seed=0):
    rng = np.random.default_rng(seed)
    attrs = {"tag": [[f"t{int(v)}" for v in rng.integers(0, 300, rng.integers(0, 6))]
                     for _ in range(N)],
             "kind": rng.integers(0, 4, N),
             "lang": [None if r < 0.1 else f"l{int(v)}" for r, v in
                      zip(rng.random(N), rng.integers(0, 30, N))]}
    sets = [{"tag": set(attrs["tag"][i]), "kind": {int(attrs["kind"][i])},
             "lang": set() if attrs["lang"][i] is None else {attrs["lang"][i]}}
            for i in range(N)]
    return attrs, sets


ATTRS, SETS = catalogue()
FILTERS = ["tag:t3", "NOT tag:t7", "tag:t1 OR (kind:2 AND NOT lang:l4)",
           "NOT (tag:t10 AND tag:t11) AND lang IN (l1, l2, l3)", "*", "NOT *",
           "tag:never", "kind IN (0, 3) AND NOT (tag:t5 OR tag:t6 OR lang:l0)"]


def truth(f):
    """bool[N]: ``f`` evaluated item by item on the parsed expression (values as strings:
    a bare value takes the field's type only when compiled)."""
    e = parse_filter(f)
    return np.array([_ref(e, s) for s in SETS])


def _ref(x, s):
    if isinstance(x, Const):
        return x.value
    if isinstance(x, Term):
        return str(x.value) in {str(v) for v in s.get(x.field, ())}
    if isinstance(x, Not):
        return not _ref(x.child, s)
    if isinstance(x, And):
        return all(_ref(c, s) for c in x.children)
    assert isinstance(x, Or), x
    return any(_ref(c, s) for c in x.children)


@pytest.fixture(scope="module", params=["bloom_heavy", "exact_rows"])
def fi(request):
    if request.param == "bloom_heavy":        # 16-bit signatures: most items uncertain
        return build_filter_index(ATTRS, N, N_PAD, bloom_bits=16, num_hashes=2,
                                  max_exact_rows=0)
    return build_filter_index(ATTRS, N, N_PAD)


@pytest.fixture(scope="module")
def truths():
    return {f: truth(f) for f in FILTERS}


def xla(fi, prog, **kw):
    return np.asarray(filter_mask(fi, prog, backend="xla", verify_capacity=256, **kw))


def native_mask(fi, prog, **kw):
    return np.asarray(jax.jit(lambda f, p: filter_mask_native(f, p, **kw))(fi, prog))


@needs_compiler
def test_dense_shared_and_per_query(fi, truths):
    for f in FILTERS:
        prog = compile_filter(fi, f)
        got = native_mask(fi, prog)
        assert got.shape == (N_PAD // 32,)
        np.testing.assert_array_equal(got, xla(fi, prog))
        np.testing.assert_array_equal(unpack(got)[:N], truths[f], err_msg=f)
    prog = compile_filter(fi, FILTERS, len(FILTERS))
    got = native_mask(fi, prog)
    assert got.shape == (len(FILTERS), N_PAD // 32)
    np.testing.assert_array_equal(got, xla(fi, prog))
    for b, f in enumerate(FILTERS):
        np.testing.assert_array_equal(unpack(got[b])[:N], truths[f], err_msg=f)
    # auto (the jitted entry point on CPU) takes the native kernel and agrees
    np.testing.assert_array_equal(np.asarray(jax.jit(filter_mask)(fi, prog)), got)


@needs_compiler
def test_selected_words(fi):
    W = N_PAD // 32
    rng = np.random.default_rng(1)
    shared = compile_filter(fi, FILTERS[3])
    per_q = compile_filter(fi, FILTERS[:4], 4)
    w1 = np.concatenate([rng.integers(0, W, 700), [-1, W, W + 9, 0, W - 1]]).astype(np.int32)
    w4 = rng.integers(-3, W + 3, (4, 600)).astype(np.int32)     # some out of range
    cases = [(shared, w1), (shared, w4), (per_q, w1), (per_q, w4), (per_q, w4[:1])]
    for prog, w in cases:
        full = np.asarray(filter_mask(fi, prog, backend="xla"))
        got = native_mask(fi, prog, word_ids=w)
        np.testing.assert_array_equal(got, xla(fi, prog, word_ids=w))
        full2, w2 = np.atleast_2d(full), np.atleast_2d(w)
        bo = max(full2.shape[0], w2.shape[0])
        full2 = np.broadcast_to(full2, (bo, W))
        w2 = np.broadcast_to(w2, (bo, w2.shape[1]))
        ref = np.where((w2 >= 0) & (w2 < W),
                       np.take_along_axis(full2, np.clip(w2, 0, W - 1), axis=1), 0)
        np.testing.assert_array_equal(np.atleast_2d(got), ref)


@needs_compiler
def test_empty_word_list_and_vmap(fi):
    prog = compile_filter(fi, "tag:t3 OR kind:1")
    for w in (np.zeros((3, 0), np.int32), np.zeros((0,), np.int32)):
        want = (3, 0) if w.ndim == 2 else (0,)
        assert native_mask(fi, prog, word_ids=w).shape == want
        assert xla(fi, prog, word_ids=w).shape == want
        assert np.asarray(filter_mask(fi, prog, word_ids=w)).shape == want
    progs = compile_filter(fi, ["tag:t3", "NOT tag:t3"], 2)
    w = jnp.arange(40, dtype=jnp.int32)
    got = jax.vmap(lambda ww: filter_mask(fi, progs, word_ids=ww))(jnp.stack([w, w + 7]))
    for i, ww in enumerate((w, w + 7)):
        np.testing.assert_array_equal(np.asarray(got[i]), xla(fi, progs, word_ids=ww))


@needs_compiler
def test_auto_is_one_custom_call_and_export_takes_the_xla_path(fi):
    prog = compile_filter(fi, ["tag:t1 OR NOT kind:2", "lang:l3"], 2)
    fn = jax.jit(filter_mask)
    text = fn.lower(fi, prog).as_text()
    assert native.FILTER_MASK_TARGET in text and "while" not in text
    by_ops = jax.jit(lambda ops: filter_mask(fi, dataclasses.replace(prog, ops=ops)))
    exp = export.export(by_ops, platforms=["cpu"])(prog.ops)
    assert native.FILTER_MASK_TARGET not in exp.mlir_module()
    exp = export.deserialize(exp.serialize())
    np.testing.assert_array_equal(np.asarray(exp.call(prog.ops)), xla(fi, prog))


@needs_compiler
def test_a_row_out_of_range_is_an_error_not_a_read(fi):
    prog = compile_filter(fi, "tag:t3")
    bad = FilterProgram(ops=prog.ops, rowids=jnp.asarray(prog.rowids).at[0, 0, 0].set(10**6),
                        terms=prog.terms, lengths=prog.lengths, per_query=False,
                        num_hashes=prog.num_hashes, stack_depth=prog.stack_depth)
    with pytest.raises(Exception, match="out of range"):
        native_mask(fi, bad)


def test_unavailable_falls_back_to_the_xla_path(fi, truths, monkeypatch):
    """No usable compiler: `backend="auto"` lowers the XLA path (same bits) and the explicit
    native mask raises NativeUnavailable naming the cause."""
    prog = compile_filter(fi, FILTERS[2])
    monkeypatch.setattr(native, "_state", {})      # forget this process's build
    monkeypatch.setattr(native, "_compiler", lambda: shutil.which("false"))
    jax.clear_caches()                             # lowerings chose native before
    try:
        with pytest.warns(RuntimeWarning, match="using the XLA twin"):
            fn = jax.jit(functools.partial(filter_mask))
            text = fn.lower(fi, prog).as_text()
        assert native.FILTER_MASK_TARGET not in text
        np.testing.assert_array_equal(unpack(fn(fi, prog))[:N], truths[FILTERS[2]])
        with pytest.raises(native.NativeUnavailable, match="failed"):
            native_mask(fi, prog)
    finally:
        jax.clear_caches()                         # later tests lower with native again


def test_an_index_without_items_and_a_hand_made_overlong_program():
    """W = 0 (no items): every backend gives zeros, also for word ids (all out of range).
    A hand-made program whose length exceeds P runs P instructions on every path (the XLA
    verification once looped `max(lengths)` times)."""
    fi0 = build_filter_index({"tag": []}, 0, 0, bloom_bits=16, num_hashes=2)
    prog = compile_filter(fi0, "NOT tag:a")
    w = np.array([0, -1, 5], np.int32)
    backends = ["xla", "auto"] + (["native"] if native._compiler() is not None else [])
    for be in backends:
        assert np.asarray(filter_mask(fi0, prog, backend=be)).shape == (0,)
        np.testing.assert_array_equal(np.asarray(filter_mask(fi0, prog, word_ids=w,
                                                             backend=be)), [0, 0, 0])
    fi = build_filter_index({"tag": [["a"], ["b"], []] * 20}, 60, 64, bloom_bits=16,
                            num_hashes=2, max_exact_rows=0)
    prog = compile_filter(fi, "NOT tag:a")
    long = dataclasses.replace(prog, lengths=jnp.full_like(jnp.asarray(prog.lengths), 2**31 - 1))
    want = np.asarray(filter_mask(fi, prog, backend="xla"))
    for be in backends:
        np.testing.assert_array_equal(np.asarray(filter_mask(fi, long, backend=be)), want)
