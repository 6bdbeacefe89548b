"""The native CPU IVF scan (C++ XLA FFI handler): built on first use, bit-identical to the XLA
twin, never inside jax.export artifacts, and replaced by the twin when it cannot be built."""
import functools
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import st_jax as st
from st_jax.synthetic import clustered_catalogue
from pallas_kernels import native
from pallas_kernels.flat_scan import flat_topk_native, flat_topk_reference
from pallas_kernels.int8_topk import pack_mask
from pallas_kernels.ivf_scan import ivf_topk, ivf_topk_native, ivf_topk_reference

from .test_flat_scan import brute as flat_brute, same
from .test_ivf_kernel import brute, make, unique_blocks

needs_compiler = pytest.mark.skipif(native._compiler() is None,
                                    reason="no C++ compiler on this machine")




@needs_compiler
def test_builds_and_loads_here():
    """CI machines have g++: the kernel must build there (a failure here is a compile error)."""
    assert native.available(), native.unavailable_reason()


@needs_compiler
@pytest.mark.parametrize("d,p,k,density,b", [
    (128, 13, 10, 1.0, 3),     # VNNI path (D a multiple of 64), unfiltered
    (128, 13, 300, 0.3, 5),    # more candidates than k, filtered
    (192, 9, 1000, 0.5, 2),    # VNNI with 3 chunks; k > eligible items: padding
    (40, 7, 64, 0.1, 33),      # generic dot loop; more queries than threads
    (32, 5, 5000, 1.0, 1),     # k > P * block
    (96, 11, 20, 0.0, 3),      # nothing eligible
])
def test_native_equals_twin_exactly(rng, d, p, k, density, b):
    q, codes, scale, _, _, _ = make(rng, b=b, d=d, p=p)
    blocks = unique_blocks(rng, b, 40, p)
    bits = rng.random((b, p, 64)) < density
    bits[0, : p // 2] = False                      # a query with dead blocks first
    pm = jnp.asarray(np.packbits(bits, axis=-1, bitorder="little").view(np.uint32))
    want = ivf_topk_reference(q, codes, scale, blocks, pm, k=k, block=64)
    got = ivf_topk_native(q, codes, scale, blocks, pm, k=k, block=64)
    same(got, want)
    same(got, brute(q, codes, scale, blocks, bits, k, 64))
    same(jax.jit(functools.partial(ivf_topk, k=k, block=64))(q, codes, scale, blocks, pm), want)


@needs_compiler
def test_ties_keep_probe_order(rng):
    """Equal scores (repeated rows) come out in probe order, as in the twin."""
    q, codes, scale, _, _, _ = make(rng, b=2, d=64, p=8)
    c = np.array(codes)
    c[64:64 * 8] = np.tile(c[:64], (7, 1))          # blocks 0-7 hold the same 64 rows
    codes = jnp.asarray(c)
    scale = jnp.ones_like(scale)
    blocks = jnp.asarray(np.array([[5, 3, 0, 7, 1, 2, 6, 4], [0, 1, 2, 3, 4, 5, 6, 7]],
                                  np.int32))
    pm = jnp.full((2, 8, 2), 0xFFFFFFFF, jnp.uint32)
    for k in (3, 100, 512):
        want = ivf_topk_reference(q, codes, scale, blocks, pm, k=k, block=64)
        same(ivf_topk_native(q, codes, scale, blocks, pm, k=k, block=64), want)


def edge_case(rng, kind, b, d):
    """``(q f32[b, d], codes i8[n, d], scale f32[n], density)`` for the score edge cases."""
    n = 70_000 if kind == "sparse_ties" else 4096
    if kind in ("ties", "sparse_ties"):   # tiny codes, integer queries: most dots tie
        codes = rng.integers(-2, 3, (n, d), dtype=np.int8)
        scale = np.ones(n, np.float32)
        q = rng.integers(-3, 4, (b, d)).astype(np.float32)
        return q, codes, scale, (0.01 if kind == "sparse_ties" else 1.0)
    codes = rng.integers(-127, 128, (n, d), dtype=np.int8)
    scale = rng.random(n, dtype=np.float32) + 0.01
    q = rng.standard_normal((b, d)).astype(np.float32)
    if kind == "signed_zero":      # underflow: negative dots give -0.0, zero rows +0.0
        q[:] = 0
        q[:, 0] = 1e-30                                    # qs ~ 7.9e-33
        scale[:] = 1e-20
        codes[::3] = 0
    elif kind == "overflow":       # scale 3e38: negative dots give -inf, positive +inf
        scale[::7] = 3e38
    elif kind == "integer_queries":   # the case where XLA once fused 1/127 into the twin
        q = np.round(q * 3)
    return q, codes, scale, 0.6


@needs_compiler
@pytest.mark.parametrize("kind,b,d", [
    ("signed_zero", 1, 4), ("signed_zero", 6, 64), ("overflow", 1, 8), ("overflow", 5, 128),
    ("integer_queries", 1, 256), ("ties", 9, 64), ("sparse_ties", 5, 64),
])
def test_native_and_twins_agree_bit_for_bit_on_edge_scores(rng, kind, b, d):
    """Native kernels, XLA twins and brute force return the same float bits, rows and order
    (lax.top_k's: +0.0 above -0.0, ties by row, the lowest rows kept at the k-th score,
    row -1 for a -inf score) on underflowing, overflowing, integer-valued and tied scores,
    with one query or a batch."""
    q, codes, scale, density = edge_case(rng, kind, b, d)
    n = codes.shape[0]
    allow = rng.random(n) < density
    mask = None if density == 1.0 else pack_mask(jnp.asarray(allow))
    q, codes, scale = map(jnp.asarray, (q, codes, scale))
    for k in (10, 300):
        want = flat_brute(q, codes, scale, mask, k)
        same(flat_topk_native(q, codes, scale, mask, k=k), want)
        same(flat_topk_reference(q, codes, scale, mask, k=k), want)
    if kind == "sparse_ties":
        return
    block, p = 64, 24                          # every query probes its own 24 of 64 blocks
    blocks = unique_blocks(rng, b, n // block, p)
    bits = np.broadcast_to(allow.reshape(-1, block)[np.asarray(blocks)], (b, p, block))
    pm = jnp.asarray(np.packbits(bits, axis=-1, bitorder="little").view(np.uint32))
    for k in (10, 300):
        want = brute(q, codes, scale, blocks, bits, k, block)
        same(ivf_topk_native(q, codes, scale, blocks, pm, k=k, block=block), want)
        same(ivf_topk_reference(q, codes, scale, blocks, pm, k=k, block=block), want)


@needs_compiler
def test_no_queries_or_no_probes():
    codes, scale = jnp.zeros((64, 8), jnp.int8), jnp.ones(64, jnp.float32)
    for b, p in ((2, 0), (0, 2)):
        q = jnp.ones((b, 8), jnp.float32)
        args = (q, codes, scale, jnp.zeros((b, p), jnp.int32), jnp.zeros((b, p, 1), jnp.uint32))
        for fn in (ivf_topk_native, ivf_topk_reference):
            v, rows = fn(*args, k=3, block=32)
            assert v.shape == rows.shape == (b, 3)
            assert np.isneginf(np.asarray(v)).all() and (np.asarray(rows) == -1).all()
    for fn in (flat_topk_native, flat_topk_reference):
        v, rows = fn(jnp.ones((0, 8), jnp.float32), codes, scale, k=3)
        assert v.shape == rows.shape == (0, 3)


@needs_compiler
def test_auto_uses_native_in_jit_and_twin_in_export(rng):
    q, codes, scale, blocks, pm, _ = make(rng, d=64)
    fn = jax.jit(functools.partial(ivf_topk, k=9, block=64))
    assert native.IVF_SCAN_TARGET in fn.lower(q, codes, scale, blocks, pm).as_text()
    exp = export.export(fn, platforms=["cpu"])(q, codes, scale, blocks, pm)
    assert native.IVF_SCAN_TARGET not in exp.mlir_module()
    exp = export.deserialize(exp.serialize())
    same(exp.call(q, codes, scale, blocks, pm),
         ivf_topk_reference(q, codes, scale, blocks, pm, k=9, block=64))


@needs_compiler
def test_vmap(rng):
    q, codes, scale, blocks, pm, _ = make(rng, d=64)
    qs = jnp.stack([q, -q, 2 * q])
    got = jax.vmap(lambda x: ivf_topk(x, codes, scale, blocks, pm, k=5, block=64))(qs)
    for i in range(3):
        same((got[0][i], got[1][i]),
             ivf_topk_reference(qs[i], codes, scale, blocks, pm, k=5, block=64))


@needs_compiler
def test_search_native_equals_twin_on_every_path():
    """st.search with the native scan returns the twin's ids, scores and paths: unfiltered,
    a uniform 20 % allow (widened), a selective one (flat), per-query allows, and an
    attribute filter (evaluated on the probed words only)."""
    n = 12_000
    cat = clustered_catalogue(n, 32, num_clusters=40, num_queries=12, seed=5)
    rng = np.random.default_rng(4)
    index = st.build_index(cat.embeddings, num_clusters=48, store_embeddings="f32",
                           attributes={"g": rng.integers(0, 5, n)})
    sparse = np.zeros(n, bool)
    sparse[::997] = True
    cases = [(None, None), (rng.random(n) < 0.2, None), (sparse, None),
             (rng.random((12, n)) < 0.3, None), (None, "g:2")]
    paths = set()
    for allow, filt in cases:
        a = st.search(index, cat.queries, 20, allow, filter=filt, nprobe=2, max_nprobe=16,
                      rerank=2)
        b = st.search(index, cat.queries, 20, allow, filter=filt, nprobe=2, max_nprobe=16,
                      rerank=2, backend="xla")
        same((a.ids, a.scores, a.path), (b.ids, b.scores, b.path))
        paths |= set(np.asarray(a.path).tolist())
    assert paths == {1, 2, 3}


def test_unavailable_falls_back_to_the_twin(rng, monkeypatch):
    """No usable compiler: a warning, `backend="auto"` runs the twin (same results), and the
    explicit native scan raises NativeUnavailable naming the cause."""
    q, codes, scale, blocks, pm, _ = make(rng, d=64)
    want = ivf_topk_reference(q, codes, scale, blocks, pm, k=7, block=64)
    monkeypatch.setattr(native, "_state", {})      # forget this process's build
    monkeypatch.setattr(native, "_compiler", lambda: shutil.which("false"))
    jax.clear_caches()                             # lowerings chose native before
    try:
        with pytest.warns(RuntimeWarning, match="using the XLA twin"):
            fn = jax.jit(functools.partial(ivf_topk, k=7, block=64))
            text = fn.lower(q, codes, scale, blocks, pm).as_text()
        assert native.IVF_SCAN_TARGET not in text
        same(fn(q, codes, scale, blocks, pm), want)
        assert "failed" in native.unavailable_reason()
        with pytest.raises(native.NativeUnavailable, match="failed"):
            ivf_topk_native(q, codes, scale, blocks, pm, k=8, block=64)
    finally:
        jax.clear_caches()                         # later tests lower with native again


@needs_compiler
def test_isa_follows_the_cpu():
    """The default build (-march=native) uses the best int8 dots this CPU has."""
    native.ensure_loaded()
    flags = set(open("/proc/cpuinfo").read().split())
    want = ("avx512-vnni" if {"avx512_vnni", "avx512bw"} <= flags
            else "avx2" if "avx2" in flags else "plain C++")
    assert native.isa() == want


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert not native.available()
    assert "disabled" in native.unavailable_reason()


@needs_compiler
def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("ST_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(native.ENV_FLAGS, "-O0")     # its own build; -O0: the test's g++ time / 2
    path = native.build()
    assert path.parent == tmp_path and path.exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]   # no temporary left
    mtime = os.stat(path).st_mtime_ns
    assert native.build() == path and os.stat(path).st_mtime_ns == mtime   # not rebuilt
    monkeypatch.setattr(native, "_compiler", lambda: shutil.which("false"))
    with pytest.raises(native.NativeUnavailable, match="failed"):
        native.build(force=True)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]   # failed build left nothing


def test_cache_dir_falls_back_when_home_cache_is_unusable(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.delenv("ST_JAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))       # mkdir under a file fails
    path = native.cache_dir()
    assert path.parent == Path(tempfile.gettempdir()) and path.name.startswith("st_jax-")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert native.cache_dir() == tmp_path / "cache" / "st_jax"
