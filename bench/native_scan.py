"""What a native CPU IVF scan would gain: the twin's contract in plain C++ vs the XLA twin.

The unfiltered CPU gap to faiss IVF-SQ8 (``bench/ivf.py``) comes from XLA:CPU's code for the
scan (narrow int8 GEMMs at 7-11 GB/s of codes, ``lax.top_k``), not from the work done. This
script measures how much a native kernel would change: ``bench/native_scan.cc`` (the twin's
contract -- same blocks, partial masks, scores and tie order -- as an auto-vectorised C++
loop with a per-query threshold buffer, OpenMP over queries) is compiled with the system's
``g++`` into a temporary folder and run on the probed blocks of the IVF benchmark's index
(1M x 128, nlist 1024, B = 32, no filter). For each nprobe and k it checks that the native
scan returns the twin's values and rows exactly, then times, interleaved, the native scan,
the twin's scan alone (``ivf_topk_reference``), the whole ``st.search`` and faiss
IVF-SQ8 at the same nprobe. Writes ``bench/results/native_scan_cpu.json``.

Not part of the library: a measurement to decide on an XLA FFI CPU kernel beside the twin.

    python bench/native_scan.py                 # ~4 min on 2 cores
    python bench/native_scan.py --items 200000 --nlist 256
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as bench/ivf.py: see there
import faiss
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import st_jax as st  # noqa: E402
from bench.ann import (RESULTS, add_malloc_option, apply_malloc_option,  # noqa: E402
                       machine_info, write_json)
from pallas_kernels.int8_topk import quantize_rows  # noqa: E402
from pallas_kernels.ivf_scan import ivf_topk_reference  # noqa: E402
from st_jax._ivf import partial_mask, probed_blocks  # noqa: E402
from st_jax._timing import interleaved_medians  # noqa: E402
from st_jax.synthetic import clustered_catalogue  # noqa: E402

SOURCE = Path(__file__).with_name("native_scan.cc")
CXXFLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def build(folder: str) -> ctypes.CDLL:
    """Compiles ``native_scan.cc`` into ``folder``; RuntimeError naming what is missing."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise RuntimeError("no C++ compiler: install g++ (apt-get install g++) or set CXX")
    lib = Path(folder) / "native_scan.so"
    subprocess.run([cxx, *CXXFLAGS, str(SOURCE), "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


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

    codes, scale = index.items.codes, index.items.scale
    codes_np, scale_np = np.asarray(codes), np.asarray(scale)
    qc, qs = (np.ascontiguousarray(np.asarray(a)) for a in quantize_rows(jnp.asarray(q)))
    block = index.ivf.block
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(tmp)
        ptr = ctypes.c_void_p

        def native(blocks, pm, k):
            b, p = blocks.shape
            out_v = np.empty((b, k), np.float32)
            out_r = np.empty((b, k), np.int32)
            lib.ivf_scan(qc.ctypes.data_as(ptr), qs.ctypes.data_as(ptr),
                         codes_np.ctypes.data_as(ptr), scale_np.ctypes.data_as(ptr),
                         blocks.ctypes.data_as(ptr), pm.ctypes.data_as(ptr), b, p,
                         codes_np.shape[1], block, k, out_v.ctypes.data_as(ptr),
                         out_r.ctypes.data_as(ptr))
            return out_v, out_r

        qd = jax.device_put(q)
        for nprobe in args.nprobes:
            blocks, valid = probed_blocks(index.ivf, qd, nprobe)
            pm = partial_mask(index.live, blocks, valid, block)
            blocks_np = np.ascontiguousarray(np.asarray(blocks, np.int32))
            pm_np = np.ascontiguousarray(np.asarray(pm))
            live_blocks = int(np.any(pm_np != 0, axis=-1).sum())
            for k in args.ks:
                twin = jax.jit(lambda qd, c, s, b, p, k=k: ivf_topk_reference(
                    qd, c, s, b, p, k=k, block=block))
                tv, tr = (np.asarray(a) for a in twin(qd, codes, scale, blocks, pm))
                nv, nr = native(blocks_np, pm_np, k)
                fns = {"native_scan": lambda k=k: native(blocks_np, pm_np, k),
                       "twin_scan": lambda twin=twin: twin(qd, codes, scale, blocks, pm),
                       "st_search": lambda k=k: st.search(index, q, k, nprobe=nprobe).ids,
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
               "params": vars(args) | {"data": "clustered_catalogue(seed=0)", "filter": None,
                                       "cxxflags": CXXFLAGS},
               "results": rows}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"native_scan_{jax.devices()[0].platform}.json"
    write_json(out, payload)
    print("wrote", out)


if __name__ == "__main__":
    main()
