"""The stratified bootstrap (cca_fast.evaluation.stats): point values, stratification, pairing, coverage."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cca_fast.errors import CCAError
from cca_fast.evaluation.stats import StratifiedBootstrap, aligned_correct


def test_value_is_the_per_template_average():
    rng = np.random.default_rng(1)
    groups = [f"t{i % 7}" for i in range(61)]  # unequal template sizes (9 or 8)
    x = rng.integers(0, 2, 61).astype(float)
    iv = StratifiedBootstrap(groups, 200, seed=0).accuracy(x)
    per = {g: [x[i] for i in range(61) if groups[i] == g] for g in set(groups)}
    expected = sum(sum(v) / len(v) for v in per.values()) / len(per)
    assert iv.value == pytest.approx(expected, abs=1e-15)  # same sums, only summation order differs
    assert iv.low <= iv.value <= iv.high and iv.n == 61


def test_resamples_stay_inside_templates():
    # correctness constant within each template: every stratified resample has the same
    # per-template means, so the interval has zero width (a plain bootstrap would not)
    groups = ["a"] * 10 + ["b"] * 13 + ["c"] * 7
    x = [1.0] * 10 + [0.0] * 13 + [1.0] * 7
    iv = StratifiedBootstrap(groups, 500, seed=3).accuracy(x)
    assert iv.value == pytest.approx(2 / 3, abs=1e-15)
    assert iv.low == pytest.approx(2 / 3, abs=1e-15) and iv.high == pytest.approx(2 / 3, abs=1e-15)
    plain = StratifiedBootstrap(["all"] * 30, 500, seed=3).accuracy(x)
    assert plain.high - plain.low > 0.1


def test_width_matches_the_binomial_standard_error():
    # one group of n Bernoulli outcomes: the bootstrap sd of the mean is sqrt(p(1-p)/n); with
    # 20000 resamples the 95% interval's width is 2*1.96*sd within a few percent (Monte Carlo
    # error of a quantile at B=20000 is ~1%; 6% leaves room for the discreteness of the mean)
    rng = np.random.default_rng(7)
    n = 401
    x = (rng.random(n) < 0.3).astype(float)
    p = x.mean()
    iv = StratifiedBootstrap(["g"] * n, 20_000, seed=11).accuracy(x)
    expected = 2 * 1.959964 * math.sqrt(p * (1 - p) / n)
    assert (iv.high - iv.low) == pytest.approx(expected, rel=0.06)


def test_paired_difference():
    rng = np.random.default_rng(5)
    groups = [f"t{i % 5}" for i in range(40)]
    a = rng.integers(0, 2, 40).astype(float)
    boot = StratifiedBootstrap(groups, 300, seed=0)
    same = boot.difference(a, a)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    b = a.copy()
    flip = [i for i in range(40) if a[i] == 0][:4]
    b[flip] = 1.0  # b is never worse, strictly better on 4 problems
    d = boot.difference(b, a)
    assert d.value == pytest.approx(boot.accuracy(b).value - boot.accuracy(a).value, abs=1e-15)
    assert d.low >= 0.0 and d.value > 0  # paired: no resample can make b worse than a
    assert not same.excludes_zero()


def test_deterministic_and_checked():
    g = ["x"] * 5 + ["y"] * 6
    x = [1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1]
    assert StratifiedBootstrap(g, 100, seed=2).accuracy(x) == StratifiedBootstrap(g, 100, seed=2).accuracy(x)
    with pytest.raises(CCAError, match="one value per problem"):
        StratifiedBootstrap(g, 100).accuracy([1, 0])
    with pytest.raises(CCAError, match="empty"):
        StratifiedBootstrap([], 10)
    with pytest.raises(CCAError, match="level"):
        StratifiedBootstrap(g, 10).accuracy(x, level=1.5)


def test_aligned_correct():
    recs = [{"id": "b", "correct": True}, {"id": "a", "correct": False}]
    assert aligned_correct(recs, ["a", "b"]) == [0.0, 1.0]
    with pytest.raises(CCAError, match="no evaluation record"):
        aligned_correct(recs, ["a", "c"])


def test_pooled_difference_of_one_member_or_identical_members_is_the_paired_difference():
    rng = np.random.default_rng(5)
    groups = [f"t{i % 7}" for i in range(53)]  # odd, unequal template sizes
    a, b = rng.normal(size=53), rng.normal(size=53)
    bs = StratifiedBootstrap(groups, n_resamples=2000, seed=1)
    ref = bs.difference(a, b)
    assert bs.pooled_difference(a, [b]) == ref
    same = bs.pooled_difference(a, [b, b, b])  # no spread between draws: only the problems' spread
    assert same.value == pytest.approx(ref.value, abs=1e-12)
    assert same.low == pytest.approx(ref.low, abs=1e-12) and same.high == pytest.approx(ref.high, abs=1e-12)


def test_pooled_difference_counts_the_spread_between_draws():
    rng = np.random.default_rng(6)
    groups = [f"t{i % 5}" for i in range(40)]
    a = rng.normal(size=40)
    base = rng.normal(size=40)
    pool = [base + shift for shift in (-1.0, 0.0, 1.0, 2.0, -2.0)]  # draws differ by a constant each
    bs = StratifiedBootstrap(groups, n_resamples=4000, seed=2)
    pooled = bs.pooled_difference(a, pool)
    mean_only = bs.difference(a, np.mean(pool, axis=0))
    assert pooled.value == pytest.approx(mean_only.value, abs=1e-12)  # same estimate
    assert pooled.high - pooled.low > (mean_only.high - mean_only.low) + 1.0  # wider by the draws' spread
    with pytest.raises(CCAError, match="empty"):
        bs.pooled_difference(a, [])
