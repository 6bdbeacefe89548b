"""The native CPU IVF scan against the XLA twin and faiss, scan alone and whole search.

``pallas_kernels/native/ivf_scan_cpu.cc`` (an XLA FFI handler built on first use, see
``pallas_kernels/native.py``) is what ``backend="auto"`` runs on CPU; the XLA twin
(``backend="xla"``) is its reference. On the IVF benchmark's index (1M x 128, nlist 1024,
B = 32, no filter), for each nprobe and k this script checks that the native scan returns the
twin's values and rows exactly, then times, interleaved: the native scan and the twin's scan
on the same probed blocks, the whole ``st.search`` with each (``st_search`` /
``st_search_twin``) and faiss IVF-SQ8 at the same nprobe. Writes
``bench/results/native_scan_cpu.json``.

    python bench/native_scan.py                 # ~4 min on 2 cores
    python bench/native_scan.py --items 200000 --nlist 256
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as bench/ivf.py: see there
import faiss
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import st_jax as st  # noqa: E402
from bench.ann import (RESULTS, add_malloc_option, apply_malloc_option,  # noqa: E402
                       machine_info, write_json)
from pallas_kernels import native  # noqa: E402
from pallas_kernels.ivf_scan import ivf_topk_native, ivf_topk_reference  # noqa: E402
from st_jax._ivf import partial_mask, probed_blocks  # noqa: E402
from st_jax._timing import interleaved_medians  # noqa: E402
from st_jax.synthetic import clustered_catalogue  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ks", type=int, nargs="+", default=[100, 1024])
    ap.add_argument("--nprobes", type=int, nargs="+", default=[7, 8, 10])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default bench/results/native_scan_<platform>.json)")
    add_malloc_option(ap)
    args = ap.parse_args(argv)
    args.malloc_tuned = apply_malloc_option(args)
    faiss.omp_set_num_threads(faiss.omp_get_max_threads())

    cat = clustered_catalogue(args.items, args.dim, num_queries=args.batch, seed=0)
    x, q = cat.embeddings, cat.queries
    index = jax.block_until_ready(st.build_index(x, num_clusters=args.nlist, progress=True))
    ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(args.dim), args.dim, args.nlist,
                                        faiss.ScalarQuantizer.QT_8bit,
                                        faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add(x)

    native.ensure_loaded()          # fails loudly here: this benchmark is about the kernel
    codes, scale = index.items.codes, index.items.scale
    block = index.ivf.block
    rows = []
    qd = jax.device_put(q)
    for nprobe in args.nprobes:
        blocks, valid = probed_blocks(index.ivf, qd, nprobe)
        pm = partial_mask(index.live, blocks, valid, block)
        live_blocks = int(np.any(np.asarray(pm) != 0, axis=-1).sum())
        for k in args.ks:
            twin = jax.jit(lambda qd, c, s, b, p, k=k: ivf_topk_reference(
                qd, c, s, b, p, k=k, block=block))
            nat = jax.jit(lambda qd, c, s, b, p, k=k: ivf_topk_native(
                qd, c, s, b, p, k=k, block=block))
            tv, tr = (np.asarray(a) for a in twin(qd, codes, scale, blocks, pm))
            nv, nr = (np.asarray(a) for a in nat(qd, codes, scale, blocks, pm))
            fns = {"native_scan": lambda nat=nat: nat(qd, codes, scale, blocks, pm),
                   "twin_scan": lambda twin=twin: twin(qd, codes, scale, blocks, pm),
                   "st_search": lambda k=k: st.search(index, q, k, nprobe=nprobe).ids,
                   "st_search_twin": lambda k=k: st.search(index, q, k, nprobe=nprobe,
                                                           backend="xla").ids,
                   "faiss_ivf_sq8": lambda k=k: ivf.search(
                       q, k, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]}
            secs = interleaved_medians(fns, args.repeats)
            row = {"nprobe": nprobe, "k": k, "live_blocks": live_blocks,
                   "codes_mb": live_blocks * block * args.dim / 1e6,
                   "values_equal": bool(np.array_equal(tv, nv)),
                   "rows_equal": bool(np.array_equal(tr, nr)),
                   "ms_per_batch": {m: s * 1e3 for m, s in secs.items()}}
            rows.append(row)
            print(f"nprobe={nprobe:<3} k={k:<5} equal values {row['values_equal']} rows "
                  f"{row['rows_equal']}  " + "  ".join(
                      f"{m} {s * 1e3:.2f} ms" for m, s in secs.items()), flush=True)
        jax.clear_caches()

    payload = {"benchmark": "native_scan", "machine": machine_info(),
               "params": vars(args) | {"out": str(args.out) if args.out else None,
                                       "data": "clustered_catalogue(seed=0)", "filter": None,
                                       "cxxflags": list(native.compiler_flags()),
                                       "isa": native.isa(),
                                       "library": str(native.loaded_path())},
               "results": rows}
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"native_scan_{jax.devices()[0].platform}.json"
    write_json(out, payload)
    print("wrote", out)


if __name__ == "__main__":
    main()
