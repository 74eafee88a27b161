"""Restricted, exact evaluator for the expressions of GSM-Symbolic templates.

Template expressions (``#init`` domains, ``#conditions``, ``#answer`` and the ``{expr}``
placeholders of solutions) are Python-like. They are parsed with :mod:`ast` and compiled into
closures that only know literals, names bound in the environment, arithmetic / comparison /
boolean operators, chained comparisons, conditional expressions, subscripts and slices, list /
tuple literals, unary operators and calls to a fixed whitelist of helpers (plus ``np.arange``
and ``np.random.randint``, handled explicitly). Python's ``eval`` is never used; any other
construct raises :class:`~cca_fast.errors.TemplateError` naming the template, the line and the
construct.

Arithmetic is exact: numbers are ``int`` or :class:`fractions.Fraction` (float literals and
float ranges become exact decimals), so ``is_int(0.1 * 30)`` is true and solutions never show
``13.999999``. A :class:`Labelled` value (``("twice", 2)``) renders as its text in a question and
acts as its number in arithmetic and comparisons; ``v[0]`` / ``v[1]`` index it.

Every evaluation is bounded by :class:`EvalLimits` (operations, integer size, list and range
length, syntax-tree depth, ``round`` digits; set with :func:`eval_limits`): a runaway expression
is a :class:`~cca_fast.errors.TemplateError` naming the line, the limit and the fix, never a
``RecursionError`` / ``OverflowError`` or hours of work. The limits in force are per thread
(set for a block with :func:`eval_limits`, like ``decimal``'s local context).
"""
from __future__ import annotations

import ast
import math
import random
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, fields
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

from cca_fast.errors import TemplateError

Number = Union[int, Fraction]

#: Reserved environment key holding the ``random.Random`` used by ``shuffle_list`` and
#: ``np.random.randint`` (template names may not start with an underscore).
RNG_KEY = "__rng__"

#: Largest integer magnitude (in bits) an expression may produce (default of
#: :attr:`EvalLimits.max_int_bits`).
MAX_POW_BITS = 4096
#: Longest list an expression may build (``list(range(..))``, ``[..] * n``, ``np.arange``;
#: default of :attr:`EvalLimits.max_seq_len`).
MAX_LIST_LEN = 1_000_000


@dataclass(frozen=True)
class EvalLimits:
    """The cost budget of one evaluation of a template expression.

    Every limit turns a runaway expression (``round(x/3, 10**7)``, ``9**9**9``, a 20,000-term
    sum, ``range(2**100)``) into a :class:`~cca_fast.errors.TemplateError` naming the template,
    the line, the limit and how to raise it, instead of hours of work or a raw
    ``RecursionError`` / ``OverflowError``. The defaults leave every upstream GSM-Symbolic
    template far inside the budget.

    Attributes:
        max_ops: operations per evaluation (each arithmetic operation or comparison counts 1,
            building or scanning a list counts its length).
        max_int_bits: largest integer (numerator / denominator) a result may have, in bits.
        max_seq_len: longest list an expression may build or scan.
        max_range_len: longest ``range(..)`` / ``numbers_within(..)`` (ranges stay lazy).
        max_depth: deepest nesting of an expression's syntax tree (checked when compiling).
        max_round_digits: largest ``ndigits`` of ``round(x, ndigits)``.
    """

    max_ops: int = 2_000_000
    max_int_bits: int = MAX_POW_BITS
    max_seq_len: int = MAX_LIST_LEN
    max_range_len: int = 10**18
    max_depth: int = 200
    max_round_digits: int = 100

    def __post_init__(self) -> None:
        from cca_fast import checks

        for f in fields(self):
            checks.positive(f"EvalLimits.{f.name}", getattr(self, f.name), error=TemplateError)


class _State(threading.local):
    """The limits in force and the operations spent by the evaluation under way, per thread (like
    ``decimal``'s context: :func:`eval_limits` sets them for a block of one thread only)."""

    def __init__(self) -> None:
        self.limits = EvalLimits()
        self.ops = 0


_STATE = _State()


def current_limits() -> EvalLimits:
    """The :class:`EvalLimits` in force (see :func:`eval_limits`)."""
    return _STATE.limits


@contextmanager
def eval_limits(limits: EvalLimits | None) -> Iterator[EvalLimits]:
    """Evaluate (and compile) with ``limits`` inside the ``with`` block (``None``: unchanged)."""
    old = _STATE.limits
    _STATE.limits = limits or old
    try:
        yield _STATE.limits
    finally:
        _STATE.limits = old


class _BudgetExceeded(Exception):
    """Internal: an evaluation went over one of its :class:`EvalLimits`."""

    def __init__(self, what: str, limit: str) -> None:
        super().__init__(what)
        self.what = what
        self.limit = limit


