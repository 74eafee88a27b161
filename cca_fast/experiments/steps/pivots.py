"""Stage 1 in the run: the ``traces`` step (training problems of weak templates and their trace
pairs), the ``pivots`` step (the pivotal token of every flipped pair) and the ``examples`` step
(stage 3's training pivots)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from cca_fast.data.problem import Problem
from cca_fast.data.splits import is_untemplated
from cca_fast.distributed import Dist, sharded
from cca_fast.errors import CCAError
from cca_fast.experiments.rundir import RunDir
from cca_fast.experiments.steps.data import subset
from cca_fast.experiments.steps.loop import LATER_STAGE_FIELDS, PIVOT_CHOICE_FIELDS, RunContext, read_records
from cca_fast.generation.decode import GenerationConfig
from cca_fast.generation.prefix import PrefixCache, start_unit
from cca_fast.io import append_jsonl, atomic_write_json, read_json, read_jsonl
from cca_fast.stages.examples import PivotExample
from cca_fast.stages.traces import TracePair


def training_problems(train: list[Problem], base_train: dict[str, Any], threshold: float,
                      limit: int | None, seed: int) -> tuple[list[Problem], list[str]]:
    """Training problems of *weak* templates (base accuracy below ``threshold``); without
    templates, every training problem. At most ``limit`` of them (a seeded subset).

    Extra training problems (``RunConfig.extra_train_data``) are groups of their own (template
    ``extra:<template>``, or ``extra`` without one) under the same rule: when neither the main
    data nor the extra data has templates, every training problem is used."""
    per = base_train["per_template"]
    if all(is_untemplated(t) for t in per):
        weak, chosen = [], list(train)
    else:
        weak = sorted(t for t, v in per.items() if v["accuracy"] < threshold)
        chosen = [p for p in train if p.template in set(weak)]
    return subset(chosen, limit, seed), weak


def find_pivots(model, tokenizer, pairs: Sequence[TracePair], method: str, branching: str,
                gen: GenerationConfig, path: Path | None, progress: bool = True,
                prefix_cache: PrefixCache | None = None, dist: Dist | None = None) -> tuple[list[PivotExample], dict]:
    """Stage 1b over flipped pairs, appending one line per pair to ``path`` (resumable).
    Returns the examples and totals of what the search cost. ``prefix_cache`` is emptied before
    every pair (:func:`~cca_fast.generation.prefix.start_unit`).

    ``dist``: the pairs are shared out across its ranks (:func:`cca_fast.distributed.sharded`);
    every rank returns the same, and only rank 0 writes ``path``, in one process's order."""
    from tqdm.auto import tqdm

    from cca_fast.stages.pivots.search import pivot_for_pair

    dist = dist or Dist()
    done: dict[str, dict[str, Any]] = {}
    if path is not None and path.exists():
        done = {r["problem_id"]: r for r in read_jsonl(path)}
    flipped = [p for p in pairs if p.flipped]
    todo = [p for p in flipped if p.problem_id not in done]

    def search(pair: TracePair) -> dict[str, Any]:
        start_unit(prefix_cache)
        example, stats = pivot_for_pair(model, tokenizer, pair, method, branching, gen, prefix_cache=prefix_cache)
        return {"problem_id": pair.problem_id, "example": example.to_dict() if example else None,
                "stats": asdict(stats)}

    bar = tqdm(total=len(todo), desc=f"stage 1: pivots ({method})", disable=not (progress and dist.main))
    try:
        for pair, rec in sharded(dist, todo, search):
            done[pair.problem_id] = rec
            if path is not None and dist.main:
                append_jsonl(path, rec)
            bar.update(1)
    finally:
        bar.close()
    return pivot_totals(flipped, done)


