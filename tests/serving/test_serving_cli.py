"""`st-jax publish / query / export` end to end on the tiny model."""
import json

import numpy as np

import serving
from st_jax import cli


def test_publish_query_export(tmp_path, tiny_model_dir, tiny_model, capsys):
    bundle = str(tmp_path / "b")
    assert cli.main(["publish", tiny_model_dir, "--out", bundle, "--clusters", "0",
                     "--k0", "30"]) == 0
    capsys.readouterr()
    users = [int(u) for u in tiny_model.dataset.user_ids[:2]]
    genre = tiny_model.dataset.item_attributes()["genres"][0][0]
    assert cli.main(["query", bundle, "--user", str(users[0]), "--user", str(users[1]),
                     "--filter", f"genres:{genre}", "--k", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    want = serving.Retriever.load(bundle).recommend(users, filter=f"genres:{genre}", k=4)
    assert [[it["id"] for it in r["items"]] for r in rows] == want.ids.tolist()
    assert set(rows[0]["items"][0]["tasks"]) == set(tiny_model.tasks)
    assert cli.main(["query", bundle, "--user", str(users[0]), "--k", "3"]) == 0
    assert f"user {users[0]}" in capsys.readouterr().out
    art = str(tmp_path / "art")
    assert cli.main(["export", bundle, "--out", art, "--batch-sizes", "1,4", "--k", "8",
                     "--exclude-max", "64"]) == 0
    ex = serving.load_exported(art)
    np.testing.assert_array_equal(ex.recommend(users, k=4).ids,
                                  serving.Retriever.load(bundle).recommend(users, k=4).ids)


def test_compact_folds_the_journal(tmp_path, tiny_model, capsys):
    bundle = str(tmp_path / "b")
    serving.publish(tiny_model, None, bundle, num_clusters=0, k0=30)
    ids = [int(i) for i in tiny_model.dataset.item_ids[:3]]
    writer = serving.Retriever.load(bundle, durable=True)
    writer.delete_items(ids[:2])
    writer.delete_items(ids[2:])
    users = [int(u) for u in tiny_model.dataset.user_ids[:3]]
    want = writer.recommend(users, k=10)
    capsys.readouterr()
    assert cli.main(["compact", bundle]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["updates_folded"] == 2 and rep["journal_seq"] == 2
    assert rep["version"].endswith("v000002")
    r = serving.Retriever.load(bundle)
    assert r.fresh_stats()["updates"] == 0 and not r.host.known(ids).any()
    np.testing.assert_array_equal(r.recommend(users, k=10).ids, want.ids)


def test_compilation_cache_option(tmp_path):
    """`--compilation-cache`: a folder per kind of CPU in st_jax's cache by default (kept
    compilations from 0.1 s), an explicit folder, or off; a second process loads what the
    first compiled. Run in subprocesses: JAX's cache settings are process-wide."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, jax, jax.numpy as jnp\n"
        "from serving.cli import compilation_cache\n"
        "hits = []\n"
        "jax.monitoring.register_event_listener(\n"
        "    lambda e, **kw: hits.append(e) if e.endswith('/cache_hits') else None)\n"
        "path = compilation_cache(None if sys.argv[1] == '-' else sys.argv[1])\n"
        "jax.jit(lambda x: jnp.sort(x) * 2)(jnp.arange(7.0)).block_until_ready()\n"
        "print(path, jax.config.values['jax_persistent_cache_min_compile_time_secs'],"
        " jax.config.values['jax_enable_compilation_cache'], len(hits))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")
           and k != "JAX_COMPILATION_CACHE_DIR"}
    env["ST_JAX_CACHE_DIR"] = str(tmp_path / "st")

    def run(arg, **extra):
        out = subprocess.run([sys.executable, "-c", script, arg], env={**env, **extra},
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    from pallas_kernels.native import cpu_tag
    path, min_s, on, _ = run("-")
    assert path == str(tmp_path / "st" / f"xla-{cpu_tag()}") and float(min_s) == 0.1
    assert on == "True"
    explicit = tmp_path / "xla"
    *_, hits = run(str(explicit), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert hits == "0" and any(explicit.iterdir())              # compiled and kept
    *_, hits = run(str(explicit), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert int(hits) >= 1                                       # loaded, not compiled
    path, _, on, hits = run("off", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert path == "None" and on == "False" and hits == "0"
