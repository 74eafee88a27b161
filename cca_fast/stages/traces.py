"""Stage 1a: greedy trace and a flipped sample for each training problem (docs/method.md section 1).

For each problem: the greedy trace ``T_g`` (taken from the base evaluation, so it is not generated
twice), then up to ``k`` samples at temperature 1.2 when ``T_g`` is correct (looking for a wrong
sample) or 0.8 when it is wrong; the first sample, in order, whose correctness is the opposite of
``T_g`` is kept. Samples are drawn ``sample_batch`` at a time with per-problem seeds, so results do
not depend on how the work was split or resumed. Problems with no flip are recorded too (and
dropped later). Under ``torchrun`` the groups of problems are shared out across ranks
(:func:`cca_fast.distributed.sharded`) and rank 0 writes them. Each finished problem is appended to ``traces.jsonl`` at once: an interrupted run
resumes where it stopped.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from cca_fast.data.problem import Problem
from cca_fast.distributed import Dist, sharded
from cca_fast.generation.decode import GenerationConfig, generate
from cca_fast.io import append_jsonl, read_jsonl
from cca_fast.generation.prefix import PrefixCache, start_unit
from cca_fast.evaluation.prompting import extract_answer, is_correct


@dataclass
class TraceConfig:
    """Sampling of the flipped trace (paper defaults)."""

    k: int = 10
    temperature_if_correct: float = 1.2
    temperature_if_wrong: float = 0.8
    top_p: float = 1.0
    sample_batch: int = 4  # samples per problem per round; the first flipped one *in order* is kept
    seed: int = 0

    def __post_init__(self) -> None:
        from cca_fast import checks

        checks.integer("TraceConfig.k", self.k, flag="--k")
        checks.integer("TraceConfig.sample_batch", self.sample_batch)
        for name in ("temperature_if_correct", "temperature_if_wrong"):
            checks.number(f"TraceConfig.{name}", getattr(self, name), lo=0, lo_open=True)
        checks.number("TraceConfig.top_p", self.top_p, lo=0, hi=1, lo_open=True)


@dataclass
class GreedyTrace:
    """A problem's greedy trace: prompt tokens, generated tokens, text and correctness."""

    problem_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    correct: bool


@dataclass
class TracePair:
    """Greedy trace + the first flipped sample (``sample_index == -1`` when none flipped)."""

    problem_id: str
    gold: float
    prompt_ids: list[int]
    greedy_ids: list[int]
    greedy_text: str
    greedy_correct: bool
    sample_ids: list[int] = field(default_factory=list)
    sample_text: str = ""
    sample_correct: bool | None = None
    sample_index: int = -1
    temperature: float = 0.0
    n_sampled: int = 0
    generated_tokens: int = 0

    @property
    def flipped(self) -> bool:
        return self.sample_index >= 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TracePair":
        return cls(**d)


