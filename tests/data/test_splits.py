"""Per-template splits (26/4/20 of 50) and the weak-template filter."""
from __future__ import annotations

import random

import pytest

from cca_fast.data import Problem, split_counts, split_problems, weak_templates
from cca_fast.errors import DataError


def _problems(n_templates: int, per: int, template=lambda t: f"t{t}") -> list[Problem]:
    return [Problem(f"p{t}-{i}", "q", "", float(i), template(t)) for t in range(n_templates)
            for i in range(per)]


def test_paper_counts_per_template_and_partition():
    probs = _problems(7, 50)
    s = split_problems(probs, seed=0)
    assert s.sizes() == (7 * 26, 7 * 4, 7 * 20)
    for t in range(7):
        counts = [sum(p.template == f"t{t}" for p in part) for part in (s.train, s.val, s.test)]
        assert counts == [26, 4, 20]
    ids = [p.id for p in s.train + s.val + s.test]
    assert sorted(ids) == sorted(p.id for p in probs)  # disjoint, nothing lost


def test_deterministic_order_invariant_and_seeded():
    probs = _problems(3, 50)
    a = split_problems(probs, seed=5)
    shuffled = list(probs)
    random.Random(0).shuffle(shuffled)
    b = split_problems(shuffled, seed=5)
    assert {p.id for p in a.train} == {p.id for p in b.train}
    assert {p.id for p in a.test} == {p.id for p in b.test}
    assert a == split_problems(probs, seed=5)
    c = split_problems(probs, seed=6)
    assert {p.id for p in a.train} != {p.id for p in c.train}
    # the training part really is a shuffle, not the first 26 of each template
    assert {p.id for p in a.train} != {f"p{t}-{i}" for t in range(3) for i in range(26)}


def test_no_templates_split_the_whole_set():
    probs = _problems(1, 100, template=lambda t: "")
    assert split_problems(probs).sizes() == (52, 8, 40)


@pytest.mark.parametrize("n, expected", [(50, (26, 4, 20)), (100, (52, 8, 40)), (1, (1, 0, 0)),
                                         (0, (0, 0, 0)), (10, (5, 1, 4)), (25, (13, 2, 10))])
def test_split_counts(n, expected):
    assert split_counts(n) == expected


def test_custom_fractions_and_bad_fractions():
    assert split_counts(20, (0.5, 0.25, 0.25)) == (10, 5, 5)
    with pytest.raises(DataError, match="sum to 1"):
        split_problems(_problems(1, 4), fractions=(0.5, 0.5, 0.5))
    with pytest.raises(DataError, match=r"\(train, val, test\)"):
        split_counts(4, (0.5, 0.5))


def test_weak_templates():
    assert weak_templates({"a": 0.79, "b": 0.8, "c": 1.0, "d": 0.0}) == {"a", "d"}
    assert weak_templates({"a": 0.5}, threshold=0.5) == set()
    with pytest.raises(DataError, match="in \\[0, 1\\]"):
        weak_templates({"a": 1.5})
