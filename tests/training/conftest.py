"""Shared tiny fixtures for the training tests (seconds on CPU)."""

import importlib.util

import numpy as np
import pytest

import training


@pytest.fixture(scope="session")
def tiny_config():
    return training.tiny_config()


@pytest.fixture(scope="session")
def tiny_dataset(tiny_config):
    return training.load_dataset(tiny_config.data.name, tiny_config.data.synthetic)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_config, tiny_dataset):
    """(model, out_dir) of one tiny training run written to disk."""
    out = str(tmp_path_factory.mktemp("tiny_run"))
    model = training.train(tiny_config.replace(out_dir=out), dataset=tiny_dataset)
    return model, out


@pytest.fixture(scope="session")
def ml100k():
    if importlib.util.find_spec("recbole") is None:
        pytest.skip("recbole (MovieLens-100K data) not installed: pip install --no-deps "
                    "recbole==1.2.1")
    return training.load_movielens_100k()


@pytest.fixture
def hand_interactions():
    """4 users: interactions chosen to exercise sorting by (timestamp, item id) and dedup."""
    # user, item, like, timestamp
    rows = np.array([
        [0, 5, 1, 10], [0, 3, 0, 20], [0, 1, 1, 20], [0, 4, 1, 30],   # tie at ts 20: 1 then 3
        [1, 2, 1, 5], [1, 2, 0, 6], [1, 0, 1, 7],                     # duplicate item 2
        [2, 1, 1, 1],                                                  # one interaction
        [3, 4, 0, 9], [3, 0, 1, 2], [3, 2, 1, 4],
    ])
    labels = np.stack([np.ones(len(rows)), rows[:, 2]], 1).astype(np.float32)
    return rows[:, 0].astype(np.int32), rows[:, 1].astype(np.int32), labels, rows[:, 3]
