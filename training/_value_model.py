"""Value Model: one score per item from the per-task predictions, by a user formula.

A formula is parsed once (outside jit) into a small AST and compiled to a pure jnp function of
`preds: f32[..., T]` (task order = `tasks`) -> `f32[...]` that runs inside `jax.jit`.

String grammar (precedence low -> high)::

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)?
    sum     := product (("+" | "-") product)*
    product := unary (("*" | "/") unary)*
    unary   := "-" unary | power
    power   := atom ("^" unary)?
    atom    := NUMBER | TASK | FUNC "(" expr ("," expr)* ")" | "(" expr ")"

Functions: if(cond, a, b), min(a, b, ...), max(a, b, ...), clip(x, lo, hi), exp(x), log(x),
sigmoid(x), abs(x), pow(x, y). Booleans are 1.0 / 0.0. Examples::

    0.7 * watch + 0.3 * like
    if(like > 0.5, 1.2, 1.0) * watch

JSON form: a number is a constant, a string a task name, an object with one key an operation
whose value is its argument list, e.g. `{"add": [{"mul": [0.7, "watch"]}, {"mul": [0.3, "like"]}]}`
or `{"mul": [{"if": [{"gt": ["like", 0.5]}, 1.2, 1.0]}, "watch"]}`. JSON operations: add, sub,
mul, div, pow, neg, gt, ge, lt, le, eq, ne, and, or, not, and every function above.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


class FormulaError(ValueError):
    """Base of the value-model formula errors; `position` is a 0-based column (or None) and
    `path` a JSON path (or None)."""

    def __init__(self, message: str, *, formula: str | None = None, position: int | None = None,
                 path: str | None = None):
        self.message, self.formula, self.position, self.path = message, formula, position, path
        text = message
        if position is not None:
            text = f"{message} at column {position}"
            if formula is not None:
                text += f"\n  {formula}\n  {' ' * position}^"
        elif path is not None:
            text = f"{message} at {path}"
        super().__init__(text)


class FormulaSyntaxError(FormulaError):
    """The formula text (or JSON structure) is malformed."""


class FormulaNameError(FormulaError):
    """The formula names a task or function that does not exist."""


# --- AST ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Const:
    value: float


@dataclasses.dataclass(frozen=True)
class Task:
    name: str


@dataclasses.dataclass(frozen=True)
class Call:
    op: str
    args: tuple


Node = Const | Task | Call

_BINARY = {"+": "add", "-": "sub", "*": "mul", "/": "div", "^": "pow",
           "<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}
# op -> (min args, max args or None)
_ARITY = {"add": (2, None), "sub": (2, 2), "mul": (2, None), "div": (2, 2), "pow": (2, 2),
          "neg": (1, 1), "lt": (2, 2), "le": (2, 2), "gt": (2, 2), "ge": (2, 2), "eq": (2, 2),
          "ne": (2, 2), "and": (2, None), "or": (2, None), "not": (1, 1), "if": (3, 3),
          "min": (1, None), "max": (1, None), "clip": (3, 3), "exp": (1, 1), "log": (1, 1),
          "sigmoid": (1, 1), "abs": (1, 1)}
_FUNCTIONS = ("if", "min", "max", "clip", "exp", "log", "sigmoid", "abs", "pow")


# --- tokenizer / parser ------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|==|!=|[-+*/^<>(),])
""", re.VERBOSE)


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise FormulaSyntaxError(f"unexpected character {text[pos]!r}", formula=text,
                                     position=pos)
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group(), pos))
        pos = m.end()
    out.append(("end", "", len(text)))
    return out


