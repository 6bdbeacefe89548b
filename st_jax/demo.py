"""`make demo` / `st-jax demo`: the whole run, train -> publish -> serve -> export
(:mod:`serving.demo`); `st-jax demo --search` runs the index-only demo below.

The index-only demo builds Int8 indexes over a synthetic catalogue and prints, for a flat
index and an IVF index (with exact re-rank), recall against the exact float32 filtered top-k,
slots filled and latency for attribute filters passing 100 / 10 / 1 / 0.1 % of the items.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import st_jax as st
from st_jax._timing import median_seconds
from st_jax.synthetic import clustered_catalogue, exact_filtered_topk, recall

FILTERS = {"*": None, "bucket10:b3": 10, "bucket100:b3": 100, "bucket1000:b3": 1000}


def main(argv=None) -> None:
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--search" in argv:
        argv.remove("--search")
        search_demo(argv)
    else:
        from serving import demo
        demo.main(argv)


def search_demo(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, prog="st-jax demo --search")
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--clusters", type=int, default=None,
                    help="IVF clusters (default ~ N / 500; 0 skips the IVF index)")
    args = ap.parse_args(argv)
    n, k = args.items, args.k
    clusters = max(1, n // 500) if args.clusters is None else args.clusters

    dev = jax.devices()[0]
    print(f"st_jax {st.__version__} on {dev.platform} ({dev.device_kind})")
    cat = clustered_catalogue(n, args.dim, num_queries=args.batch, seed=0)
    rng = np.random.default_rng(1)
    buckets = {m: rng.integers(0, m, n) for m in (10, 100, 1000)}
    attrs = {f"bucket{m}": [f"b{v}" for v in col] for m, col in buckets.items()}

    indexes = []
    t = time.perf_counter()
    indexes.append(("flat", jax.block_until_ready(st.build_index(cat.embeddings,
                                                                 attributes=attrs)), {}))
    print(f"flat Int8 index: {n:,} x {args.dim} in {time.perf_counter() - t:.1f}s, "
          f"{indexes[0][1].bytes_per_item():.0f} bytes/item (codes, scales, filter rows)")
    if clusters:
        t = time.perf_counter()
        ivf = jax.block_until_ready(st.build_index(cat.embeddings, attributes=attrs,
                                                   num_clusters=clusters,
                                                   store_embeddings="bf16"))
        print(f"IVF index: {ivf.ivf.num_clusters} clusters in {time.perf_counter() - t:.1f}s, "
              f"{ivf.bytes_per_item():.0f} bytes/item (+ bf16 re-rank cache)")
        nprobe = min(16, ivf.ivf.num_clusters)
        indexes.append((f"IVF nprobe={nprobe} rerank=4", ivf, {"nprobe": nprobe, "rerank": 4}))

    print(f"\n{'index':>24} {'filter':>14} {'pass':>7} {'recall@' + str(k):>10} "
          f"{'filled':>7} {'ivf/flat':>9} {'ms/batch':>9} {'QPS':>7}")
    for name, index, kw in indexes:
        for text, m in FILTERS.items():
            allow = None if m is None else buckets[m] == 3
            res = st.search(index, cat.queries, k, filter=text, **kw)
            ms = median_seconds(lambda: st.search(index, cat.queries, k, filter=text, **kw)) * 1e3
            truth = exact_filtered_topk(cat.embeddings, cat.queries, k, allow)
            eligible = n if allow is None else int(allow.sum())
            filled = float(np.asarray(res.count).mean()) / min(k, eligible)
            paths = np.asarray(res.path)
            split = f"{(paths == 1).sum()}/{(paths != 1).sum()}"
            print(f"{name:>24} {text:>14} {eligible / n:>7.1%} "
                  f"{recall(np.asarray(res.ids), truth):>10.3f} {filled:>7.2f} {split:>9} "
                  f"{ms:>9.1f} {args.batch / ms * 1e3:>7.0f}")
    res = st.search(indexes[0][1], cat.queries[:1], 5,
                    filter="bucket10:b3 AND NOT bucket100:b13")
    print(f"\nquery 0, filter 'bucket10:b3 AND NOT bucket100:b13', top 5 ids: "
          f"{np.asarray(res.ids[0]).tolist()}")


if __name__ == "__main__":
    main()
