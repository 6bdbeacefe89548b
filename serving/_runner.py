"""What the in-process and the exported retriever share: batching a request into buckets,
running one compiled graph per bucket, and the user-id convenience API."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pallas_kernels.int8_topk import MAX_K
from serving._host import (HostSide, Recommendations, RequestError, bucket_for,
                           concat_results)


class Runner:
    """Base of :class:`~serving.Retriever` and :class:`~serving.ExportedRetriever`.

    Subclasses set ``host`` (:class:`~serving._host.HostSide`), ``buckets``, ``default_k0``
    and implement ``_graph(bucket, k, k0, inputs) -> dict of arrays`` and ``_widths``.
    """

    host: HostSide
    buckets: tuple[int, ...]
    default_k0: int

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.host.tasks

    def _check_k(self, k: int, k0: int) -> None:
        for name, v in (("k", k), ("k0", k0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= MAX_K:
                raise RequestError(f"{name} must be an int in [1, {MAX_K}]; got {v!r}")

    def _prepare(self, b: int, exclude) -> int:
        """Exclusion width for this request (subclasses may fix it)."""
        return self.host.exclude_width(exclude, b)

    def __call__(self, user_features: Mapping, *, filter=None, k: int = 10,
                 k0: int | None = None, exclude: Sequence | None = None) -> Recommendations:
        """Recommendations for a batch of users given by their features.

        Args:
          user_features: ``{field: [B, ...]}`` per the model's user schema.
          filter: None, one filter (text in the filter language or an ``st.F`` expression)
            for every user, or a list / tuple / 1-D numpy array of B filters. A new filter
            never recompiles.
          k: results per user; k0: candidates per task (default: the bundle's).
          exclude: optional list of B sequences of item ids never to return (e.g. seen items).
        Returns:
          :class:`~serving.Recommendations`.
        Raises:
          RequestError: bad features, ids, k; FilterError: a bad filter (with the column).
        """
        k0 = self.default_k0 if k0 is None else k0
        self._check_k(k, k0)
        b = self.host.check_user_features(user_features)
        filters = self.host.filters_for(filter, b)
        if exclude is not None and len(exclude) != b:
            raise RequestError(f"exclude has {len(exclude)} entries for {b} users")
        snap = self._snapshot()                  # one consistent state for the whole request
        exclude, extra_exclude = self._split_exclude(snap, exclude)
        width = self._prepare(b, exclude)
        big = max(self.buckets)
        parts = []
        for s in range(0, b, big):                      # batches beyond the largest bucket
            e = min(b, s + big)
            feats = {f: np.asarray(v)[s:e] for f, v in user_features.items()}
            bucket = bucket_for(e - s, self.buckets)
            fl = None if filters is None else filters[s:e]
            inputs = self.host.inputs(feats, fl, None if exclude is None else list(exclude[s:e]),
                                      bucket, width, always_filter=self._always_filter)
            inputs.update(self._extra_inputs(
                snap, fl, None if extra_exclude is None else extra_exclude[s:e], bucket))
            out = self._graph(snap, bucket, k, k0, inputs)
            parts.append(self.host.result(out, e - s, k))
        return concat_results(parts)

    _always_filter = False

    # hooks for state that changes while serving (the fresh index of a Retriever)
    def _snapshot(self):
        return None

    def _split_exclude(self, snap, exclude):
        """(exclusions of catalogue items, exclusions handled by `_extra_inputs`)."""
        return exclude, None

    def _extra_inputs(self, snap, filters, exclude, bucket: int) -> dict:
        return {}

    def recommend(self, user_ids: Sequence, *, filter=None, k: int = 10,
                  k0: int | None = None, exclude_seen: bool = True) -> Recommendations:
        """Recommendations for users of the bundle's user table, by their own ids (e.g.
        MovieLens user ids); ``exclude_seen`` drops the items each user interacted with."""
        rows = self.host.user_rows(user_ids)
        feats = self.host.user_features(rows)
        exclude = self.host.seen_items(rows) if exclude_seen else None
        return self(feats, filter=filter, k=k, k0=k0, exclude=exclude)

    def title(self, item_id: int) -> str:
        return self.host.title(item_id)

    def titles(self, ids: np.ndarray) -> list[list[str]]:
        """Display titles for an id array ``[B, k]`` (-1 entries are skipped)."""
        return [[self.title(int(i)) for i in row if i >= 0] for row in np.asarray(ids)]