class _Parser:
    def __init__(self, text: str, tasks: Sequence[str]):
        self.text, self.tasks = text, tuple(tasks)
        self.toks = _tokenize(text)
        self.i = 0

    def peek(self):
        return self.toks[self.i]

    def take(self):
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def error(self, msg, pos, cls=FormulaSyntaxError):
        raise cls(msg, formula=self.text, position=pos)

    def expect(self, value):
        kind, val, pos = self.take()
        if val != value or kind == "end" and value:
            found = "end of formula" if kind == "end" else repr(val)
            self.error(f"expected {value!r}, found {found}", pos)

    def parse(self) -> Node:
        if self.peek()[0] == "end":
            self.error("empty formula", 0)
        node = self.or_()
        kind, val, pos = self.peek()
        if kind != "end":
            self.error(f"unexpected {val!r} after a complete expression", pos)
        return node

    def _chain(self, word, sub, op):
        node = sub()
        args = [node]
        while self.peek()[0] == "name" and self.peek()[1] == word:
            self.take()
            args.append(sub())
        return Call(op, tuple(args)) if len(args) > 1 else node

    def or_(self):
        return self._chain("or", self.and_, "or")

    def and_(self):
        return self._chain("and", self.not_, "and")

    def not_(self):
        if self.peek()[0] == "name" and self.peek()[1] == "not":
            self.take()
            return Call("not", (self.not_(),))
        return self.compare()

    def compare(self):
        left = self.sum_()
        kind, val, _ = self.peek()
        if kind == "op" and val in ("<", "<=", ">", ">=", "==", "!="):
            self.take()
            return Call(_BINARY[val], (left, self.sum_()))
        return left

    def sum_(self):
        node = self.product()
        while self.peek()[0] == "op" and self.peek()[1] in "+-":
            op = self.take()[1]
            node = Call(_BINARY[op], (node, self.product()))
        return node

    def product(self):
        node = self.unary()
        while self.peek()[0] == "op" and self.peek()[1] in ("*", "/"):
            op = self.take()[1]
            node = Call(_BINARY[op], (node, self.unary()))
        return node

    def unary(self):
        if self.peek()[1] == "-" and self.peek()[0] == "op":
            self.take()
            return Call("neg", (self.unary(),))
        if self.peek()[1] == "+" and self.peek()[0] == "op":
            self.take()
            return self.unary()
        return self.power()

    def power(self):
        node = self.atom()
        if self.peek()[0] == "op" and self.peek()[1] == "^":
            self.take()
            node = Call("pow", (node, self.unary()))
        return node

    def atom(self):
        kind, val, pos = self.take()
        if kind == "num":
            return Const(float(val))
        if kind == "op" and val == "(":
            node = self.or_()
            self.expect(")")
            return node
        if kind == "name":
            if self.peek()[1] == "(" and self.peek()[0] == "op":
                if val not in _FUNCTIONS:
                    self.error(f"unknown function {val!r}; known functions: "
                               f"{', '.join(_FUNCTIONS)}", pos, FormulaNameError)
                self.take()
                args = [self.or_()]
                while self.peek()[1] == "," and self.peek()[0] == "op":
                    self.take()
                    args.append(self.or_())
                self.expect(")")
                lo, hi = _ARITY[val]
                if len(args) < lo or (hi is not None and len(args) > hi):
                    want = f"{lo}" if lo == hi else f"at least {lo}"
                    self.error(f"{val}() takes {want} argument(s), got {len(args)}", pos)
                return Call(val, tuple(args))
            if val in ("and", "or", "not"):
                self.error(f"unexpected keyword {val!r}", pos)
            if val not in self.tasks:
                self.error(f"unknown task {val!r}; known tasks: {', '.join(self.tasks)}", pos,
                           FormulaNameError)
            return Task(val)
        found = "end of formula" if kind == "end" else repr(val)
        self.error(f"expected a number, task name, function or '(', found {found}", pos)


def parse_formula(text: str, tasks: Sequence[str]) -> Node:
    """Parses a formula string into an AST over `tasks`.

    Raises: FormulaSyntaxError / FormulaNameError with the column of the problem.
    """
    if not isinstance(text, str):
        raise FormulaSyntaxError(f"formula must be a string, got {type(text).__name__}")
    return _Parser(text, tasks).parse()


