"""The restricted evaluator: exact arithmetic, whitelist enforcement, helpers, formatting."""
from __future__ import annotations

import random
from fractions import Fraction

import pytest

from cca_fast.data.safe_eval import (Draw, Labelled, RNG_KEY, compile_expression, format_number,
                                     parse_number_text, solution_text, strip_markers)
from cca_fast.errors import TemplateError

WHERE = "template 0042, line 9 (#answer)"


def ev(src: str, **env):
    return compile_expression(src, WHERE).evaluate(env)


def _random_expr(rng: random.Random, depth: int) -> tuple[str, Fraction]:
    """A random arithmetic expression and its exact value computed independently with
    Fractions (so the compiler's parsing, precedence and wiring are checked, not re-used)."""
    if depth == 0 or rng.random() < 0.25:
        v = rng.randint(-20, 20)
        return (f"({v})" if v < 0 else str(v)), Fraction(v)
    op = rng.choice(["+", "-", "*", "/", "//", "%"])
    (ls, lv), (rs, rv) = _random_expr(rng, depth - 1), _random_expr(rng, depth - 1)
    if op in ("/", "//", "%") and rv == 0:
        op = "+"
    lv, rv = Fraction(lv), Fraction(rv)
    value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else 0,
             "//": lv // rv if rv else 0, "%": lv % rv if rv else 0}[op]
    return f"({ls} {op} {rs})", Fraction(value)


def test_random_arithmetic_is_exact():
    rng = random.Random(1234)
    for _ in range(400):
        src, expected = _random_expr(rng, 4)
        got = ev(src)
        assert Fraction(got) == expected, src
        # integral results come back as int, never Fraction(k, 1)
        assert isinstance(got, int) == (expected.denominator == 1), src


def test_float_literals_are_exact_decimals():
    assert ev("0.1 * 3 == 0.3") is True
    assert ev("is_int(12.48 - 16 * 0.03)") is True
    assert ev("1.01 * 100") == 101
    assert ev("int(0.29 * 100)") == 29  # float math would give 28


def test_chained_comparison_boolean_ops_and_ifexp():
    assert ev("a < b < c", a=1, b=2, c=3) is True
    assert ev("a < b < c", a=1, b=5, c=3) is False
    assert ev("not divides(t, 5) and t > 3", t=7) is True
    assert ev("x if x > 0 else -x", x=-4) == 4
    assert ev("7 if p == 'week' else 30", p="month") == 30
    assert ev("a or b", a=0, b=9) == 9


def test_helpers():
    assert ev("divides(12, 4)") and not ev("divides(4, 12)") and not ev("divides(3, 0)")
    assert ev("divides(60, Fraction(4, 5))")  # 60 / (4/5) = 75
    assert ev("is_int(7 / 2)") is False and ev("is_int(8 / 2)") is True
    assert ev("Fraction('1/2') + Fraction(1, 3)") == Fraction(5, 6)
    assert ev("round(2.5)") == 2 and ev("round(3.5)") == 4  # Python's round-half-even
    assert ev("round(2.675, 2)") == Fraction(268, 100)  # exact 2.675 (a float would give 2.67)
    assert ev("numbers_within(2, 5)") == range(2, 6)  # both ends included
    assert ev("np.arange(0.25, 1, 0.25)") == [Fraction(1, 4), Fraction(1, 2), Fraction(3, 4)]
    assert ev("frange(1, 2, 0.5)") == [1, Fraction(3, 2)]
    assert ev("fix_floats(np.arange(1.26, 2, 0.33))") == [Fraction(126, 100), Fraction(159, 100), Fraction(192, 100)]
    assert ev("list(range(2, 4)) * 2") == [2, 3, 2, 3]
    assert ev("[1, 2] + [3]") == [1, 2, 3]
    assert ev("xs[:2]", xs=[5, 6, 7]) == [5, 6]
    assert ev("d[0]", d="Wednesday") == "W"
    assert ev("format_frac(Fraction(25, 2))") == "12 1/2"
    assert ev("max(3, 9, 4) - min([3, 9, 4])") == 6


def test_labelled_values_act_as_numbers():
    twice = Labelled("twice", 2)
    assert ev("n * m", n=7, m=twice) == 14
    assert ev("m > 1", m=twice) is True
    assert ev("m[0]", m=twice) == "twice" and ev("m[1]", m=twice) == 2
    assert ev("int(b)", b=Labelled("20", 20)) == 20
    assert ev("Fraction(f)", f=Labelled("half", Fraction(1, 2))) == Fraction(1, 2)
    assert solution_text(twice) == "2"
    assert solution_text(Labelled("1/2", Fraction(1, 2))) == "1/2"


def test_rng_helpers_are_seeded_from_env():
    def draw(seed: int):
        env = {RNG_KEY: random.Random(seed)}
        return (compile_expression("np.random.randint(10, 20, 5)", WHERE).evaluate(env),
                compile_expression("shuffle_list([1, 2, 3, 4, 5, 6])", WHERE).evaluate(env))
    a, b = draw(3), draw(3)
    assert a == b
    assert all(10 <= v < 20 for v in a[0]) and len(a[0]) == 5
    assert sorted(a[1]) == [1, 2, 3, 4, 5, 6]
    assert draw(3) != draw(4)


