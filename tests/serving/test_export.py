"""jax.export artifacts: round trip equal to the in-process graph, run without model code,
CUDA artifacts lowered from CPU."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import serving


@pytest.fixture(scope="module")
def cpu_export(tmp_path_factory, flat_retriever):
    out = str(tmp_path_factory.mktemp("export") / "cpu")
    flat_retriever.export(out, platform="cpu", batch_sizes=(1, 8), k=12, exclude_max=64)
    return out


def test_export_round_trip_equals_the_graph(cpu_export, flat_retriever, tiny_model):
    ex = serving.load_exported(cpu_export)
    users = tiny_model.dataset.user_ids[:5]
    genre = tiny_model.dataset.item_attributes()["genres"][0][0]
    for filt in (None, f"genres:{genre}", [f"genres:{genre}", "*", "decade:1990s",
                                          f"NOT genres:{genre}", "decade:1980s"]):
        for k in (12, 5):
            a = flat_retriever.recommend(users, filter=filt, k=k)
            b = ex.recommend(users, filter=filt, k=k)
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(a.task_scores, b.task_scores, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(a.count, b.count)
    one = ex.recommend(users[:1], k=3)                        # bucket 1
    np.testing.assert_array_equal(one.ids, flat_retriever.recommend(users[:1], k=3).ids)


def test_exported_limits_are_clear(cpu_export, tiny_model):
    ex = serving.load_exported(cpu_export)
    users = tiny_model.dataset.user_ids[:2]
    with pytest.raises(serving.RequestError, match="exceeds the exported k=12"):
        ex.recommend(users, k=13)
    with pytest.raises(serving.RequestError, match="k0 is fixed"):
        ex.recommend(users, k=3, k0=7)


def test_exported_graph_runs_without_the_model_code(cpu_export, flat_retriever, tiny_model):
    users = tiny_model.dataset.user_ids[:4]
    want = flat_retriever.recommend(users, filter="decade:1990s", k=6).ids
    code = textwrap.dedent(f"""
        import sys
        for name in ("training", "flax", "optax"):      # the model code is not importable
            sys.modules[name] = None
        import numpy as np
        import serving
        ex = serving.load_exported({cpu_export!r})
        out = ex.recommend({users.tolist()!r}, filter="decade:1990s", k=6)
        print(out.ids.tolist())
        assert "flax" not in [m.split(".")[0] for m in sys.modules if sys.modules[m]]
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert np.array_equal(np.array(eval(p.stdout.strip().splitlines()[-1])), want)


def test_cuda_artifacts_lower_from_cpu(tmp_path, flat_retriever, ivf_bundle):
    """The whole graph with the Pallas kernels (filter, Int8 top-k, IVF scan) lowers for
    CUDA on a CPU-only machine; loading it here is refused with a clear message."""
    out = str(tmp_path / "cuda")
    flat_retriever.export(out, platform="cuda", batch_sizes=(8,), k=10)
    vdir = serving._store.current_version(out)
    assert os.path.getsize(os.path.join(vdir, "graphs", "b8.jaxexport")) > 0
    with pytest.raises(RuntimeError, match="artifacts are for 'cuda'"):
        serving.load_exported(out)
    ivf = serving.Retriever.load(ivf_bundle)
    ivf.export(str(tmp_path / "cuda_ivf"), platform="cuda", batch_sizes=(4,), k=10)


def test_tampered_export_is_refused(tmp_path, flat_retriever):
    out = str(tmp_path / "e")
    flat_retriever.export(out, platform="cpu", batch_sizes=(1,), k=5)
    vdir = serving._store.current_version(out)
    g = os.path.join(vdir, "graphs", "b1.jaxexport")
    original = Path(g).read_bytes()
    data = bytearray(original)
    data[-10] ^= 0xFF
    Path(g).write_bytes(bytes(data))
    with pytest.raises(serving.TamperedError):
        serving.load_exported(out)
    # its arrays carry the same file record as a bundle's
    Path(g).write_bytes(original)
    serving.load_exported(out)                                   # restored: loads
    meta = os.path.join(vdir, "arrays", "_METADATA")
    Path(meta).write_bytes(Path(meta).read_bytes() + b" ")
    with pytest.raises(serving.TamperedError, match="changed: _METADATA"):
        serving.load_exported(out)
