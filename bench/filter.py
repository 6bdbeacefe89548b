"""Filter evaluation benchmark: st_jax bit-sliced Bloom + exact index vs a numpy forward
index and faiss ID selectors; Bloom FPR before verification vs theory.

    .venv/bin/python bench/filter.py                 # N = 1M items, writes bench/results/filter.json
    .venv/bin/python bench/filter.py --n 100000 --out /tmp/f.json   # quick

Synthetic catalogue (Zipf-like value frequencies): country (1 of 60), lang (1 of 40),
genre (1-3 of 50), tags (0-15 of 200k, int), creator (1 of 100k, int), year (int, 5% missing).
Queries: ~7 conditions each, nested AND / OR / NOT, pass rates from ~50% to ~0.01%.
On CPU the masks are timed for ``backend="auto"`` (the native kernel, pallas_kernels.native,
where it builds) and for the XLA path (interval bounds + while-loop verification), with the
compile time of one filter_mask graph for each.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from bench._machine import cpu_model  # noqa: E402
from pallas_kernels import native  # noqa: E402

from st_jax._filter_index import (bloom_stats, build_filter_index, filter_bounds,  # noqa: E402
                                  filter_mask)
from st_jax._filter_lang import (And, Const, Expr, Not, Term, compile_filter,  # noqa: E402
                                 parse_filter)


def zipf_codes(rng, k, size, a=1.2):
    """Codes in [0, k) with Zipf-like frequencies (rank r has weight r^-a)."""
    w = 1.0 / np.arange(1, k + 1) ** a
    return rng.choice(k, size=size, p=w / w.sum())


def make_catalogue(n, seed=0):
    rng = np.random.default_rng(seed)
    cols = {}  # field -> (offsets i64[n+1], codes i64[nnz]) ; forward index in numpy
    def ragged(lo, hi, k, a):
        cnt = rng.integers(lo, hi + 1, n)
        codes = zipf_codes(rng, k, int(cnt.sum()), a)
        off = np.zeros(n + 1, np.int64)
        np.cumsum(cnt, out=off[1:])
        # dedupe within item
        item = np.repeat(np.arange(n), cnt)
        key = np.unique(item * k + codes)
        item, codes = key // k, key % k
        off = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(item, minlength=n), out=off[1:])
        return off, codes
    cols["country"] = (np.arange(n + 1), zipf_codes(rng, 60, n, 1.1))
    cols["lang"] = (np.arange(n + 1), zipf_codes(rng, 40, n, 1.3))
    cols["genre"] = ragged(1, 3, 50, 1.0)
    cols["tags"] = ragged(0, 15, 200_000, 1.1)
    cols["creator"] = (np.arange(n + 1), zipf_codes(rng, 100_000, n, 1.05))
    present = rng.random(n) > 0.05
    off = np.zeros(n + 1, np.int64)
    np.cumsum(present, out=off[1:])
    cols["year"] = (off, rng.integers(0, 76, int(present.sum())))
    names = {"country": lambda c: f"C{c}", "lang": lambda c: f"L{c}", "genre": lambda c: f"g{c}",
             "tags": int, "creator": int, "year": lambda c: 1950 + int(c)}
    attrs = {}
    for f, (off, codes) in cols.items():
        conv = names[f]
        if f in ("country", "lang"):
            table = [conv(c) for c in range(int(codes.max()) + 1)]
            attrs[f] = [table[c] for c in codes.tolist()]
        elif f == "year":
            vals = (codes + 1950).tolist()
            lst = [None] * n
            idx = np.flatnonzero(present).tolist()
            for i, v in zip(idx, vals):
                lst[i] = v
            attrs[f] = lst
        elif f == "creator":
            attrs[f] = codes.tolist()
        else:
            table = None if conv is int else [conv(c) for c in range(int(codes.max()) + 1)]
            flat = codes.tolist() if table is None else [table[c] for c in codes.tolist()]
            o = off.tolist()
            attrs[f] = [flat[o[i]:o[i + 1]] for i in range(n)]
    return attrs, cols, names


QUERIES = [
    'country:C0',
    'country IN (C0, C1, C2) AND lang:L0',
    'country:C0 AND (lang:L0 OR lang:L1) AND NOT genre:g0',
    '(genre:g3 OR genre:g7) AND NOT tags:0 AND year IN (2000, 2001, 2002, 2003)',
    'country:C1 AND lang:L0 AND genre:g2 AND NOT (tags:1 OR tags:2) AND year:2010',
    'tags:5 OR tags:77 OR creator:12',
    'country IN (C3, C4) AND (tags:100 OR tags:1000 OR genre:g40) AND NOT lang:L2',
    'NOT tags:0 AND NOT tags:1 AND NOT genre:g0',
    'creator:500 OR (tags:3000 AND NOT country:C0)',
    'lang:L5 AND genre:g10 AND NOT (tags:9 OR tags:10 OR tags:11) AND year IN (1990, 1991)',
]


def forward_eval(e: Expr, cols, names, n):
    """Numpy forward-index evaluation (per-item value lists, vectorised over items)."""
    if isinstance(e, Const):
        return np.full(n, e.value)
    if isinstance(e, Term):
        off, codes = cols[e.field]
        inv = {names[e.field](c): c for c in np.unique(codes).tolist()} if e.field not in _INV else _INV[e.field]
        _INV[e.field] = inv
        v = e.value
        if e.field in ("tags", "creator", "year"):
            v = int(v)
        code = inv.get(v)
        out = np.zeros(n, bool)
        if code is None:
            return out
        pos = np.flatnonzero(codes == code)
        out[np.searchsorted(off, pos, side="right") - 1] = True
        return out
    if isinstance(e, Not):
        return ~forward_eval(e.child, cols, names, n)
    parts = [forward_eval(c, cols, names, n) for c in e.children]
    f = np.logical_and if isinstance(e, And) else np.logical_or
    return f.reduce(parts)


_INV: dict = {}


def timeit(fn, repeat=5):
    fn()  # warm-up / compile
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def unpack(words, n):
    return np.unpackbits(np.asarray(words).view(np.uint8), bitorder="little")[:n].astype(bool)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--bits", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--main-bits", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--fpr-terms", type=int, default=50000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "filter.json"))
    args = ap.parse_args()
    n = args.n
    n_pad = -(-n // 1024) * 1024
    t0 = time.perf_counter()
    attrs, cols, names = make_catalogue(n)
    t_cat = time.perf_counter() - t0
    print(f"catalogue: {n} items in {t_cat:.1f}s", flush=True)
    res = {"params": vars(args) | {"n_pad": n_pad, "num_hashes": 5, "queries": QUERIES},
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                       "jax_backend": jax.default_backend(),
                       "devices": [str(d) for d in jax.devices()]},
           "versions": {"python": sys.version.split()[0], "jax": jax.__version__,
                        "numpy": np.__version__}}
    try:
        import faiss
        res["versions"]["faiss"] = faiss.__version__
    except ImportError:
        faiss = None

    # ---------------- forward index (numpy) baseline + faiss selectors
    fwd_bytes = sum(off.nbytes + codes.nbytes for off, codes in cols.values())
    # compact forward index: int32 term ids + int32 offsets per field
    fwd_bytes32 = sum(4 * (off.size + codes.size) for off, codes in cols.values())
    exprs = [parse_filter(q) for q in QUERIES]
    truth = [forward_eval(e, cols, names, n) for e in exprs]
    fwd_t = [timeit(lambda e=e: forward_eval(e, cols, names, n), args.repeat) for e in exprs]
    rows = []
    for q, t, tt in zip(QUERIES, truth, fwd_t):
        row = {"filter": q, "pass_rate": float(t.mean()), "forward_numpy_s": tt}
        if faiss is not None:
            def sel_bitmap(t=t):
                bits = np.packbits(t, bitorder="little")
                return faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits)), bits
            def sel_batch(t=t):
                ids = np.flatnonzero(t).astype("int64")
                return faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids)), ids
            row["faiss_bitmap_build_s"] = timeit(sel_bitmap, args.repeat)
            row["faiss_batch_build_s"] = timeit(sel_batch, args.repeat)
            row["faiss_bitmap_bytes"] = (n + 7) // 8
            # IDSelectorBatch: unordered_set<int64> (~ 32-40 B / id incl. buckets) + bloom
            row["faiss_batch_bytes_est"] = int(t.sum()) * 40
        rows.append(row)
        print(f"{q[:60]:60s} pass {t.mean():8.4%}  fwd {tt*1e3:8.2f} ms", flush=True)

    # ---------------- st_jax index at several M
    res["fpr"] = []
    for M in args.bits:
        t0 = time.perf_counter()
        fi = build_filter_index(attrs, n, n_pad, bloom_bits=M, num_hashes=5)
        jax.block_until_ready(fi.rows)
        t_build = time.perf_counter() - t0
        s = bloom_stats(fi, max_terms=args.fpr_terms)
        progs = [compile_filter(fi, q) for q in QUERIES]
        unc = []
        for p in progs:
            lo, up = filter_bounds(fi, p)
            unc.append(int(np.bitwise_count(np.asarray(up & ~lo)).sum()))
        entry = {"bloom_bits": M, "build_s": t_build, "num_exact_rows": fi.schema.num_exact,
                 "num_terms": fi.schema.num_terms, "nbytes": fi.nbytes(),
                 "bytes_per_item": {k: v / n for k, v in fi.nbytes().items()},
                 "uncertain_items_per_query": unc}
        entry |= {k: v for k, v in s.items() if k != "per_term"}
        res["fpr"].append(entry)
        print(f"M={M}: build {t_build:.1f}s exact_rows={fi.schema.num_exact} "
              f"fpr={s['fpr']:.3e} theory={s.get('theory', 0):.3e} "
              f"(ratio {s.get('fpr_over_theory', float('nan')):.3f}; vs signature theory "
              f"{s.get('theory_from_signatures', 0):.3e}: ratio "
              f"{s['fpr'] / max(s.get('theory_from_signatures', 0), 1e-300):.3f}; "
              f"{s['false_positives']} FP, top term "
              f"{s['fp_top_term_share']:.0%} of them, {s['terms_measured']} terms, "
              f"{s['negatives']} trials) uncertain/query={unc}", flush=True)
        if M != args.main_bits:
            del fi
            continue
        # ---- throughput at the main M: the CPU default (`backend="auto"`: the native
        # kernel where it builds, pallas_kernels.native) and the XLA path (bounds + verification)
        backends = ("auto", "xla") if jax.default_backend() == "cpu" else ("auto",)
        f_mask = {be: jax.jit(functools.partial(filter_mask, backend=be)) for be in backends}
        f_bounds = jax.jit(lambda fi, p: filter_bounds(fi, p))
        res["native_cpu"] = native.available() if jax.default_backend() == "cpu" else None
        res["compile_s"] = {}
        for be in backends:   # lowering + XLA compilation of one filter_mask (shared program)
            t = time.perf_counter()
            f_mask[be].lower(fi, progs[0]).compile()
            res["compile_s"][be] = time.perf_counter() - t
        print("compile " + " ".join(f"{be} {t:.2f}s" for be, t in res["compile_s"].items()),
              flush=True)
        for i, (p, row, t) in enumerate(zip(progs, rows, truth)):
            for be in backends:
                got = unpack(f_mask[be](fi, p), n)
                assert (got == t).all(), f"mismatch on {QUERIES[i]} ({be}): {(got != t).sum()}"
            ts = timeit(lambda p=p: f_mask["auto"](fi, p).block_until_ready(), args.repeat)
            tb = timeit(lambda p=p: jax.block_until_ready(f_bounds(fi, p)), args.repeat)
            row |= {"st_jax_mask_s": ts, "st_jax_bounds_only_s": tb,
                    "st_jax_items_per_s": n / ts, "speedup_vs_forward": row["forward_numpy_s"] / ts,
                    "uncertain_items": unc[i], "exact": True}
            if "xla" in backends:
                row["st_jax_mask_xla_s"] = timeit(
                    lambda p=p: f_mask["xla"](fi, p).block_until_ready(), args.repeat)
            print(f"  {QUERIES[i][:50]:50s} st_jax {ts*1e3:7.2f} ms (xla path "
                  f"{row.get('st_jax_mask_xla_s', float('nan'))*1e3:6.2f}, bounds {tb*1e3:6.2f}) "
                  f"fwd {row['forward_numpy_s']*1e3:7.2f} ms  x{row['speedup_vs_forward']:.1f}",
                  flush=True)
        # co-design: evaluate only the words of "probed clusters" (32 runs of 1024 items)
        rng = np.random.default_rng(0)
        W = n_pad // 32
        starts = rng.choice(W // 32, min(32, W // 32), replace=False) * 32
        wids = (starts[:, None] + np.arange(32)[None]).reshape(-1).astype(np.int32)
        full = [np.packbits(truth[i].tolist() + [False] * (n_pad - n),
                            bitorder="little").view("<u4") for i in range(len(progs))]
        part = {}
        for be in backends:
            f_part = jax.jit(lambda fi, p, w, be=be: filter_mask(fi, p, word_ids=w, backend=be))
            part[be] = []
            for i, p in enumerate(progs):
                assert (np.asarray(f_part(fi, p, wids)) == full[i][wids]).all()
                part[be].append(timeit(lambda p=p: f_part(fi, p, wids).block_until_ready(),
                                       args.repeat))
        res["codesign_partial"] = {"fraction_of_items": wids.size / W, "mask_s": part["auto"],
                                   "full_mask_s": [r["st_jax_mask_s"] for r in rows]}
        if "xla" in part:
            res["codesign_partial"]["mask_xla_s"] = part["xla"]
        print(f"partial ({wids.size / W:.1%} of words): "
              + " ".join(f"{t*1e3:.2f}" for t in part["auto"]) + " ms", flush=True)
        B = args.batch
        batch = [QUERIES[i % len(QUERIES)] for i in range(B)]
        pb = compile_filter(fi, batch, B)
        res["batch"] = {"batch_size": B,
                        "forward_numpy_per_query_s": float(np.mean(
                            [fwd_t[b % len(QUERIES)] for b in range(B)]))}
        for be in backends:
            got = np.asarray(f_mask[be](fi, pb))
            for b in range(B):
                assert (unpack(got[b], n) == truth[b % len(QUERIES)]).all()
            tb = timeit(lambda: f_mask[be](fi, pb).block_until_ready(), args.repeat)
            key = "" if be == "auto" else "_xla"
            res["batch"] |= {f"mask{key}_s": tb, f"per_query{key}_s": tb / B}
            print(f"batch {B} per-query programs ({be}): {tb*1e3:.1f} ms "
                  f"({tb/B*1e3:.2f} ms/query)", flush=True)
        res["memory_bytes_per_item"] = {
            "st_jax_rows": fi.nbytes()["rows"] / n,
            "st_jax_verify_lists": (fi.nbytes()["item_offsets"] + fi.nbytes()["item_terms"]) / n,
            "st_jax_total": sum(fi.nbytes().values()) / n,
            "forward_index_int32": fwd_bytes32 / n,
            "forward_index_int64_as_built": fwd_bytes / n,
            "faiss_bitmap_per_filter": 1 / 8,
        }
        del fi
    res["queries"] = rows
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"                 # atomic: temporary file + rename
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(tmp, args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
