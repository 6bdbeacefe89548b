"""Datasets: interactions, features, the fixed time-ordered split and the seen-item masks.

Split protocol (used by every metric in this package):
  1. duplicate (user, item) pairs keep only their first occurrence;
  2. per user, interactions are sorted by (timestamp, item id);
  3. the last one is the **test** interaction, the one before it the **validation** interaction,
     the rest are **training** interactions (a user with 2 interactions has no validation item, a
     user with 1 has only training data);
  4. when ranking for the test item, every item the user interacted with before it (training and
     validation items) is masked; for the validation item, the training items are masked.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from collections.abc import Mapping, Sequence

import numpy as np

from training._schema import FeatureKind, FeatureSchema, FeatureSpec


class DatasetNotAvailableError(RuntimeError):
    """The dataset files are not installed on this machine."""


class UnknownIdError(KeyError):
    """A user or item id is not part of the dataset."""

    def __str__(self):  # KeyError quotes its argument; keep the message readable
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Interactions:
    """A set of (user, item) events with one label per task.

    Attributes:
      user: i32[E] user rows.  item: i32[E] item rows.
      labels: f32[E, T] task labels (1 = positive).  timestamp: i64[E].
    """

    user: np.ndarray
    item: np.ndarray
    labels: np.ndarray
    timestamp: np.ndarray

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def take(self, idx) -> "Interactions":
        return Interactions(self.user[idx], self.item[idx], self.labels[idx], self.timestamp[idx])


@dataclasses.dataclass(frozen=True)
class Csr:
    """Per-user item lists: items of user u are `indices[indptr[u]:indptr[u+1]]` (i64, i32)."""

    indptr: np.ndarray
    indices: np.ndarray

    def dense_mask(self, users: np.ndarray, num_items: int) -> np.ndarray:
        """bool[B, N]: True where item n is in the list of user `users[b]` (vectorised)."""
        users = np.asarray(users)
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lens = ends - starts
        rows = np.repeat(np.arange(len(users)), lens)
        offs = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        cols = self.indices[np.repeat(starts, lens) + offs]
        mask = np.zeros((len(users), num_items), dtype=bool)
        mask[rows, cols] = True
        return mask


def _csr(users: np.ndarray, items: np.ndarray, num_users: int) -> Csr:
    order = np.lexsort((items, users))
    counts = np.bincount(users, minlength=num_users)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Csr(indptr, items[order].astype(np.int32))


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A split dataset. Rows are internal; `user_ids` / `item_ids` hold the dataset's own ids.

    Attributes:
      name: dataset name.
      schema: the feature schema (its `tasks` name the label columns).
      user_ids: i64[U] the dataset's user ids, sorted; row u is `user_ids[u]`.
      item_ids: i64[N] the dataset's item ids, sorted.
      user_features / item_features: feature dicts (see `training._schema`), U / N rows.
      train / valid / test: the split (module docstring).
      item_raw_attributes: field -> per-item raw value (str / int, or list for multi-valued),
        aligned with `item_ids`; the filter attributes of the index.
      source: how to rebuild the dataset (`load_dataset(**source)`), stored with trained models.
      item_titles: display names aligned with `item_ids` (e.g. movie titles), or None.
    """

    name: str
    schema: FeatureSchema
    user_ids: np.ndarray
    item_ids: np.ndarray
    user_features: dict[str, np.ndarray]
    item_features: dict[str, np.ndarray]
    train: Interactions
    valid: Interactions
    test: Interactions
    item_raw_attributes: dict[str, list]
    source: dict
    item_titles: tuple[str, ...] | None = None

    @property
    def num_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def num_items(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.schema.tasks

    # --- id mapping --------------------------------------------------------------------------
    def user_rows(self, user_ids: Sequence) -> np.ndarray:
        """i32[B] rows for the dataset's user ids; raises UnknownIdError for unknown ids."""
        return _rows(self.user_ids, user_ids, "user")

    def item_rows(self, item_ids: Sequence) -> np.ndarray:
        """i32[B] rows for the dataset's item ids; raises UnknownIdError for unknown ids."""
        return _rows(self.item_ids, item_ids, "item")

    # --- masks ---------------------------------------------------------------------------------
    def seen(self, split: str = "test") -> Csr:
        """Items each user interacted with before the `split` item (`"valid"`, `"test"`), or all
        known items (`"all"`: train + valid + test, for recommending after the data ends)."""
        parts = {"valid": [self.train], "test": [self.train, self.valid],
                 "all": [self.train, self.valid, self.test]}
        if split not in parts:
            raise ValueError(f"split must be one of {sorted(parts)}, got {split!r}")
        ps = parts[split]
        return _csr(np.concatenate([p.user for p in ps]), np.concatenate([p.item for p in ps]),
                    self.num_users)

    def split(self, name: str) -> Interactions:
        if name not in ("train", "valid", "test"):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {name!r}")
        return getattr(self, name)

    def item_popularity(self) -> np.ndarray:
        """f32[N] training interaction counts per item."""
        return np.bincount(self.train.item, minlength=self.num_items).astype(np.float32)

    # --- attributes ----------------------------------------------------------------------------
    def item_attributes(self) -> dict[str, list]:
        """Filter attributes: field -> list of per-item values aligned with `item_ids`
        (str / int scalars, lists for multi-valued fields such as genres)."""
        return {k: list(v) for k, v in self.item_raw_attributes.items()}

    def item_attributes_by_id(self) -> dict:
        """item id -> {field: value}, keyed by the dataset's own item ids."""
        fields = list(self.item_raw_attributes)
        cols = [self.item_raw_attributes[f] for f in fields]
        return {_py(i): dict(zip(fields, vals)) for i, vals in zip(self.item_ids, zip(*cols))}

    def summary(self) -> dict:
        return {"name": self.name, "users": self.num_users, "items": self.num_items,
                "train": len(self.train), "valid": len(self.valid), "test": len(self.test),
                "tasks": list(self.tasks),
                "positives_per_task_train": {t: int(self.train.labels[:, j].sum())
                                             for j, t in enumerate(self.tasks)}}


def _py(x):
    return x.item() if isinstance(x, np.generic) else x


def _rows(sorted_ids: np.ndarray, ids, what: str) -> np.ndarray:
    ids = np.asarray(ids).reshape(-1)
    try:
        ids = ids.astype(sorted_ids.dtype)
    except (ValueError, TypeError):
        raise UnknownIdError(f"{what} ids must be {sorted_ids.dtype}, got {ids.dtype}") from None
    pos = np.searchsorted(sorted_ids, ids)
    pos_c = np.minimum(pos, len(sorted_ids) - 1)
    bad = sorted_ids[pos_c] != ids
    if bad.any():
        raise UnknownIdError(
            f"unknown {what} ids {ids[bad][:5].tolist()} (dataset has {len(sorted_ids)} {what}s, "
            f"ids {sorted_ids[0]}..{sorted_ids[-1]})")
    return pos_c.astype(np.int32)


def temporal_split(users: np.ndarray, items: np.ndarray, labels: np.ndarray,
                   timestamps: np.ndarray, num_users: int
                   ) -> tuple[Interactions, Interactions, Interactions]:
    """Applies the split protocol of the module docstring (vectorised).

    Args: users i32[E], items i32[E] (row order = item id order), labels f32[E, T], timestamps i64[E].
    Returns: (train, valid, test).
    """
    order = np.lexsort((items, timestamps, users))
    users, items, labels, timestamps = users[order], items[order], labels[order], timestamps[order]
    # dedupe (user, item): keep the first occurrence in time order
    key = users.astype(np.int64) * (int(items.max()) + 1 if len(items) else 1) + items
    _, first = np.unique(key, return_index=True)
    keep = np.zeros(len(users), bool)
    keep[first] = True
    users, items, labels, timestamps = users[keep], items[keep], labels[keep], timestamps[keep]
    counts = np.bincount(users, minlength=num_users)
    starts = np.cumsum(counts) - counts
    pos = np.arange(len(users)) - starts[users]
    from_end = counts[users] - 1 - pos
    n = counts[users]
    is_test = (from_end == 0) & (n >= 2)
    is_valid = (from_end == 1) & (n >= 3)
    is_train = ~(is_test | is_valid)
    mk = lambda m: Interactions(users[m].astype(np.int32), items[m].astype(np.int32),
                                labels[m].astype(np.float32), timestamps[m].astype(np.int64))
    return mk(is_train), mk(is_valid), mk(is_test)


# ---------------------------------------------------------------------------------------------
# MovieLens-100K
# ---------------------------------------------------------------------------------------------

_INSTALL_HINT = ("MovieLens-100K is read from the recbole wheel, which is not installed. "
                 "Install it with: pip install --no-deps recbole==1.2.1")


def _movielens_dir() -> str:
    try:
        root = importlib.resources.files("recbole")
    except ModuleNotFoundError:
        raise DatasetNotAvailableError(_INSTALL_HINT) from None
    d = root / "dataset_example" / "ml-100k"
    if not (d / "ml-100k.inter").is_file():
        raise DatasetNotAvailableError(
            f"{_INSTALL_HINT} (recbole is installed at {root} but has no dataset_example/ml-100k)")
    return str(d)


def _read_table(path: str) -> tuple[list[str], list[list[str]]]:
    with open(path, encoding="latin-1") as f:
        lines = f.read().splitlines()
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    rows = [ln.split("\t") for ln in lines[1:] if ln]
    return header, rows


def _encode(values: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Categorical strings -> (i32[N] codes with 0 = unknown/empty, vocab sorted)."""
    vocab = tuple(sorted({v for v in values if v != ""}))
    index = {v: i + 1 for i, v in enumerate(vocab)}
    return np.array([index.get(v, 0) for v in values], np.int32), vocab


def _encode_multi(lists: Sequence[Sequence[str]], max_len: int | None = None
                  ) -> tuple[np.ndarray, tuple[str, ...], int]:
    vocab = tuple(sorted({v for vs in lists for v in vs}))
    index = {v: i + 1 for i, v in enumerate(vocab)}
    max_len = max_len or max(1, max(len(vs) for vs in lists))
    out = np.zeros((len(lists), max_len), np.int32)
    for r, vs in enumerate(lists):  # runs once at load time over 1.7k items
        codes = [index[v] for v in vs][:max_len]
        out[r, :len(codes)] = codes
    return out, vocab, max_len


def _age_bucket(age: int) -> str:
    edges = [18, 25, 35, 45, 50, 56]
    names = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
    return names[int(np.searchsorted(edges, age, side="right"))]


def load_movielens_100k() -> Dataset:
    """MovieLens-100K from the `recbole==1.2.1` wheel, split per the module docstring.

    Tasks: `watch` (every rating) and `like` (rating >= 4). Item features: id, genres (multi,
    filterable), decade (filterable), release year (numeric; raw int attribute). User features:
    id, age bucket, gender, occupation, zip prefix (first 2 characters).

    Raises:
      DatasetNotAvailableError: recbole (with its example data) is not installed.
    """
    d = _movielens_dir()
    ih, irows = _read_table(os.path.join(d, "ml-100k.item"))
    uh, urows = _read_table(os.path.join(d, "ml-100k.user"))
    th, trows = _read_table(os.path.join(d, "ml-100k.inter"))
    icol = {h: i for i, h in enumerate(ih)}
    ucol = {h: i for i, h in enumerate(uh)}
    tcol = {h: i for i, h in enumerate(th)}

    item_ids_raw = np.array([int(r[icol["item_id"]]) for r in irows], np.int64)
    iorder = np.argsort(item_ids_raw, kind="stable")
    irows = [irows[i] for i in iorder]
    item_ids = item_ids_raw[iorder]
    years = [int(r[icol["release_year"]]) if r[icol["release_year"]].strip().isdigit() else 0
             for r in irows]
    genres = [r[icol["class"]].split() if len(r) > icol["class"] else [] for r in irows]
    decades = [f"{y // 10 * 10}s" if y else "" for y in years]

    user_ids_raw = np.array([int(r[ucol["user_id"]]) for r in urows], np.int64)
    uorder = np.argsort(user_ids_raw, kind="stable")
    urows = [urows[i] for i in uorder]
    user_ids = user_ids_raw[uorder]

    inter = np.array([[int(r[tcol["user_id"]]), int(r[tcol["item_id"]]),
                       int(float(r[tcol["rating"]])), int(float(r[tcol["timestamp"]]))]
                      for r in trows], np.int64)
    u = _rows(user_ids, inter[:, 0], "user")
    i = _rows(item_ids, inter[:, 1], "item")
    labels = np.stack([np.ones(len(inter)), inter[:, 2] >= 4], axis=1).astype(np.float32)
    train, valid, test = temporal_split(u, i, labels, inter[:, 3], len(user_ids))

    g_codes, g_vocab, g_len = _encode_multi(genres)
    dec_codes, dec_vocab = _encode(decades)
    yr = np.array(years, np.float32)
    known = yr > 0
    yr_std = np.where(known, (yr - yr[known].mean()) / (yr[known].std() + 1e-6), 0.0)
    ages = [_age_bucket(int(r[ucol["age"]])) for r in urows]
    age_codes, age_vocab = _encode(ages)
    gen_codes, gen_vocab = _encode([r[ucol["gender"]] for r in urows])
    occ_codes, occ_vocab = _encode([r[ucol["occupation"]] for r in urows])
    zip_codes, zip_vocab = _encode([r[ucol["zip_code"]][:2] for r in urows])

    nu, ni = len(user_ids), len(item_ids)
    schema = FeatureSchema(
        user=(FeatureSpec("user_id", FeatureKind.ID, nu + 1),
              FeatureSpec("age", FeatureKind.CATEGORICAL, len(age_vocab) + 1, age_vocab),
              FeatureSpec("gender", FeatureKind.CATEGORICAL, len(gen_vocab) + 1, gen_vocab),
              FeatureSpec("occupation", FeatureKind.CATEGORICAL, len(occ_vocab) + 1, occ_vocab),
              FeatureSpec("zip_prefix", FeatureKind.CATEGORICAL, len(zip_vocab) + 1, zip_vocab)),
        item=(FeatureSpec("item_id", FeatureKind.ID, ni + 1),
              FeatureSpec("genres", FeatureKind.MULTI, len(g_vocab) + 1, g_vocab, g_len,
                          filterable=True),
              FeatureSpec("decade", FeatureKind.CATEGORICAL, len(dec_vocab) + 1, dec_vocab,
                          filterable=True),
              FeatureSpec("year", FeatureKind.NUMERIC)),
        tasks=("watch", "like"))
    return Dataset(
        name="movielens-100k", schema=schema, user_ids=user_ids, item_ids=item_ids,
        user_features={"user_id": np.arange(1, nu + 1, dtype=np.int32), "age": age_codes,
                       "gender": gen_codes, "occupation": occ_codes, "zip_prefix": zip_codes},
        item_features={"item_id": np.arange(1, ni + 1, dtype=np.int32), "genres": g_codes,
                       "decade": dec_codes, "year": yr_std.astype(np.float32)},
        train=train, valid=valid, test=test,
        item_raw_attributes={"genres": genres, "year": years, "decade": decades},
        source={"name": "movielens-100k"},
        item_titles=tuple(r[icol["movie_title"]].strip() for r in irows))


# ---------------------------------------------------------------------------------------------
# Synthetic data with planted tastes
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """A synthetic catalogue with planted structure.

    Items belong to `num_clusters` taste clusters (cluster sizes Zipf-like); each item has a
    Zipf-like popularity, 1..`max_genres` genres drawn around its cluster's genre, a year and a
    decade. Each user has a taste: a Zipf-like mixture over `tastes_per_user` clusters. A user's
    interactions pick a cluster from the taste, then an item of that cluster by popularity
    (inverse-CDF sampling, O(E log N), no user x item matrix). `like` = the item's quality plus the
    user's affinity beats a threshold. Everything is vectorised numpy; scales to millions of items.
    """

    num_users: int = 1000
    num_items: int = 2000
    num_clusters: int = 20
    interactions_per_user: int = 20
    tastes_per_user: int = 2
    num_genres: int = 12
    max_genres: int = 3
    popularity_zipf: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if min(self.num_users, self.num_items, self.num_clusters,
               self.interactions_per_user, self.tastes_per_user, self.num_genres,
               self.max_genres) < 1:
            raise ValueError(f"all SyntheticConfig sizes must be >= 1, got {self}")
        if self.num_clusters > self.num_items:
            raise ValueError("num_clusters must be <= num_items")


def synthetic(config: SyntheticConfig = SyntheticConfig()) -> Dataset:
    """Generates a dataset per `SyntheticConfig` (deterministic in `config.seed`)."""
    c = config
    rng = np.random.default_rng(c.seed)
    ni, nu, nc = c.num_items, c.num_users, c.num_clusters
    # clusters: Zipf-like sizes, every cluster non-empty
    w = 1.0 / np.arange(1, nc + 1) ** 0.5
    cluster = np.concatenate([np.arange(nc), rng.choice(nc, ni - nc, p=w / w.sum())])
    rng.shuffle(cluster)
    pop = 1.0 / rng.permutation(np.arange(1, ni + 1)).astype(np.float64) ** c.popularity_zipf
    quality = rng.normal(size=ni)
    # cluster-major cumulative popularity for inverse-CDF sampling within a cluster
    order = np.argsort(cluster, kind="stable")
    cum = np.cumsum(pop[order])
    csize = np.bincount(cluster, minlength=nc)
    cend = np.cumsum(csize)
    cstart = cend - csize
    lo = np.where(cstart > 0, cum[np.maximum(cstart - 1, 0)], 0.0)
    hi = cum[cend - 1]
    # users: taste clusters with Zipf-like mixture weights
    tastes = rng.integers(0, nc, size=(nu, c.tastes_per_user))
    tw = 1.0 / np.arange(1, c.tastes_per_user + 1)
    tw = tw / tw.sum()
    affinity = rng.normal(size=nu)
    e = nu * c.interactions_per_user
    users = np.repeat(np.arange(nu), c.interactions_per_user)
    which = rng.choice(c.tastes_per_user, size=e, p=tw)
    # 10% of events are exploration outside the taste
    explore = rng.random(e) < 0.1
    cl = np.where(explore, rng.integers(0, nc, size=e), tastes[users, which])
    r = lo[cl] + rng.random(e) * (hi[cl] - lo[cl])
    pos = np.minimum(np.searchsorted(cum, r, side="right"), cend[cl] - 1)
    items = order[np.maximum(pos, cstart[cl])]
    ts = rng.integers(0, 10**6, size=e)
    like = (quality[items] + 0.5 * affinity[users] + 0.8 * (~explore)
            + 0.5 * rng.normal(size=e)) > 0.6
    labels = np.stack([np.ones(e), like], axis=1).astype(np.float32)
    train, valid, test = temporal_split(users.astype(np.int32), items.astype(np.int32), labels,
                                        ts, nu)
    # attributes: genres around the cluster's genre (Zipf-like), year/decade per cluster era
    gz = 1.0 / np.arange(1, c.num_genres + 1) ** 1.1
    main_genre = rng.choice(c.num_genres, size=nc, p=gz / gz.sum())
    n_genres = rng.integers(1, c.max_genres + 1, size=ni)
    extra = rng.choice(c.num_genres, size=(ni, c.max_genres), p=gz / gz.sum())
    extra[:, 0] = main_genre[cluster]
    slot = np.arange(c.max_genres)[None, :] < n_genres[:, None]
    # drop duplicate genre codes within a row (keep first)
    srt = np.sort(np.where(slot, extra, c.num_genres), axis=1)
    dup = np.concatenate([np.zeros((ni, 1), bool), srt[:, 1:] == srt[:, :-1]], axis=1)
    srt = np.where(dup, c.num_genres, srt)
    srt = np.sort(srt, axis=1)
    genre_codes = np.where(srt < c.num_genres, srt + 1, 0).astype(np.int32)
    era = rng.integers(1950, 2020, size=nc)
    years = np.clip(era[cluster] + rng.integers(-5, 6, size=ni), 1940, 2025)
    dec_vocab = tuple(f"{d}s" for d in range(1940, 2030, 10))
    dec_codes = ((years // 10 * 10 - 1940) // 10 + 1).astype(np.int32)
    g_vocab = tuple(f"g{j:02d}" for j in range(c.num_genres))
    seg_vocab = tuple(f"c{j}" for j in range(nc))
    schema = FeatureSchema(
        user=(FeatureSpec("user_id", FeatureKind.ID, nu + 1),
              FeatureSpec("segment", FeatureKind.CATEGORICAL, nc + 1, seg_vocab)),
        item=(FeatureSpec("item_id", FeatureKind.ID, ni + 1),
              FeatureSpec("genres", FeatureKind.MULTI, c.num_genres + 1, g_vocab, c.max_genres,
                          filterable=True),
              FeatureSpec("decade", FeatureKind.CATEGORICAL, len(dec_vocab) + 1, dec_vocab,
                          filterable=True),
              FeatureSpec("year", FeatureKind.NUMERIC)),
        tasks=("watch", "like"))
    g_arr = np.array(g_vocab + ("",), dtype=object)
    genre_lists = [[g for g in row if g] for row in g_arr[np.where(genre_codes > 0,
                                                                   genre_codes - 1, -1)]]
    return Dataset(
        name="synthetic", schema=schema,
        user_ids=np.arange(nu, dtype=np.int64), item_ids=np.arange(ni, dtype=np.int64),
        user_features={"user_id": np.arange(1, nu + 1, dtype=np.int32),
                       "segment": (tastes[:, 0] + 1).astype(np.int32)},
        item_features={"item_id": np.arange(1, ni + 1, dtype=np.int32), "genres": genre_codes,
                       "decade": dec_codes,
                       "year": ((years - years.mean()) / (years.std() + 1e-6)).astype(np.float32)},
        train=train, valid=valid, test=test,
        item_raw_attributes={"genres": genre_lists, "year": years.astype(int).tolist(),
                             "decade": [dec_vocab[k - 1] for k in dec_codes]},
        source={"name": "synthetic", "synthetic": dataclasses.asdict(c)})


def load_dataset(name: str, synthetic: Mapping | SyntheticConfig | None = None) -> Dataset:
    """Loads a dataset by name: `"movielens-100k"` or `"synthetic"` (with a SyntheticConfig)."""
    if name in ("movielens-100k", "ml-100k"):
        return load_movielens_100k()
    if name == "synthetic":
        if synthetic is None:
            synthetic = SyntheticConfig()
        elif isinstance(synthetic, Mapping):
            synthetic = SyntheticConfig(**synthetic)
        return globals()["synthetic"](synthetic)
    raise ValueError(f"unknown dataset {name!r}; known: 'movielens-100k', 'synthetic'")