def _over(what: str, limit: str) -> _BudgetExceeded:
    value = getattr(_STATE.limits, limit)
    return _BudgetExceeded(f"{what} is too large (limit {limit}={value})", limit)


def _charge(n: int = 1) -> None:
    """Spend ``n`` operations of the evaluation budget."""
    st = _STATE
    st.ops += n
    if st.ops > st.limits.max_ops:
        raise _BudgetExceeded(f"more than {st.limits.max_ops} operations in one evaluation "
                              f"(limit max_ops={st.limits.max_ops})", "max_ops")


def _check_len(n: int, what: str) -> None:
    if n > _STATE.limits.max_seq_len:
        raise _over(f"{what} of {n} items", "max_seq_len")
    _charge(n)


def _check_size(x: Any) -> Any:
    """``x`` unchanged, unless it is a number over ``max_int_bits``."""
    if isinstance(x, int):
        bits = x.bit_length() if x >= 0 else (-x).bit_length()
    elif isinstance(x, Fraction):
        bits = max(abs(x.numerator).bit_length(), x.denominator.bit_length())
    else:
        return x
    if bits > _STATE.limits.max_int_bits:
        raise _over(f"a number of {bits} bits", "max_int_bits")
    return x


@dataclass(frozen=True)
class Labelled:
    """A value with a display text, e.g. ``Labelled("twice", 2)`` or ``Labelled("1/2", 1/2)``.

    It renders as ``text`` in question text, acts as ``value`` in arithmetic and comparisons,
    and ``v[0]`` / ``v[1]`` give ``text`` / ``value`` (like the template tuple it came from).
    """

    text: str
    value: Any

    def __getitem__(self, i: int) -> Any:
        return (self.text, self.value)[i]


@dataclass(frozen=True)
class Draw:
    """A domain to draw from: the result of ``sample(seq)``, ``sample(seq, k)`` (k distinct
    items) or ``sample_sequential(seq, k)`` (k consecutive items from a random start).

    Only valid as the whole right-hand side of an ``#init`` line.
    """

    items: Sequence[Any]
    k: int | None = None
    sequential: bool = False


class _EvalFailure(Exception):
    """Internal: an arithmetic failure for these particular values (division by zero, ...).

    Conditions treat it as "not satisfied"; answers and solution text turn it into a
    :class:`TemplateError`.
    """


# ----------------------------------------------------------------------------- numbers


def normalize(x: Any) -> Any:
    """Fractions with denominator 1 become ints; bools become ints; other values unchanged."""
    if isinstance(x, Fraction) and x.denominator == 1:
        return int(x.numerator)
    if isinstance(x, bool):
        return int(x)
    return x


def unwrap(x: Any) -> Any:
    """The arithmetic value of ``x`` (a :class:`Labelled` gives its ``value``)."""
    while isinstance(x, Labelled):
        x = x.value
    return x


def exact(x: Any) -> Any:
    """Convert a Python float to the exact decimal it prints as; other values unchanged."""
    if isinstance(x, float):
        if not math.isfinite(x):
            raise _EvalFailure(f"non-finite number {x!r}")
        return normalize(Fraction(repr(x)))
    return x


def is_number(x: Any) -> bool:
    """True for int / Fraction (not bool, not str)."""
    return isinstance(x, (int, Fraction)) and not isinstance(x, bool)


def _num(x: Any, what: str) -> Number:
    x = exact(unwrap(x))
    if isinstance(x, bool):
        return int(x)
    if not is_number(x):
        raise TypeError(f"{what} needs a number, got {type(x).__name__} {x!r}")
    return x


def _int(x: Any, what: str) -> int:
    v = _num(x, what)
    if isinstance(v, Fraction):
        raise TypeError(f"{what} needs an integer, got {format_number(v)}")
    return v


def format_number(x: Any) -> str:
    """GSM8K-style text of a number: ints without ``.0``; terminating fractions as minimal
    decimals (``0.25``, ``12.48``); other fractions as ``p/q``; labelled values by number."""
    x = exact(unwrap(x))
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, Fraction):
        if x.denominator == 1:
            return str(x.numerator)
        d = x.denominator
        twos = fives = 0
        while d % 2 == 0:
            d //= 2
            twos += 1
        while d % 5 == 0:
            d //= 5
            fives += 1
        if d != 1:
            return f"{x.numerator}/{x.denominator}"
        places = max(twos, fives)
        scaled = abs(x) * 10**places
        digits = str(int(scaled)).rjust(places + 1, "0")
        sign = "-" if x < 0 else ""
        return f"{sign}{digits[:-places]}.{digits[-places:]}"
    return str(x)


def display_text(x: Any) -> str:
    """How a bound value appears in question text: labels as text, numbers GSM8K-style."""
    if isinstance(x, Labelled):
        return x.text
    if isinstance(x, str):
        return x
    if isinstance(x, (list, tuple)):
        return ", ".join(display_text(v) for v in x)
    return format_number(x)


