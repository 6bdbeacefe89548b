"""st_jax training: multi-task two towers, OverArch (MLP, Mixture of Logits), Value Model.

Python::

    import training
    cfg = training.TrainConfig(out_dir="runs/ml100k")        # MovieLens-100K, a few CPU minutes
    model = training.train(cfg)                               # resumes if runs/ml100k has checkpoints
    metrics = training.evaluate(model)                        # popularity / two-tower / OverArch
    model = training.load("runs/ml100k")
    model.recommend([1, 2, 3], k=10)                          # MovieLens user ids -> item ids
    model.item_embeddings().shape                             # f32[N, D]
    model.dataset.item_attributes()["genres"][:3]             # filter attributes per item

CLI (via `st-jax`, or `python -m training.cli`)::

    st-jax train --dataset movielens-100k --out runs/ml100k [--steps 3000 --overarch mol]
    st-jax eval runs/ml100k --json

For serving, `model.params` is a plain pytree and `model.user_tower_apply`,
`model.item_tower_apply`, `model.overarch_apply`, `model.value_model_apply` are pure functions
of (params, arrays) that work under `jax.jit` / `jax.export`.
"""

from training._config import DataConfig, TrainConfig, tiny_config
from training._data import (Csr, Dataset, DatasetNotAvailableError, Interactions,
                            SyntheticConfig, UnknownIdError, load_dataset, load_movielens_100k,
                            synthetic, temporal_split)
from training._evaluate import auc, evaluate, ranking_metrics
from training._losses import overarch_loss, sampled_softmax_loss
from training._models import (ItemTower, MLPOverArch, MoLOverArch, OverArchConfig, TowerConfig,
                              TwoTower, UserTower)
from training._schema import FeatureError, FeatureKind, FeatureSchema, FeatureSpec
from training._io import CorruptModelError
from training._train import CheckpointMismatchError, ModelNotFoundError, load, train
from training._trained import TrainedModel, fit_value_model, with_value_model
from training._value_model import (FormulaError, FormulaNameError, FormulaSyntaxError,
                                   ValueModel, fit_value_weights)

__all__ = [
    "CheckpointMismatchError", "CorruptModelError", "Csr", "DataConfig", "Dataset",
    "DatasetNotAvailableError", "FeatureError", "FeatureKind", "FeatureSchema", "FeatureSpec",
    "FormulaError", "FormulaNameError", "FormulaSyntaxError", "Interactions", "ItemTower",
    "MLPOverArch", "MoLOverArch", "ModelNotFoundError", "OverArchConfig", "SyntheticConfig",
    "TowerConfig", "TrainConfig", "TrainedModel", "TwoTower", "UnknownIdError", "UserTower",
    "ValueModel", "auc", "evaluate", "fit_value_weights", "load", "load_dataset",
    "load_movielens_100k", "overarch_loss", "ranking_metrics", "sampled_softmax_loss", "synthetic",
    "temporal_split", "tiny_config", "train", "fit_value_model", "with_value_model",
]
