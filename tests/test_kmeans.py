import faiss
import numpy as np
import pytest

from st_jax._kmeans import kmeans
from st_jax.synthetic import clustered_catalogue


@pytest.mark.parametrize("n,d,c", [(6000, 16, 32), (20000, 32, 64)])
def test_inertia_close_to_faiss(n, d, c):
    x = clustered_catalogue(n, d, num_clusters=50, seed=3).embeddings
    ours = kmeans(x, c, seed=0)
    ref = faiss.Kmeans(d, c, niter=20, seed=1, max_points_per_centroid=256)
    ref.train(x)
    ref_inertia = float(ref.index.search(x, 1)[0].sum())
    assert ours.inertia <= 1.03 * ref_inertia
    assert ours.assign.shape == (n,) and ours.sizes.sum() == n
    # the assignment really is the nearest centroid
    d2 = ((x[:500, None, :] - ours.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(ours.assign[:500], d2.argmin(1))


def test_deterministic_and_errors():
    x = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    a, b = kmeans(x, 10, seed=5), kmeans(x, 10, seed=5)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x, 1001)
