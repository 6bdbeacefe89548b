"""Index <-> (flat arrays, JSON spec): how an :class:`~st_jax.Index` goes to disk.

An index is a tree of frozen pytree dataclasses (``Index``, ``Int8Matrix``, ``IVF``,
``FilterIndex``). :func:`index_to_flat` splits it into ``{path: np.ndarray}`` (saved with
Orbax by the serving bundle) and a JSON-able *spec* holding the tree shape and the static
fields; :func:`index_from_flat` rebuilds it and checks every array against the spec.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from st_jax._filter_index import FilterIndex, FilterSchema
from st_jax._index import Index
from st_jax._ivf import IVF
from st_jax._types import Int8Matrix

_CLASSES = {c.__name__: c for c in (Index, Int8Matrix, IVF, FilterIndex)}


class IndexFormatError(ValueError):
    """Stored index arrays do not match their spec (missing, wrong shape or dtype)."""


def _encode_static(v: Any) -> Any:
    if isinstance(v, FilterSchema):
        return {"t": "filter_schema", "v": v.to_json()}
    if isinstance(v, tuple):
        return {"t": "tuple", "v": [_encode_static(x) for x in v]}
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot serialise static field value of type {type(v).__name__}")


def _decode_static(v: Any) -> Any:
    if isinstance(v, dict):
        if v.get("t") == "filter_schema":
            return FilterSchema.from_json(v["v"])
        if v.get("t") == "tuple":
            return tuple(_decode_static(x) for x in v["v"])
        raise IndexFormatError(f"unknown static value {v!r}")
    return v


def _encode(obj: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    if obj is None:
        return {"t": "none"}
    if dataclasses.is_dataclass(obj) and type(obj).__name__ in _CLASSES:
        fields = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.metadata.get("static"):
                fields[f.name] = {"t": "static", "v": _encode_static(v)}
            else:
                fields[f.name] = _encode(v, f"{path}.{f.name}" if path else f.name, arrays)
        return {"t": "dc", "cls": type(obj).__name__, "fields": fields}
    if isinstance(obj, (jax.Array, np.ndarray)):
        a = np.asarray(obj)
        arrays[path] = a
        return {"t": "array", "shape": list(a.shape), "dtype": a.dtype.name}
    raise TypeError(f"cannot serialise index field {path!r} of type {type(obj).__name__}")


def index_to_flat(index: Index) -> tuple[dict[str, np.ndarray], dict]:
    """``Index`` -> ``({path: np.ndarray}, spec)``; ``spec`` is JSON-serialisable."""
    arrays: dict[str, np.ndarray] = {}
    spec = _encode(index, "", arrays)
    return arrays, spec


def _decode(spec: Any, path: str, arrays: dict, host: bool = False) -> Any:
    t = spec.get("t") if isinstance(spec, dict) else None
    if t == "none":
        return None
    if t == "array":
        if path not in arrays:
            raise IndexFormatError(f"index array {path!r} is missing")
        a = np.asarray(arrays[path])
        if list(a.shape) != list(spec["shape"]) or a.dtype.name != spec["dtype"]:
            raise IndexFormatError(
                f"index array {path!r} is {a.dtype.name}{list(a.shape)}, expected "
                f"{spec['dtype']}{list(spec['shape'])}")
        return a if host else jax.numpy.asarray(a)
    if t == "dc":
        cls = _CLASSES.get(spec["cls"])
        if cls is None:
            raise IndexFormatError(f"unknown index class {spec['cls']!r}")
        kw = {}
        for name, fs in spec["fields"].items():
            if isinstance(fs, dict) and fs.get("t") == "static":
                kw[name] = _decode_static(fs["v"])
            else:
                kw[name] = _decode(fs, f"{path}.{name}" if path else name, arrays, host)
        try:
            return cls(**kw)
        except TypeError as e:
            raise IndexFormatError(f"index spec does not fit {cls.__name__}: {e}") from None
    raise IndexFormatError(f"bad index spec node at {path or '<root>'!r}: {spec!r}")


def index_from_flat(arrays: dict[str, np.ndarray], spec: dict, *, host: bool = False) -> Index:
    """Inverse of :func:`index_to_flat`; ``host=True`` keeps the arrays in host memory
    (numpy) instead of placing them on the default device.

    Raises:
      IndexFormatError: an array is missing or has another shape / dtype than the spec.
    """
    extra = set(arrays) - set(_array_paths(spec, ""))
    if extra:
        raise IndexFormatError(f"unexpected index arrays {sorted(extra)[:5]}")
    return _decode(spec, "", arrays, host)


def _array_paths(spec: Any, path: str) -> list[str]:
    t = spec.get("t") if isinstance(spec, dict) else None
    if t == "array":
        return [path]
    if t == "dc":
        out = []
        for name, fs in spec["fields"].items():
            out += _array_paths(fs, f"{path}.{name}" if path else name)
        return out
    return []


def array_specs(spec: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{path: (shape, dtype name)}`` of every array an index spec expects."""
    out = {}

    def walk(s, path):
        t = s.get("t") if isinstance(s, dict) else None
        if t == "array":
            out[path] = (tuple(s["shape"]), s["dtype"])
        elif t == "dc":
            for name, fs in s["fields"].items():
                walk(fs, f"{path}.{name}" if path else name)
    walk(spec, "")
    return out
