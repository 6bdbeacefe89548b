"""The filter language: parser, Python builder ``F``, and compiler to program arrays.

Grammar (keywords case-insensitive; ``&``, ``|``, ``!`` are aliases of AND, OR, NOT)::

    expr  := term | expr AND expr | expr OR expr | NOT expr | ( expr ) | *
    term  := field:value | field:"value with spaces" | field IN (v1, v2, ...)

Precedence NOT > AND > OR; AND and OR are left-associative. An empty filter, ``None``
or ``*`` matches every item. A bare value is coerced to the column's type (``year:2020``
is an int for an int column, a string for a string column); a quoted value is always a
string. Keywords used as values must be quoted (``tag:"not"``).

Python builder (same semantics)::

    F.country == "US"                      # term
    F.lang.isin(["en", "es"])              # field IN (...)
    (F.country == "US") & ~(F.tag == "nsfw") | F("year") == 2020

Everything here runs on the host, once per filter, outside ``jax.jit``. The result of
:func:`compile_filter` is a :class:`FilterProgram`: array data of a fixed maximum size,
so a new filter never retriggers compilation of the graph that consumes it.

Program encoding (one row per program, postfix order, evaluated by a stack machine in
``pallas_kernels.filter_eval``)::

    ops[b, p]        i32   NOP | TERM_EXACT | TERM_BLOOM | AND | OR | NOT
    rowids[b, p, :]  i32   bit-sliced rows ANDed for a term (padded with the VALID row)
    terms[b, p]      i32   term id (exact verification of Bloom terms; -1 if none)
    lengths[b]       i32   number of instructions used
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Protocol, Union

import jax
import numpy as np

# ----------------------------------------------------------------------------- errors


class FilterError(ValueError):
    """A filter that cannot be parsed or compiled against an index.

    Attributes:
      column: 1-based column in the filter text where the problem is (``None`` for
        filters built with :data:`F`).
      field: the field involved, if any.
    """

    def __init__(self, message: str, *, column: int | None = None, field: str | None = None):
        super().__init__(message)
        self.column = column
        self.field = field


def _at(column: int | None) -> str:
    return f" at column {column}" if column is not None else ""


# ----------------------------------------------------------------------------- AST


class Expr:
    """Base of filter expressions; combine with ``&``, ``|``, ``~``."""

    def __and__(self, other: "Expr") -> "Expr":
        return And(_flat(And, self, _as_expr(other)))

    def __rand__(self, other: "Expr") -> "Expr":
        return And(_flat(And, _as_expr(other), self))

    def __or__(self, other: "Expr") -> "Expr":
        return Or(_flat(Or, self, _as_expr(other)))

    def __ror__(self, other: "Expr") -> "Expr":
        return Or(_flat(Or, _as_expr(other), self))

    def __invert__(self) -> "Expr":
        return Not(self)

    def __str__(self) -> str:
        return to_string(self)


def _flat(kind: type, a: Expr, b: Expr) -> tuple[Expr, ...]:
    """Children of ``kind(a, b)`` with nested nodes of the same kind spliced in."""
    out: list[Expr] = []
    for x in (a, b):
        out.extend(x.children if type(x) is kind else (x,))  # type: ignore[attr-defined]
    return tuple(out)


def _as_expr(x: Any) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, bool):
        return Const(x)
    raise TypeError(f"cannot combine a filter expression with {type(x).__name__}")


@dataclasses.dataclass(frozen=True, repr=False)
class Term(Expr):
    """``field:value``. ``bare`` marks an unquoted token from the parser (coerced to the
    column's type); ``column`` is the 1-based position of the value in the text."""

    field: str
    value: str | int
    bare: bool = dataclasses.field(default=False, compare=False)
    column: int | None = dataclasses.field(default=None, compare=False)
    field_column: int | None = dataclasses.field(default=None, compare=False)

    def __repr__(self) -> str:
        return f"Term({self.field!r}, {self.value!r})"


@dataclasses.dataclass(frozen=True, repr=False)
class Const(Expr):
    """Matches every item (``True``) or none (``False``)."""

    value: bool

    def __repr__(self) -> str:
        return f"Const({self.value})"


@dataclasses.dataclass(frozen=True, repr=False)
class Not(Expr):
    child: Expr

    def __repr__(self) -> str:
        return f"Not({self.child!r})"


@dataclasses.dataclass(frozen=True, repr=False)
class And(Expr):
    children: tuple[Expr, ...]

    def __repr__(self) -> str:
        return f"And{self.children!r}"


@dataclasses.dataclass(frozen=True, repr=False)
class Or(Expr):
    children: tuple[Expr, ...]

    def __repr__(self) -> str:
        return f"Or{self.children!r}"


# ----------------------------------------------------------------------------- builder


class _Field:
    """``F.name`` / ``F("name")``: build terms with ``==``, ``!=``, ``isin``."""

    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def __eq__(self, value: Any) -> Expr:  # type: ignore[override]
        _check_py_value(self._name, value)
        return Term(self._name, value)

    def __ne__(self, value: Any) -> Expr:  # type: ignore[override]
        return Not(self == value)

    def isin(self, values: Sequence[Any]) -> Expr:
        values = list(values)
        if not values:
            raise FilterError(f"empty isin() list for field '{self._name}'", field=self._name)
        return Or(tuple(self == v for v in values)) if len(values) > 1 else self == values[0]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"F.{self._name}"


def _check_py_value(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
        raise FilterError(
            f"value {value!r} for field '{field}' must be a str or an int, "
            f"not {type(value).__name__}",
            field=field)


class _FBuilder:
    """Entry point of the Python builder: ``F.country == "US"``, ``F("my field") == 1``,
    ``F.all()`` (everything), ``F.none()`` (nothing)."""

    def __getattr__(self, name: str) -> _Field:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Field(name)

    def __call__(self, name: str) -> _Field:
        return _Field(name)

    @property
    def all(self) -> "_ConstField":
        """``F.all()``: every item; ``F.all == v``: the field named ``all``."""
        return _ConstField("all", True)

    @property
    def none(self) -> "_ConstField":
        """``F.none()``: no item; ``F.none == v``: the field named ``none``."""
        return _ConstField("none", False)


class _ConstField(_Field):
    """``F.all`` / ``F.none``: called, the constant filter (every item / none); compared,
    the attribute of that name like any other field (``F.none == 3`` is a term, never
    Python's ``False``, which ``&`` and ``|`` would take as a constant)."""

    __slots__ = ("_value",)

    def __init__(self, name: str, value: bool):
        super().__init__(name)
        self._value = value

    def __call__(self) -> Expr:
        return Const(self._value)


F = _FBuilder()

# ----------------------------------------------------------------------------- rendering

_BARE_RE = re.compile(r'[^\s()",:&|!]+')
_KEYWORDS = {"AND", "OR", "NOT", "IN"}


def _render_value(v: str | int) -> str:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    s = str(v)
    if _BARE_RE.fullmatch(s) and s.upper() not in _KEYWORDS and s != "*":
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_string(e: Expr) -> str:
    """Canonical text of an expression; ``parse_filter(to_string(e))`` means the same."""
    if isinstance(e, Term):
        return f"{e.field}:{_render_value(e.value)}"
    if isinstance(e, Const):
        return "*" if e.value else "NOT *"
    if isinstance(e, Not):
        return f"NOT {_render_atom(e.child)}"
    if isinstance(e, And):
        return " AND ".join(_render_atom(c) for c in e.children)
    if isinstance(e, Or):
        return " OR ".join(_render_atom(c) for c in e.children)
    raise TypeError(type(e))


def _render_atom(e: Expr) -> str:
    s = to_string(e)
    return s if isinstance(e, (Term, Const)) and e != Const(False) else f"({s})"


# ----------------------------------------------------------------------------- parser


@dataclasses.dataclass(frozen=True)
class _Tok:
    kind: str  # "(" ")" "," ":" "AND" "OR" "NOT" "IN" "*" "WORD" "STR" "EOF"
    text: str
    col: int  # 1-based


_PUNCT = {"(": "(", ")": ")", ",": ",", ":": ":", "&": "AND", "|": "OR", "!": "NOT"}


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c in _PUNCT:
            toks.append(_Tok(_PUNCT[c], c, i + 1))
            i += 1
            continue
        if c == '"':
            j, buf = i + 1, []
            while j < n and text[j] != '"':
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(text[j])
                j += 1
            if j >= n:
                raise FilterError(f"unterminated string starting at column {i + 1}", column=i + 1)
            toks.append(_Tok("STR", "".join(buf), i + 1))
            i = j + 1
            continue
        m = _BARE_RE.match(text, i)
        assert m is not None
        w = m.group(0)
        up = w.upper()
        kind = up if up in _KEYWORDS else ("*" if w == "*" else "WORD")
        toks.append(_Tok(kind, w, i + 1))
        i = m.end()
    toks.append(_Tok("EOF", "", n + 1))
    return toks


def _describe(t: _Tok) -> str:
    return "end of filter" if t.kind == "EOF" else f"'{t.text}'"


class _Parser:
    def __init__(self, text: str):
        self.toks = _tokenize(text)
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def expect(self, kind: str, what: str) -> _Tok:
        t = self.take()
        if t.kind != kind:
            raise FilterError(f"expected {what} at column {t.col}, got {_describe(t)}",
                              column=t.col)
        return t

    def parse(self) -> Expr:
        e = self.or_expr()
        t = self.peek()
        if t.kind != "EOF":
            hint = "; expected AND, OR or end of filter" if t.kind != ")" else "; unbalanced ')'"
            raise FilterError(f"unexpected {_describe(t)} at column {t.col}{hint}", column=t.col)
        return e

    def or_expr(self) -> Expr:
        parts = [self.and_expr()]
        while self.peek().kind == "OR":
            self.take()
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def and_expr(self) -> Expr:
        parts = [self.not_expr()]
        while self.peek().kind == "AND":
            self.take()
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def not_expr(self) -> Expr:
        if self.peek().kind == "NOT":
            self.take()
            return Not(self.not_expr())
        return self.primary()

    def primary(self) -> Expr:
        t = self.take()
        if t.kind == "(":
            e = self.or_expr()
            self.expect(")", "')'")
            return e
        if t.kind == "*":
            return Const(True)
        if t.kind == "WORD":
            return self.term(t)
        if t.kind == "STR":
            raise FilterError(f"a field name cannot be quoted (column {t.col})", column=t.col)
        raise FilterError(f"expected a term, '(' or NOT at column {t.col}, got {_describe(t)}",
                          column=t.col)

    def value(self, field: str) -> tuple[str, bool, int]:
        t = self.take()
        if t.kind == "WORD":
            return t.text, True, t.col
        if t.kind == "STR":
            return t.text, False, t.col
        if t.kind in _KEYWORDS or t.kind == "*":
            raise FilterError(f"keyword '{t.text}' cannot be a bare value for field '{field}' at "
                              f"column {t.col}; quote it: \"{t.text}\"", column=t.col, field=field)
        raise FilterError(f"expected a value for field '{field}' at column {t.col}, got "
                          f"{_describe(t)}", column=t.col, field=field)

    def term(self, ft: _Tok) -> Expr:
        field = ft.text
        nt = self.take()
        if nt.kind == ":":
            v, bare, col = self.value(field)
            return Term(field, v, bare, col, ft.col)
        if nt.kind == "IN":
            self.expect("(", f"'(' after IN for field '{field}'")
            if self.peek().kind == ")":
                raise FilterError(f"empty IN list for field '{field}' at column {self.peek().col}",
                                  column=self.peek().col, field=field)
            terms = []
            while True:
                v, bare, col = self.value(field)
                terms.append(Term(field, v, bare, col, ft.col))
                t = self.take()
                if t.kind == ")":
                    break
                if t.kind != ",":
                    raise FilterError(f"expected ',' or ')' in IN list at column {t.col}, got "
                                      f"{_describe(t)}", column=t.col, field=field)
            return terms[0] if len(terms) == 1 else Or(tuple(terms))
        raise FilterError(f"expected ':' or IN after field '{field}' at column {nt.col}, got "
                          f"{_describe(nt)}", column=nt.col, field=field)


FilterLike = Union[str, Expr, None]


def parse_filter(text: FilterLike) -> Expr:
    """Parse filter text (or pass an ``F`` expression through) into an :class:`Expr`.

    Raises:
      FilterError: on a syntax error, with the 1-based column.
    """
    if text is None:
        return Const(True)
    if isinstance(text, Expr):
        return text
    if not isinstance(text, str):
        raise FilterError("a filter must be a str, an F expression or None, not "
                          f"{type(text).__name__}")
    if not text.strip():
        return Const(True)
    return _Parser(text).parse()


def split_filters(filter: Any) -> tuple[list[FilterLike], bool]:
    """``filter`` -> ``(filters, per_query)``: one filter shared by the batch (``None``, a
    str, an ``F`` expression) as a one-element list with ``per_query`` False, or one filter
    per query (a list, a tuple or a 1-D numpy array of them) as a list with ``per_query``
    True. Checks the container only; each filter is checked when parsed.

    Raises:
      FilterError: anything else (a set or a generator has no query order, a number is no
        filter).
    """
    if filter is None or isinstance(filter, (str, Expr)):
        return [filter], False
    if isinstance(filter, (list, tuple)) or (isinstance(filter, np.ndarray) and filter.ndim == 1):
        return list(filter), True
    raise FilterError("filter must be a string, an st.F expression, None, or a list of them "
                      f"(one per query); got {type(filter).__name__}"
                      + (f" of shape {filter.shape}" if isinstance(filter, np.ndarray) else ""))


def matches_everything(filter: Any) -> bool:
    """True when ``filter`` (shared or one per query) keeps every item: ``None``, blank,
    ``*`` or ``F.all()`` everywhere, so no mask is needed. False for an empty list and for
    text with a syntax error (left to :func:`compile_filter`, which reports the column).

    Raises:
      FilterError: ``filter`` is not a filter or a sequence of them (see :func:`split_filters`).
    """
    filters, _ = split_filters(filter)
    try:
        return bool(filters) and all(parse_filter(f) == Const(True) for f in filters)
    except FilterError:
        return False


# ----------------------------------------------------------------------------- program

NOP, TERM_EXACT, TERM_BLOOM, AND, OR, NOT = 0, 1, 2, 3, 4, 5
OP_NAMES = {NOP: "NOP", TERM_EXACT: "TERM_EXACT", TERM_BLOOM: "TERM_BLOOM", AND: "AND", OR: "OR",
            NOT: "NOT"}

DEFAULT_MAX_LEN = 128  # instructions per program (power of two for the kernel)
DEFAULT_STACK_DEPTH = 8  # enough for any 128-instruction program thanks to Sethi-Ullman order


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FilterProgram:
    """Compiled filters, one postfix program per row. Array data of a fixed maximum size.

    Attributes:
      ops: ``i32[Bp, P]`` — op codes (``NOP`` after ``lengths[b]``).
      rowids: ``i32[Bp, P, KP]`` — rows of the bit-sliced matrix ANDed by a term
        (``KP = next_pow2(num_hashes)``; unused slots hold the VALID row).
      terms: ``i32[Bp, P]`` — term ids for exact verification (``-1``: no term / unknown).
      lengths: ``i32[Bp]`` — instructions used per program.
      per_query: static — ``False``: one program shared by the batch (``Bp == 1``, masks
        ``u32[W]``); ``True``: one program per query (masks ``u32[B, W]``).
      num_hashes: static — K, rows ANDed per Bloom term.
      stack_depth: static — S, evaluation stack size.
    """

    ops: jax.Array
    rowids: jax.Array
    terms: jax.Array
    lengths: jax.Array
    per_query: bool = dataclasses.field(metadata=dict(static=True))
    num_hashes: int = dataclasses.field(metadata=dict(static=True))
    stack_depth: int = dataclasses.field(metadata=dict(static=True))

    @property
    def max_len(self) -> int:
        return int(self.ops.shape[-1])


class TermResolver(Protocol):
    """What the compiler needs from an index (implemented by ``FilterSchema``)."""

    num_hashes: int
    field_types: dict[str, str]  # field -> "str" | "int" | "any"

    def resolve(self, field: str, value: str | int) -> tuple[int, tuple[int, ...], int]:
        """(op, rows, term_id): op TERM_EXACT/TERM_BLOOM; rows ANDed; term id or -1."""
        ...

    @property
    def zero_row(self) -> int: ...

    @property
    def valid_row(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class _Leaf:
    op: int
    rows: tuple[int, ...]
    term: int


def _coerce(t: Term, ftype: str) -> str | int:
    v = t.value
    where = _at(t.column)
    if ftype == "int":
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return int(v)
        if t.bare:
            try:
                return int(v)
            except ValueError:
                pass
        shown = f'"{v}"' if isinstance(v, str) and not t.bare else _render_value(v)
        raise FilterError(f"field '{t.field}' holds int values; got {shown}{where}",
                          column=t.column, field=t.field)
    if ftype == "str":
        if isinstance(v, str):
            return v
        raise FilterError(f"field '{t.field}' holds str values; got int {v}{where}; quote it for "
                          "the text form", column=t.column, field=t.field)
    return v  # "any": a field without values; every term folds to FALSE


def _resolve(e: Expr, schema: TermResolver) -> Any:
    """Resolve terms; flatten AND/OR; fold constants and double negation.

    Returns a nested structure of ``bool`` | ``_Leaf`` | ("not", x) | ("and"|"or", [xs])."""
    if isinstance(e, Const):
        return bool(e.value)
    if isinstance(e, Term):
        types = schema.field_types
        if e.field not in types:
            known = ", ".join(sorted(types)) or "(none)"
            col = e.field_column if e.field_column is not None else e.column
            raise FilterError(f"unknown field '{e.field}'{_at(col)}; known fields: {known}",
                              column=col, field=e.field)
        value = _coerce(e, types[e.field])
        op, rows, term = schema.resolve(e.field, value)
        if op == TERM_EXACT and rows == (schema.zero_row,):
            return False
        if op == TERM_EXACT and rows == (schema.valid_row,):
            return True
        return _Leaf(op, rows, term)
    if isinstance(e, Not):
        c = _resolve(e.child, schema)
        if isinstance(c, bool):
            return not c
        if isinstance(c, tuple) and c[0] == "not":
            return c[1]
        return ("not", c)
    if isinstance(e, (And, Or)):
        kind = "and" if isinstance(e, And) else "or"
        absorbing = kind == "or"  # True absorbs OR, False absorbs AND
        out = []
        for ch in e.children:
            c = _resolve(ch, schema)
            if isinstance(c, bool):
                if c == absorbing:
                    return absorbing
                continue  # identity element
            if isinstance(c, tuple) and c[0] == kind:
                out.extend(c[1])
            else:
                out.append(c)
        if not out:
            return not absorbing
        return out[0] if len(out) == 1 else (kind, out)
    raise FilterError(f"not a filter expression: {e!r}")


def _binarize(x: Any) -> Any:
    """n-ary AND/OR -> balanced binary trees (shallow stacks, short critical path)."""
    if isinstance(x, tuple) and x[0] == "not":
        return ("not", _binarize(x[1]))
    if isinstance(x, tuple):
        kind, xs = x
        xs = [_binarize(c) for c in xs]
        while len(xs) > 1:
            nxt = [(kind, [xs[i], xs[i + 1]]) for i in range(0, len(xs) - 1, 2)]
            if len(xs) % 2:
                nxt.append(xs[-1])
            xs = nxt
        return xs[0]
    return x


def _need(x: Any) -> int:
    """Sethi-Ullman number: stack slots needed to evaluate x."""
    if isinstance(x, tuple) and x[0] == "not":
        return _need(x[1])
    if isinstance(x, tuple):
        a, b = (_need(c) for c in x[1])
        return max(a, b) if a != b else a + 1
    return 1


def _emit(x: Any, out: list[_Leaf | int]) -> None:
    if isinstance(x, tuple) and x[0] == "not":
        _emit(x[1], out)
        out.append(NOT)
        return
    if isinstance(x, tuple):
        a, b = x[1]
        if _need(b) > _need(a):  # commutative: deeper child first keeps the stack small
            a, b = b, a
        _emit(a, out)
        _emit(b, out)
        out.append(AND if x[0] == "and" else OR)
        return
    out.append(x)


def _program_rows(f: FilterLike, schema: TermResolver, max_len: int, stack_depth: int,
                  label: str) -> list[_Leaf | int]:
    try:
        e = parse_filter(f)
        r = _resolve(e, schema)
    except FilterError as err:
        if label:
            raise FilterError(f"{label}: {err}", column=err.column, field=err.field) from None
        raise
    if isinstance(r, bool):
        return [_Leaf(TERM_EXACT, (schema.valid_row if r else schema.zero_row,), -1)]
    tree = _binarize(r)
    need = _need(tree)
    out: list[_Leaf | int] = []
    _emit(tree, out)
    if len(out) > max_len or need > stack_depth:
        nterms = sum(isinstance(o, _Leaf) for o in out)
        raise FilterError(
            f"{label + ': ' if label else ''}filter too large: {len(out)} instructions "
            f"({nterms} terms, stack depth {need}) exceed the program limit of {max_len} "
            f"instructions / depth {stack_depth}; simplify the filter or compile with a larger "
            "max_len")
    return out


def compile_filter(schema: Any, filter: FilterLike | Sequence[FilterLike],
                   batch_size: int | None = None, *, max_len: int = DEFAULT_MAX_LEN,
                   stack_depth: int = DEFAULT_STACK_DEPTH) -> FilterProgram:
    """Compile filter text / ``F`` expressions into a :class:`FilterProgram` (host side).

    Args:
      schema: a ``FilterIndex`` or its ``FilterSchema``.
      filter: one filter (str, ``F`` expression or ``None``) shared by the batch, or a
        list / tuple / 1-D numpy array of ``batch_size`` filters, one per query.
      batch_size: required length of a per-query sequence (checked); ignored for one filter.
      max_len: P, instructions per program (power of two; fixed -> no recompilation).
      stack_depth: S, evaluation stack slots (8 covers any program of <= 128 instructions).

    Returns:
      ``FilterProgram`` with ``Bp = 1`` (shared) or ``Bp = batch_size`` (per query).

    Raises:
      FilterError: syntax error, unknown field, wrong value type, program too large, or
        ``filter`` neither a filter nor a sequence of them.
    """
    schema = getattr(schema, "schema", schema)
    if max_len < 1 or max_len & (max_len - 1):
        raise FilterError(f"max_len must be a power of two, got {max_len}")
    filters, per_query = split_filters(filter)
    if per_query:
        if batch_size is not None and len(filters) != batch_size:
            raise FilterError(f"got {len(filters)} filters for a batch of {batch_size} queries")
        if not filters:
            raise FilterError("empty list of filters")
        labels = [f"filter {i}" for i in range(len(filters))]
    else:
        labels = [""]
    K = int(schema.num_hashes)
    KP = 1 << max(0, (K - 1).bit_length())
    Bp = len(filters)
    ops = np.zeros((Bp, max_len), np.int32)
    rowids = np.full((Bp, max_len, KP), schema.valid_row, np.int32)
    terms = np.full((Bp, max_len), -1, np.int32)
    lengths = np.zeros((Bp,), np.int32)
    for b, (f, lab) in enumerate(zip(filters, labels)):
        prog = _program_rows(f, schema, max_len, stack_depth, lab)
        lengths[b] = len(prog)
        for p, ins in enumerate(prog):
            if isinstance(ins, _Leaf):
                ops[b, p] = ins.op
                rowids[b, p, : len(ins.rows)] = ins.rows
                terms[b, p] = ins.term
            else:
                ops[b, p] = ins
    return FilterProgram(ops=ops, rowids=rowids, terms=terms, lengths=lengths,
                         per_query=per_query, num_hashes=K, stack_depth=stack_depth)


def describe_program(prog: FilterProgram, b: int = 0) -> list[str]:
    """Human-readable listing of program ``b`` (debugging aid)."""
    out = []
    for p in range(int(np.asarray(prog.lengths)[b])):
        op = int(np.asarray(prog.ops)[b, p])
        if op in (TERM_EXACT, TERM_BLOOM):
            rows = np.asarray(prog.rowids)[b, p, : prog.num_hashes if op == TERM_BLOOM else 1]
            term = int(np.asarray(prog.terms)[b, p])
            out.append(f"{OP_NAMES[op]} term={term} rows={rows.tolist()}")
        else:
            out.append(OP_NAMES[op])
    return out