_NUMERIC_TEXT = re.compile(r"^-?\d+(\.\d+)?(/\d+)?$")


def solution_text(x: Any) -> str:
    """How a value appears in solution text: numbers GSM8K-style; a labelled value shows its
    label only when the label is itself numeric (``"1/2"``, ``"0.25"``), else its number."""
    if isinstance(x, Labelled):
        return x.text if _NUMERIC_TEXT.match(x.text.strip()) else format_number(x.value)
    if isinstance(x, str):
        return x
    return format_number(x)


_UNITS = MappingProxyType({w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())})
_TENS = MappingProxyType({w: 10 * (i + 2) for i, w in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split())})
_ORDINALS = MappingProxyType({
    "half": 2, "halves": 2, "third": 3, "quarter": 4, "fourth": 4, "fifth": 5, "sixth": 6,
    "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10, "twelfth": 12, "sixteenth": 16,
    "twentieth": 20, "hundredth": 100})
_MULTIPLIERS = MappingProxyType({"once": 1, "twice": 2, "double": 2, "thrice": 3, "triple": 3,
                                 "quadruple": 4})


def _word_int(text: str) -> int | None:
    t = text.strip().lower().replace("-", " ")
    if t in ("a", "an"):
        return 1
    if re.fullmatch(r"\d+", t):
        return int(t)
    parts = t.split()
    if not parts:
        return None
    if len(parts) == 1:
        if parts[0] in _UNITS:
            return _UNITS[parts[0]]
        return _TENS.get(parts[0])
    if len(parts) == 2 and parts[0] in _TENS and parts[1] in _UNITS and 0 < _UNITS[parts[1]] < 10:
        return _TENS[parts[0]] + _UNITS[parts[1]]
    if len(parts) == 2 and parts[1] == "hundred":
        head = _word_int(parts[0])
        return None if head is None else head * 100
    return None


def parse_number_text(text: str) -> Number | None:
    """Read a number written as text: ``"42"``, ``"1,200"``, ``"0.25"``, ``"1/2"``,
    ``"forty-two"``, ``"half"``, ``"two-thirds"``, ``"a quarter"``, ``"twice"``,
    ``"three times"``. Returns ``None`` when the text is not a number."""
    t = text.strip().lower().rstrip(".")
    if not t:
        return None
    plain = t.replace(",", "")
    if re.fullmatch(r"-?\d+", plain):
        return int(plain)
    if re.fullmatch(r"-?\d*\.\d+", plain):
        return normalize(Fraction(plain))
    m = re.fullmatch(r"(-?\d+)\s*/\s*(\d+)", plain)
    if m and int(m.group(2)) != 0:
        return normalize(Fraction(int(m.group(1)), int(m.group(2))))
    if t in _MULTIPLIERS:
        return _MULTIPLIERS[t]
    m = re.fullmatch(r"(.+?)\s+times", t)
    if m:
        return parse_number_text(m.group(1))
    if t in ("half", "a half", "one half", "one-half"):
        return Fraction(1, 2)
    words = t.replace("-", " ").split()
    if len(words) >= 2:
        last = words[-1]
        singular = last[:-1] if last.endswith("s") and last[:-1] in _ORDINALS else last
        if singular in _ORDINALS:
            num = _word_int(" ".join(words[:-1]))
            if num is not None:
                return normalize(Fraction(num, _ORDINALS[singular]))
    return _word_int(t)


# ----------------------------------------------------------------------------- helpers


def _np_arange(*args: Any) -> list[Number]:
    vals = [_num(a, "np.arange") for a in args]
    if len(vals) == 1:
        start, stop, step = 0, vals[0], 1
    elif len(vals) == 2:
        start, stop, step = vals[0], vals[1], 1
    elif len(vals) == 3:
        start, stop, step = vals
    else:
        raise TypeError("np.arange takes 1 to 3 arguments")
    if step == 0:
        raise TypeError("np.arange step must not be 0")
    count = max(0, math.ceil(Fraction(stop - start) / step))
    _check_len(count, "np.arange")
    return [normalize(Fraction(start) + i * Fraction(step)) for i in range(count)]


def _frange(start: Any, stop: Any, step: Any = 1) -> list[Number]:
    return _np_arange(start, stop, step)


def _range_len(r: range, what: str) -> range:
    try:
        n = len(r)
    except OverflowError:  # more items than sys.maxsize
        n = (abs(r.stop - r.start) + abs(r.step) - 1) // abs(r.step)
    if n > _STATE.limits.max_range_len:
        raise _over(f"{what} of {n} items", "max_range_len")
    return r


