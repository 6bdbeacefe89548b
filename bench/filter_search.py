"""End-to-end filtered search: st.search(filter="...") vs faiss SQ8 + IDSelectorBitmap.

The filter-evaluation benchmark is bench/filter.py; this one measures whole searches with
attribute filters on the synthetic catalogue (default N = 1M, D = 128, B = 32, k = 100).
Attributes: ``p10`` / ``p100`` / ``p1000`` (uniform, 10 / 100 / 1000 values: one value passes
10 / 1 / 0.1 %) and a multi-valued Zipf ``tag`` field. Filters: ``*``, ``p10:v3``,
``p100:v3``, ``p1000:v3`` and a nested one with NOT over the multi-valued field. st_jax
evaluates the filter inside the search (exact: bit-sliced Bloom + exact rows + verification);
faiss gets the same predicate as a ready bitmap computed by numpy (its time reported apart).
Recall@k against the exact float32 filtered top-k, slots filled, QPS (median of repeats,
methods alternated). Writes bench/results/filter_search_<platform>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
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
from st_jax.synthetic import clustered_catalogue, exact_filtered_topk, recall  # noqa: E402


def attributes(n, rng):
    cols = {f"p{m}": rng.integers(0, m, n) for m in (10, 100, 1000)}
    tag_ids = np.minimum(rng.zipf(1.3, (n, 3)) - 1, 199)
    ntags = rng.integers(0, 4, n)
    tags = [[f"t{t}" for t in row[:c]] for row, c in zip(tag_ids, ntags)]
    attrs = {k: [f"v{v}" for v in col] for k, col in cols.items()} | {"tag": tags}
    preds = {
        "*": lambda: None,
        "p10:v3": lambda: cols["p10"] == 3,
        "p100:v3": lambda: cols["p100"] == 3,
        "p1000:v3": lambda: cols["p1000"] == 3,
        "(p10:v1 OR p10:v2) AND NOT tag:t0": lambda: np.isin(cols["p10"], [1, 2]) & ~np.array(
            [bool(c) and (0 in row[:c]) for row, c in zip(tag_ids, ntags)]),
    }
    return attrs, preds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    add_malloc_option(ap)
    args = ap.parse_args(argv)
    args.malloc_tuned = apply_malloc_option(args)
    rng = np.random.default_rng(5)
    cat = clustered_catalogue(args.items, args.dim, num_queries=args.batch, seed=0)
    attrs, preds = attributes(args.items, rng)
    t = time.perf_counter()
    index = jax.block_until_ready(st.build_index(cat.embeddings, attributes=attrs))
    build = time.perf_counter() - t
    sq8 = faiss.IndexScalarQuantizer(args.dim, faiss.ScalarQuantizer.QT_8bit,
                                     faiss.METRIC_INNER_PRODUCT)
    sq8.train(cat.embeddings)
    sq8.add(cat.embeddings)
    q, k = cat.queries, args.k
    rows = []
    for text, pred in preds.items():
        t = time.perf_counter()
        allow = pred()
        pred_ms = (time.perf_counter() - t) * 1e3
        eligible = args.items if allow is None else int(allow.sum())
        truth = exact_filtered_topk(cat.embeddings, q, k, allow)
        params = None if allow is None else faiss.SearchParameters(
            sel=faiss.IDSelectorBitmap(np.packbits(allow, bitorder="little")))

        def run_st():
            return jax.block_until_ready(st.search(index, q, k, filter=text))

        def run_faiss():
            return sq8.search(q, k) if params is None else sq8.search(q, k, params=params)

        res = run_st()
        run_faiss()
        t_st, t_f = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            run_st()
            t_st.append(time.perf_counter() - t)
            t = time.perf_counter()
            run_faiss()
            t_f.append(time.perf_counter() - t)
        ids = np.asarray(res.ids)
        fp = 0 if allow is None else int(sum((~allow[r[r >= 0]]).sum() for r in ids))
        f_ids = run_faiss()[1]
        row = {"filter": text, "pass_rate": eligible / args.items, "eligible": eligible,
               "st_jax": {"recall": recall(ids, truth), "false_positives": fp,
                          "slots_filled": float(np.asarray(res.count).mean()) / min(k, eligible),
                          "qps": args.batch / statistics.median(t_st),
                          "ms_per_batch": statistics.median(t_st) * 1e3},
               "faiss_sq8_bitmap": {"recall": recall(f_ids, truth),
                                    "slots_filled": float((f_ids >= 0).sum(1).mean()) / min(k, eligible),
                                    "qps": args.batch / statistics.median(t_f),
                                    "ms_per_batch": statistics.median(t_f) * 1e3,
                                    "numpy_predicate_ms": pred_ms}}
        rows.append(row)
        print(f"{text:>36} pass {row['pass_rate']:7.2%} | st_jax recall {row['st_jax']['recall']:.3f}"
              f" FP {fp} {row['st_jax']['qps']:7.0f} QPS | faiss SQ8 recall "
              f"{row['faiss_sq8_bitmap']['recall']:.3f} {row['faiss_sq8_bitmap']['qps']:7.0f} QPS",
              flush=True)
    payload = {"benchmark": "filter_search", "machine": machine_info(),
               "params": vars(args), "build_seconds": build,
               "bytes_per_item": index.bytes_per_item(), "results": rows}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"filter_search_{jax.devices()[0].platform}.json"
    write_json(out, payload)
    print("wrote", out)


if __name__ == "__main__":
    main()
