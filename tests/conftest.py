"""Shared fixtures: tiny catalogues so every test runs in seconds on CPU."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None)
settings.load_profile("ci")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def clustered(rng, n, d, clusters=8, spread=0.3):
    """f32[n, d] embeddings around `clusters` random centres (stored cluster by cluster)."""
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    which = np.sort(rng.integers(0, clusters, n))
    return (centres[which] + spread * rng.standard_normal((n, d))).astype(np.float32)
