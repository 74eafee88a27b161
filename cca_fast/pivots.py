"""Stage 1b: localise the pivotal token of a (greedy, flipped sample) trace pair (METHOD section 1).

Token sequences here are *trace* tokens (generated tokens only); the prompt is prepended when an
example is built. ``correct(ids) -> bool`` judges a full trace; ``complete(prefixes) -> traces``
returns, for each trace prefix, the greedy trace that continues it (prefix included).

Methods:

* ``prefix``: first index where the greedy trace and the sample differ.
* ``branching`` (reference, :func:`branching_pivot_reference`): for t = 0, 1, ... complete
  ``s[:t+1]`` greedily; the first t whose completion's correctness differs from the greedy
  trace's makes ``s[t]`` the pivotal token. One completion per position, one at a time.
* ``branching`` (fast, :func:`branching_pivot_fast`): if ``s[t+1]`` is the greedy argmax after
  ``s[:t+1]``, the completions of ``s[:t+1]`` and ``s[:t+2]`` are the same, so correctness can
  only change at *departures* ``t`` (``s[t] != argmax after s[:t]``). One teacher-forced pass
  finds the departures; only they get completions, in ordered batches, stopping at the first flip.
  Same pivots as the reference (the completion of a non-departure equals that of the previous
  departure), far fewer generated tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .examples import PivotExample

Complete = Callable[[list[list[int]]], list[list[int]]]
Correct = Callable[[Sequence[int]], bool]


@dataclass
class PivotStats:
    """What a pivot search cost: completions requested and tokens they generated."""

    completions: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0

    def add(self, other: "PivotStats") -> None:
        self.completions += other.completions
        self.generated_tokens += other.generated_tokens
        self.forward_passes += other.forward_passes


@dataclass
class Pivot:
    """Where a trace pair diverges.

    Attributes:
        t: index in the sample (branching) or in both traces (prefix) of the pivotal token.
        prefix: trace tokens before the pivot (``sample[:t]``).
        desired, undesired: next-token ids at the pivot.
    """

    t: int
    prefix: list[int]
    desired: int
    undesired: int
    meta: dict = field(default_factory=dict)


def prefix_pivot(greedy: Sequence[int], sample: Sequence[int], greedy_correct: bool) -> Pivot | None:
    """First index where the two traces differ; ``None`` if one is a prefix of the other."""
    n = min(len(greedy), len(sample))
    for i in range(n):
        if greedy[i] != sample[i]:
            good, bad = (greedy, sample) if greedy_correct else (sample, greedy)
            return Pivot(i, list(greedy[:i]), int(good[i]), int(bad[i]))
    return None


def _pivot_at(t: int, sample: Sequence[int], greedy_choice: int, greedy_correct: bool) -> Pivot:
    # greedy trace correct -> the sample's token led astray: desired = greedy choice
    if greedy_correct:
        return Pivot(t, list(sample[:t]), int(greedy_choice), int(sample[t]))
    return Pivot(t, list(sample[:t]), int(sample[t]), int(greedy_choice))


def branching_pivot_reference(
    sample: Sequence[int], greedy_correct: bool, complete: Complete, correct: Correct,
    greedy_next: Callable[[list[int]], int],
) -> tuple[Pivot | None, PivotStats]:
    """The literal per-position loop (the paper's reference; the most expensive step).

    Args:
        sample: the sampled trace's tokens ``s``.
        greedy_correct: correctness of the greedy trace ``T_g``.
        complete: greedy completion of trace prefixes (called with one prefix at a time).
        correct: correctness of a full trace.
        greedy_next: the model's greedy next token after a trace prefix.
    """
    stats = PivotStats()
    for t in range(len(sample)):
        prefix = list(sample[: t + 1])
        (full,) = complete([prefix])
        stats.completions += 1
        stats.generated_tokens += len(full) - len(prefix)
        if correct(full) != greedy_correct:
            stats.forward_passes += 1
            return _pivot_at(t, sample, greedy_next(list(sample[:t])), greedy_correct), stats
    return None, stats


def branching_pivot_fast(
    sample: Sequence[int], greedy_correct: bool, complete: Complete, correct: Correct,
    argmax_along: Callable[[list[int]], list[int]], batch_size: int = 8,
) -> tuple[Pivot | None, PivotStats]:
    """The pruned, batched search (exact speed-up, same pivot as the reference).

    Args:
        argmax_along: ``argmax_along(s)[t]`` = greedy next token after ``s[:t]`` for
            ``t = 0 .. len(s) - 1`` (one teacher-forced pass).
        batch_size: departures completed per batch, in order; the search stops at the first
            batch that contains a flip.
    """
    stats = PivotStats(forward_passes=1)
    greedy_after = argmax_along(list(sample))
    departures = [t for t in range(len(sample)) if int(sample[t]) != int(greedy_after[t])]
    for i in range(0, len(departures), batch_size):
        chunk = departures[i : i + batch_size]
        prefixes = [list(sample[: t + 1]) for t in chunk]
        fulls = complete(prefixes)
        stats.completions += len(chunk)
        stats.generated_tokens += sum(len(f) - len(p) for f, p in zip(fulls, prefixes))
        for t, full in zip(chunk, fulls):
            if correct(full) != greedy_correct:
                return _pivot_at(t, sample, greedy_after[t], greedy_correct), stats
    return None, stats


def to_example(pivot: Pivot, prompt_ids: Sequence[int], problem_id: str, *, greedy_correct: bool,
               method: str) -> PivotExample:
    """The :class:`PivotExample` (prompt + trace prefix) of a pivot."""
    return PivotExample(
        problem_id=problem_id,
        prefix_ids=tuple(int(t) for t in prompt_ids) + tuple(pivot.prefix),
        desired=pivot.desired,
        undesired=pivot.undesired,
        direction="greedy_correct" if greedy_correct else "greedy_wrong",
        method=method,
        meta={"t": pivot.t, **pivot.meta},
    )


@torch.no_grad()
def teacher_forced_argmax(model, prompt_ids: Sequence[int], trace: Sequence[int]) -> list[int]:
    """``out[t]`` = the model's argmax next token after ``prompt + trace[:t]``, for
    ``t = 0 .. len(trace) - 1``, from one forward pass over ``prompt + trace``."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(trace)], dtype=torch.long, device=device)
    logits = model(input_ids=ids).logits[0]
    P = len(prompt_ids)
    return logits[P - 1 : P - 1 + len(trace)].argmax(-1).tolist()
