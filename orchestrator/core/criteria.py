"""Success criteria: small expressions over metric names, evaluated safely.

A whitelist evaluator over Python's ``ast``: comparisons (chained too), ``and``/``or``/``not``,
``+ - * / // % **`` and unary minus, numbers, metric names, and calls of ``abs``, ``min`` and
``max`` only. Attribute access, subscripts, other calls, dunder names, strings and lambdas are
rejected when the plan is loaded, never at evaluation time. ``eval`` is never used.

Metric names as loggers write them (``Loss/test``, ``val/acc``, ``val_acc.top1``) are quoted in
backquotes, as pandas' ``DataFrame.query`` does: ```Loss/test` < 2.4``.

Bounded: constant sub-expressions are folded when the plan loads, in floating point, so a
runaway (``10**10**10``, a literal beyond a float) is refused there with one error line; at run
time every metric value is a float too, so no operation can build a huge integer (``step **
step``) and one evaluation costs microseconds whatever the record holds. An overflow makes the
criterion false.

A metric that is missing, null or non-numeric makes the criterion false (never an exception).
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

from orchestrator.errors import CriteriaError

_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}
_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {"abs": abs, "min": min, "max": max}
_OP_TEXT = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}
MAX_LENGTH = 500
_QUOTED = re.compile(r"`([^`]*)`")


class _Missing(Exception):
    """A metric the expression needs is absent or not a finite number."""


@dataclass(frozen=True)
class Threshold:
    """The simple form ``metric OP number`` (or ``number OP metric``), for dashboards."""

    metric: str
    op: str  # one of < <= > >= == !=
    value: float

    @property
    def higher_is_better(self) -> bool:
        return self.op in (">", ">=")

    def passes(self, x: float) -> bool:
        return {
            "<": x < self.value,
            "<=": x <= self.value,
            ">": x > self.value,
            ">=": x >= self.value,
            "==": x == self.value,
            "!=": x != self.value,
        }[self.op]


@dataclass(frozen=True)
class Criterion:
    """One parsed, validated success criterion.

    Use ``Criterion.parse("val_accuracy >= 0.9")``; ``evaluate(metrics)`` returns a bool.
    """

    source: str
    tree: ast.Expression = field(repr=False, compare=False)
    names: frozenset[str] = frozenset()
    threshold: Threshold | None = None

    @classmethod
    def parse(cls, text: str) -> Criterion:
        """Parse and validate ``text``.

        Raises:
            CriteriaError: on a syntax error or anything outside the whitelist, naming the part.
        """
        text = text.strip()
        if not text:
            raise CriteriaError("criterion is empty")
        if len(text) > MAX_LENGTH:
            raise CriteriaError(f"criterion is longer than {MAX_LENGTH} characters")
        quoted: dict[str, str] = {}

        def alias(m: re.Match[str]) -> str:
            name = m.group(1)
            if not name.strip():
                raise CriteriaError(f"criterion {text!r}: empty backquoted metric name")
            key = f"_quoted_{len(quoted)}_"
            quoted[key] = name
            return f"({key})"

        try:
            tree = ast.parse(_QUOTED.sub(alias, text), mode="eval")
        except SyntaxError as e:
            hint = " (quote metric names with '/', '.' or '-' in backquotes)" if "`" in text else ""
            raise CriteriaError(
                f"criterion {text!r} is not a valid expression: {e.msg}{hint}"
            ) from None
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in quoted:
                node.id = quoted[node.id]
                node.ctx = ast.Load()
                node.quoted = True  # type: ignore[attr-defined]  # see _validate
        names: set[str] = set()
        _validate(tree.body, text, names)
        tree.body = _fold(tree.body, text)
        if not isinstance(tree.body, (ast.Compare, ast.BoolOp)) and not (
            isinstance(tree.body, ast.UnaryOp) and isinstance(tree.body.op, ast.Not)
        ):
            raise CriteriaError(
                f"criterion {text!r} must be a comparison such as 'val_accuracy >= 0.75'"
            )
        return cls(text, tree, frozenset(names), _threshold(tree.body))

    def evaluate(self, metrics: Mapping[str, Any]) -> bool:
        """True if the criterion holds for ``metrics``; False if a needed metric is missing."""
        try:
            return bool(_eval(self.tree.body, metrics))
        except (_Missing, ZeroDivisionError, OverflowError, ValueError, TypeError):
            return False

    def __str__(self) -> str:
        return self.source

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            lambda v: v if isinstance(v, Criterion) else cls.parse(str(v)),
            serialization=core_schema.plain_serializer_function_ser_schema(lambda c: c.source),
        )


def all_pass(criteria: tuple[Criterion, ...], metrics: Mapping[str, Any]) -> bool:
    """True when every criterion holds for one metrics record."""
    return all(c.evaluate(metrics) for c in criteria)


def _validate(node: ast.AST, text: str, names: set[str]) -> None:
    def bad(what: str) -> CriteriaError:
        return CriteriaError(
            f"criterion {text!r}: {what} is not allowed; use metric names, numbers, comparisons, "
            "and/or/not, + - * / and abs/min/max"
        )

    if isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _COMPARE:
                raise bad(f"operator {type(op).__name__}")
        for child in [node.left, *node.comparators]:
            _validate(child, text, names)
    elif isinstance(node, ast.BoolOp):
        for child in node.values:
            _validate(child, text, names)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
            raise bad(f"operator {type(node.op).__name__}")
        _validate(node.operand, text, names)
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise bad(f"operator {type(node.op).__name__}")
        _validate(node.left, text, names)
        _validate(node.right, text, names)
    elif isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise bad(f"the constant {node.value!r}")
    elif isinstance(node, ast.Name) and getattr(node, "quoted", False):
        names.add(node.id)
    elif isinstance(node, ast.Name):
        if node.id.startswith("_"):
            raise bad(f"the name {node.id!r}")
        if node.id in _FUNCTIONS:
            raise bad(f"{node.id} without a call")
        names.add(node.id)
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            raise bad("calling anything but abs, min or max")
        if node.keywords or not node.args or any(isinstance(a, ast.Starred) for a in node.args):
            raise bad("keyword or starred arguments")
        for a in node.args:
            _validate(a, text, names)
    elif isinstance(node, ast.Attribute):
        raise bad(f"attribute access '.{node.attr}'")
    elif isinstance(node, ast.Subscript):
        raise bad("subscripting")
    else:
        raise bad(f"a {type(node).__name__} expression")


def _eval(node: ast.AST, metrics: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Compare):
        left = _eval(node.left, metrics)
        for op, comp in zip(node.ops, node.comparators, strict=True):
            right = _eval(comp, metrics)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            return all(_eval(v, metrics) for v in node.values)
        # "or": a missing metric in one branch must not sink the other branch.
        for v in node.values:
            try:
                if _eval(v, metrics):
                    return True
            except _Missing:
                continue
        return False
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, metrics)
        if isinstance(node.op, ast.Not):
            return not value
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_eval(node.left, metrics), _eval(node.right, metrics))
    if isinstance(node, ast.Constant):
        return float(node.value)  # type: ignore[arg-type]  # validated: int or float
    if isinstance(node, ast.Name):
        value = metrics.get(node.id)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Missing(node.id)
        try:
            value = float(value)  # floats only: no operation can build a huge integer
        except OverflowError:
            raise _Missing(node.id) from None
        if not math.isfinite(value):
            raise _Missing(node.id)
        return value
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        return _FUNCTIONS[node.func.id](*(_eval(a, metrics) for a in node.args))
    raise AssertionError(f"unvalidated node {type(node).__name__}")


def _fold(node: ast.expr, text: str) -> ast.expr:
    """Replace constant sub-expressions by their float value (bottom-up).

    Raises:
        CriteriaError: a constant beyond a float, or an operation on constants that overflows
            or divides by zero (e.g. ``10**10**10``), naming the part.
    """
    for field_name, value in ast.iter_fields(node):
        if isinstance(value, ast.expr):
            setattr(node, field_name, _fold(value, text))
        elif isinstance(value, list):
            setattr(node, field_name, [_fold(v, text) if isinstance(v, ast.expr) else v
                                       for v in value])
    if isinstance(node, ast.Constant):
        try:
            as_float = float(node.value)  # type: ignore[arg-type]  # validated number
        except OverflowError:
            raise CriteriaError(
                f"criterion {text!r}: the number {str(node.value)[:20]}... is too large"
            ) from None
        if not math.isfinite(as_float):
            raise CriteriaError(f"criterion {text!r}: the number {node.value!r} is not finite")
        return ast.copy_location(ast.Constant(as_float), node)
    constant = (
        isinstance(node, ast.BinOp)
        and isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant)
    ) or (isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant)
          and not isinstance(node.op, ast.Not))
    if not constant:
        return node
    try:
        value = float(_eval(node, {}))
    except (OverflowError, ZeroDivisionError, ValueError) as e:
        part = ast.unparse(node)
        raise CriteriaError(
            f"criterion {text!r}: {part} cannot be computed ({type(e).__name__}: {e}); "
            "write the number itself"
        ) from None
    if not math.isfinite(value):
        raise CriteriaError(f"criterion {text!r}: {ast.unparse(node)} is not a finite number")
    return ast.copy_location(ast.Constant(value), node)


def _threshold(node: ast.AST) -> Threshold | None:
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1):
        return None
    left, right, op = node.left, node.comparators[0], type(node.ops[0])

    def number(n: ast.AST) -> float | None:
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return float(n.value)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            inner = number(n.operand)
            return -inner if inner is not None else None
        return None

    flipped = {ast.Lt: ast.Gt, ast.LtE: ast.GtE, ast.Gt: ast.Lt, ast.GtE: ast.LtE}
    if isinstance(left, ast.Name) and (v := number(right)) is not None:
        return Threshold(left.id, _OP_TEXT[op], v)
    if isinstance(right, ast.Name) and (v := number(left)) is not None:
        return Threshold(right.id, _OP_TEXT[flipped.get(op, op)], v)
    return None
