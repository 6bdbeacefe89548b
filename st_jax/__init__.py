"""st_jax — SilverTorch in JAX: filtered Int8 retrieval as a served model.

Public API (kept small):

    import st_jax as st
    index = st.build_index(embeddings)                 # f32[N, D] -> Index
    res = st.search(index, queries, k, allow=None)     # -> SearchResult(ids, scores, count)
    index = st.build_index(emb, attributes={"genre": [...]}, num_clusters=1024)
    res = st.search(index, q, k, filter="genre:Comedy AND NOT year:1995", nprobe=32)
    st.fresh.add(index, st.fresh.create_fresh(index, 1000), ids, emb, attrs)   # updates
    st.sharded_search(st.shard_index(index, mesh), q, k)   # items across devices (flat or IVF)
    st.tune_cpu_malloc()        # CPU serving: stop XLA's per-call temporaries page-faulting
"""
from st_jax._filter_lang import F, FilterError
from st_jax._index import Index, build_index
from st_jax._malloc import tune_cpu_malloc
from st_jax._quant import dequantize, quantize_int8, score_error_bound
from st_jax._search import search
from st_jax._shard import ShardedIndex, shard_index, sharded_search
from st_jax import fresh
from st_jax._types import Int8Matrix, SearchResult

__all__ = [
    "F", "FilterError", "Index", "Int8Matrix", "SearchResult", "build_index", "dequantize", "quantize_int8",
    "ShardedIndex", "fresh", "score_error_bound", "search", "shard_index", "sharded_search",
    "tune_cpu_malloc",
]
__version__ = "0.1.0"