def pivot_totals(flipped: Sequence[TracePair], done: dict[str, dict[str, Any]]) -> tuple[list[PivotExample], dict]:
    """The examples of the flipped pairs' ``pivots.jsonl`` records ``done`` (by problem id), and
    totals of what the search cost."""
    examples, totals = [], {"pairs": len(flipped), "completions": 0, "generated_tokens": 0, "no_pivot": 0}
    for pair in flipped:
        rec = done[pair.problem_id]
        totals["completions"] += rec["stats"]["completions"]
        totals["generated_tokens"] += rec["stats"]["generated_tokens"]
        if rec["example"] is None:
            totals["no_pivot"] += 1
        else:
            examples.append(PivotExample.from_dict(rec["example"]))
    return examples, totals


@dataclass
class Traces:
    """Stage 1a: the training problems (of weak templates) and their trace pairs."""

    problems: list[Problem]
    weak_templates: list[str]
    pairs: list[Any]  # TracePair

    @property
    def n_flipped(self) -> int:
        return sum(p.flipped for p in self.pairs)

    def message(self) -> str:
        return f"stage 1: {self.n_flipped} of {len(self.pairs)} problems have a flipped sample"


@dataclass
class Pivots:
    """Stage 1b: pivot examples and what the search cost."""

    examples: list[Any]  # PivotExample
    stats: dict[str, int]

    def message(self) -> str:
        return f"stage 1: {len(self.examples)} pivot examples ({self.stats['generated_tokens']} tokens generated)"


@dataclass
class TrainingExamples:
    """Stage 3's training pivots (after ``pivot_source`` and ``pivot_filter``) and their counts."""

    examples: list
    stats: dict[str, Any]

    def message(self) -> str:
        return f"training examples: {len(self.examples)} ({self.stats.get('source')}, filter {self.stats.get('filter')})"


class TracesStep:
    """Stage 1a: the training problems of weak templates (recorded in ``training_set.json``),
    and for each a flipped sample if one of ``trace.k`` has the opposite correctness."""

    name = "traces"
    outputs = (RunDir.TRAINING_SET, RunDir.TRACES)
    all_ranks = True
    ignores = LATER_STAGE_FIELDS + PIVOT_CHOICE_FIELDS  # stage 1 (a study shares it between conditions)

    def _training_set(self, ctx: RunContext) -> tuple[list[Problem], list[str]]:
        c, base = ctx.config, ctx.results["base_eval"]
        chosen, weak = training_problems(ctx.results["data"].train, base.train, c.weak_threshold,
                                         c.max_train_problems, c.seed)
        if not chosen:
            raise CCAError(f"no training problems: every template has base accuracy >= {c.weak_threshold} "
                           "(raise --weak-threshold, or use harder data)")
        return chosen, weak

    def load(self, ctx: RunContext) -> Traces | None:
        from cca_fast.stages.traces import TracePair

        chosen, weak = self._training_set(ctx)
        if not ctx.rd.training_set_file.exists():
            return None
        records = read_records(ctx.rd.traces, chosen, key="problem_id")
        return None if records is None else Traces(chosen, weak, [TracePair.from_dict(r) for r in records])

    def run(self, ctx: RunContext) -> Traces:
        from cca_fast.stages.traces import GreedyTrace, collect_traces

        chosen, weak = self._training_set(ctx)
        if ctx.writes:
            ctx.rd.write_training_set(weak, [p.id for p in chosen])
        greedy = {r["id"]: GreedyTrace(r["id"], r["prompt_ids"], r["output_ids"], r["output"], bool(r["correct"]))
                  for r in ctx.results["base_eval"].train_records}
        s = ctx.settings
        pairs = collect_traces(ctx.model, ctx.tokenizer, chosen, greedy, s.generation, s.trace, ctx.rd.traces,
                               ctx.progress, prefix_cache=ctx.prefix_cache, dist=ctx.dist)
        return Traces(chosen, weak, pairs)


