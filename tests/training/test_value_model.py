import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training import FormulaNameError, FormulaSyntaxError, ValueModel, fit_value_weights

TASKS = ("watch", "like")
P = np.array([[0.9, 0.2], [0.4, 0.7], [0.5, 0.5]], np.float32)


@pytest.mark.parametrize("formula, expect", [
    ("0.7 * watch + 0.3 * like", 0.7 * P[:, 0] + 0.3 * P[:, 1]),
    ("if(like > 0.5, 1.2, 1.0) * watch", np.where(P[:, 1] > 0.5, 1.2, 1.0) * P[:, 0]),
    ("1 + 2 * 3 - 4 / 2", np.full(3, 5.0)),
    ("-watch ^ 2", -(P[:, 0] ** 2)),
    ("2 ^ 3 ^ 2", np.full(3, 2.0 ** 9)),
    ("(watch >= 0.5 and like >= 0.5) or not watch < 0.9", np.array([1.0, 0.0, 1.0])),
    ("min(watch, like, 0.45) + max(watch, like)", np.minimum(P.min(1), 0.45) + P.max(1)),
    ("clip(watch * 2, 0, 1) + sigmoid(0) + abs(-like) + pow(2, 2) + exp(0) + log(1)",
     np.clip(P[:, 0] * 2, 0, 1) + 0.5 + P[:, 1] + 4 + 1),
    ("(watch == 0.5) != 0", np.array([0.0, 0.0, 1.0])),
    ("1e-1 * .5 * watch", 0.05 * P[:, 0]),
])
def test_formulas_evaluate(formula, expect):
    vm = ValueModel.parse(formula, TASKS)
    out = jax.jit(vm)(P)
    assert out.shape == (3,) and out.dtype == jnp.float32
    if expect is not None:
        np.testing.assert_allclose(out, expect, rtol=1e-5)


def test_json_form_matches_string_form():
    s = ValueModel.parse("if(like > 0.5, 1.2, 1.0) * watch", TASKS)
    obj = {"mul": [{"if": [{"gt": ["like", 0.5]}, 1.2, 1.0]}, "watch"]}
    for form in (obj, json.dumps(obj)):
        j = ValueModel.parse(form, TASKS)
        np.testing.assert_allclose(j(P), s(P))
    lin = ValueModel.parse({"add": [{"mul": [0.7, "watch"]}, {"mul": [0.3, "like"]}]}, TASKS)
    np.testing.assert_allclose(lin(P), 0.7 * P[:, 0] + 0.3 * P[:, 1], rtol=1e-6)


def test_works_inside_jit_with_batch_dims():
    vm = ValueModel.parse("0.7 * watch + 0.3 * like", TASKS)
    preds = jnp.ones((4, 5, 2)) * 0.5
    out = jax.jit(lambda p: vm.fn(jax.nn.sigmoid(p)))(preds)
    assert out.shape == (4, 5)
    with pytest.raises(ValueError, match="f32\\[..., 2\\]"):
        vm(jnp.ones((3, 3)))


@pytest.mark.parametrize("formula, err, pos, msg", [
    ("0.7 * watc + like", FormulaNameError, 6, "unknown task 'watc'; known tasks: watch, like"),
    ("0.7 * (watch", FormulaSyntaxError, 12, "expected '\\)'"),
    ("foo(watch)", FormulaNameError, 0, "unknown function 'foo'"),
    ("1 +", FormulaSyntaxError, 3, "found end of formula"),
    ("watch $ 2", FormulaSyntaxError, 6, "unexpected character '\\$'"),
    ("if(watch, 1)", FormulaSyntaxError, 0, "if\\(\\) takes 3 argument"),
    ("watch like", FormulaSyntaxError, 6, "unexpected 'like'"),
    ("", FormulaSyntaxError, 0, "empty formula"),
    ("watch < 1 < 2", FormulaSyntaxError, 10, "unexpected '<'"),
])
def test_parse_errors_have_positions(formula, err, pos, msg):
    with pytest.raises(err, match=msg) as e:
        ValueModel.parse(formula, TASKS)
    assert e.value.position == pos
    assert "^" in str(e.value)


@pytest.mark.parametrize("obj, path, msg", [
    ({"mul": [1, "x"]}, "$.mul[1]", "unknown task 'x'"),
    ({"frobnicate": [1]}, "$", "unknown operation"),
    ({"add": [1, {"gt": [1]}]}, "$.add[1]", "gt takes 2"),
    ({"add": [1], "mul": [2]}, "$", "exactly one key"),
    ({"add": [1, [2]]}, "$.add[1]", "expected number"),
])
def test_json_errors_have_paths(obj, path, msg):
    with pytest.raises((FormulaSyntaxError, FormulaNameError), match=msg) as e:
        ValueModel.parse(obj, TASKS)
    assert e.value.path == path


def test_bad_json_text():
    with pytest.raises(FormulaSyntaxError, match="invalid JSON") as e:
        ValueModel.parse('{"add": [1, }', TASKS)
    assert e.value.position is not None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=3, max_size=3))
def test_linear_formula_roundtrip(ws):
    a, b, c = ws
    vm = ValueModel.parse(f"{a!r} * watch + {b!r} * like - {c!r}", TASKS)
    np.testing.assert_allclose(vm(P), a * P[:, 0] + b * P[:, 1] - c, rtol=1e-4, atol=1e-4)
    from training._value_model import to_text
    again = ValueModel.parse(to_text(vm.ast), TASKS)   # canonical text: the same function
    np.testing.assert_allclose(again(P), vm(P), rtol=1e-6)


def test_fit_value_weights_recovers_direction():
    rng = np.random.default_rng(0)
    preds = rng.random((2000, 2)).astype(np.float32)
    target = (0.2 * preds[:, 0] + 0.8 * preds[:, 1] > 0.5).astype(np.float32)
    vm = fit_value_weights(preds, target, TASKS, steps=400)
    w = vm.ast  # formula text holds the fitted weights
    s = np.asarray(vm(preds))
    assert np.corrcoef(s, 0.2 * preds[:, 0] + 0.8 * preds[:, 1])[0, 1] > 0.95
    assert "watch" in vm.formula and "like" in vm.formula and w is not None
    mse = fit_value_weights(preds, 3 * preds[:, 0] + 1 * preds[:, 1], TASKS, loss="mse",
                            steps=1500, learning_rate=0.05, l2=0.0)
    np.testing.assert_allclose(mse(preds), 3 * preds[:, 0] + preds[:, 1], atol=0.05)
    with pytest.raises(ValueError, match="loss must be"):
        fit_value_weights(preds, target, TASKS, loss="hinge")


def test_fit_value_model_on_trained_model(tiny_run):
    import training
    model, _ = tiny_run
    vm = training.fit_value_model(model, target="like", steps=100)
    assert vm.tasks == model.tasks and "like" in vm.formula
    m2 = training.with_value_model(model, vm)
    assert m2.config.value_formula == vm.formula
    assert m2.recommend([int(model.dataset.user_ids[0])], k=3).shape == (1, 3)
    with pytest.raises(ValueError, match="unknown task"):
        training.fit_value_model(model, target="share")