def test_sample_only_in_init():
    d = compile_expression("sample([1, 2, 3], 2)", WHERE, allow_init=True).evaluate({})
    assert isinstance(d, Draw) and d.k == 2 and list(d.items) == [1, 2, 3]
    with pytest.raises(TemplateError, match="outside the right-hand side of an #init"):
        compile_expression("sample([1, 2])", WHERE)
    with pytest.raises(TemplateError, match="1 <= k <= len"):
        compile_expression("sample([1, 2], 3)", WHERE, allow_init=True).evaluate({})


@pytest.mark.parametrize("src, what", [
    ("x.__class__", "attribute access '.__class__'"),
    ("(1).real", "attribute access '.real'"),
    ("(lambda: 1)()", "calling a lambda"),
    ("[v for v in xs]", "a comprehension"),
    ("__import__('os')", "the unknown function '__import__'"),
    ("__builtins__", "the name '__builtins__'"),
    ("open('f')", "the unknown function 'open'"),
    ("eval('1')", "the unknown function 'eval'"),
    ("np.linalg.inv(x)", "the unknown function 'np.linalg.inv'"),
    ("{1: 2}", "a dict literal"),
    ("f'{x}'", "an f-string"),
    ("round(x, ndigits=2)", "keyword arguments"),
    ("x is None", "the comparison Is"),
    ("x @ y", "the operator MatMult"),
    ("range", "using the function 'range' as a value"),
])
def test_forbidden_constructs_name_template_line_and_construct(src, what):
    with pytest.raises(TemplateError) as e:
        compile_expression(src, WHERE).evaluate({"x": 1, "xs": [1], "y": 2})
    msg = str(e.value)
    assert msg.startswith(WHERE) and what in msg, msg


def test_undefined_variable_message():
    with pytest.raises(TemplateError, match=r"template 0042, line 9 \(#answer\): undefined variable 'q'"):
        compile_expression("p + q", WHERE, known_names={"p"})
    with pytest.raises(TemplateError, match="undefined variable 'q'"):
        compile_expression("p + q", WHERE).evaluate({"p": 1})


def test_huge_numbers_are_refused():
    with pytest.raises(TemplateError, match="too large"):
        ev("9 ** 99999")
    with pytest.raises(TemplateError, match="too large"):
        ev("(10 ** 1000) ** 10")
    assert ev("2 ** 10") == 1024 and ev("2 ** -2") == Fraction(1, 4)
    with pytest.raises(TemplateError, match="limit"):
        ev("[1] * 10000000")
    for src in ["sum(range(10 ** 12))", "max(numbers_within(1, 10 ** 9))", "list(range(10 ** 8))",
                "fix_floats(range(10 ** 9))", "len(range(10 ** 30))"]:
        with pytest.raises(TemplateError, match="limit|too large|cannot evaluate"):
            ev(src)
    assert ev("5 in range(10 ** 15)") is True and ev("'b' in 'abc'") is True
    with pytest.raises(TemplateError, match="division by zero"):
        ev("1 / (x - x)", x=3)


def test_syntax_error_is_template_error():
    with pytest.raises(TemplateError, match="cannot parse"):
        compile_expression("a +* b", WHERE)


def test_conditions_treat_arithmetic_failure_as_false():
    cond = compile_expression("is_int(y / d)", WHERE)
    assert cond.holds({"y": 6, "d": 3}) and not cond.holds({"y": 6, "d": 0})


def test_strip_markers_keeps_strings():
    assert strip_markers("$ans + $b_2") == "ans + b_2"
    assert strip_markers("x == '$y'") == "x == '$y'"


@pytest.mark.parametrize("value, text", [
    (5, "5"), (Fraction(10, 2), "5"), (Fraction(1, 4), "0.25"), (Fraction(1248, 100), "12.48"),
    (Fraction(-3, 20), "-0.15"), (Fraction(1, 3), "1/3"), (Fraction(7, 6), "7/6"),
    (Labelled("twice", 2), "2"), (0.1, "0.1"), (2.0, "2"),
])
def test_format_number(value, text):
    assert format_number(value) == text


@pytest.mark.parametrize("text, value", [
    ("42", 42), ("1,200", 1200), ("0.25", Fraction(1, 4)), ("1/16", Fraction(1, 16)),
    ("forty-two", 42), ("twenty", 20), ("one", 1), ("half", Fraction(1, 2)),
    ("two-thirds", Fraction(2, 3)), ("three quarters", Fraction(3, 4)), ("a third", Fraction(1, 3)),
    ("one-fifth", Fraction(1, 5)), ("three-fifths", Fraction(3, 5)), ("twice", 2), ("triple", 3),
    ("three times", 3), ("four", 4), ("Benny", None), ("an hour", None), ("", None),
])
def test_parse_number_text(text, value):
    assert parse_number_text(text) == value
