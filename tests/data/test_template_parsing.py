"""Template parsing on small hand-written templates: syntax variants and error messages."""
from __future__ import annotations

from fractions import Fraction

import pytest

from cca_fast.data.safe_eval import Labelled
from cca_fast.data.templates import (default_bindings, evaluate_answer, instantiate,
                                     parse_template, sample_instances)
from cca_fast.errors import TemplateError

SOLUTION = "So {x} + {y} = <<{x}+{y}={x+y}>>{x+y}.\n#### {x+y}"


def tmpl(body: str, solution: str = SOLUTION, tid: str = "0042"):
    return parse_template({"question_annotated": body, "answer_annotated": solution}, tid)


BASE = "Add {x,3} and {y,4}.\n\n#init:\n- $x = range(1, 10)\n- $y = range(1, 10)\n\n"


@pytest.mark.parametrize("answer_line", ["#answer: x + y", "#answer = x + y", "#answer: {x + y}",
                                         "#answer: $x + $y", "#answer:  x+y "])
def test_answer_line_variants(answer_line):
    t = tmpl(BASE + answer_line)
    assert evaluate_answer(t, {"x": 3, "y": 4}) == 7
    assert default_bindings(t) == {"x": 3, "y": 4}


def test_multi_target_sample_and_sequential_draws():
    t = tmpl("{a,Ana} and {b,Ben} on {d1,Monday}-{d2,Tuesday} add {x,1} {y,2}.\n#init:\n"
             "- a, b = sample(names, 2)\n- d1, d2 = sample_sequential(weekdays, 2)\n"
             "- $x = range(1, 50)\n- $y = range(1, 50)\n#answer: x + y")
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    for inst in sample_instances(t, 30, seed=0):
        b = inst.bindings
        assert b["a"] != b["b"]  # k distinct items
        assert days.index(b["d2"]) == days.index(b["d1"]) + 1  # consecutive, no wrap-around
        assert inst.question.startswith(f"{b['a']} and {b['b']} on {b['d1']}-{b['d2']}")


def test_labelled_domain_and_conditions():
    t = tmpl("She ran {m,twice} as far: {x,4} then more.\n#init:\n"
             "- $m = sample([('twice', 2), ('half', Fraction(1, 2)), ('2.5 times', 2.5)])\n"
             "- $x = range(1, 30)\n#conditions:\n- is_int(x * m)\n#answer: x * m",
             solution="{x} * {m} = {x*m}\n#### {x*m}")
    seen = set()
    for inst in sample_instances(t, 40, seed=2):
        m = inst.bindings["m"]
        assert isinstance(m, Labelled) and f"ran {m.text} as far" in inst.question
        assert inst.value == inst.bindings["x"] * m.value and Fraction(inst.value).denominator == 1
        seen.add(m.text)
    assert seen == {"twice", "half", "2.5 times"}
    assert default_bindings(t)["m"] == Labelled("twice", 2)


def test_integer_answers_required_by_default():
    t = tmpl(BASE + "#answer: x / y", solution="#### {x/y}")
    for inst in sample_instances(t, 20, seed=0):
        assert inst.bindings["x"] % inst.bindings["y"] == 0


@pytest.mark.parametrize("body, message", [
    ("Q {x,1}\n#init:\n- $x = range(1, 5)\n", r"template 0042: no '#answer: <expr>' line"),
    ("Q {x,1}\n#answer: 3", r"template 0042: no #init section"),
    ("Q {x,1}\n#init:\n- $x range(1, 5)\n#answer: x",
     r"template 0042, line 3 \(#init\): expected 'name = domain'"),
    ("Q {x,1}\n#init:\n- $x = range(1, 5)\n- x = range(2, 3)\n#answer: x",
     r"template 0042, line 4 \(#init\): variable 'x' defined twice"),
    ("Q {x,1}\n#init:\n- $x = range(1, 5)\n#answer: x + q",
     r"template 0042, line 4 \(#answer\): undefined variable 'q'"),
    ("Q {x,1}\n#init:\n- $x = range(1, 5)\n#conditions:\n- x.__class__\n#answer: x",
     r"template 0042, line 5 \(#conditions\): attribute access '.__class__' is not allowed"),
    ("Q {z,1}\n#init:\n- $x = range(1, 5)\n#answer: x",
     r"template 0042, question line 1: placeholder \{z,1\} uses undefined variable 'z'"),
    ("Q {x,1}\n#init:\n- $x = y + 1\n- $y = range(1, 5)\n#answer: x",
     r"template 0042, line 3 \(#init\): undefined variable 'y'"),
    ("Q {x,1}\n#init:\n- $x = range(1, 5)\n#conditions:\nx > 1\n#answer: x",
     r"template 0042, line 5: #conditions lines must start with '- '"),
    ("Q {x,1}\n#init:\n- $x = range(1, 5)\n#answer: x\nmore",
     r"template 0042, line 5: unexpected line after #answer"),
])
def test_parse_errors_name_template_and_line(body, message):
    with pytest.raises(TemplateError, match=message):
        tmpl(body, solution="#### {x}")


def test_solution_errors():
    with pytest.raises(TemplateError, match="no final '#### {answer}' line"):
        tmpl(BASE + "#answer: x + y", solution="just {x}")
    with pytest.raises(TemplateError, match=r"answer_annotated line 2: undefined variable 'w'"):
        tmpl(BASE + "#answer: x + y", solution="ok {x}\n{w}\n#### {x+y}")


def test_domain_arity_errors():
    t = tmpl("Q {a,1} {b,2}\n#init:\n- a, b = sample(names)\n#answer: 1", solution="#### 1")
    with pytest.raises(TemplateError, match=r"2 variable\(s\) a, b but the domain .* gives 1"):
        instantiate(t, 1, seed=0)
    t = tmpl("Q {x,1}\n#init:\n- $x = []\n#answer: x", solution="#### {x}")
    with pytest.raises(TemplateError, match="empty domain"):
        instantiate(t, 1, seed=0)


def test_constant_false_condition_is_reported_at_once():
    t = tmpl(BASE + "#conditions:\n- 1 > 2\n#answer: x + y")
    with pytest.raises(TemplateError, match=r"template 0042, line 8 \(#conditions\): condition `1 > 2` is always false"):
        instantiate(t, 1, seed=0)


def test_ids_meta_and_seed_determinism():
    t = tmpl(BASE + "#answer: x + y", tid="t9")
    a = instantiate(t, 5, seed=11, source="mine")
    assert [p.id for p in a] == [f"mine-t9-{i}" for i in range(5)]
    assert all(p.template == "t9" and p.meta["seed"] == 11 and p.meta["source"] == "mine" for p in a)
    assert all(p.gold == p.meta["bindings"]["x"] + p.meta["bindings"]["y"] for p in a)
    assert a == instantiate(t, 5, seed=11, source="mine")
    assert [p.question for p in a] != [p.question for p in instantiate(t, 5, seed=12, source="mine")]
