"""Tiny trained model + published bundles shared by the serving tests (seconds on CPU)."""
import pytest

import serving
import training


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("serving_model"))
    training.train(training.tiny_config(out_dir=out))
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    return training.load(tiny_model_dir)


@pytest.fixture(scope="session")
def flat_bundle(tmp_path_factory, tiny_model):
    out = str(tmp_path_factory.mktemp("bundle_flat") / "b")
    serving.publish(tiny_model, None, out, num_clusters=0, k0=40)
    return out


@pytest.fixture(scope="session")
def ivf_bundle(tmp_path_factory, tiny_model):
    out = str(tmp_path_factory.mktemp("bundle_ivf") / "b")
    serving.publish(tiny_model, None, out, num_clusters=6, nprobe=2, k0=30)
    return out


@pytest.fixture(scope="session")
def flat_retriever(flat_bundle):
    return serving.Retriever.load(flat_bundle)
