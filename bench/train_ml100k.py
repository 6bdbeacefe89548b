"""Train and evaluate the default st_jax training config on MovieLens-100K; write JSON.

    .venv/bin/python bench/train_ml100k.py [--seeds 0 1 2] [--overarch mol] [--out PATH]

Writes `bench/results/train_ml100k.json` (atomically, after every seed): machine, library
versions, the config, wall times (training, evaluation) and the full metrics per seed, plus
mean / min / max over seeds of the headline numbers (Recall@20 of popularity, two-tower and
OverArch re-ranking; the target ratios of issue 5), on the test split and (keys `valid_*`) on
the validation split.

The MLP-OverArch variant: `--overarch mlp --out bench/results/train_ml100k_mlp.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import training  # noqa: E402
from training._io import write_json_atomic  # noqa: E402


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "jax_devices": [str(d) for d in jax.devices()],
            "load_average_at_start": os.getloadavg()}


def versions() -> dict:
    out = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "recbole"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


HEADLINE = ("popularity_recall@20", "two_tower_recall@20", "two_tower_over_popularity_recall@20",
            "overarch_rerank_recall@20", "overarch_rerank_relative_gain_recall@20")
VALID_HEADLINE = tuple(f"valid_{k}" for k in HEADLINE)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--overarch", choices=("mol", "mlp"), default="mol")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "train_ml100k.json"))
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)

    base = training.TrainConfig(progress=args.progress, evaluate_at_end=False)
    base = dataclasses.replace(base, overarch=dataclasses.replace(base.overarch,
                                                                  kind=args.overarch))
    dataset = training.load_movielens_100k()
    report = {"benchmark": "train_ml100k", "machine": machine(), "versions": versions(),
              "dataset": dataset.summary(),
              "protocol": "per-user (timestamp, item id) order: last = test, previous = "
                          "validation; full catalogue ranking with earlier items masked; "
                          "OverArch re-ranks the top 200 of the dot product; valid_* = the same on "
                          "the validation split (training items masked)",
              "targets": {"two_tower_over_popularity_recall@20": ">= 1.3",
                          "overarch_rerank_relative_gain_recall@20": ">= 0.05"},
              "config": base.to_json(), "runs": []}
    for seed in args.seeds:
        cfg = base.replace(seed=seed)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = cfg.replace(out_dir=tmp)     # exercises checkpointing as in real use
            t0 = time.perf_counter()
            model = training.train(cfg, dataset=dataset)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            metrics = training.evaluate(model)
            eval_s = time.perf_counter() - t0
            valid = training.evaluate(model, split="valid")
        summary = {**metrics["summary"],
                   **{f"valid_{k}": valid["summary"][k] for k in HEADLINE}}
        run = {"seed": seed, "train_seconds": train_s, "eval_seconds": eval_s,
               "summary": summary, "metrics": metrics, "valid_metrics": valid}
        report["runs"].append(run)
        s = summary
        print(f"seed {seed}: train {train_s:.0f}s eval {eval_s:.1f}s  " +
              "  ".join(f"{k} {s[k]:.4f}" for k in HEADLINE + VALID_HEADLINE), flush=True)
        agg = {}
        for k in HEADLINE + VALID_HEADLINE:
            v = np.array([r["summary"][k] for r in report["runs"]])
            agg[k] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}
        report["aggregate_over_seeds"] = agg
        report["seeds"] = [r["seed"] for r in report["runs"]]
        write_json_atomic(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
