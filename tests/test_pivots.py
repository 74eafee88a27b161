"""Pivot localisation on a synthetic deterministic "model" (exact, no floating point).

The fake model's greedy next token is a hash of the last two tokens; traces stop at token 0 or at a
length limit; a trace is "correct" when the sum of its tokens is even. Samples follow the greedy
rule except for random departures, like a temperature sample. The fast branching search must return
exactly the reference loop's pivots while completing fewer prefixes.
"""
from __future__ import annotations

import random

import pytest

from cca_fast.stages.pivots.algorithms import (branching_pivot_fast, branching_pivot_reference, prefix_pivot)

V, STOP, MAXLEN = 11, 0, 24


def greedy_next(seq):
    a = seq[-1] if seq else 3
    b = seq[-2] if len(seq) > 1 else 5
    return (a * 7 + b * 3 + len(seq)) % V


def complete(prefixes):
    out = []
    for p in prefixes:
        s = list(p)
        while (not s or s[-1] != STOP) and len(s) < MAXLEN:
            s.append(greedy_next(s))
        out.append(s)
    return out


def correct(trace):
    return sum(trace) % 2 == 0


def argmax_along(s):
    return [greedy_next(list(s[:t])) for t in range(len(s))]


def random_sample(rng, p_depart):
    s = []
    while (not s or s[-1] != STOP) and len(s) < MAXLEN:
        g = greedy_next(s)
        s.append(rng.randrange(V) if rng.random() < p_depart else g)
    return s


@pytest.mark.parametrize("first_batch", [1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_fast_branching_equals_reference(seed, first_batch):
    rng = random.Random(seed)
    greedy = complete([[]])[0]
    g_ok = correct(greedy)
    found = 0
    fast_completions = ref_completions = 0
    for _ in range(200):
        s = random_sample(rng, p_depart=0.15)
        if correct(s) == g_ok:
            continue  # not a flipped sample: stage 1 would not keep it
        ref, ref_stats = branching_pivot_reference(s, g_ok, complete, correct, greedy_next)
        fast, fast_stats = branching_pivot_fast(s, g_ok, complete, correct, argmax_along, batch_size=3,
                                                    first_batch=first_batch)
        assert ref is not None  # a flip always exists: completing the whole sample gives the sample
        assert (fast.t, fast.prefix, fast.desired, fast.undesired) == (ref.t, ref.prefix, ref.desired, ref.undesired)
        assert fast.desired != fast.undesired
        ref_completions += ref_stats.completions
        fast_completions += fast_stats.completions
        found += 1
    assert found >= 20
    assert fast_completions < ref_completions / 2


def test_prefix_pivot_directions():
    g, s = [5, 6, 7, 8], [5, 6, 9, 8]
    p = prefix_pivot(g, s, greedy_correct=True)
    assert (p.t, p.prefix, p.desired, p.undesired) == (2, [5, 6], 7, 9)
    p = prefix_pivot(g, s, greedy_correct=False)
    assert (p.desired, p.undesired) == (9, 7)
    assert prefix_pivot([1, 2], [1, 2, 3], True) is None


def test_departure_chunks_double_up_to_the_batch_size():
    from cca_fast.stages.pivots.algorithms import departure_chunks

    assert departure_chunks(0, 8) == []
    assert departure_chunks(20, 8) == [(0, 1), (1, 3), (3, 7), (7, 15), (15, 20)]
    assert departure_chunks(5, 1) == [(i, i + 1) for i in range(5)]
    assert departure_chunks(10, 4, first=3) == [(0, 3), (3, 7), (7, 10)]
    for n in range(30):  # every departure exactly once, in order
        flat = [i for a, b in departure_chunks(n, 6) for i in range(a, b)]
        assert flat == list(range(n))
