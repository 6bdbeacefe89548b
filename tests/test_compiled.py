"""The guard on compiled search graphs: near the process's memory-mapping limit, a search
that compiled a new graph drops its entry point's compiled graphs, with a warning."""
import numpy as np
import pytest

import st_jax as st
from st_jax import _compiled, _search


@pytest.mark.skipif(_compiled.map_limit() is None or not _compiled.map_count(),
                    reason="no /proc/sys/vm/max_map_count or /proc/self/maps here")
def test_search_graphs_dropped_near_the_mapping_limit(rng, monkeypatch):
    x = rng.standard_normal((500, 8)).astype(np.float32)
    index = st.build_index(x)
    st.search(index, x[:2], 3)
    assert _search._search_jit._cache_size() >= 1
    # far from the limit: nothing dropped
    monkeypatch.setattr(_compiled, "map_limit", lambda: 1 << 40)
    st.search(index, x[:2], 4)
    assert _search._search_jit._cache_size() >= 2
    # near it (a limit just above what the process holds): a new graph drops them all
    monkeypatch.setattr(_compiled, "map_limit", lambda: int(_compiled.map_count() * 1.1))
    with pytest.warns(RuntimeWarning, match=r"Dropped the \d+ compiled graphs"):
        want = st.search(index, x[:2], 5)        # compiles; then the cache is cleared
    assert _search._search_jit._cache_size() == 0
    with pytest.warns(RuntimeWarning, match="vm.max_map_count"):
        got = st.search(index, x[:2], 6)
    assert _search._search_jit._cache_size() == 0
    np.testing.assert_array_equal(np.asarray(got.ids)[:, :5], np.asarray(want.ids))
    # a cached call never counts: compile one, then call it again under a huge limit
    monkeypatch.setattr(_compiled, "map_limit", lambda: 1 << 40)
    st.search(index, x[:2], 7)
    monkeypatch.setattr(_compiled, "map_count", lambda: pytest.fail("counted a cached call"))
    st.search(index, x[:2], 7)
