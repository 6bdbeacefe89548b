"""Feature schema: what a user or an item is made of, as arrays.

Every feature is an integer or float array whose first axis is the row (user or item):

| kind          | array            | meaning                                              |
|---------------|------------------|------------------------------------------------------|
| `id`          | `i32[N]`         | row id + 1 (0 = unknown / out of vocabulary)         |
| `categorical` | `i32[N]`         | index into `vocab` + 1 (0 = unknown)                 |
| `multi`       | `i32[N, L]`      | up to `max_len` indices into `vocab` + 1, 0 = padding |
| `numeric`     | `f32[N]`         | standardised value (0 = missing)                     |

Index 0 is reserved in every embedding table, so unknown values and padding share one row.
Item `categorical` / `multi` features marked `filterable` double as filter attributes of the index.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

import numpy as np


class FeatureError(ValueError):
    """A feature dict does not match its schema (missing field, wrong shape or dtype, bad value)."""


class FeatureKind(str, enum.Enum):
    ID = "id"
    CATEGORICAL = "categorical"
    MULTI = "multi"
    NUMERIC = "numeric"


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One feature.

    Attributes:
      name: field name, e.g. `"genres"`.
      kind: see module docstring.
      cardinality: number of embedding rows including the reserved row 0 (ignored for numeric).
      vocab: the value names for rows 1.. (categorical / multi); empty for ids and numerics.
      max_len: padded length of a `multi` feature.
      filterable: an item attribute that the index may filter on.
    """

    name: str
    kind: FeatureKind
    cardinality: int = 0
    vocab: tuple[str, ...] = ()
    max_len: int = 1
    filterable: bool = False

    def __post_init__(self):
        object.__setattr__(self, "kind", FeatureKind(self.kind))
        if self.kind is not FeatureKind.NUMERIC and self.cardinality < 2:
            raise FeatureError(
                f"feature {self.name!r} ({self.kind.value}) needs cardinality >= 2 "
                f"(row 0 is reserved), got {self.cardinality}")
        if self.vocab and len(self.vocab) + 1 != self.cardinality:
            raise FeatureError(
                f"feature {self.name!r}: cardinality {self.cardinality} != len(vocab) + 1 "
                f"= {len(self.vocab) + 1}")
        if self.kind is FeatureKind.MULTI and self.max_len < 1:
            raise FeatureError(f"feature {self.name!r}: multi-valued needs max_len >= 1")

    @property
    def embedded(self) -> bool:
        return self.kind is not FeatureKind.NUMERIC

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["kind"] = self.kind.value
        d["vocab"] = list(self.vocab)
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> "FeatureSpec":
        return cls(**{**d, "vocab": tuple(d.get("vocab", ()))})


@dataclasses.dataclass(frozen=True)
class FeatureSchema:
    """User and item features plus the task names (one label column per task)."""

    user: tuple[FeatureSpec, ...]
    item: tuple[FeatureSpec, ...]
    tasks: tuple[str, ...]

    def __post_init__(self):
        for side, specs in (("user", self.user), ("item", self.item)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise FeatureError(f"duplicate {side} feature names: {names}")
            if not specs:
                raise FeatureError(f"the {side} side needs at least one feature")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise FeatureError(f"tasks must be non-empty and unique, got {self.tasks}")

    def side(self, side: str) -> tuple[FeatureSpec, ...]:
        if side not in ("user", "item"):
            raise FeatureError(f"side must be 'user' or 'item', got {side!r}")
        return self.user if side == "user" else self.item

    @property
    def filterable_item_fields(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.item if s.filterable)

    def validate(self, features: Mapping[str, np.ndarray], side: str) -> int:
        """Checks a feature dict against the schema; returns the number of rows N.

        Raises:
          FeatureError: a field is missing or unknown, or has the wrong rank, length or range.
        """
        specs = self.side(side)
        known = {s.name for s in specs}
        missing = known - set(features)
        if missing:
            raise FeatureError(
                f"{side} features missing {sorted(missing)}; expected fields: {sorted(known)}")
        extra = set(features) - known
        if extra:
            raise FeatureError(
                f"unknown {side} features {sorted(extra)}; known fields: {sorted(known)}")
        n = None
        for s in specs:
            a = features[s.name]
            want_rank = 2 if s.kind is FeatureKind.MULTI else 1
            if np.ndim(a) != want_rank:
                raise FeatureError(
                    f"{side} feature {s.name!r} ({s.kind.value}) must have rank {want_rank}, "
                    f"got shape {np.shape(a)}")
            if n is None:
                n = np.shape(a)[0]
            elif np.shape(a)[0] != n:
                raise FeatureError(
                    f"{side} feature {s.name!r} has {np.shape(a)[0]} rows, expected {n}")
            if s.kind is FeatureKind.MULTI and np.shape(a)[1] != s.max_len:
                raise FeatureError(
                    f"{side} feature {s.name!r} must be padded to max_len={s.max_len}, "
                    f"got width {np.shape(a)[1]}")
            if s.embedded and isinstance(a, np.ndarray) and a.size:
                if not np.issubdtype(a.dtype, np.integer):
                    raise FeatureError(
                        f"{side} feature {s.name!r} must be integer, got {a.dtype}")
                lo, hi = int(a.min()), int(a.max())
                if lo < 0 or hi >= s.cardinality:
                    raise FeatureError(
                        f"{side} feature {s.name!r} has values in [{lo}, {hi}], outside "
                        f"[0, {s.cardinality - 1}]")
        return int(n)

    def to_json(self) -> dict:
        return {"user": [s.to_json() for s in self.user],
                "item": [s.to_json() for s in self.item],
                "tasks": list(self.tasks)}

    @classmethod
    def from_json(cls, d: Mapping) -> "FeatureSchema":
        return cls(user=tuple(FeatureSpec.from_json(s) for s in d["user"]),
                   item=tuple(FeatureSpec.from_json(s) for s in d["item"]),
                   tasks=tuple(d["tasks"]))


def take_rows(features: Mapping[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    """Selects rows of every feature: `{name: a[rows]}`."""
    return {k: v[rows] for k, v in features.items()}
