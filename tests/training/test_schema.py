import numpy as np
import pytest

from training import FeatureError, FeatureKind, FeatureSchema, FeatureSpec


def _schema():
    return FeatureSchema(
        user=(FeatureSpec("user_id", FeatureKind.ID, 4),),
        item=(FeatureSpec("item_id", FeatureKind.ID, 6),
              FeatureSpec("genres", "multi", 4, ("a", "b", "c"), max_len=2, filterable=True),
              FeatureSpec("year", FeatureKind.NUMERIC)),
        tasks=("watch", "like"))


def test_validate_ok_and_json_roundtrip():
    s = _schema()
    n = s.validate({"item_id": np.array([1, 2]), "genres": np.array([[1, 0], [2, 3]]),
                    "year": np.array([0.1, -0.2], np.float32)}, "item")
    assert n == 2
    assert FeatureSchema.from_json(s.to_json()) == s
    assert s.filterable_item_fields == ("genres",)


@pytest.mark.parametrize("feats, msg", [
    ({"item_id": np.array([1]), "genres": np.array([[1, 0]])}, "missing \\['year'\\]"),
    ({"item_id": np.array([1]), "genres": np.array([[1, 0]]), "year": np.zeros(1),
      "lang": np.zeros(1)}, "unknown item features \\['lang'\\]"),
    ({"item_id": np.array([9]), "genres": np.array([[1, 0]]), "year": np.zeros(1)},
     "outside \\[0, 5\\]"),
    ({"item_id": np.array([1]), "genres": np.array([[1, 0, 0]]), "year": np.zeros(1)},
     "max_len=2"),
    ({"item_id": np.array([1, 2]), "genres": np.array([[1, 0]]), "year": np.zeros(2)},
     "has 1 rows, expected 2"),
    ({"item_id": np.array([1.0]), "genres": np.array([[1, 0]]), "year": np.zeros(1)},
     "must be integer"),
])
def test_validate_errors(feats, msg):
    with pytest.raises(FeatureError, match=msg):
        _schema().validate(feats, "item")


def test_spec_errors():
    with pytest.raises(FeatureError, match="cardinality"):
        FeatureSpec("x", "categorical", 1)
    with pytest.raises(FeatureError, match="len\\(vocab\\)"):
        FeatureSpec("x", "categorical", 5, ("a",))
    with pytest.raises(ValueError):
        FeatureSpec("x", "nonsense", 5)