def parse_formula_json(obj, tasks: Sequence[str], path: str = "$") -> Node:
    """Parses the JSON form (a decoded object, or a JSON string) into an AST.

    Raises: FormulaSyntaxError / FormulaNameError with the JSON path of the problem.
    """
    if isinstance(obj, str) and path == "$" and obj.lstrip().startswith(("{", "[")):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as e:
            raise FormulaSyntaxError(f"invalid JSON: {e.msg}", formula=obj, position=e.pos) from None
    if isinstance(obj, bool):
        return Const(float(obj))
    if isinstance(obj, (int, float)):
        return Const(float(obj))
    if isinstance(obj, str):
        if obj not in tasks:
            raise FormulaNameError(f"unknown task {obj!r}; known tasks: {', '.join(tasks)}",
                                   path=path)
        return Task(obj)
    if isinstance(obj, Mapping):
        if len(obj) != 1:
            raise FormulaSyntaxError(
                f"an operation object needs exactly one key, got {sorted(obj)}", path=path)
        ((op, args),) = obj.items()
        if op not in _ARITY:
            raise FormulaNameError(f"unknown operation {op!r}; known: {', '.join(sorted(_ARITY))}",
                                   path=path)
        if not isinstance(args, list):
            args = [args]
        lo, hi = _ARITY[op]
        if len(args) < lo or (hi is not None and len(args) > hi):
            raise FormulaSyntaxError(f"{op} takes {lo if lo == hi else f'at least {lo}'} "
                                     f"argument(s), got {len(args)}", path=path)
        return Call(op, tuple(parse_formula_json(a, tasks, f"{path}.{op}[{j}]")
                              for j, a in enumerate(args)))
    raise FormulaSyntaxError(f"expected number, task name or operation object, got "
                             f"{type(obj).__name__}", path=path)


def to_text(node: Node) -> str:
    """Renders an AST back to the string form (fully parenthesised where needed)."""
    if isinstance(node, Const):
        return repr(node.value)
    if isinstance(node, Task):
        return node.name
    inv = {v: k for k, v in _BINARY.items()}
    a = [to_text(x) for x in node.args]
    if node.op in ("add", "mul") and len(a) > 2:
        return "(" + f" {inv[node.op]} ".join(a) + ")"
    if node.op in inv:
        return f"({a[0]} {inv[node.op]} {a[1]})"
    if node.op == "neg":
        return f"(-{a[0]})"
    if node.op in ("and", "or"):
        return "(" + f" {node.op} ".join(a) + ")"
    if node.op == "not":
        return f"(not {a[0]})"
    return f"{node.op}({', '.join(a)})"


# --- compiler ----------------------------------------------------------------------------------

def _f(x):
    return x.astype(jnp.float32)


_IMPL: dict[str, Callable] = {
    "add": lambda *a: sum(a[1:], a[0]), "sub": lambda a, b: a - b,
    "mul": lambda *a: _prod(a), "div": lambda a, b: a / b, "pow": jnp.power,
    "neg": lambda a: -a,
    "lt": lambda a, b: _f(a < b), "le": lambda a, b: _f(a <= b), "gt": lambda a, b: _f(a > b),
    "ge": lambda a, b: _f(a >= b), "eq": lambda a, b: _f(a == b), "ne": lambda a, b: _f(a != b),
    "and": lambda *a: _f(_prod([x != 0 for x in a])),
    "or": lambda *a: _f(sum([_f(x != 0) for x in a[1:]], _f(a[0] != 0)) > 0),
    "not": lambda a: _f(a == 0), "if": lambda c, a, b: jnp.where(c != 0, a, b),
    "min": lambda *a: _reduce(jnp.minimum, a), "max": lambda *a: _reduce(jnp.maximum, a),
    "clip": lambda x, lo, hi: jnp.clip(x, lo, hi), "exp": jnp.exp, "log": jnp.log,
    "sigmoid": jax.nn.sigmoid, "abs": jnp.abs,
}


def _prod(xs):
    out = xs[0]
    for x in xs[1:]:
        out = out * x
    return out


def _reduce(fn, xs):
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out


