"""The calculator tool the model calls as <|python_start|>expr<|python_end|> during generation.

A narrow evaluator, not Python: it parses `expr` with ast and walks an explicit allow-list of
nodes. It knows numbers (int and float literals; + - * / // % ** and unary -/+, parentheses),
string literals, `len(s)`, `s + t`, `s * n`, and the string methods s.count(t), s.lower(),
s.upper(), s.strip() / s.strip(chars) that spelling questions need ("strawberry".count("r")).
No names, attributes other than those methods, subscripts, comprehensions, lambdas or imports.

Every operation is bounded before it runs (expression length, integer size, string length,
exponent), so it cannot hang or exhaust memory and needs no timer; the caller's thread is
never blocked for long. Anything refused or failing (1/0, overflow) gives None.

Results print as Python's print() would, except floats: they are rounded to 4 decimal places
(2/3 -> 0.6667, 10/4 -> 2.5, 10/2 -> 5.0); a nonzero float that would round to 0.0 keeps 4
significant digits instead (1/30000 -> 3.333e-05).
"""

import ast
import math
import operator

MAX_EXPRESSION_CHARS = 1000
MAX_INT_BITS = 4096  # about 1233 decimal digits; no operation starts on or keeps a larger integer
MAX_STRING_CHARS = 10_000

_ARITHMETIC = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_STRING_METHODS = {"count": (1, 1), "lower": (0, 0), "upper": (0, 0), "strip": (0, 1)}  # name: (min, max) arguments


class _Refused(Exception):
    """The expression is outside what the calculator evaluates."""


def use_calculator(expr: str) -> str | None:
    """Evaluate a calculator expression; the printed result, or None if refused or failing."""
    if len(expr) > MAX_EXPRESSION_CHARS:
        return None
    try:
        value = _evaluate(ast.parse(expr.strip(), mode="eval").body)
    except (_Refused, SyntaxError, ArithmeticError, ValueError, TypeError, RecursionError, MemoryError):
        return None
    if isinstance(value, float):
        return _format_float(value)
    return str(value)


def _format_float(x: float) -> str | None:
    if not math.isfinite(x):
        return None
    rounded = round(x, 4)
    if rounded == 0 and x != 0:
        rounded = float(f"{x:.4g}")
    return repr(rounded)


def _evaluate(node: ast.AST) -> int | float | str:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):  # type(): True is an int too
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _number(_evaluate(node.operand))
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        return _binary(node.op, _evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.Call) and not node.keywords:
        args = [_evaluate(arg) for arg in node.args]
        if isinstance(node.func, ast.Name) and node.func.id == "len" and len(args) == 1:
            return len(_string(args[0]))
        if isinstance(node.func, ast.Attribute) and node.func.attr in _STRING_METHODS:
            low, high = _STRING_METHODS[node.func.attr]
            if low <= len(args) <= high:
                target = _string(_evaluate(node.func.value))
                return getattr(target, node.func.attr)(*(_string(arg) for arg in args))
    raise _Refused(ast.dump(node)[:100])


def _binary(op: ast.operator, left, right) -> int | float | str:
    if isinstance(left, str) or isinstance(right, str):
        if isinstance(op, ast.Add) and isinstance(left, str) and isinstance(right, str):
            return _checked(left + right)
        if isinstance(op, ast.Mult):  # repetition, either order; size checked before building it
            text, times = (left, right) if isinstance(left, str) else (right, left)
            if isinstance(text, str) and type(times) is int and len(text) * max(times, 0) <= MAX_STRING_CHARS:
                return text * times
        raise _Refused("string operation")
    if isinstance(op, ast.Pow) and isinstance(left, int) and isinstance(right, int) and right > 0:
        if (left.bit_length() - 1) * right + 1 > MAX_INT_BITS:  # the result has at least this many bits
            raise _Refused("power too large")
    return _checked(_ARITHMETIC[type(op)](left, right))


def _checked(value):
    if isinstance(value, complex):  # (-8) ** 0.5
        raise _Refused("complex result")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Refused("integer too large")
    if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
        raise _Refused("string too long")
    return value


def _number(value) -> int | float:
    if isinstance(value, str):
        raise _Refused("expected a number")
    return value


def _string(value) -> str:
    if not isinstance(value, str):
        raise _Refused("expected a string")
    return value
