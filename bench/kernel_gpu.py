"""Int8 top-k kernel on a GPU: Pallas kernel vs its XLA twin on the same device.

Default: N = 10M items, D = 128, B = 64, k = 1024, pass rates 100 / 10 / 1 %. Reports per
configuration the median latency of both implementations, achieved bytes/s of the kernel
(item codes + scales + mask words read once: the common, unsaturated path) against the HBM
roofline of the device, the speed-up over the twin, exactness (kernel == twin) and the
fraction of queries that needed the saturation re-run. Writes
bench/results/kernel_<device>.json. Needs a CUDA device (exits with a message otherwise).

    python bench/kernel_gpu.py [--items 10000000] [--batch 64] [--k 1024]
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ann import RESULTS, machine_info, write_json  # noqa: E402
from st_jax._timing import median_seconds  # noqa: E402
from pallas_kernels.int8_topk import (int8_topk_pallas, int8_topk_reference, pack_mask,  # noqa: E402
                                      saturation_rate)

ROOFLINE_TBS = {"H100": 3.35, "H200": 4.8, "A100": 2.0}


def roofline(kind: str) -> float | None:
    for key, tbs in ROOFLINE_TBS.items():
        if key in kind:
            return tbs * 1e12
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--pass-rates", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        print("bench/kernel_gpu.py needs a CUDA GPU; found", dev.platform)
        return 1
    key = jax.random.key(0)
    n = -(-args.items // 1024) * 1024
    codes = jax.random.randint(key, (n, args.dim), -127, 128, jnp.int8)
    scale = jax.random.uniform(jax.random.key(1), (n,), jnp.float32)
    q = jax.random.normal(jax.random.key(2), (args.batch, args.dim), jnp.float32)
    peak = roofline(dev.device_kind)
    rows = []
    for p in args.pass_rates:
        allow = jax.random.uniform(jax.random.key(3), (n,)) < p
        mask = pack_mask(allow)
        # arrays as arguments, not closed-over constants (XLA would constant-fold them)
        kern_fn = jax.jit(functools.partial(int8_topk_pallas, k=args.k))
        twin_fn = jax.jit(functools.partial(int8_topk_reference, k=args.k))
        kern = functools.partial(kern_fn, q, codes, scale, mask)
        twin = functools.partial(twin_fn, q, codes, scale, mask)
        t_k, t_x = median_seconds(kern, 20), median_seconds(twin, 20)
        vk, ik = kern()
        vx, ix = twin()
        nbytes = codes.size + scale.size * 4 + mask.size * 4
        row = {"pass_rate": p, "kernel_ms": t_k * 1e3, "xla_twin_ms": t_x * 1e3,
               "speedup_vs_twin": t_x / t_k, "kernel_GBps": nbytes / t_k / 1e9,
               "roofline_fraction": (nbytes / t_k / peak) if peak else None,
               "qps": args.batch / t_k,
               "scores_equal_twin": bool(jnp.array_equal(vk, vx)),
               "ids_equal_fraction": float(jnp.mean(ik == ix)),
               "saturation_rate": float(saturation_rate(q, codes, scale, mask, k=args.k))}
        rows.append(row)
        print(row, flush=True)
    payload = {"benchmark": "kernel_gpu", "machine": machine_info(),
               "params": vars(args) | {"items_padded": n}, "results": rows}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"kernel_{dev.device_kind.replace(' ', '_')}.json"
    write_json(out, payload)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
