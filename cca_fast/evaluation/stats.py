"""Confidence intervals for accuracies and paired differences: the stratified bootstrap over
problems.

Accuracy follows docs/method.md section 0: the mean over templates of the per-template accuracy. A
bootstrap resample draws, *within every template*, as many problems as the template has (with
replacement), so every resample has the same template sizes and the per-template average stays
well defined. Differences between two conditions are *paired*: both are scored on the same
resampled problems, which is what makes a small difference on the same test set detectable.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from cca_fast.errors import CCAError


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided bootstrap percentile interval.

    Attributes:
        value: the estimate on the observed data.
        low, high: the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the resamples.
        level: the coverage (0.95 for a 95% interval).
        n: problems it was computed on.
    """

    value: float
    low: float
    high: float
    level: float
    n: int

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (a difference "is significant")."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StratifiedBootstrap:
    """Resample indices of ``n`` problems within their groups (templates), once, and reuse the
    same resamples for every statistic, so that paired differences are consistent.

    Args:
        groups: the group (template) of each problem, length ``n``; use one value for all
            problems to get the plain bootstrap.
        n_resamples: number of bootstrap resamples ``B``.
        seed: seed of the resampling (results are deterministic given it).
    """

    def __init__(self, groups: Sequence[str], n_resamples: int = 10_000, seed: int = 0):
        from cca_fast import checks

        checks.positive("n_resamples", n_resamples)
        if len(groups) == 0:
            raise CCAError("cannot bootstrap an empty set of problems")
        self.n = len(groups)
        rng = np.random.default_rng(seed)
        members: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(str(g), []).append(i)
        # per group: [B, n_g] indices into the whole problem list
        self._draws = [np.asarray(idx)[rng.integers(0, len(idx), size=(n_resamples, len(idx)))]
                       for _, idx in sorted(members.items())]
        self._groups = [np.asarray(idx) for _, idx in sorted(members.items())]
        self.n_resamples = n_resamples

    def _stat(self, x: np.ndarray, idx_per_group: Sequence[np.ndarray]) -> np.ndarray:
        """Mean over groups of the per-group mean of ``x`` [n] at the indices (each [..., n_g])."""
        return np.mean([x[idx].mean(axis=-1) for idx in idx_per_group], axis=0)

    def accuracy(self, correct: Sequence[float], level: float = 0.95) -> Interval:
        """Per-group-averaged mean of ``correct`` [n] (0/1 or any per-problem score) with its
        interval."""
        x = self._check(correct)
        return self._interval(float(self._stat(x, self._groups)), self._stat(x, self._draws), level)

    def difference(self, a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
        """Paired difference ``stat(a) - stat(b)`` (aligned per problem) with its interval."""
        xa, xb = self._check(a), self._check(b)
        d = xa - xb
        return self._interval(float(self._stat(d, self._groups)), self._stat(d, self._draws), level)

    def pooled_difference(self, a: Sequence[float], pool: Sequence[Sequence[float]], level: float = 0.95,
                          seed: int = 0) -> Interval:
        """Paired difference of ``a`` [n] to a *distribution* of conditions ``pool`` [S, n] (S
        random draws, e.g. seeds of a random control), with an interval that includes both the
        problem-to-problem and the draw-to-draw spread (a two-level bootstrap).

        Estimate: ``stat(a - mean_s pool[s])``. Resample ``b`` draws the S members of the pool
        with replacement (seeded by ``seed``) *and* the problems within their templates (the
        resamples shared with :meth:`difference`), and takes ``stat(a - mean of the drawn
        members)`` on the drawn problems. With S = 1 it is :meth:`difference`.
        """
        xa = self._check(a)
        xp = np.stack([self._check(p) for p in pool]) if len(pool) else np.empty((0, self.n))
        if xp.shape[0] == 0:
            raise CCAError("the pool of conditions to compare with is empty")
        S = xp.shape[0]
        value = float(self._stat(xa - xp.mean(0), self._groups))
        if S == 1:
            return self._interval(value, self._stat(xa - xp[0], self._draws), level)
        rng = np.random.default_rng(seed)
        members = rng.integers(0, S, size=(self.n_resamples, S))  # [B, S]
        weights = np.stack([np.bincount(m, minlength=S) for m in members]) / S  # [B, S]
        pooled = weights @ xp  # [B, n]: each resample's mean of its drawn members
        d = xa[None, :] - pooled  # [B, n]
        rows = np.arange(self.n_resamples)[:, None]
        samples = np.mean([d[rows, idx].mean(axis=-1) for idx in self._draws], axis=0)
        return self._interval(value, samples, level)

    def _check(self, x: Sequence[float]) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float64)
        if arr.shape != (self.n,):
            raise CCAError(f"expected one value per problem ({self.n}), got shape {arr.shape}")
        return arr

    def _interval(self, value: float, samples: np.ndarray, level: float) -> Interval:
        if not 0 < level < 1:
            raise CCAError(f"interval level must be in (0, 1), got {level}")
        lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
        return Interval(value, float(lo), float(hi), level, self.n)


def aligned_correct(records: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> list[float]:
    """``correct`` of ``records`` in the order of ``ids`` (evaluation records of the same test
    problems, possibly in another order); a missing id is an error, not a silent zero."""
    by_id = {str(r["id"]): float(bool(r["correct"])) for r in records}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise CCAError(f"{len(missing)} test problems have no evaluation record (first: {missing[0]}); "
                       "the conditions were not evaluated on the same problems")
    return [by_id[i] for i in ids]
