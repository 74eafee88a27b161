"""The package's own templates (the default data set)."""
from __future__ import annotations

import json
from fractions import Fraction

from cca_fast.data import BUILTIN_TEMPLATES, load_problems
from cca_fast.data.templates import (default_bindings, evaluate_answer, failed_conditions,
                                     load_template_dir, render_question, render_solution)


def test_builtin_files_are_complete_and_self_consistent():
    files = sorted(BUILTIN_TEMPLATES.glob("*.json"))
    assert len(files) >= 24
    templates = load_template_dir(BUILTIN_TEMPLATES)
    for f, t in zip(files, templates):
        data = json.loads(f.read_text(encoding="utf-8"))
        assert set(data) >= {"id", "question", "answer", "question_annotated", "answer_annotated"}
        assert data["id"] == f.stem == t.id
        # the stored original problem is exactly the template bound to its defaults
        b = default_bindings(t)
        assert b is not None and not failed_conditions(t, b), t.id
        assert render_question(t, b) == data["question"], t.id
        assert render_solution(t, b) == data["answer"], t.id
        gold = Fraction(data["answer"].rsplit("####", 1)[1].strip())
        assert gold == evaluate_answer(t, b) and gold.denominator == 1, t.id


def test_builtin_problem_set():
    problems = load_problems(None, n_per_template=50, seed=0)
    templates = {p.template for p in problems}
    assert len(templates) >= 24 and len(problems) == 50 * len(templates)
    assert problems == load_problems("builtin", n_per_template=50, seed=0)
    by_template: dict[str, list] = {}
    for p in problems:
        by_template.setdefault(p.template, []).append(p)
        assert p.gold == int(p.gold) and p.gold >= 0, p
        assert p.answer.endswith(f"#### {int(p.gold)}"), p
        assert p.id.startswith(f"builtin-{p.template}-")
    for tid, ps in by_template.items():
        assert len({p.question for p in ps}) == 50, f"builtin {tid}: repeated questions"
