"""Per-template train / validation / test splits and the weak-template filter (METHOD section 0).

Each template's instances are shuffled with a generator derived from ``(seed, template)`` and
cut in order: 50 instances with the paper's fractions ``(0.52, 0.08, 0.40)`` give exactly
26 / 4 / 20. Problems without a template (``template == ""``) form one group.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

from cca_fast.errors import DataError
from cca_fast.data.problem import Problem

PAPER_FRACTIONS = (0.52, 0.08, 0.40)


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
