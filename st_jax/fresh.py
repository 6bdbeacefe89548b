"""Fresh index: add, delete and update items of a live index without recompiling.

    from st_jax import fresh
    fr = fresh.create_fresh(index, capacity=10_000)
    fr = fresh.add(index, fr, ids, embeddings, attributes)           # new items
    index, fr = fresh.update(index, fr, ids, attributes={"genre": [...]})
    index, fr = fresh.delete(index, fr, ids)                          # tombstones, immediate
    res = fresh.search_fresh(index, fr, queries, k, filter="genre:new")  # res.source: 0/1
    index = fresh.compact(index, fr)                                  # fold into a new main

Design and guarantees: :mod:`st_jax._fresh`.
"""
from st_jax._fresh import (DuplicateIdError, FreshIndex, FreshSearchResult, IndexFullError,
                           UnknownIdError, add, compact, create_fresh, delete, search_fresh,
                           update)

__all__ = ["DuplicateIdError", "FreshIndex", "FreshSearchResult", "IndexFullError",
           "UnknownIdError", "add", "compact", "create_fresh", "delete", "search_fresh",
           "update"]
