"""Greedy-path forking pivots (issue 12): pivots that lie on the path greedy decoding takes.

The paper's pivots (:mod:`cca_fast.stages.pivots.search`) come from a *sampled* trace: their
prefix is often off the greedy path, and when the greedy trace is correct their desired token is
already the argmax, so raising its margin cannot change greedy decoding there. Forking walks the
*greedy* trace instead:

1. one teacher-forced forward over ``prompt + greedy`` gives the next-token distribution at every
   trace position ``t`` (the distribution after ``prompt + greedy[:t]``);
2. a *candidate* is a position whose most probable token other than ``greedy[t]`` (the
   *alternative*) has probability ``>= p_min``; the ``max_forks`` candidates with the highest
   alternative probability are kept (ties: earlier ``t``);
3. each candidate is completed greedily from ``greedy[:t] + [alt]``
   (:func:`~cca_fast.stages.pivots.search.make_completer`, same cap and stop rules as the branching
   search) and judged with :class:`~cca_fast.stages.pivots.search.TraceJudge` (same judge, marker
   and EOS ids as :func:`~cca_fast.stages.pivots.search.pivot_for_pair`);
4. a completion whose correctness differs from the greedy trace's makes a
   :class:`~cca_fast.stages.examples.PivotExample` at ``prompt + greedy[:t]``: the desired token is
   the one whose continuation is correct (``greedy[t]`` when the greedy trace is correct, else the
   alternative). A ``"greedy_wrong"`` fork's desired token is *not* the argmax: those are the
   pivots whose amplification can change greedy decoding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from cca_fast.distributed import Dist, sharded
from cca_fast.errors import CCAError
from cca_fast.evaluation.prompting import NEW_QUESTION_MARKER
from cca_fast.generation.decode import GenerationConfig
from cca_fast.generation.prefix import PrefixCache, start_unit
from cca_fast.models import runtime
from cca_fast.stages.examples import PivotExample
from cca_fast.stages.pivots.algorithms import Pivot, to_example
from cca_fast.stages.pivots.search import TraceJudge, make_completer

METHOD = "greedy_fork"
STAT_KEYS = ("candidates", "completions", "flips")


@dataclass
class ForkConfig:
    """Settings of the greedy-path fork search.

    Attributes:
        p_min: an alternative token must have at least this next-token probability, in ``(0, 1)``.
        max_forks: at most this many candidate positions per problem (highest alternative
            probability first, ties: earlier position), ``>= 1``.
    """

    p_min: float = 0.15
    max_forks: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.p_min, (int, float)) or isinstance(self.p_min, bool) or not 0.0 < float(self.p_min) < 1.0:
            raise CCAError(f"ForkConfig.p_min must be a probability strictly between 0 and 1, got {self.p_min!r}; "
                           "e.g. 0.15 (an alternative token needs at least that probability to be forked)")
        if isinstance(self.max_forks, bool) or not isinstance(self.max_forks, int) or self.max_forks < 1:
            raise CCAError(f"ForkConfig.max_forks must be an integer >= 1, got {self.max_forks!r}; "
                           "e.g. 8 (candidate positions completed per problem)")
        self.p_min = float(self.p_min)


@dataclass(frozen=True)
class ForkCandidate:
    """A fork position: after ``prompt + greedy[:t]`` the greedy token has probability ``p_greedy``
    and the most probable other token ``alt`` has ``p_alt``."""

    t: int
    alt: int
    p_alt: float
    p_greedy: float


@torch.no_grad()
def next_token_probs(model, prompt_ids: Sequence[int], trace: Sequence[int],
                     prefix_cache: PrefixCache | None = None) -> torch.Tensor:
    """Next-token probabilities ``[len(trace), V]`` (float32 or wider, on the model's device): row
    ``t`` is the distribution after ``prompt + trace[:t]``, from one teacher-forced forward over
    ``prompt + trace`` (through ``prefix_cache`` when given: its stored common prefix is reused and
    ``prompt + trace`` is left stored there for the completions that follow)."""
    P, n = len(prompt_ids), len(trace)
    tokens = [int(x) for x in prompt_ids] + [int(x) for x in trace]
    if prefix_cache is not None:
        logits = prefix_cache.logits(model, tokens, P - 1)[:n]
    else:
        ids = torch.tensor([tokens], dtype=torch.long, device=runtime.input_device(model))
        logits = model(input_ids=ids).logits[0, P - 1 : P - 1 + n]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.softmax(logits, dim=-1)


def fork_candidates(probs: torch.Tensor, greedy_ids: Sequence[int], config: ForkConfig) -> list[ForkCandidate]:
    """The kept candidates of a trace, highest ``p_alt`` first (ties: earlier ``t``).

    Args:
        probs: ``[len(greedy_ids), V]`` next-token probabilities along the trace
            (:func:`next_token_probs`).
        greedy_ids: the greedy trace's tokens; ``greedy_ids[t]`` is excluded at row ``t``.
    """
    n = len(greedy_ids)
    if n == 0:
        return []
    g = torch.tensor([int(x) for x in greedy_ids], dtype=torch.long, device=probs.device)
    rows = torch.arange(n, device=probs.device)
    p_greedy = probs[rows, g]
    others = probs.clone()
    others[rows, g] = -1.0  # below any probability: the alternative is never the greedy token
    p_alt, alt = others.max(dim=-1)  # max returns the first maximal index on ties
    out = [ForkCandidate(t, int(a), float(pa), float(pg))
           for t, (a, pa, pg) in enumerate(zip(alt.tolist(), p_alt.tolist(), p_greedy.tolist()))
           if pa >= config.p_min]
    out.sort(key=lambda c: (-c.p_alt, c.t))
    return out[: config.max_forks]


def fork_pivots(model, tokenizer, problem_id: str, gold: float, prompt_ids: Sequence[int], greedy_ids: Sequence[int],
                greedy_correct: bool, gen: GenerationConfig, config: ForkConfig, *,
                prefix_cache: PrefixCache | None = None, batched: bool = True,
                marker: str | None = None) -> tuple[list[PivotExample], dict]:
    """The greedy-path forking pivots of one problem (see the module docstring).

    Args:
        gold: the problem's numeric answer (judges completions).
        prompt_ids: the prompt's tokens (non-empty).
        greedy_ids: the greedy trace's generated tokens (after the prompt).
        greedy_correct: the greedy trace's correctness (completions that differ make pivots).
        gen: generation settings; completions are greedy, capped at ``gen.max_new_tokens`` trace
            tokens in all, as in :func:`~cca_fast.stages.pivots.search.make_completer`.
        prefix_cache: reused for the teacher-forced pass and the completions (``batched`` and
            ``gen.share_prefix`` only, as in the branching search).
        batched: ``False`` = the reference: completions one at a time, no prefix reuse.
        marker: the new-question marker that cuts a trace (default ``"\\nQ:"``).

    Returns:
        ``(examples, stats)``: examples in increasing ``t``, method ``"greedy_fork"``, meta
        ``{"t", "p_alt", "p_greedy", "on_greedy_path": True}``; stats counts ``candidates``,
        ``completions`` (completions requested) and ``flips`` (examples made).
    """
    if len(prompt_ids) == 0:
        raise CCAError(f"problem {problem_id}: empty prompt_ids; fork pivots need the prompt the greedy trace "
                       "was generated from")
    greedy_ids = [int(x) for x in greedy_ids]
    stats = {k: 0 for k in STAT_KEYS}
    if not greedy_ids:
        return [], stats
    cache = prefix_cache if batched and gen.share_prefix else None
    cands = fork_candidates(next_token_probs(model, prompt_ids, greedy_ids, cache), greedy_ids, config)
    stats["candidates"] = len(cands)
    if not cands:
        return [], stats
    judge = TraceJudge(tokenizer, gold, marker or NEW_QUESTION_MARKER,
                       runtime.eos_ids(model, tokenizer, gen.eos_token_ids))
    complete = make_completer(model, tokenizer, prompt_ids, judge, gen, batched=batched, prefix_cache=cache)
    order = sorted(cands, key=lambda c: c.t)  # neighbouring prefixes together
    fulls = complete([greedy_ids[: c.t] + [c.alt] for c in order])
    stats["completions"] = len(order)
    examples = []
    for c, full in zip(order, fulls):
        if judge.correct(full) == bool(greedy_correct):
            continue
        g = greedy_ids[c.t]
        desired, undesired = (g, c.alt) if greedy_correct else (c.alt, g)
        pivot = Pivot(c.t, greedy_ids[: c.t], desired, undesired,
                      meta={"p_alt": c.p_alt, "p_greedy": c.p_greedy, "on_greedy_path": True})
        examples.append(to_example(pivot, prompt_ids, problem_id, greedy_correct=bool(greedy_correct), method=METHOD))
    stats["flips"] = len(examples)
    return examples, stats


def fork_pivots_for(model, tokenizer, problems: Sequence[Any], greedy_records: dict[str, dict[str, Any]],
                    gen: GenerationConfig, config: ForkConfig, progress: bool = False,
                    prefix_cache: PrefixCache | None = None,
                    dist: Dist | None = None) -> tuple[list[PivotExample], dict]:
    """:func:`fork_pivots` over ``problems`` (objects with ``id`` and ``gold``, e.g.
    :class:`~cca_fast.data.problem.Problem`), their greedy traces from ``greedy_records[id]``
    (``prompt_ids``, ``output_ids``, ``correct``). Returns all examples (problem order) and the
    summed stats, plus ``problems``. ``prefix_cache`` is emptied before every problem
    (:func:`~cca_fast.generation.prefix.start_unit`); ``dist``: the problems are shared out across
    its ranks (:func:`cca_fast.distributed.sharded`) and every rank returns the same.

    Raises:
        CCAError: a problem has no greedy record, or a record lacks a field (before any work).
    """
    from tqdm.auto import tqdm

    for p in problems:
        rec = greedy_records.get(p.id)
        if rec is None:
            raise CCAError(f"no greedy trace for problem {p.id!r}: run the greedy evaluation of these problems "
                           "first (fork pivots walk the greedy trace)")
        missing = [k for k in ("prompt_ids", "output_ids", "correct") if k not in rec]
        if missing:
            raise CCAError(f"the greedy record of problem {p.id!r} lacks {missing}; it needs prompt_ids, "
                           "output_ids and correct")
    dist = dist or Dist()

    def forks(p: Any) -> tuple[list[PivotExample], dict[str, int]]:
        start_unit(prefix_cache)
        rec = greedy_records[p.id]
        return fork_pivots(model, tokenizer, p.id, p.gold, rec["prompt_ids"], rec["output_ids"],
                           bool(rec["correct"]), gen, config, prefix_cache=prefix_cache)

    examples: list[PivotExample] = []
    totals = {"problems": len(problems), **{k: 0 for k in STAT_KEYS}}
    bar = tqdm(total=len(problems), desc="stage 1: greedy-path forks", disable=not (progress and dist.main))
    for _, (ex, stats) in sharded(dist, list(problems), forks):
        bar.update(1)
        examples.extend(ex)
        for k in STAT_KEYS:
            totals[k] += stats[k]
    bar.close()
    return examples, totals
