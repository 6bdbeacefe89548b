from st_jax import cli


def test_demo_runs(capsys):
    assert cli.main(["demo", "--search", "--items", "3000", "--batch", "4", "--k", "10"]) == 0
    out = capsys.readouterr().out
    assert "recall@10" in out and "bucket1000:b3" in out and "IVF" in out


def test_unknown_arguments_rejected(capsys):
    import pytest
    with pytest.raises(SystemExit):
        cli.main(["nope"])
