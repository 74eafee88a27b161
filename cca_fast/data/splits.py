"""Per-template train / validation / test splits and the weak-template filter (docs/method.md section 0).

Each template's instances are shuffled with a generator derived from ``(seed, template)`` and
cut in order: 50 instances with the paper's fractions ``(0.52, 0.08, 0.40)`` give exactly
26 / 4 / 20. Problems without a template (``template == ""``) form one group.

Extra training problems (``RunConfig.extra_train_data``) join the training split only
(:func:`fresh_extra`): their ids start ``extra:`` and their template is ``extra:<template>``
(``extra`` when they have none), so they never collide with the main data and stay one group of
their own in per-template accuracy and the weak-template filter.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

from cca_fast.errors import DataError
from cca_fast.data.problem import Problem

PAPER_FRACTIONS = (0.52, 0.08, 0.40)
#: the id prefix and template (group) of extra training problems (see :func:`as_extra`)
EXTRA_PREFIX = "extra:"
EXTRA_TEMPLATE = "extra"


@dataclass(frozen=True)
class Splits:
    """The three parts, each a list of problems (template groups in first-seen order)."""

    train: list[Problem]
    val: list[Problem]
    test: list[Problem]

    def sizes(self) -> tuple[int, int, int]:
        """``(len(train), len(val), len(test))``."""
        return len(self.train), len(self.val), len(self.test)


def split_counts(n: int, fractions: Sequence[float] = PAPER_FRACTIONS) -> tuple[int, int, int]:
    """Sizes of the three parts of a group of ``n``: train and val are ``n * f`` rounded half
    up (a 1e-9 guard absorbs float error), test takes the rest. ``50 -> (26, 4, 20)``."""
    f_train, f_val, _ = _check_fractions(fractions)
    n_train = min(n, math.floor(n * f_train + 0.5 + 1e-9))
    n_val = min(n - n_train, math.floor(n * f_val + 0.5 + 1e-9))
    return n_train, n_val, n - n_train - n_val


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise DataError(f"split fractions must be (train, val, test), got {tuple(fractions)}")
    fr = tuple(float(f) for f in fractions)
    if any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise DataError(f"split fractions must be >= 0 and sum to 1, got {fr}")
    return fr  # type: ignore[return-value]


def split_problems(problems: Sequence[Problem], seed: int = 0,
                   fractions: Sequence[float] = PAPER_FRACTIONS) -> Splits:
    """Split per template (``Problem.template``), each group shuffled with ``seed``.

    Deterministic: the same problems (in any order) and seed give the same splits.
    """
    _check_fractions(fractions)
    groups: dict[str, list[Problem]] = {}
    for p in problems:
        groups.setdefault(p.template, []).append(p)
    train: list[Problem] = []
    val: list[Problem] = []
    test: list[Problem] = []
    for template, members in groups.items():
        ordered = sorted(members, key=lambda p: p.id)
        random.Random(f"cca_fast-split:{seed}:{template}").shuffle(ordered)
        n_train, n_val, _ = split_counts(len(ordered), fractions)
        train.extend(ordered[:n_train])
        val.extend(ordered[n_train:n_train + n_val])
        test.extend(ordered[n_train + n_val:])
    return Splits(train, val, test)


def weak_templates(per_template_accuracy: Mapping[str, float], threshold: float = 0.8) -> set[str]:
    """Templates whose accuracy is below ``threshold`` (the paper trains only on these)."""
    for t, acc in per_template_accuracy.items():
        if not 0.0 <= float(acc) <= 1.0:
            raise DataError(f"accuracy of template {t!r} must be in [0, 1], got {acc}")
    return {t for t, acc in per_template_accuracy.items() if float(acc) < threshold}


def as_extra(problems: Sequence[Problem]) -> list[Problem]:
    """``problems`` marked as extra training problems: id ``extra:<id>``, template
    ``extra:<template>`` (``extra`` for problems without one)."""
    return [dataclasses.replace(p, id=EXTRA_PREFIX + p.id,
                                template=EXTRA_PREFIX + p.template if p.template else EXTRA_TEMPLATE)
            for p in problems]


def is_extra(problem: Problem) -> bool:
    """Whether ``problem`` is an extra training problem (:func:`as_extra`)."""
    return problem.id.startswith(EXTRA_PREFIX)


def is_untemplated(template: str) -> bool:
    """Whether ``template`` is the group of problems without a template (``""``, or ``extra``
    for extra training problems without one)."""
    return template in ("", EXTRA_TEMPLATE)


def _question_key(problem: Problem) -> str:
    return " ".join(problem.question.split())


def fresh_extra(splits: Splits, extra: Sequence[Problem], where: str) -> tuple[list[Problem], int]:
    """The extra training problems (already :func:`as_extra`) that may join ``splits``' training
    split: those whose question (whitespace normalised) is not one of the main data's, so that
    no validation or test problem trains. Returns them (in order) and how many were left out.

    Raises:
        DataError: naming ``where``, when an extra id collides with a main-data id.
    """
    main = [*splits.train, *splits.val, *splits.test]
    ids = {p.id for p in main}
    clash = next((p.id for p in extra if p.id in ids), None)
    if clash is not None:
        raise DataError(f"{where}: extra training problem id {clash!r} is also an id of the main data; "
                        f"rename the main data's ids that start {EXTRA_PREFIX!r}")
    seen = {_question_key(p) for p in main}
    fresh = [p for p in extra if _question_key(p) not in seen]
    return fresh, len(extra) - len(fresh)
