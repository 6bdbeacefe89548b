"""st.tune_cpu_malloc: argument checks and the effect on a search (same results)."""
import sys

import numpy as np
import pytest

import st_jax as st


@pytest.mark.parametrize("bad", [0, -1, 2**31, 1.5, True, "1G"])
def test_rejects_bad_threshold(bad):
    with pytest.raises(ValueError, match="threshold must be an int"):
        st.tune_cpu_malloc(bad)


def test_applies_on_glibc_and_search_unchanged():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    q = rng.standard_normal((4, 32)).astype(np.float32)
    index = st.build_index(x)
    before = st.search(index, q, 50)
    applied = st.tune_cpu_malloc(1 << 28)
    if sys.platform.startswith("linux"):
        import platform
        assert applied == (platform.libc_ver()[0] == "glibc")
    else:
        assert applied is False
    after = st.search(index, q, 50)
    np.testing.assert_array_equal(np.asarray(before.ids), np.asarray(after.ids))
    np.testing.assert_array_equal(np.asarray(before.scores), np.asarray(after.scores))
