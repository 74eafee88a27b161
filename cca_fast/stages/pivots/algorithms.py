"""Stage 1b: localise the pivotal token of a (greedy, flipped sample) trace pair (docs/method.md section 1).

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
  finds the departures; only they get completions, in ordered batches (1, 2, 4, ... up to the
  batch size), stopping at the first flip.
  Same pivots as the reference (the completion of a non-departure equals that of the previous
  departure), far fewer generated tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from cca_fast.stages.examples import PivotExample
from cca_fast.models import runtime

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


def departure_chunks(n: int, batch_size: int, first: int = 1) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``0 .. n-1`` in order, of sizes ``first, 2*first, 4*first,
    ...`` capped at ``batch_size``. Pivots sit early in most traces (the first departure, often):
    a first batch of 1 costs one completion there, where a full batch would cost
    ``batch_size``; later batches double until batching pays, so a late pivot still needs only
    ``log2`` more calls."""
    out, start, size = [], 0, max(1, min(int(first), int(batch_size)))
    while start < n:
        out.append((start, min(n, start + size)))
        start += size
        size = min(2 * size, max(1, int(batch_size)))
    return out


def branching_pivot_fast(
    sample: Sequence[int], greedy_correct: bool, complete: Complete, correct: Correct,
    argmax_along: Callable[[list[int]], list[int]], batch_size: int = 8, first_batch: int = 1,
) -> tuple[Pivot | None, PivotStats]:
    """The pruned, batched search (exact speed-up, same pivot as the reference).

    Args:
        argmax_along: ``argmax_along(s)[t]`` = greedy next token after ``s[:t]`` for
            ``t = 0 .. len(s) - 1`` (one teacher-forced pass).
        batch_size: most departures completed together; batches are in order and the search
            stops at the first batch that contains a flip.
        first_batch: size of the first batch; each next one doubles up to ``batch_size``
            (:func:`departure_chunks`).
    """
    stats = PivotStats(forward_passes=1)
    greedy_after = argmax_along(list(sample))
    departures = [t for t in range(len(sample)) if int(sample[t]) != int(greedy_after[t])]
    for a, b in departure_chunks(len(departures), batch_size, first_batch):
        chunk = departures[a:b]
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
def teacher_forced_argmax(model, prompt_ids: Sequence[int], trace: Sequence[int], prefix_cache=None) -> list[int]:
    """``out[t]`` = the model's argmax next token after ``prompt + trace[:t]``, for
    ``t = 0 .. len(trace) - 1``, from one forward pass over ``prompt + trace``.

    ``prefix_cache`` (a :class:`~cca_fast.generation.prefix.PrefixCache`): take the stored positions
    of a common prefix (the few-shot exemplars) from it, and leave ``prompt + trace`` stored
    there for the completions of its prefixes that follow."""
    P = len(prompt_ids)
    if prefix_cache is not None:
        logits = prefix_cache.logits(model, list(prompt_ids) + list(trace), P - 1)
        return logits[: len(trace)].argmax(-1).tolist()
    device = runtime.input_device(model)
    ids = torch.tensor([list(prompt_ids) + list(trace)], dtype=torch.long, device=device)
    logits = model(input_ids=ids).logits[0]
    return logits[P - 1 : P - 1 + len(trace)].argmax(-1).tolist()