def compile_formula(node: Node, tasks: Sequence[str]) -> Callable[[jax.Array], jax.Array]:
    """AST -> pure function `preds f32[..., T] -> f32[...]` (jit-compatible; tasks by column)."""
    col = {t: j for j, t in enumerate(tasks)}

    def build(n: Node) -> Callable:
        if isinstance(n, Const):
            v = n.value
            return lambda p: jnp.full(p.shape[:-1], v, jnp.float32)
        if isinstance(n, Task):
            j = col[n.name]
            return lambda p: p[..., j]
        fs = [build(a) for a in n.args]
        impl = _IMPL[n.op]
        return lambda p: impl(*[f(p) for f in fs])

    fn = build(node)
    return lambda preds: fn(jnp.asarray(preds, jnp.float32)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ValueModel:
    """A parsed, compiled value-model formula over `tasks` (`formula`: the text as given, or
    the canonical text of a JSON formula; `to_text(vm.ast)` is always canonical).

    `vm(preds)` with `preds: f32[..., T]` (per-task probabilities, columns in `tasks` order) ->
    `f32[...]`; pure and usable inside `jax.jit`. Build with `ValueModel.parse(...)`.
    """

    formula: str
    tasks: tuple[str, ...]
    ast: Node = dataclasses.field(repr=False, compare=False)
    fn: Callable = dataclasses.field(repr=False, compare=False)

    @classmethod
    def parse(cls, formula, tasks: Sequence[str]) -> "ValueModel":
        """Accepts a formula string, a JSON string, or a decoded JSON object."""
        tasks = tuple(tasks)
        if isinstance(formula, str) and not formula.lstrip().startswith(("{", "[")):
            ast = parse_formula(formula, tasks)
            text = formula.strip()
        else:
            ast = parse_formula_json(formula, tasks)
            text = to_text(ast)
        return cls(text, tasks, ast, compile_formula(ast, tasks))

    @classmethod
    def from_weights(cls, weights: Mapping[str, float], tasks: Sequence[str],
                     bias: float = 0.0) -> "ValueModel":
        terms = [f"{float(w)!r} * {t}" for t, w in weights.items()]
        if bias:
            terms.append(repr(float(bias)))
        return cls.parse(" + ".join(terms) if terms else "0", tasks)

    def __call__(self, preds: jax.Array) -> jax.Array:
        preds = jnp.asarray(preds)
        if preds.shape[-1] != len(self.tasks):
            raise ValueError(f"value model over tasks {self.tasks} needs preds f32[..., "
                             f"{len(self.tasks)}], got shape {preds.shape}")
        return self.fn(preds)


def fit_value_weights(preds: np.ndarray, target: np.ndarray, tasks: Sequence[str], *,
                      loss: str = "bce", steps: int = 500, learning_rate: float = 0.05,
                      l2: float = 1e-3) -> ValueModel:
    """Learnable weighting: fits score = sum_t w_t * preds_t + b to a target.

    Args:
      preds: f32[N, T] per-task predictions (probabilities).
      target: f32[N] target (e.g. 1 for items the user engaged with, or a graded value).
      loss: "bce" (target in [0, 1], score used as a logit) or "mse".
    Returns: a ValueModel whose formula is the fitted linear combination.
    """
    preds = jnp.asarray(preds, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    if preds.ndim != 2 or preds.shape[1] != len(tasks) or target.shape != preds.shape[:1]:
        raise ValueError(f"need preds f32[N, {len(tasks)}] and target f32[N], got "
                         f"{preds.shape} and {target.shape}")
    if loss not in ("bce", "mse"):
        raise ValueError(f"loss must be 'bce' or 'mse', got {loss!r}")
    params = {"w": jnp.full((len(tasks),), 1.0 / len(tasks)), "b": jnp.zeros(())}
    tx = optax.adam(learning_rate)

    def objective(p):
        s = preds @ p["w"] + p["b"]
        base = (optax.sigmoid_binary_cross_entropy(s, target).mean() if loss == "bce"
                else jnp.mean((s - target) ** 2))
        return base + l2 * jnp.sum(p["w"] ** 2)

    @jax.jit
    def run(p):
        def body(carry, _):
            p, s = carry
            g = jax.grad(objective)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), None, length=steps)
        return p

    p = run(params)
    w = np.asarray(p["w"])
    return ValueModel.from_weights({t: round(float(x), 6) for t, x in zip(tasks, w)}, tasks,
                                   bias=round(float(p["b"]), 6))
