"""Frozen configuration dataclasses (JSON round-trippable)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from training._data import SyntheticConfig
from training._models import OverArchConfig, TowerConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which dataset: `"movielens-100k"` or `"synthetic"` (with `synthetic` settings)."""

    name: str = "movielens-100k"
    synthetic: SyntheticConfig | None = None

    def __post_init__(self):
        if self.name not in ("movielens-100k", "synthetic"):
            raise ValueError(f"unknown dataset {self.name!r}; known: 'movielens-100k', "
                             f"'synthetic'")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything `training.train` needs; the default trains MovieLens-100K in a few CPU minutes.

    Attributes:
      data / tower / overarch: see DataConfig, TowerConfig, OverArchConfig.
      steps: two-tower training steps (the OverArch then trains `overarch.steps` more).
      batch_size: interactions per two-tower step (also the number of in-batch negatives).
      learning_rate / weight_decay: AdamW settings of the two towers.
      seed: seeds parameters and data order; same seed -> same model, resumed or not.
      value_formula: the Value Model formula (string or JSON) over the task names.
      out_dir: where checkpoints, the final model and metrics go (None: keep in memory only).
      checkpoint_every: save a checkpoint every this many steps (both phases).
      max_to_keep: checkpoints kept by the CheckpointManager.
      log_every: progress-bar update interval (steps).
      progress: show a progress bar.
      evaluate_at_end: run `evaluate` on the test split and write `metrics.json` to `out_dir`.
    """

    data: DataConfig = DataConfig()
    tower: TowerConfig = TowerConfig()
    overarch: OverArchConfig = OverArchConfig()
    steps: int = 3000
    batch_size: int = 512
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    value_formula: str = "0.7 * watch + 0.3 * like"
    out_dir: str | None = None
    checkpoint_every: int = 500
    max_to_keep: int = 2
    log_every: int = 25
    progress: bool = True
    evaluate_at_end: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "max_to_keep"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        if self.overarch.steps < 0:
            raise ValueError("OverArchConfig.steps must be >= 0")

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> "TrainConfig":
        d = dict(d)
        data = dict(d.pop("data", {}))
        if data.get("synthetic") is not None:
            data["synthetic"] = SyntheticConfig(**data["synthetic"])
        tower = {k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("tower", {}).items()}
        oa = {k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("overarch", {}).items()}
        # configs written before `cosine_decay` existed trained at a constant rate: resuming
        # or reproducing them keeps that
        oa.setdefault("cosine_decay", False)
        return cls(data=DataConfig(**data), tower=TowerConfig(**tower),
                   overarch=OverArchConfig(**oa), **d)

    def training_fingerprint(self) -> dict:
        """The fields that must match to resume from a checkpoint (not out_dir / progress)."""
        d = self.to_json()
        for k in ("out_dir", "progress", "log_every", "evaluate_at_end", "max_to_keep"):
            d.pop(k)
        return d


def tiny_config(**overrides) -> TrainConfig:
    """A seconds-on-CPU config on a small synthetic dataset, for tests and examples."""
    cfg = TrainConfig(
        data=DataConfig("synthetic", SyntheticConfig(num_users=120, num_items=200,
                                                     num_clusters=6, interactions_per_user=12)),
        tower=TowerConfig(embed_dim=8, user_hidden=(16,), item_hidden=(16,), out_dim=8),
        overarch=OverArchConfig(kind="mol", hidden=(16,), user_components=2, item_components=2,
                                component_dim=8, steps=20, batch_size=32, hard_pool=20,
                                num_hard=4, num_random=4, rerank_top=50, hard_rank_min=2,
                                holdout=2, refresh_steps=10),
        steps=30, batch_size=64, checkpoint_every=10, log_every=10, progress=False,
        evaluate_at_end=False)
    return dataclasses.replace(cfg, **overrides)