class PivotsStep:
    """Stage 1b: the pivotal token of every flipped pair (``pivot_method``)."""

    name = "pivots"
    outputs = (RunDir.PIVOTS,)
    all_ranks = True
    ignores = LATER_STAGE_FIELDS + PIVOT_CHOICE_FIELDS  # stage 1 (a study shares it between conditions)

    @staticmethod
    def _checked(examples: list, stats: dict[str, int]) -> Pivots:
        if not examples:
            raise CCAError("stage 1 found no pivot examples: raise --max-train-problems or --k, or use data the "
                           "model solves sometimes (both correct and wrong traces are needed)")
        return Pivots(examples, stats)

    def load(self, ctx: RunContext) -> Pivots | None:
        flipped = [p for p in ctx.results["traces"].pairs if p.flipped]
        if not ctx.rd.pivots.exists():
            return None
        done = {r["problem_id"]: r for r in read_jsonl(ctx.rd.pivots)}
        if any(p.problem_id not in done for p in flipped):
            return None
        return self._checked(*pivot_totals(flipped, done))

    def run(self, ctx: RunContext) -> Pivots:
        s = ctx.settings
        examples, stats = find_pivots(ctx.model, ctx.tokenizer, ctx.results["traces"].pairs, ctx.config.pivot_method,
                                      s.branching, s.generation, ctx.rd.pivots, ctx.progress,
                                      prefix_cache=ctx.prefix_cache, dist=ctx.dist)
        return self._checked(examples, stats)


class TrainingExamplesStep:
    """Stage 3's training pivots: the paper's (``pivots.jsonl``), greedy-path forks of the
    training problems (:mod:`cca_fast.stages.pivots.fork`), or both (``pivot_source``); then
    ``pivot_filter``. With the paper's settings they are ``pivots.jsonl`` as it is."""

    name = "examples"
    outputs = (RunDir.TRAINING_EXAMPLES,)
    all_ranks = True  # the forks are shared out; the filter runs on every rank (cheap), rank 0 writes
    ignores = LATER_STAGE_FIELDS

    def load(self, ctx: RunContext) -> TrainingExamples | None:
        from cca_fast.stages.examples import PivotExample

        if not ctx.rd.training_examples.exists():
            return None
        d = read_json(ctx.rd.training_examples)
        return TrainingExamples([PivotExample.from_dict(e) for e in d["examples"]], d["stats"])

    def run(self, ctx: RunContext) -> TrainingExamples:
        c = ctx.config
        examples: list = []
        stats: dict[str, Any] = {"source": c.pivot_source, "filter": c.pivot_filter}
        if c.pivot_source in ("paper", "both"):
            examples += ctx.results["pivots"].examples
            stats["paper"] = len(ctx.results["pivots"].examples)
        if c.pivot_source in ("fork", "both"):
            from cca_fast.stages.pivots.fork import fork_pivots_for

            greedy = {r["id"]: r for r in ctx.results["base_eval"].train_records}
            forks, fstats = fork_pivots_for(ctx.model, ctx.tokenizer, ctx.results["traces"].problems, greedy,
                                            ctx.settings.generation, c.fork, progress=ctx.progress,
                                            prefix_cache=ctx.prefix_cache, dist=ctx.dist)
            examples += forks
            stats["fork"] = {**fstats, "examples": len(forks)}
        if c.pivot_filter == "not_argmax" and examples:
            from cca_fast.experiments.diagnostics import pivot_table

            rows = pivot_table(ctx.model, examples, None)
            kept = [e for e, r in zip(examples, rows) if not r["desired_is_argmax"]]
            stats["dropped_desired_is_argmax"] = len(examples) - len(kept)
            examples = kept
        stats["examples"] = len(examples)
        if not examples:
            raise CCAError(f"no training pivots left ({stats}): use --pivot-filter all, --pivot-source both, or "
                           "more training problems (--max-train-problems)")
        if ctx.writes:
            atomic_write_json(ctx.rd.training_examples, {"stats": stats, "examples": [e.to_dict() for e in examples]})
        return TrainingExamples(examples, stats)
