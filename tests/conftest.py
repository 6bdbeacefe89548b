"""Shared fixtures: tiny catalogues so every test runs in seconds on CPU."""
import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None)
settings.load_profile("ci")

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole run, fresh each run: the xdist
    workers and the subprocesses the tests start (servers, CLIs, the notebook) inherit it
    through the environment, so a graph compiled by one of them is loaded, not recompiled,
    by the others (the serving tests: ~20 % less time). The cached executables are XLA's own
    serialised output for the same programs: results do not change. A cache dir set by the
    caller is kept as it is."""
    if hasattr(config, "workerinput") or os.environ.get(_CACHE_ENV):
        return
    path = tempfile.mkdtemp(prefix="st_jax_xla_cache_")
    config._st_jax_xla_cache = path
    os.environ[_CACHE_ENV] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
    if "jax" in sys.modules:                     # already imported: tell its config too
        import jax
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)


def pytest_unconfigure(config):
    path = getattr(config, "_st_jax_xla_cache", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def clustered(rng, n, d, clusters=8, spread=0.3):
    """f32[n, d] embeddings around `clusters` random centres (stored cluster by cluster)."""
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    which = np.sort(rng.integers(0, clusters, n))
    return (centres[which] + spread * rng.standard_normal((n, d))).astype(np.float32)
