"""`st-jax train` and `st-jax eval` sub-commands (wired into the `st-jax` script by st_jax.cli).

    st-jax train --dataset movielens-100k --out runs/ml100k [--steps 3000 --overarch mol ...]
    st-jax eval runs/ml100k --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def register(subparsers) -> None:
    """Adds the `train` and `eval` sub-commands to an argparse subparsers object."""
    from training._config import TrainConfig
    d = TrainConfig()
    p = subparsers.add_parser("train", help="train the two-tower + OverArch + Value Model",
                              description="Train a multi-task two-tower model with OverArch; "
                                          "checkpoints resume automatically from --out.")
    p.add_argument("--dataset", default="movielens-100k", choices=("movielens-100k", "synthetic"))
    p.add_argument("--out", required=True, help="output directory (checkpoints, model, metrics)")
    p.add_argument("--preset", default="default", choices=("default", "tiny"),
                   help="model sizes and step counts: the MovieLens default or a seconds-long "
                        "smoke-test config; the flags below override it")
    p.add_argument("--steps", type=int, help=f"two-tower steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, help=f"two-tower learning rate (default "
                                            f"{d.learning_rate})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--overarch", choices=("mol", "mlp", "none"),
                   help=f"OverArch kind (default {d.overarch.kind})")
    p.add_argument("--overarch-steps", type=int, help=f"default {d.overarch.steps}")
    p.add_argument("--value-formula", default=d.value_formula,
                   help="Value Model formula over the tasks (string or JSON)")
    p.add_argument("--checkpoint-every", type=int, help=f"default {d.checkpoint_every}")
    p.add_argument("--synthetic-users", type=int, help="synthetic dataset users (default 1000)")
    p.add_argument("--synthetic-items", type=int, help="synthetic dataset items (default 2000)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.set_defaults(func=_train)

    e = subparsers.add_parser("eval", help="evaluate a trained model directory",
                              description="Full-catalogue Recall/NDCG/HR@K, head AUC/log-loss, "
                                          "popularity baseline and OverArch re-ranking.")
    e.add_argument("dir", help="a directory written by `st-jax train`")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--split", default="test", choices=("test", "valid"))
    e.set_defaults(func=_eval)


def _train(args) -> int:
    from training._config import DataConfig, TrainConfig, tiny_config
    from training._data import SyntheticConfig
    from training._train import train
    base = tiny_config(progress=True, evaluate_at_end=True) if args.preset == "tiny" \
        else TrainConfig()
    if args.dataset == "synthetic":
        syn = base.data.synthetic or SyntheticConfig()
        syn = dataclasses.replace(
            syn, seed=args.seed,
            num_users=args.synthetic_users or syn.num_users,
            num_items=args.synthetic_items or syn.num_items)
        data = DataConfig("synthetic", syn)
    else:
        data = DataConfig(args.dataset)
    pick = lambda v, default: default if v is None else v
    oa = dataclasses.replace(base.overarch, kind=pick(args.overarch, base.overarch.kind),
                             steps=pick(args.overarch_steps, base.overarch.steps))
    cfg = dataclasses.replace(
        base, data=data, overarch=oa, steps=pick(args.steps, base.steps),
        batch_size=pick(args.batch_size, base.batch_size),
        learning_rate=pick(args.lr, base.learning_rate), seed=args.seed,
        value_formula=args.value_formula, out_dir=args.out,
        checkpoint_every=pick(args.checkpoint_every, base.checkpoint_every),
        progress=not args.no_progress, evaluate_at_end=not args.no_eval)
    train(cfg)
    print(f"model written to {args.out}", file=sys.stderr)
    if not args.no_eval:
        with open(f"{args.out}/metrics.json") as f:
            print(json.dumps(json.load(f)["summary"], indent=2))
    return 0


def _eval(args) -> int:
    from training._evaluate import evaluate
    from training._train import load
    metrics = evaluate(load(args.dir), split=args.split)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    ks = metrics["ks"]
    print(f"{metrics['dataset']['name']} / {metrics['split']}  (users: "
          f"{metrics['two_tower'][next(iter(metrics['two_tower']))]['users']})")
    for method in ("popularity", "two_tower", "two_tower+overarch",
                   "two_tower+overarch+value_model"):
        for task, m in metrics.get(method, {}).items():
            cells = "  ".join(f"R@{k} {m[f'recall@{k}']:.4f} N@{k} {m[f'ndcg@{k}']:.4f}"
                              for k in ks)
            print(f"{method:32s} {task:6s} {cells}")
    for kind, per in metrics["heads"].items():
        if isinstance(per, dict):
            for task, m in per.items():
                print(f"head {kind:10s} {task:6s} " + "  ".join(f"{k} {v:.4f}"
                                                             for k, v in m.items()))
    return 0


def main(argv=None) -> int:
    """Stand-alone entry point (`python -m training.cli ...`) for use before st_jax.cli wires it."""
    parser = argparse.ArgumentParser(prog="st-jax")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