def _range(*args: Any) -> range:
    if not 1 <= len(args) <= 3:
        raise TypeError("range takes 1 to 3 arguments")
    vals = [_int(a, "range") for a in args]
    if len(vals) == 3 and vals[2] == 0:
        raise TypeError("range() step must not be 0")
    return _range_len(range(*vals), "range()")


def _numbers_within(lo: Any, hi: Any) -> range:
    """Integers from ``lo`` to ``hi``, both included."""
    return _range_len(range(_int(lo, "numbers_within"), _int(hi, "numbers_within") + 1),
                      "numbers_within()")


def _seq(x: Any, what: str) -> Sequence[Any]:
    if isinstance(x, (list, tuple, range, str)):
        return x
    raise TypeError(f"{what} needs a list, got {type(x).__name__}")


def _bounded(x: Any, what: str) -> Sequence[Any]:
    """A sequence short enough to iterate (``sum(range(10**12))`` is refused, not run)."""
    items = _seq(x, what)
    _check_len(len(items), f"{what}() over a list")
    return items


def _sample(seq: Any, k: Any = None) -> Draw:
    items = _seq(seq, "sample")
    if len(items) == 0:
        raise TypeError("sample() of an empty list")
    if k is None:
        return Draw(items)
    k = _int(k, "sample")
    if not 1 <= k <= len(items):
        raise TypeError(f"sample(seq, {k}) needs 1 <= k <= len(seq) = {len(items)}")
    return Draw(items, k)


def _sample_sequential(seq: Any, k: Any) -> Draw:
    items = _seq(seq, "sample_sequential")
    k = _int(k, "sample_sequential")
    if not 1 <= k <= len(items):
        raise TypeError(f"sample_sequential(seq, {k}) needs 1 <= k <= len(seq) = {len(items)}")
    return Draw(items, k, sequential=True)


def _list(x: Any = ()) -> list[Any]:
    return list(_bounded(x, "list"))


def _text_as_number(x: Any, fn: str) -> Any:
    """``x`` unwrapped; numeric text parsed (``fn`` names the builtin in the error)."""
    x = exact(unwrap(x))
    if isinstance(x, str):
        v = parse_number_text(x)
        if v is None:
            raise TypeError(f"{fn}() of non-numeric text {x!r}")
        x = v
    return x


def _to_int(x: Any) -> int:
    return int(_num(_text_as_number(x, "int"), "int"))


def _round(x: Any, ndigits: Any = None) -> Number:
    v = _num(x, "round")
    if ndigits is None:
        return int(round(v))
    nd = _int(ndigits, "round")
    if abs(nd) > _STATE.limits.max_round_digits:
        raise _over(f"round(x, {nd}): ndigits", "max_round_digits")
    return normalize(Fraction(round(Fraction(v), nd)))


def _is_int(x: Any) -> bool:
    v = _num(x, "is_int")
    return isinstance(v, int) or v.denominator == 1


def _divides(a: Any, b: Any) -> bool:
    """True when ``a`` is divisible by ``b`` (``a % b == 0``); false when ``b`` is 0."""
    a, b = _num(a, "divides"), _num(b, "divides")
    return b != 0 and a % b == 0


def _fraction(a: Any, b: Any = None) -> Number:
    a = _num(_text_as_number(a, "Fraction"), "Fraction")
    if b is None:
        return normalize(Fraction(a))
    b = _num(b, "Fraction")
    if b == 0:
        raise _EvalFailure("Fraction(a, 0): division by zero")
    return normalize(Fraction(a) / Fraction(b))


def _fix_floats(seq: Any) -> list[Number]:
    return [normalize(Fraction(round(Fraction(_num(v, "fix_floats")), 2))) for v in _bounded(seq, "fix_floats")]


def _format_frac(x: Any) -> str:
    """``Fraction(25, 2)`` -> ``"12 1/2"``; integral values as ints; proper fractions ``p/q``."""
    v = _num(x, "format_frac")
    if isinstance(v, int):
        return str(v)
    whole = int(v)
    rest = abs(v - whole)
    if whole == 0:
        return f"{v.numerator}/{v.denominator}"
    return f"{whole} {rest.numerator}/{rest.denominator}"


def _float(x: Any) -> Number:
    return _num(x, "float")


def _abs(x: Any) -> Number:
    return abs(_num(x, "abs"))


