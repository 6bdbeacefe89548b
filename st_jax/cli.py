"""The ``st-jax`` command line.

    st-jax demo [--tiny] [--dataset synthetic]         train -> publish -> serve -> export
    st-jax demo --search [--items N ...]               index-only filtered search demo
    st-jax train --dataset movielens-100k --out DIR    (training package)
    st-jax eval DIR --json                             (training package)
    st-jax publish MODEL_DIR --out BUNDLE              (serving package)
    st-jax query BUNDLE --user 42 --filter ... --k 10  (serving package)
    st-jax export BUNDLE --platform cpu --out ART      (serving package)
"""
from __future__ import annotations

import argparse
import importlib
import sys


def _demo(args: argparse.Namespace) -> int:
    from st_jax import demo
    demo.main(args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="st-jax", description="SilverTorch in JAX")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the whole run on MovieLens-100K: train, publish, serve, "
                       "export (--search: index-only demo; options: st-jax demo -- --help)",
                       add_help=False)
    d.set_defaults(func=_demo, passthrough=True)
    # Packages that add sub-commands expose `register(subparsers)` in their cli module.
    for module in ("training.cli", "serving.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:   # that package is not installed: skip its commands
            if e.name != module and not module.startswith(f"{e.name}."):
                raise
            continue
        mod.register(sub)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.rest = [r for r in rest if r != "--"]
    elif rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
