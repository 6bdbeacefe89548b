"""Filter language: parser, builder, compiler (host side, no JAX evaluation)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from st_jax._filter_index import build_filter_index
from st_jax._filter_lang import (NOT, OR, TERM_EXACT, And, Const, F,
                                 FilterError, Not, Or, Term, compile_filter, parse_filter,
                                 to_string)

# ----------------------------------------------------------------------------- independent evaluator
# Evaluates parsed expressions over one item given as {field: set(values)}; bare values are
# compared as text or int according to the field's type (the language's coercion rule).
INT_FIELDS = {"year"}


def eval_expr(e, item: dict) -> bool:
    if isinstance(e, Const):
        return e.value
    if isinstance(e, Term):
        v = e.value
        if e.field in INT_FIELDS and isinstance(v, str):
            v = int(v)
        return v in item.get(e.field, set())
    if isinstance(e, Not):
        return not eval_expr(e.child, item)
    if isinstance(e, And):
        return all(eval_expr(c, item) for c in e.children)
    if isinstance(e, Or):
        return any(eval_expr(c, item) for c in e.children)
    raise TypeError(e)


# ----------------------------------------------------------------------------- unit tests


def test_precedence_not_and_or():
    e = parse_filter("a:1 OR b:2 AND NOT c:3")
    assert e == Or((Term("a", "1"), And((Term("b", "2"), Not(Term("c", "3"))))))


def test_aliases_and_case_insensitive_keywords():
    assert parse_filter("a:1 & !b:2 | c:3") == parse_filter("a:1 and not b:2 Or c:3")


def test_in_list_and_quotes():
    e = parse_filter('genre IN (drama, "sci fi", 7) AND title:"say \\"hi\\""')
    assert e == And((Or((Term("genre", "drama"), Term("genre", "sci fi"), Term("genre", "7"))),
                     Term("title", 'say "hi"')))
    assert parse_filter('a in (x)') == Term("a", "x")


@pytest.mark.parametrize("text", [None, "", "   ", "*", "(*)"])
def test_everything(text):
    assert parse_filter(text) == Const(True)


def test_builder_matches_text():
    built = (F.country == "US") & (F.lang.isin(["en", "es"])) & ~(F.tag == "nsfw")
    text = parse_filter('country:US AND (lang:en OR lang:es) AND NOT tag:nsfw')
    assert to_string(built) == to_string(text)
    assert parse_filter(to_string(built)) == built  # bare flag is not compared
    assert (F("year") != 2020) == Not(Term("year", 2020))


def test_fields_named_all_and_none():
    """``F.all()`` / ``F.none()`` are the constants; compared, ``F.all`` / ``F.none`` are the
    fields of those names (was Python's False, silently taken as a constant by ``&``)."""
    assert F.all() == Const(True) and F.none() == Const(False)
    assert (F.none == 3) == Term("none", 3)
    assert ((F.none == "1") & (F.all != "x")) == parse_filter('none:1 AND NOT all:x')
    assert F.all.isin(["1", "2"]) == parse_filter("all IN (1, 2)")


@pytest.mark.parametrize("text, col, words", [
    ("a:1 AND", 8, "expected a term"),
    ("a:1 b:2", 5, "expected AND, OR"),
    ("(a:1", 5, "expected ')'"),
    ("a:1)", 4, "unbalanced"),
    ('a:"x', 3, "unterminated string"),
    ("a:and", 3, "quote it"),
    ("a IN ()", 7, "empty IN list"),
    ("a IN (x y)", 9, "expected ',' or ')'"),
    ("a", 2, "expected ':' or IN"),
])
def test_syntax_errors_name_the_column(text, col, words):
    with pytest.raises(FilterError) as ei:
        parse_filter(text)
    assert ei.value.column == col
    assert words in str(ei.value) and f"column {col}" in str(ei.value)
    assert isinstance(ei.value, ValueError)


@pytest.fixture(scope="module")
def tiny_index():
    attrs = {"country": ["US", "FR", None, "US"], "genre": [["drama", "sci fi"], [], None, "drama"],
             "year": [2020, 2021, None, 1999]}
    return build_filter_index(attrs, 4, 32, bloom_bits=64, exact_min_frac=0.5)


def test_unknown_field_message(tiny_index):
    with pytest.raises(FilterError, match=r"unknown field 'lang' at column 16; known fields: "
                                          r"country, genre, year") as ei:
        compile_filter(tiny_index, "country:US AND lang:en")
    assert ei.value.field == "lang" and ei.value.column == 16


def test_wrong_type_messages(tiny_index):
    with pytest.raises(FilterError, match=r"field 'year' holds int values; got abc at column 6"):
        compile_filter(tiny_index, "year:abc")
    with pytest.raises(FilterError, match=r"field 'year' holds int values; got \"2020\""):
        compile_filter(tiny_index, 'year:"2020"')
    with pytest.raises(FilterError, match="field 'country' holds str values"):
        compile_filter(tiny_index, F.country == 5)
    with pytest.raises(FilterError, match="must be a str or an int"):
        F.year == 2.5
    with pytest.raises(FilterError, match="filter 1: unknown field 'x'"):
        compile_filter(tiny_index, ["year:2020", "x:1"], 2)
    with pytest.raises(FilterError, match="got 1 filters for a batch of 2"):
        compile_filter(tiny_index, ["year:2020"], 2)
    for unordered in ({"year:2020", "year:2021"}, (f for f in ["year:2020"] * 2)):
        with pytest.raises(FilterError, match="one per query"):    # no query order
            compile_filter(tiny_index, unordered, 2)
    arr = compile_filter(tiny_index, np.array(["year:2020", "NOT year:2021"]), 2)
    lst = compile_filter(tiny_index, ["year:2020", "NOT year:2021"], 2)
    for name in ("ops", "rowids", "terms", "lengths"):
        np.testing.assert_array_equal(getattr(arr, name), getattr(lst, name))


def test_program_size_limit(tiny_index):
    big = " OR ".join(f"genre:g{i}" for i in range(70))  # unknown values fold to FALSE
    assert list(compile_filter(tiny_index, big).ops[0, :1]) == [TERM_EXACT]
    big = " OR ".join("(year:2020 AND country:US AND genre:drama)" for _ in range(12))
    with pytest.raises(FilterError, match="filter too large: .* exceed the program limit of 32"):
        compile_filter(tiny_index, big, max_len=32)


def test_compile_shapes_and_folding(tiny_index):
    s = tiny_index.schema
    prog = compile_filter(tiny_index, "country:US AND NOT genre:nothing")  # -> country:US
    assert prog.ops.shape == (1, 128) and prog.rowids.shape == (1, 128, 8)
    assert not prog.per_query and int(prog.lengths[0]) == 1
    assert int(prog.ops[0, 0]) == TERM_EXACT
    prog = compile_filter(tiny_index, ["year:2020 OR NOT genre:drama", None], 2)
    assert prog.per_query and prog.ops.shape == (2, 128)
    assert int(prog.lengths[1]) == 1 and int(prog.rowids[1, 0, 0]) == s.valid_row
    ops = [int(o) for o in prog.ops[0, : int(prog.lengths[0])]]
    assert sorted(ops) == sorted([prog.ops[0, 0], prog.ops[0, 1], NOT, OR])
    assert compile_filter(tiny_index, "NOT *").rowids[0, 0, 0] == s.zero_row


def test_sethi_ullman_keeps_stack_small(tiny_index):
    # right-deep chain of 40 ANDs would need depth 40 in naive postfix
    text = "genre:drama AND (" * 39 + "year:2020" + ")" * 39
    prog = compile_filter(tiny_index, text, stack_depth=8)
    assert int(prog.lengths[0]) == 79


# ----------------------------------------------------------------------------- property tests

FIELDS = {"genre": ["drama", "sci fi", "and", "x-y", "NOT"], "year": [1999, 2020, 2021],
          "tag": ["a", "b", "c"]}
node = st.deferred(lambda: st.one_of(
    st.tuples(st.just("term"), st.sampled_from(sorted(FIELDS))).flatmap(
        lambda t: st.tuples(st.just("term"), st.just(t[1]), st.sampled_from(FIELDS[t[1]]))),
    st.tuples(st.just("in"), st.sampled_from(["genre", "tag"]),
              st.lists(st.sampled_from(["a", "b", "drama", "sci fi"]), min_size=1, max_size=3)),
    st.just(("star",)),
    st.tuples(st.just("not"), node),
    st.tuples(st.sampled_from(["and", "or"]), node, node),
))


def _ref_eval(n, item):
    k = n[0]
    if k == "term":
        return n[2] in item.get(n[1], set())
    if k == "in":
        return any(v in item.get(n[1], set()) for v in n[2])
    if k == "star":
        return True
    if k == "not":
        return not _ref_eval(n[1], item)
    a, b = _ref_eval(n[1], item), _ref_eval(n[2], item)
    return (a and b) if k == "and" else (a or b)


def _q(v, draw):
    if isinstance(v, int):
        return str(v)
    if v.upper() in {"AND", "OR", "NOT", "IN"} or " " in v or draw(st.booleans()):
        return '"' + v + '"'
    return v


PREC = {"or": 1, "and": 2, "not": 3}


def _render(n, draw, parent=0) -> str:
    k = n[0]
    kw = lambda w, sym: draw(st.sampled_from([w, w.lower(), w.title(), sym]))  # noqa: E731
    if k == "term":
        return f"{n[1]}{draw(st.sampled_from([':', ' : ']))}{_q(n[2], draw)}"
    if k == "in":
        return f"{n[1]} {draw(st.sampled_from(['IN', 'in']))} (" + ", ".join(
            _q(v, draw) for v in n[2]) + ")"
    if k == "star":
        return "*"
    if k == "not":
        s = f"{kw('NOT', '!')} {_render(n[1], draw, 3)}"
        prec = 3
    else:
        s = f"{_render(n[1], draw, PREC[k])} {kw(k.upper(), '&' if k == 'and' else '|')} " \
            f"{_render(n[2], draw, PREC[k] + 1)}"
        prec = PREC[k]
    return f"({s})" if prec < parent or draw(st.booleans()) else s


ITEMS = [
    {"genre": {"drama"}, "year": {2020}, "tag": {"a", "b"}},
    {"genre": {"sci fi", "and"}, "year": {1999}, "tag": set()},
    {"genre": set(), "year": set(), "tag": {"c"}},
    {"genre": {"NOT", "x-y"}, "year": {2021}, "tag": {"a", "c"}},
    {"genre": {"drama", "sci fi"}, "year": {2021}, "tag": {"b"}},
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_parser_matches_independent_evaluator(data):
    tree = data.draw(node)
    text = _render(tree, data.draw)
    e = parse_filter(text)
    for item in ITEMS:
        assert eval_expr(e, item) == _ref_eval(tree, item), text
    # canonical text round-trips
    e2 = parse_filter(to_string(e))
    for item in ITEMS:
        assert eval_expr(e2, item) == eval_expr(e, item)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='ab:() "&|!*,\\INOTDR1', max_size=25))
def test_parser_never_crashes(text):
    try:
        parse_filter(text)
    except FilterError:
        pass
