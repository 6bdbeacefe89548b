"""Filtered Int8 brute-force search: st.search vs faiss-cpu, on CPU (or the local device).

For N items x D dims (default 1M x 128), batch B, k in {100, 1024} and filter pass rates
100 / 10 / 1 / 0.1 % (uniform random filters shared by the batch), measures:
  - recall@k against the exact float32 *filtered* top-k (faiss IndexFlatIP + IDSelectorBitmap),
    normalised by min(k, eligible); slots filled (count / min(k, eligible));
  - QPS (batch / median wall time after warm-up; st_jax and faiss timed alternately in the
    same process so machine noise hits both alike);
  - bytes per item.
Peers: faiss IndexScalarQuantizer(QT_8bit, inner product) with IDSelectorBitmap — the Int8
brute-force peer — and IndexFlatIP (exact float32, also the ground truth). st_jax runs twice:
Int8 only, and with exact re-rank of the best R*k Int8 candidates from a bf16 cache.
Writes bench/results/ann_<platform>.json.

    python bench/ann.py                  # full run (a few minutes on 2 cores)
    python bench/ann.py --items 100000   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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
from bench._machine import cpu_model  # noqa: E402
from st_jax._timing import interleaved_medians  # noqa: E402
from st_jax.synthetic import clustered_catalogue, recall  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def add_malloc_option(ap) -> None:
    """``--no-malloc-tuning``; see :func:`apply_malloc_option`."""
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="leave glibc's malloc as it is (default: st.tune_cpu_malloc(), "
                    "for both st_jax and faiss: they share the process)")


def apply_malloc_option(args) -> bool:
    """Calls ``st.tune_cpu_malloc()`` unless ``--no-malloc-tuning``; whether it applied."""
    return not args.no_malloc_tuning and st.tune_cpu_malloc()


def machine_info() -> dict:
    dev = jax.devices()[0]
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": dev.platform,
            "device": dev.device_kind, "python": platform.python_version(),
            "jax": jax.__version__, "faiss": faiss.__version__, "numpy": np.__version__}
    if dev.platform == "cpu":     # which scans backend="auto" ran (pallas_kernels/native.py)
        from pallas_kernels import native
        info["cpu_scans"] = (f"native (IVF and flat scans, filter mask; {native.isa()} dots)"
                             if native.available()
                             else f"xla twin ({native.unavailable_reason()})")
    return info


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def write_json(path: Path, payload: dict) -> None:
    """Atomic write: temp file + rename."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ks", type=int, nargs="+", default=[100, 1024])
    ap.add_argument("--pass-rates", type=float, nargs="+", default=[1.0, 0.1, 0.01, 0.001])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rerank", type=int, default=2,
                    help="R for the st_jax + exact re-rank configuration (bf16 cache)")
    ap.add_argument("--out", type=Path, default=None)
    add_malloc_option(ap)
    args = ap.parse_args(argv)
    args.malloc_tuned = apply_malloc_option(args)
    faiss.omp_set_num_threads(args.threads)

    cat = clustered_catalogue(args.items, args.dim, num_queries=args.batch, seed=0)
    x, q = cat.embeddings, cat.queries
    t0 = time.perf_counter()
    index = jax.block_until_ready(st.build_index(x))
    st_build = time.perf_counter() - t0
    index_rr = jax.block_until_ready(st.build_index(x, store_embeddings="bf16"))

    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    sq8 = faiss.IndexScalarQuantizer(args.dim, faiss.ScalarQuantizer.QT_8bit,
                                     faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    sq8.train(x)
    sq8.add(x)
    sq8_build = time.perf_counter() - t0

    rng = np.random.default_rng(7)
    rows = []
    for p in args.pass_rates:
        allow = None if p >= 1 else rng.random(args.items) < p
        eligible = args.items if allow is None else int(allow.sum())
        params = None
        if allow is not None:
            sel = faiss.IDSelectorBitmap(np.packbits(allow, bitorder="little"))
            params = faiss.SearchParameters(sel=sel)
        for k in args.ks:
            def run_faiss(idx):
                return idx.search(q, k) if params is None else idx.search(q, k, params=params)

            def run_st():
                return jax.block_until_ready(st.search(index, q, k, allow))

            def run_twin():       # the XLA twin (backend="xla"): what CPU ran before the
                return jax.block_until_ready(   # native flat scan
                    st.search(index, q, k, allow, backend="xla"))

            def run_rr():
                return jax.block_until_ready(st.search(index_rr, q, k, allow, rerank=args.rerank))

            t_flat = timed(lambda: run_faiss(flat), 1)
            truth = run_faiss(flat)[1]
            res, res_rr, res_twin = run_st(), run_rr(), run_twin()
            # sampled in alternation, so both share the machine's noise
            med = interleaved_medians({"st": run_st, "rr": run_rr, "twin": run_twin,
                                       "sq8": lambda: run_faiss(sq8)}, args.repeats)
            sq8_ids = run_faiss(sq8)[1]
            denom = min(k, eligible)
            row = {
                "pass_rate": p, "eligible": eligible, "k": k,
                "st_jax": {"recall": recall(np.asarray(res.ids), truth),
                           "slots_filled": float(np.asarray(res.count).mean()) / denom,
                           "ms_per_batch": med["st"] * 1e3,
                           "qps": args.batch / med["st"]},
                "st_jax_xla_twin": {
                    "scores_equal": bool(np.array_equal(np.asarray(res.scores),
                                                        np.asarray(res_twin.scores))),
                    "ms_per_batch": med["twin"] * 1e3, "qps": args.batch / med["twin"]},
                f"st_jax_rerank{args.rerank}": {
                    "recall": recall(np.asarray(res_rr.ids), truth),
                    "slots_filled": float(np.asarray(res_rr.count).mean()) / denom,
                    "ms_per_batch": med["rr"] * 1e3,
                    "qps": args.batch / med["rr"]},
                "faiss_sq8": {"recall": recall(sq8_ids, truth),
                              "slots_filled": float((sq8_ids >= 0).sum(1).mean()) / denom,
                              "ms_per_batch": med["sq8"] * 1e3,
                              "qps": args.batch / med["sq8"]},
                "faiss_flat": {"ms_per_batch": t_flat[0] * 1e3,
                               "qps": args.batch / t_flat[0]},
            }
            row["speedup_vs_sq8"] = row["st_jax"]["qps"] / row["faiss_sq8"]["qps"]
            rr = row[f"st_jax_rerank{args.rerank}"]
            row["speedup_vs_sq8_rerank"] = rr["qps"] / row["faiss_sq8"]["qps"]
            rows.append(row)
            print(f"pass {p:7.1%} k {k:5d} | st_jax recall {row['st_jax']['recall']:.3f} "
                  f"{row['st_jax']['qps']:8.0f} QPS | faiss SQ8 recall "
                  f"{row['faiss_sq8']['recall']:.3f} {row['faiss_sq8']['qps']:8.0f} QPS | "
                  f"x{row['speedup_vs_sq8']:.2f} | twin {med['twin'] * 1e3:.1f} ms | "
                  f"rerank{args.rerank} recall {rr['recall']:.3f} "
                  f"{rr['qps']:6.0f} QPS x{row['speedup_vs_sq8_rerank']:.2f} | "
                  f"flat {row['faiss_flat']['qps']:.0f} QPS",
                  flush=True)

    payload = {
        "benchmark": "ann", "machine": machine_info(),
        "params": {"items": args.items, "dim": args.dim, "batch": args.batch, "ks": args.ks,
                   "pass_rates": args.pass_rates, "repeats": args.repeats,
                   "threads": args.threads, "filters": "uniform random, shared by the batch",
                   "malloc_tuned": args.malloc_tuned,
                   "data": "clustered_catalogue(seed=0): unit-norm, 256 Zipf-sized clusters"},
        "bytes_per_item": {"st_jax": index.bytes_per_item(),
                           "st_jax_with_bf16_cache": index_rr.bytes_per_item(),
                           "faiss_sq8": sq8.sa_code_size(), "faiss_flat": 4 * args.dim},
        "build_seconds": {"st_jax": st_build, "faiss_sq8": sq8_build},
        "results": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"ann_{jax.devices()[0].platform}.json"
    write_json(out, payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