def problem_seed(seed: int, problem_id: str) -> int:
    """A stable 63-bit seed for ``problem_id`` (independent of order and process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()[:8], "little") >> 1


def _temperature(config: TraceConfig, greedy: GreedyTrace) -> float:
    return config.temperature_if_correct if greedy.correct else config.temperature_if_wrong


def _sample_rounds(model, tokenizer, problems: Sequence[Problem], greedy: dict[str, GreedyTrace],
                   gen: GenerationConfig, config: TraceConfig,
                   prefix_cache: PrefixCache | None = None) -> list[TracePair]:
    """Flipped samples for ``problems``, batched across problems (each sampled at its own
    temperature: :attr:`TraceConfig.temperature_if_correct` / ``_if_wrong`` by its greedy trace;
    one generation call holds both).

    Round ``r`` draws samples ``r*b .. r*b+b-1`` (``b = sample_batch``) of every problem that has
    no flip yet; sample ``j`` of a problem always uses seed ``problem_seed(seed, id) + j``, so the
    result of each problem does not depend on which problems share its batches."""
    temps = {p.id: _temperature(config, greedy[p.id]) for p in problems}
    pairs = {p.id: TracePair(p.id, p.gold, list(greedy[p.id].prompt_ids), list(greedy[p.id].output_ids),
                             greedy[p.id].text, greedy[p.id].correct, temperature=temps[p.id]) for p in problems}
    cfg = replace(gen, do_sample=True, top_p=config.top_p)
    drawn = 0
    while drawn < config.k:
        active = [p for p in problems if not pairs[p.id].flipped]
        if not active:
            break
        n = min(config.sample_batch, config.k - drawn)
        prompts = [pairs[p.id].prompt_ids for p in active for _ in range(n)]
        seeds = [problem_seed(config.seed, p.id) + drawn + j for p in active for j in range(n)]
        outs = generate(model, tokenizer, prompts, cfg, row_seeds=seeds,
                        row_temperatures=[temps[p.id] for p in active for _ in range(n)], prefix_cache=prefix_cache)
        for i, p in enumerate(active):
            pair = pairs[p.id]
            for j, out in enumerate(outs[i * n : (i + 1) * n]):
                pair.generated_tokens += out.n_generated
                ok = is_correct(extract_answer(out.text), p.gold)
                if ok != pair.greedy_correct:
                    pair.sample_ids, pair.sample_text, pair.sample_correct = list(out.output_ids), out.text, ok
                    pair.sample_index = drawn + j
                    break
            pair.n_sampled = pair.sample_index + 1 if pair.flipped else drawn + n
        drawn += n
    return [pairs[p.id] for p in problems]


def sample_flip(model, tokenizer, problem: Problem, greedy: GreedyTrace, gen: GenerationConfig,
                config: TraceConfig) -> TracePair:
    """Draw samples for one problem until one's correctness is opposite to the greedy trace's."""
    return _sample_rounds(model, tokenizer, [problem], {problem.id: greedy}, gen, config)[0]


def collect_traces(model, tokenizer, problems: Sequence[Problem], greedy: dict[str, GreedyTrace],
                   gen: GenerationConfig, config: TraceConfig, path: str | Path | None = None,
                   progress: bool = True, prefix_cache: PrefixCache | None = None,
                   dist: Dist | None = None) -> list[TracePair]:
    """Trace pairs for ``problems`` (in order), resuming from ``path`` (JSON Lines) if given.
    ``prefix_cache``: see :func:`~cca_fast.generation.decode.generate` (the exemplars; emptied
    before every group: :func:`~cca_fast.generation.prefix.start_unit`).

    Problems are processed in groups of ``max(1, gen.rows // config.sample_batch)`` (in order,
    each sampled at its own temperature), so a generation call holds samples of several
    problems and fills the decoder's rows. ``dist``: the
    groups are shared out across its ranks (:func:`cca_fast.distributed.sharded`); every rank
    returns every pair and only rank 0 writes ``path``, in the order one process writes it."""
    dist = dist or Dist()
    done: dict[str, TracePair] = {}
    if path is not None and Path(path).exists():
        for rec in read_jsonl(path):
            done[rec["problem_id"]] = TracePair.from_dict(rec)
    todo = [p for p in problems if p.id not in done]
    missing = [p.id for p in todo if p.id not in greedy]
    if missing:
        raise KeyError(f"no greedy trace for problems {missing[:5]}...")
    from tqdm.auto import tqdm

    size = max(1, gen.rows // max(1, config.sample_batch))
    groups = [todo[i : i + size] for i in range(0, len(todo), size)]

    def sample(group: list[Problem]) -> list[TracePair]:
        start_unit(prefix_cache)
        return _sample_rounds(model, tokenizer, group, greedy, gen, config, prefix_cache)

    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc="stage 1: sampling flipped traces",
               disable=not (progress and dist.main))
    try:
        for _, pairs in sharded(dist, groups, sample):
            for pair in pairs:
                done[pair.problem_id] = pair
                if path is not None and dist.main:
                    append_jsonl(path, pair.to_dict())
                bar.update(1)
    finally:
        bar.close()
    return [done[p.id] for p in problems]
