"""IVF with filters: st_jax vs faiss IVF-SQ8 and HNSW, recall-QPS curves over nprobe.

N items x D dims (default 1M x 128, 1024 lists), batch 32, k in {100, 1024}; filters:
uniform random with pass rates 100 / 10 / 1 / 0.1 % and a cluster-correlated ~1 % filter
(all eligible items in a few planted clusters). For each configuration and probe width:
recall@k against the exact float32 filtered top-k (normalised by min(k, eligible)), slots
filled, QPS (median of repeats after warm-up; the methods of one probe width are
sampled in interleaved rounds, so they see the same machine load), and for
st_jax the fractions of queries answered by the flat fallback and by a widened probe
(default max_nprobe = 4 nprobe). Peers: faiss
IndexIVFScalarQuantizer(QT_8bit) with SearchParametersIVF(sel=, nprobe=), IndexHNSWFlat(32)
with SearchParametersHNSW(sel=, efSearch=). Writes bench/results/ivf_<platform>.json and a
recall-QPS plot ivf_<platform>.png beside it.

Probe widths 6, 7, 8, 10, 12, 16, 32 and 128 by default: fine steps where both sides cross
recall 0.95 unfiltered, so neither is charged for a coarse grid (with 8, 12, 16 only, a side
reaching 0.95 at 10 probes had to be timed at 12). ``--rerank`` defaults to 2: on this
catalogue R = 4 gave exactly R = 2's recall in all 50 (filter, k, nprobe) cells of the
runs with each (every pass rate, k = 100 and 1024), at a higher cost. On the filtered runs
``st_jax+mef4`` adds ``min_eligible_factor=4`` (default 16; ``--min-eligible-factors``): a
probe then counts as starved under 4 k eligible items instead of 16 k, so a moderate filter
(10 %) widens fewer probes, trading recall margin for speed. Every st_jax row is exact
(the native CPU scan returns the XLA twin's results), and st_jax's mask is packed into row
words once (``index.allow_words``), as faiss's bitmap is.

Compilation: the search is one program per (k, probe width, rerank, filtered or not), the
filter's mask being an argument, so the filters are swept inside each k and the programs
are compiled once for all filtered runs; the caches are cleared between phases (too many
live executables exhaust the process's memory maps, vm.max_map_count, and LLVM fails).

Head to head: the sweep's methods are timed per probe width, so a comparison across widths
(st_jax at nprobe 8 vs faiss at nprobe 16) mixes machine phases. For every filter and k,
the two fastest configurations of each side reaching recall >= 0.95 (any st_jax method;
faiss IVF-SQ8) are therefore timed again together, interleaved, with 3x
the repeats; ``head_to_head`` in the JSON keeps each side's faster one and the QPS ratio.

    python bench/ivf.py                      # full (~12-25 min on 2 cores, HNSW build included)
    python bench/ivf.py --items 100000 --nlist 256 --no-hnsw    # quick
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# faiss's OpenMP workers must not spin between its calls (libgomp's default): timed
# alternately with st_jax, the spinning took the 2 cores from st_jax's next call (its IVF
# search ~10 % slower); faiss itself measured no slower with PASSIVE. Read at import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import faiss
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import st_jax as st  # noqa: E402
from bench.ann import (RESULTS, add_malloc_option, apply_malloc_option,  # noqa: E402
                       machine_info, write_json)
from st_jax._timing import interleaved_medians  # noqa: E402
from st_jax.synthetic import clustered_catalogue, recall  # noqa: E402


def filters(cat, rng, n):
    out = {"100%": None, "10%": rng.random(n) < 0.1, "1%": rng.random(n) < 0.01,
           "0.1%": rng.random(n) < 0.001}
    # cluster-correlated: whole planted clusters (smallest first) until ~1 % of the items
    sizes = np.bincount(cat.cluster)
    chosen, total = [], 0
    for c in np.argsort(sizes):
        if total >= 0.01 * n:
            break
        chosen.append(c)
        total += sizes[c]
    out["1% cluster-correlated"] = np.isin(cat.cluster, chosen)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ks", type=int, nargs="+", default=[100, 1024])
    ap.add_argument("--nprobes", type=int, nargs="+", default=[6, 7, 8, 10, 12, 16, 32, 128])
    ap.add_argument("--efs", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--rerank", type=int, default=2,
                    help="R of the st_jax+rerankR method (the best R * k Int8 candidates "
                    "re-scored in float)")
    ap.add_argument("--min-eligible-factors", type=float, nargs="*", default=[4],
                    help="extra st_jax+mefF methods on the filtered runs: st.search's "
                    "min_eligible_factor F instead of its default 16 (a smaller F widens "
                    "fewer starved probes: faster, lower recall)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-hnsw", action="store_true")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default bench/results/ivf_<platform>.json; the plot beside it)")
    add_malloc_option(ap)
    args = ap.parse_args(argv)
    args.malloc_tuned = apply_malloc_option(args)
    faiss.omp_set_num_threads(faiss.omp_get_max_threads())

    cat = clustered_catalogue(args.items, args.dim, num_queries=args.batch, seed=0)
    x, q = cat.embeddings, cat.queries
    builds = {}
    t = time.perf_counter()
    index = jax.block_until_ready(st.build_index(x, num_clusters=args.nlist,
                                                 store_embeddings="bf16", progress=True))
    builds["st_jax"] = time.perf_counter() - t
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    t = time.perf_counter()
    ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(args.dim), args.dim, args.nlist,
                                        faiss.ScalarQuantizer.QT_8bit,
                                        faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add(x)
    builds["faiss_ivf_sq8"] = time.perf_counter() - t
    hnsw = None
    if not args.no_hnsw:
        t = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.add(x)
        builds["faiss_hnsw32"] = time.perf_counter() - t
    print("build seconds", builds, flush=True)

    rng = np.random.default_rng(11)
    rows, h2h = [], []
    masks = filters(cat, rng, args.items)
    for k, (fname, allow) in ((k, fa) for k in args.ks for fa in masks.items()):
        eligible = args.items if allow is None else int(allow.sum())
        # packed once into st_jax's row words, as faiss's bitmap is packed once below (a
        # served filter's mask would be kept so too: no per-call upload or packing)
        allow_dev = None if allow is None else index.allow_words(allow)
        sel = None if allow is None else faiss.IDSelectorBitmap(
            np.packbits(allow, bitorder="little"))
        denom = min(k, eligible)
        truth = (flat.search(q, k) if sel is None else
                 flat.search(q, k, params=faiss.SearchParameters(sel=sel)))[1]

        fns = {}                  # (method, knob) -> fn, for the head to head

        def record(group):
            """``group``: (method, knob, fn, extra) timed together, interleaved."""
            secs = interleaved_medians({(m, kn): fn for m, kn, fn, _ in group},
                                       args.repeats)
            for method, knob, fn, extra in group:
                fns[(method, knob)] = fn
                sec = secs[(method, knob)]
                ids = fn()
                row = {"filter": fname, "eligible": eligible, "k": k, "method": method,
                       "knob": knob, "recall": recall(ids, truth),
                       "slots_filled": float((ids >= 0).sum(1).mean()) / denom,
                       "qps": args.batch / sec, "ms_per_batch": sec * 1e3} | (extra or {})
                rows.append(row)
                print(f"{fname:>22} k={k:<5} {method:>14} {knob:>12}: recall "
                      f"{row['recall']:.3f} filled {row['slots_filled']:.2f} "
                      f"{row['qps']:8.0f} QPS" + (f" fallback {extra['fallback']:.2f}"
                                                   f" widened {extra['widened']:.2f}"
                                                   if extra else ""), flush=True)

        for nprobe in args.nprobes:
            group = []
            # the default min_eligible_factor, with and without re-rank; each further factor
            # (filtered runs only: an unfiltered probe is never starved) without re-rank
            variants = [(None, None), (args.rerank, None)] + (
                [(None, f) for f in args.min_eligible_factors] if allow is not None else [])
            for rr, mef in variants:
                opts = {} if mef is None else {"min_eligible_factor": mef}

                def run_st(nprobe=nprobe, rr=rr, opts=opts):
                    return np.asarray(jax.block_until_ready(
                        st.search(index, q, k, allow_dev, nprobe=nprobe, rerank=rr,
                                  **opts)).ids)
                res = st.search(index, q, k, allow_dev, nprobe=nprobe, rerank=rr, **opts)
                path = np.asarray(res.path)
                group.append(("st_jax" + (f"+rerank{rr}" if rr else "")
                              + (f"+mef{mef:g}" if mef is not None else ""),
                              f"nprobe={nprobe}", run_st,
                              {"fallback": float((path == 2).mean()),
                               "widened": float((path == 3).mean())}))
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe) if sel else \
                faiss.SearchParametersIVF(nprobe=nprobe)
            group.append(("faiss_ivf_sq8", f"nprobe={nprobe}",
                          lambda params=params: ivf.search(q, k, params=params)[1], None))
            record(group)
        if hnsw is not None:
            group = []
            for ef in sorted({max(ef, k) for ef in args.efs}):
                params = faiss.SearchParametersHNSW(sel=sel, efSearch=ef) if sel else \
                    faiss.SearchParametersHNSW(efSearch=ef)
                group.append(("faiss_hnsw32", f"ef={ef}",
                              lambda params=params: hnsw.search(q, k, params=params)[1],
                              None))
            record(group)
        h2h.append(head_to_head(rows, fns, fname, k, args.repeats * 3, args.batch))
        print("head to head:", h2h[-1], flush=True)
        # the unfiltered programs are not used again, the filtered ones only within
        # this k: dropped then (live executables otherwise exhaust the process's
        # memory maps, vm.max_map_count, and LLVM fails)
        if allow is None or fname == list(masks)[-1]:
            jax.clear_caches()

    payload = {"benchmark": "ivf", "machine": machine_info(),
               "params": vars(args) | {"out": str(args.out) if args.out else None,
                                       "data": "clustered_catalogue(seed=0)",
                                       "st_jax_clusters": index.ivf.num_clusters},
               "build_seconds": builds,
               "bytes_per_item": {"st_jax": index.bytes_per_item(),
                                  "st_jax_without_rerank_cache": index.bytes_per_item()
                                  - 2 * args.dim * index.num_rows / args.items},
               "results": rows, "head_to_head": h2h}
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"ivf_{jax.devices()[0].platform}.json"
    write_json(out, payload)
    plot(rows, out.with_suffix(".png"))
    print("wrote", out)


def head_to_head(rows, fns, fname, k, repeats, batch, target=0.95):
    """Re-times, interleaved, the two fastest configurations of st_jax (any rerank) and of
    faiss IVF-SQ8 that reach ``target`` recall for (``fname``, ``k``); returns each side's
    faster one (None when a side never reaches it) and the QPS ratio."""
    sides = {"st_jax": lambda m: m.startswith("st_jax"),
             "faiss_ivf_sq8": lambda m: m == "faiss_ivf_sq8"}
    picks = {}
    for side, is_side in sides.items():
        ok = [r for r in rows if r["filter"] == fname and r["k"] == k and is_side(r["method"])
              and r["recall"] >= target]
        picks[side] = sorted(ok, key=lambda r: r["ms_per_batch"])[:2]
    cand = [r for rs in picks.values() for r in rs]
    secs = interleaved_medians({(r["method"], r["knob"]): fns[(r["method"], r["knob"])]
                                for r in cand}, repeats) if cand else {}
    out = {"filter": fname, "k": k, "target_recall": target}
    for side, rs in picks.items():
        if not rs:
            out[side] = None
            continue
        best = min(rs, key=lambda r: secs[(r["method"], r["knob"])])
        sec = secs[(best["method"], best["knob"])]
        out[side] = {"method": best["method"], "knob": best["knob"], "recall": best["recall"],
                     "qps": batch / sec, "ms_per_batch": sec * 1e3}
    s, f = out["st_jax"], out["faiss_ivf_sq8"]
    out["speedup"] = s["qps"] / f["qps"] if s and f else None
    return out


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fnames = list(dict.fromkeys(r["filter"] for r in rows))
    ks = sorted({r["k"] for r in rows})
    fig, axes = plt.subplots(len(ks), len(fnames), figsize=(4 * len(fnames), 3.4 * len(ks)),
                             squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    handles = {}
    for i, k in enumerate(ks):
        for j, f in enumerate(fnames):
            ax = axes[i][j]
            for c, m in enumerate(methods):        # one colour per method in every panel
                pts = [(r["recall"], r["qps"]) for r in rows
                       if r["k"] == k and r["filter"] == f and r["method"] == m]
                if pts:
                    handles[m], = ax.plot(*zip(*pts), marker="o", color=f"C{c}", label=m)
            ax.set_yscale("log")
            ax.set_title(f"{f}, k={k}", fontsize=9)
            ax.set_xlabel("recall")
            ax.set_ylabel("QPS")
            ax.axvline(0.95, color="grey", lw=0.5, ls="--")
    fig.legend([handles[m] for m in methods if m in handles],
               [m for m in methods if m in handles], loc="upper center",
               ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)


if __name__ == "__main__":
    main()
