"""st_jax serving: publish a trained model into one jitted retrieval graph, serve, export.

Python::

    import serving, training
    model = training.load("runs/ml100k")
    serving.publish(model, None, "bundles/ml100k")          # None: the model's own catalogue
    r = serving.Retriever.load("bundles/ml100k")
    out = r.recommend([1, 2], filter="genres:Comedy AND NOT decade:1990s", k=10)
    out.ids, out.scores, out.task_scores                      # [B, k], [B, k], [B, k, T]
    r.export("exports/ml100k-cpu", platform="cpu")
    serving.load_exported("exports/ml100k-cpu").recommend([1, 2], k=10)   # no model code

CLI: ``st-jax publish MODEL_DIR --out BUNDLE``, ``st-jax query BUNDLE --user 42 --filter ...``,
``st-jax export BUNDLE --platform cpu --out ART``.
"""
from serving._bundle import (BundleError, Catalogue, CatalogueError, SkewError, compact,
                             default_num_clusters, model_fingerprint, publish, read_bundle)
from serving._export import ExportedRetriever, load_exported
from serving._host import Recommendations, RequestError, UnknownUserError
from serving._store import StoreError, TamperedError

__all__ = [
    "BundleError", "Catalogue", "CatalogueError", "ExportedRetriever", "Recommendations",
    "RequestError", "Retriever", "SkewError", "StoreError", "TamperedError", "UnknownUserError",
    "compact", "default_num_clusters", "load_exported", "model_fingerprint", "publish", "read_bundle",
]


def __getattr__(name):
    # The in-process retriever needs the model code (flax, training); importing it lazily
    # keeps `serving.load_exported` usable without them.
    if name == "Retriever":
        from serving._retriever import Retriever
        return Retriever
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