def _minmax(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        vals = list(_bounded(args[0], name)) if len(args) == 1 else list(args)
        if not vals:
            raise TypeError(f"{name}() of nothing")
        return fn(vals, key=lambda v: _num(v, name))
    return run


def _sum(seq: Any) -> Number:
    return normalize(sum((Fraction(_num(v, "sum")) for v in _bounded(seq, "sum")), Fraction(0)))


def _len(seq: Any) -> int:
    return len(_seq(seq, "len"))


def _shuffle_list(rng: random.Random, seq: Any) -> list[Any]:
    items = _list(seq)
    rng.shuffle(items)
    return items


def _np_randint(rng: random.Random, lo: Any, hi: Any = None, size: Any = None) -> Any:
    lo = _int(lo, "np.random.randint")
    if hi is None:
        lo, hi = 0, lo
    hi = _int(hi, "np.random.randint")
    if hi <= lo:
        raise TypeError(f"np.random.randint({lo}, {hi}): high must exceed low")
    if size is None:
        return rng.randrange(lo, hi)
    size = _int(size, "np.random.randint")
    if size < 0:
        raise TypeError(f"np.random.randint size {size} out of range")
    _check_len(size, "np.random.randint(.., size)")
    return [rng.randrange(lo, hi) for _ in range(size)]


@dataclass(frozen=True)
class _Helper:
    fn: Callable[..., Any]
    needs_rng: bool = False
    init_only: bool = False  # only meaningful on the right-hand side of an #init line


#: The whitelist of callable helpers, by the name templates call them with.
HELPERS: Mapping[str, _Helper] = MappingProxyType({
    "range": _Helper(_range),
    "sample": _Helper(_sample, init_only=True),
    "sample_sequential": _Helper(_sample_sequential, init_only=True),
    "numbers_within": _Helper(_numbers_within),
    "frange": _Helper(_frange),
    "list": _Helper(_list),
    "int": _Helper(_to_int),
    "float": _Helper(_float),
    "round": _Helper(_round),
    "abs": _Helper(_abs),
    "min": _Helper(_minmax(min, "min")),
    "max": _Helper(_minmax(max, "max")),
    "sum": _Helper(_sum),
    "len": _Helper(_len),
    "is_int": _Helper(_is_int),
    "divides": _Helper(_divides),
    "Fraction": _Helper(_fraction),
    "fix_floats": _Helper(_fix_floats),
    "format_frac": _Helper(_format_frac),
    "shuffle_list": _Helper(_shuffle_list, needs_rng=True),
    "np.arange": _Helper(_np_arange),
    "np.random.randint": _Helper(_np_randint, needs_rng=True),
})


# ----------------------------------------------------------------------------- operators


def _arith(op: type, a: Any, b: Any) -> Any:
    _charge()
    return _check_size(_arith_raw(op, a, b))


def _arith_raw(op: type, a: Any, b: Any) -> Any:
    a, b = exact(unwrap(a)), exact(unwrap(b))
    if isinstance(a, bool):
        a = int(a)
    if isinstance(b, bool):
        b = int(b)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return _seq_arith(op, a, b)
    if isinstance(a, range) or isinstance(b, range):
        raise TypeError("arithmetic on range(); wrap it in list(...)")
    if isinstance(a, str) or isinstance(b, str):
        raise TypeError(f"arithmetic on text ({type(a).__name__} {op.__name__} "
                        f"{type(b).__name__}); template expressions compute with numbers only")
    if not (is_number(a) and is_number(b)):
        raise TypeError(f"arithmetic between {type(a).__name__} and {type(b).__name__}")
    if op is ast.Add:
        return normalize(a + b)
    if op is ast.Sub:
        return normalize(a - b)
    if op is ast.Mult:
        return normalize(a * b)
    if op in (ast.Div, ast.FloorDiv, ast.Mod):
        if b == 0:
            raise _EvalFailure("division by zero")
        if op is ast.Div:
            return normalize(Fraction(a) / b)
        if op is ast.FloorDiv:
            return normalize(a // b)
        return normalize(a % b)
    if op is ast.Pow:
        return _pow(a, b)
    raise TypeError(f"operator {op.__name__}")


def _pow(a: Number, b: Number) -> Number:
    if isinstance(b, Fraction):
        raise TypeError(f"non-integer exponent {format_number(b)} is not supported")
    if a == 0 and b < 0:
        raise _EvalFailure("0 to a negative power")
    base_bits = max(abs(a.numerator).bit_length(), abs(a.denominator).bit_length()) if isinstance(
        a, Fraction) else abs(a).bit_length()
    limit = _STATE.limits.max_int_bits
    if abs(b) > limit or base_bits * abs(b) > limit:
        raise _over(f"{_short(a)} ** {_short(b)} (over {limit} bits)", "max_int_bits")
    return normalize(Fraction(a) ** b if (b < 0 or isinstance(a, Fraction)) else a**b)


def _short(x: Any) -> str:
    x = unwrap(x)
    if isinstance(x, int) and abs(x).bit_length() > 64:
        return f"<a {abs(x).bit_length()}-bit number>"
    return format_number(x)


def _seq_arith(op: type, a: Any, b: Any) -> Any:
    if op is ast.Add and isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        out = list(a) + list(b)
    elif op is ast.Mult and isinstance(a, (list, tuple)) and is_number(b):
        out = _repeat(a, b)
    elif op is ast.Mult and isinstance(b, (list, tuple)) and is_number(a):
        out = _repeat(b, a)
    else:
        raise TypeError(f"unsupported list arithmetic ({op.__name__})")
    _check_len(len(out), "a list")
    return out


def _repeat(seq: Sequence[Any], n: Number) -> list[Any]:
    if isinstance(n, Fraction):
        raise TypeError("list * non-integer")
    _check_len(len(seq) * max(n, 0), "a list")
    return list(seq) * n


def _cmp_value(x: Any) -> Any:
    x = exact(unwrap(x))
    return int(x) if isinstance(x, bool) else x


_CMP: Mapping[type, Callable[[Any, Any], bool]] = MappingProxyType({
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
})


def _compare(op: type, a: Any, b: Any) -> bool:
    _charge()
    if op in (ast.In, ast.NotIn):
        if isinstance(b, (str, range)):
            return _CMP[op](_cmp_value(a), b)
        return _CMP[op](_cmp_value(a), [_cmp_value(v) for v in _bounded(b, "in")])
    a, b = _cmp_value(a), _cmp_value(b)
    if op not in (ast.Eq, ast.NotEq) and not (is_number(a) and is_number(b)) and not (
            isinstance(a, str) and isinstance(b, str)):
        raise TypeError(f"cannot order {type(a).__name__} and {type(b).__name__}")
    return _CMP[op](a, b)


def _subscript(value: Any, index: Any) -> Any:
    if isinstance(index, slice):
        if isinstance(value, Labelled):
            return (value.text, value.value)[index]
        return list(_seq(value, "slice"))[index] if not isinstance(value, str) else value[index]
    i = _int(index, "index")
    try:
        if isinstance(value, (Labelled, list, tuple, range, str)):
            return value[i]
    except IndexError:
        n = 2 if isinstance(value, Labelled) else len(value)
        raise _EvalFailure(f"index {i} out of range (the list has {n} items)") from None
    raise TypeError(f"cannot index {type(value).__name__}")


# ----------------------------------------------------------------------------- compiler

Env = Mapping[str, Any]
Compiled = Callable[[Env], Any]


@dataclass(frozen=True)
class Expression:
    """A compiled template expression.

    Attributes:
        source: the expression text.
        where: location used in error messages, e.g. ``"template 0042, line 9 (#answer)"``.
        names: the free names it reads (variables and pools), in first-use order.
    """

    source: str
    where: str
    names: tuple[str, ...]
    _fn: Compiled

    def __call__(self, env: Env) -> Any:
        """Evaluate; errors become :class:`TemplateError` (``_EvalFailure`` passes through)."""
        _STATE.ops = 0
        try:
            return self._fn(env)
        except (_EvalFailure, TemplateError):
            raise
        except _BudgetExceeded as e:
            raise TemplateError(
                f"{self.where}: `{_clip(self.source)}` exceeds the evaluation budget: {e.what}. "
                f"Fix: use smaller numbers or a simpler expression in the template, or raise the "
                f"limit (InstantiateConfig(limits=EvalLimits({e.limit}=...)))") from None
        except RecursionError:
            raise TemplateError(f"{self.where}: `{_clip(self.source)}` nests too deeply to "
                                "evaluate; split it into several #init lines") from None
        except MemoryError:
            raise TemplateError(f"{self.where}: `{_clip(self.source)}` needs too much memory; "
                                "use smaller numbers or shorter lists") from None
        except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:
            raise TemplateError(f"{self.where}: cannot evaluate `{_clip(self.source)}`: {e}") from None

    def evaluate(self, env: Env) -> Any:
        """Evaluate; any failure (including division by zero) is a :class:`TemplateError`."""
        try:
            return self(env)
        except _EvalFailure as e:
            raise TemplateError(f"{self.where}: cannot evaluate `{_clip(self.source)}`: {e}") from None

    def holds(self, env: Env) -> bool:
        """Evaluate as a condition: truthiness; arithmetic failures count as false."""
        try:
            return bool(unwrap(self(env)))
        except _EvalFailure:
            return False


def _clip(source: str, n: int = 120) -> str:
    return source if len(source) <= n else source[: n - 20] + " ... " + source[-15:]


def _depth(tree: ast.AST, limit: int) -> int:
    """Nesting depth of ``tree`` (iterative: safe on any depth); stops once over ``limit``."""
    deepest = 0
    stack = [(tree, 1)]
    while stack:
        node, d = stack.pop()
        if d > deepest:
            deepest = d
            if d > limit:
                return d
        stack.extend((child, d + 1) for child in ast.iter_child_nodes(node))
    return deepest


class _Compiler:
    """Turns an :mod:`ast` tree into nested closures, rejecting anything not whitelisted."""

    def __init__(self, source: str, where: str, allow_init: bool) -> None:
        self.source = source
        self.where = where
        self.allow_init = allow_init
        self.names: list[str] = []

    def fail(self, what: str) -> TemplateError:
        return TemplateError(f"{self.where}: {what} is not allowed in template expressions: "
                             f"`{self.source}`")

    def compile(self, node: ast.AST) -> Compiled:
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:
            raise self.fail(_describe(node))
        return method(node)

    def _Expression(self, node: ast.Expression) -> Compiled:
        return self.compile(node.body)

    def _Constant(self, node: ast.Constant) -> Compiled:
        v = node.value
        if isinstance(v, bool) or isinstance(v, (int, str)):
            value = v
        elif isinstance(v, float):
            value = exact(v)
        else:
            raise self.fail(f"the constant {v!r}")
        return lambda env: value

    def _Name(self, node: ast.Name) -> Compiled:
        name = node.id
        if name.startswith("_"):
            raise self.fail(f"the name '{name}' (names may not start with '_')")
        if name in ("True", "False"):
            value = name == "True"
            return lambda env: value
        if name in HELPERS:
            raise self.fail(f"using the function '{name}' as a value")
        if name not in self.names:
            self.names.append(name)
        where, source = self.where, self.source

        def lookup(env: Env) -> Any:
            try:
                return env[name]
            except KeyError:
                raise TemplateError(f"{where}: undefined variable '{name}' in `{source}`") from None
        return lookup

    def _List(self, node: ast.List) -> Compiled:
        parts = [self.compile(e) for e in node.elts]
        return lambda env: [p(env) for p in parts]

    def _Tuple(self, node: ast.Tuple) -> Compiled:
        parts = [self.compile(e) for e in node.elts]
        return lambda env: tuple(p(env) for p in parts)

    def _BinOp(self, node: ast.BinOp) -> Compiled:
        op = type(node.op)
        if op not in (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow):
            raise self.fail(f"the operator {op.__name__}")
        left, right = self.compile(node.left), self.compile(node.right)
        return lambda env: _arith(op, left(env), right(env))

    def _UnaryOp(self, node: ast.UnaryOp) -> Compiled:
        operand = self.compile(node.operand)
        op = type(node.op)
        if op is ast.Not:
            return lambda env: not unwrap(operand(env))
        if op is ast.USub:
            return lambda env: normalize(-_num(operand(env), "unary -"))
        if op is ast.UAdd:
            return lambda env: _num(operand(env), "unary +")
        raise self.fail(f"the operator {op.__name__}")

    def _BoolOp(self, node: ast.BoolOp) -> Compiled:
        parts = [self.compile(v) for v in node.values]
        if isinstance(node.op, ast.And):
            def run_and(env: Env) -> Any:
                result: Any = True
                for p in parts:
                    result = p(env)
                    if not unwrap(result):
                        return result
                return result
            return run_and

        def run_or(env: Env) -> Any:
            result: Any = False
            for p in parts:
                result = p(env)
                if unwrap(result):
                    return result
            return result
        return run_or

    def _Compare(self, node: ast.Compare) -> Compiled:
        ops = [type(o) for o in node.ops]
        for op in ops:
            if op not in _CMP:
                raise self.fail(f"the comparison {op.__name__}")
        first = self.compile(node.left)
        rest = [self.compile(c) for c in node.comparators]

        def run(env: Env) -> bool:
            a = first(env)
            for op, c in zip(ops, rest):
                b = c(env)
                if not _compare(op, a, b):
                    return False
                a = b
            return True
        return run

    def _IfExp(self, node: ast.IfExp) -> Compiled:
        test, body, orelse = self.compile(node.test), self.compile(node.body), self.compile(node.orelse)
        return lambda env: body(env) if unwrap(test(env)) else orelse(env)

    def _Subscript(self, node: ast.Subscript) -> Compiled:
        value = self.compile(node.value)
        sl = node.slice
        if isinstance(sl, ast.Slice):
            if sl.step is not None:
                raise self.fail("a slice with a step")
            lo = self.compile(sl.lower) if sl.lower is not None else None
            hi = self.compile(sl.upper) if sl.upper is not None else None

            def run_slice(env: Env) -> Any:
                a = _int(lo(env), "slice") if lo else None
                b = _int(hi(env), "slice") if hi else None
                return _subscript(value(env), slice(a, b))
            return run_slice
        index = self.compile(sl)
        return lambda env: _subscript(value(env), index(env))

    def _Call(self, node: ast.Call) -> Compiled:
        name = _call_name(node.func)
        if name is None:
            raise self.fail(f"calling {_describe(node.func)}")
        helper = HELPERS.get(name)
        if helper is None:
            raise self.fail(f"the unknown function '{name}'")
        if helper.init_only and not self.allow_init:
            raise self.fail(f"'{name}' outside the right-hand side of an #init line")
        if node.keywords:
            raise self.fail(f"keyword arguments in a call to '{name}'")
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise self.fail(f"*-arguments in a call to '{name}'")
        args = [self.compile(a) for a in node.args]
        fn = helper.fn
        if helper.needs_rng:
            where = self.where

            def run_rng(env: Env) -> Any:
                rng = env.get(RNG_KEY)
                if rng is None:
                    raise TemplateError(f"{where}: '{name}' needs a random generator here")
                return fn(rng, *[a(env) for a in args])
            return run_rng
        return lambda env: fn(*[a(env) for a in args])


def _call_name(func: ast.AST) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name) and func.id == "np":
        return ".".join(["np", *reversed(parts)])
    return None


def _describe(node: ast.AST) -> str:
    kinds = {
        "Attribute": "attribute access", "Lambda": "a lambda", "ListComp": "a comprehension",
        "SetComp": "a comprehension", "DictComp": "a comprehension",
        "GeneratorExp": "a generator expression", "Dict": "a dict literal", "Set": "a set literal",
        "NamedExpr": "an assignment expression", "Await": "await", "Yield": "yield",
        "JoinedStr": "an f-string", "Starred": "a starred expression",
    }
    name = type(node).__name__
    if isinstance(node, ast.Attribute):
        return f"attribute access '.{node.attr}'"
    return kinds.get(name, f"the construct {name}")


def strip_markers(source: str) -> str:
    """Remove the ``$`` that marks numeric variables (``$ans`` -> ``ans``) outside strings."""
    out: list[str] = []
    quote: str | None = None
    for i, ch in enumerate(source):
        if quote:
            out.append(ch)
            if ch == quote and source[i - 1] != "\\":
                quote = None
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "$" and i + 1 < len(source) and (source[i + 1].isalpha() or source[i + 1] == "_"):
            continue
        else:
            out.append(ch)
    return "".join(out)


def compile_expression(source: str, where: str, *, allow_init: bool = False,
                       known_names: Iterable[str] | None = None) -> Expression:
    """Compile a template expression.

    Args:
        source: the expression (``$`` markers are removed first).
        where: location for error messages, e.g. ``"template 0042, line 9 (#answer)"``.
        allow_init: allow ``sample`` / ``sample_sequential`` (``#init`` right-hand sides only).
        known_names: if given, every free name must be one of these, else
            ``TemplateError("template 0042, ...: undefined variable 'q' ...")``.

    Raises:
        TemplateError: syntax errors and any construct outside the whitelist.
    """
    text = strip_markers(source).strip()
    if not text:
        raise TemplateError(f"{where}: empty expression")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        if "too many nested" in str(e.msg) or "too complex" in str(e.msg):
            raise TemplateError(f"{where}: `{_clip(text)}` nests too deeply to parse ({e.msg}); "
                                "split it into several #init lines") from None
        raise TemplateError(f"{where}: cannot parse `{_clip(text)}`: {e.msg}") from None
    except (RecursionError, MemoryError):
        raise TemplateError(f"{where}: `{_clip(text)}` nests too deeply to parse (a chain such "
                            "as a+b+c+... or - - - x nests one level per term). Fix: write long "
                            "sums as sum([a, b, c, ...]) or split the expression into several "
                            "#init lines") from None
    limit = _STATE.limits.max_depth
    depth = _depth(tree, limit)
    if depth > limit:
        raise TemplateError(
            f"{where}: `{_clip(text)}` nests more than {limit} levels deep (limit "
            f"max_depth={limit}; a long chain such as a+b+c+... or - - - x nests one level per "
            "term). Fix: write long sums as sum([a, b, c, ...]), split the expression into several "
            "#init lines, or raise the limit (InstantiateConfig(limits=EvalLimits(max_depth=...)))")
    compiler = _Compiler(text, where, allow_init)
    try:
        fn = compiler.compile(tree)
    except RecursionError:
        raise TemplateError(f"{where}: `{_clip(text)}` nests too deeply to compile; lower "
                            "EvalLimits.max_depth or split the expression") from None
    if known_names is not None:
        known = set(known_names)
        for name in compiler.names:
            if name not in known:
                raise TemplateError(f"{where}: undefined variable '{name}' in `{text}`")
    return Expression(text, where, tuple(compiler.names), fn)


def labelled_item(x: Any) -> Any:
    """A domain item as bound to a variable: a ``(label, number)`` pair becomes
    :class:`Labelled`; floats become exact; other values unchanged."""
    if isinstance(x, tuple) and len(x) == 2 and is_number(exact(unwrap(x[1]))) and isinstance(
            x[0], (str, int, Fraction, float)):
        label = x[0] if isinstance(x[0], str) else format_number(x[0])
        return Labelled(label, exact(unwrap(x[1])))
    return exact(x)
