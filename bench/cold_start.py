"""Cold start: the first call of a search graph (trace + XLA compile + run) vs a warm call.

    .venv/bin/python bench/cold_start.py           # writes bench/results/cold_start_cpu.json

A served model pays this once per graph (each batch size, k, filter kind, ...) after every
start, and a notebook sweep pays it for every configuration. Measured for st.search on a
flat and an IVF index with attributes, unfiltered and with an attribute filter, for
``backend="auto"`` (on CPU: the native kernels of pallas_kernels.native, the filter mask
included) and ``backend="xla"`` (the XLA twins). Each case starts from ``jax.clear_caches()``
and is repeated; the median is reported.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

import st_jax as st  # noqa: E402
from bench.ann import RESULTS, machine_info, write_json  # noqa: E402
from st_jax.synthetic import clustered_catalogue  # noqa: E402

FILTER = "genre:g1 AND NOT tag:t5"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "cold_start_cpu.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    cat = clustered_catalogue(args.n, args.dim, num_clusters=200, num_queries=args.batch, seed=0)
    attrs = {"genre": [f"g{g}" for g in rng.integers(0, 20, args.n)],
             "tag": [[f"t{t}" for t in rng.integers(0, 5000, rng.integers(0, 6))]
                     for _ in range(args.n)]}
    indexes = {
        "flat": (st.build_index(cat.embeddings, attributes=attrs), {}),
        "ivf": (st.build_index(cat.embeddings, attributes=attrs, num_clusters=256,
                               store_embeddings="bf16"), dict(nprobe=8, rerank=2)),
    }
    backends = ("auto", "xla") if jax.default_backend() == "cpu" else ("auto",)
    rows = []
    for name, (index, kw) in indexes.items():
        for filt in (None, FILTER):
            for be in backends:
                first, warm = [], []
                for _ in range(args.repeat):
                    jax.clear_caches()
                    t = time.perf_counter()
                    r = st.search(index, cat.queries, args.k, filter=filt, backend=be, **kw)
                    jax.block_until_ready(r.ids)
                    first.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    r = st.search(index, cat.queries, args.k, filter=filt, backend=be, **kw)
                    jax.block_until_ready(r.ids)
                    warm.append(time.perf_counter() - t)
                row = {"index": name, "filter": filt, "backend": be,
                       "first_call_s": float(np.median(first)),
                       "warm_call_s": float(np.median(warm))}
                rows.append(row)
                print(f"{name:4s} {str(filt):26s} {be:4s} first {row['first_call_s']:6.2f} s  "
                      f"warm {row['warm_call_s'] * 1e3:7.2f} ms", flush=True)
    write_json(args.out, {"benchmark": "cold_start", "machine": machine_info(),
                          "params": vars(args) | {"filter": FILTER, "out": str(args.out)},
                          "results": rows})
    print("wrote", args.out)


if __name__ == "__main__":
    main()
