import argparse
import json

import pytest

from training import cli


def _run(argv, capsys):
    parser = argparse.ArgumentParser(prog="st-jax")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rc = args.func(args)
    return rc, capsys.readouterr()


def test_train_then_eval_json(tmp_path, capsys):
    out = str(tmp_path / "run")
    rc, cap = _run(["train", "--dataset", "synthetic", "--preset", "tiny", "--out", out,
                    "--steps", "20", "--overarch-steps", "10", "--no-progress"], capsys)
    assert rc == 0
    summary = json.loads(cap.out)
    assert "two_tower_recall@20" in summary
    rc, cap = _run(["eval", out, "--json"], capsys)
    metrics = json.loads(cap.out)
    assert rc == 0 and metrics["summary"] == pytest.approx(summary)
    with open(f"{out}/config.json") as f:
        assert json.load(f)["steps"] == 20
    assert {"popularity", "two_tower", "two_tower+overarch", "heads"} <= set(metrics)
    rc, cap = _run(["eval", out], capsys)
    assert "popularity" in cap.out and "R@20" in cap.out


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        _run(["train", "--dataset", "imagenet", "--out", "x"], capsys)
    with pytest.raises(SystemExit):
        _run(["train"], capsys)
