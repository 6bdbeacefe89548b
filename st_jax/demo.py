"""`make demo`: build an Int8 index over a synthetic catalogue and run filtered searches.

Prints recall against the exact float32 filtered top-k, slots filled and latency for pass
rates 100 / 10 / 1 / 0.1 % (later milestones grow this into train -> publish -> serve).
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import st_jax as st
from st_jax.synthetic import clustered_catalogue, exact_filtered_topk, recall


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=100)
    args = ap.parse_args(argv)

    print(f"st_jax {st.__version__} on {jax.devices()[0].platform} "
          f"({jax.devices()[0].device_kind})")
    cat = clustered_catalogue(args.items, args.dim, num_queries=args.batch, seed=0)
    t = time.perf_counter()
    index = st.build_index(cat.embeddings)
    jax.block_until_ready(index)
    print(f"built Int8 index: {args.items:,} items x {args.dim} dims in "
          f"{time.perf_counter() - t:.2f}s, {index.bytes_per_item():.0f} bytes/item")
    rng = np.random.default_rng(1)
    print(f"\n{'pass rate':>10} {'recall@' + str(args.k):>11} {'slots filled':>13} "
          f"{'ms / batch':>11} {'QPS':>9}")
    for p in (1.0, 0.1, 0.01, 0.001):
        allow = None if p == 1 else rng.random(args.items) < p
        res = st.search(index, cat.queries, args.k, allow)      # compile + warm-up
        jax.block_until_ready(res)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            res = jax.block_until_ready(st.search(index, cat.queries, args.k, allow))
            times.append(time.perf_counter() - t)
        ms = float(np.median(times)) * 1e3
        truth = exact_filtered_topk(cat.embeddings, cat.queries, args.k, allow)
        eligible = args.items if allow is None else int(allow.sum())
        filled = float(np.asarray(res.count).mean()) / min(args.k, eligible)
        print(f"{p:>10.1%} {recall(np.asarray(res.ids), truth):>11.3f} {filled:>13.2f} "
              f"{ms:>11.1f} {args.batch / ms * 1e3:>9.0f}")
    top = np.asarray(st.search(index, cat.queries[:1], 5).ids[0])
    print(f"\nquery 0, top 5 item ids: {top.tolist()}")


if __name__ == "__main__":
    main()
