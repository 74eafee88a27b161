"""The stages of ``cca run`` as a loop: a :class:`Stage` reads its result back from the run
directory (:meth:`Stage.load`) or computes it (:meth:`Stage.run`); :func:`run_stages` is the one
place that times stages and stops after ``until``.

=============  ============================================  ========================================
stage          outputs (:class:`RunDir` names)               result
=============  ============================================  ========================================
``data``       ``data/{train,val,test}.jsonl``               :class:`Splits`
``base_eval``  ``eval_base_{train,test}.jsonl``              :class:`BaseEval`
``traces``     ``training_set.json``, ``traces.jsonl``       :class:`Traces`
``pivots``     ``pivots.jsonl``                              :class:`Pivots`
``examples``   ``training_examples.json``                    :class:`TrainingExamples`
``localize``   ``selection.json``                            :class:`Localized`
``diagnostics`` ``diagnostics.json``                         :class:`Diagnostics`
``update``     ``update.json``, ``delta/``                   :class:`UpdateInfo`
``cca_eval``   ``eval_cca_test.jsonl``                       :class:`CCAEval`
``report``     ``report.json``, ``report.md``, ``components.png``  :class:`~cca_fast.experiments.report.RunReport`
=============  ============================================  ========================================

``load`` returns ``None`` unless the stage's outputs are complete; ``run`` resumes from partial
outputs (evaluations, traces and pivots append one line per finished item) and writes them.

Under ``torchrun`` (:attr:`RunContext.dist` of several ranks) the stages with ``all_ranks`` (data,
``base_eval``, ``traces``, ``pivots``, ``examples``: stage 1's generation) run on every rank: their
generation batches / problems are shared out across the ranks
(:func:`cca_fast.distributed.sharded`), every rank gets every result, and only rank 0 writes
(appending in the order one process appends, so the files are the same). The other ranks then
return; rank 0 runs the later stages alone (localization, the update and its evaluation need
one model copy and no collective, so nothing waits on a barrier for hours). Every rank reads a
stage's outputs between two barriers (:func:`run_stages`), so all ranks agree on what is done.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from cca_fast.data.problem import Problem
from cca_fast.distributed import Dist
from cca_fast.errors import CCAError
from cca_fast.experiments.config import ProcedureSettings, RunConfig, procedure_settings
from cca_fast.experiments.rundir import SPLITS, RunDir
from cca_fast.io import atomic_write_json, read_json, read_jsonl
from cca_fast.models import runtime

if TYPE_CHECKING:
    from cca_fast.data.splits import Splits as DataSplits


# ---- the protocol and the loop -------------------------------------------------------------------
class Stage(Protocol):
    """One stage of a run.

    Attributes:
        name: the stage's name (``--until`` takes it; ``stages.json`` times it).
        outputs: the :class:`RunDir` names of the files the stage writes.
        all_ranks: under ``torchrun``, every rank runs the stage (sharing out its generation;
            rank 0 writes); else rank 0 alone, after the other ranks have returned.
    """

    name: str
    outputs: tuple[str, ...]
    all_ranks: bool

    def load(self, ctx: "RunContext") -> Any | None:
        """The result read back from complete outputs (no model work), else ``None``."""

    def run(self, ctx: "RunContext") -> Any:
        """Compute the result (resuming from partial outputs) and write the outputs."""


@dataclass
class RunContext:
    """What the stages of one run share: the configuration, its directory, the loaded model
    (``None`` where only files are read) and the results of the stages so far."""

    config: RunConfig
    rd: RunDir
    progress: bool = True
    model: Any = None
    tokenizer: Any = None
    space: Any = None  # ComponentSpace
    prefix_cache: Any = None  # PrefixCache: the exemplars' key/values, once per weights
    model_holds_update: bool = False  # the model in memory holds the (no-mask) update
    pending_splits: Any = None  # data.splits.Splits made (and checked) before config.json was written
    results: dict[str, Any] = field(default_factory=dict)
    dist: Dist = field(default_factory=Dist)  # the torchrun ranks (one rank outside torchrun)

    @property
    def settings(self) -> ProcedureSettings:
        return procedure_settings(self.config)

    @property
    def writes(self) -> bool:
        """Whether this process writes the run directory (rank 0)."""
        return self.dist.main

    def say(self, message: str | None) -> None:
        if message and self.progress and self.dist.main:
            print(message, flush=True)


def run_stages(stages: Sequence[Stage], ctx: RunContext, *, until: str | None = None) -> Any | None:
    """Run (or load) ``stages`` in order; returns the last stage's result, or ``None`` when
    stopped by ``until`` before it. Seconds of every stage that ran go to ``stages.json``.

    On ranks other than 0 (``ctx.dist``) it returns ``None`` at the first stage without
    ``all_ranks``; an ``all_ranks`` stage is loaded by every rank between barriers (so no rank
    reads while rank 0 writes), and the ranks must agree on whether it is complete."""
    names = [s.name for s in stages]
    if until is not None and until not in names:
        raise CCAError(f"unknown stage {until!r} (--until); stages: {', '.join(names)}")
    for stage in stages:
        if not ctx.dist.main and not stage.all_ranks:
            return None
        result = _load(stage, ctx)
        if result is None:
            t = time.perf_counter()
            result = stage.run(ctx)
            if ctx.writes:
                ctx.rd.record_seconds(stage.name, time.perf_counter() - t)
        ctx.results[stage.name] = result
        ctx.say(result.message() if hasattr(result, "message") else None)
        if stage.name == until and stage is not stages[-1]:
            return None
    return ctx.results[stages[-1].name]


def _load(stage: Stage, ctx: RunContext) -> Any | None:
    """``stage.load(ctx)``; for an ``all_ranks`` stage on several ranks, between barriers, and
    checked to be complete on every rank or on none."""
    if ctx.dist.world == 1 or not stage.all_ranks:
        return stage.load(ctx)
    ctx.dist.barrier()  # every write of the stages before is done
    result = stage.load(ctx)
    complete = ctx.dist.all_gather_object(result is not None)  # and nobody writes before all have read
    if len(set(complete)) > 1:
        raise CCAError(f"the ranks disagree on whether stage {stage.name!r} is complete in {ctx.rd.path} "
                       f"(rank: complete {dict(enumerate(complete))}): is the run directory on storage that every "
                       "rank sees the same?")
    return result


def _read_records(path, problems: Sequence[Problem], key: str = "id") -> list[dict[str, Any]] | None:
    """The records of ``path`` aligned with ``problems``, or ``None`` if any is missing."""
    if not path.exists():
        return None
    done = {r[key]: r for r in read_jsonl(path)}
    if any(p.id not in done for p in problems):
        return None
    return [done[p.id] for p in problems]


# ---- results ---------------------------------------------------------------------------------------
@dataclass
class Splits:
    """The run's problems: the training split, and the validation and test problems (capped)."""

    train: list[Problem]
    val: list[Problem]
    test: list[Problem]

    def message(self) -> str:
        return f"data: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test problems"


@dataclass
class BaseEval:
    """The base model's greedy records of the training split and the test summary."""

    train_records: list[dict[str, Any]]
    train: dict[str, Any]
    test: dict[str, Any]

    def message(self) -> str:
        return f"base accuracy: train {self.train['accuracy']:.3f}, test {self.test['accuracy']:.3f}"


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
class Localized:
    """Stage 2: the selection (``None`` for the no-mask baseline)."""

    selection: Any  # Selection | None
    total: int

    def message(self) -> str | None:
        if self.selection is None:
            return None
        return (f"stage 2: {len(self.selection.indices)} of {self.total} components selected "
                f"({self.selection.counts})")


@dataclass
class UpdateInfo:
    """Stage 3: ``update.json`` (the delta itself is in ``delta/``)."""

    best_step: int
    best_val: float | None
    history: list[dict[str, Any]]
    config: dict[str, Any]

    def message(self) -> str:
        return f"stage 3: best step {self.best_step} (validation accuracy {self.best_val})"


@dataclass
class TrainingExamples:
    """Stage 3's training pivots (after ``pivot_source`` and ``pivot_filter``) and their counts."""

    examples: list
    stats: dict[str, Any]

    def message(self) -> str:
        return f"training examples: {len(self.examples)} ({self.stats.get('source')}, filter {self.stats.get('filter')})"


@dataclass
class Diagnostics:
    """``diagnostics.json`` (``None`` when ``RunConfig.diagnostics`` is off)."""

    data: dict[str, Any] | None

    def message(self) -> str | None:
        if not self.data:
            return None
        t = (self.data.get("transfer") or {}).get("ratio")
        a = (self.data.get("alignment") or {}).get("mean_pairwise_cos")
        return ("diagnostics: held-out / training gain of one step "
                + ("n/a" if t is None else f"{t:.2f}") + ", mean pairwise gradient cosine "
                + ("n/a" if a is None else f"{a:.3f}"))


@dataclass
class CCAEval:
    """The updated model on the test problems."""

    test: dict[str, Any]


# ---- the stages --------------------------------------------------------------------------------------
class DataStage:
    """Seeded per-template splits of the data; validation and test problems capped."""

    name = "data"
    outputs = tuple(RunDir.split_name(s) for s in SPLITS)
    all_ranks = True

    def load(self, ctx: RunContext) -> Splits | None:
        if not all((ctx.rd / o).exists() for o in self.outputs):
            return None
        from cca_fast.experiments.pipeline import _subset

        c = ctx.config
        train, val, test = (ctx.rd.read_split(s) for s in SPLITS)
        splits = Splits(train, _subset(val, c.max_val_problems, c.seed), _subset(test, c.max_test_problems, c.seed))
        check_splits(splits.train, splits.val, splits.test, c)
        check_gold_solutions(splits.train, c)
        return splits

    def run(self, ctx: RunContext) -> Splits:
        from cca_fast.data.loaders import write_problems_jsonl

        if ctx.writes:
            splits = ctx.pending_splits if ctx.pending_splits is not None else make_splits(ctx.config)
            for s in SPLITS:
                write_problems_jsonl(getattr(splits, s), ctx.rd.split(s))
        ctx.dist.barrier()  # the other ranks read what rank 0 wrote
        return self.load(ctx)


def make_splits(config: RunConfig) -> "DataSplits":
    """The seeded per-template splits (:class:`cca_fast.data.splits.Splits`) of ``config``'s data,
    with ``extra_train_data``'s problems added to the training split (:func:`add_extra_train`),
    checked by :func:`check_splits` (no model, nothing written)."""
    from cca_fast.data import split_problems

    splits = split_problems(load_source(config, config.data), seed=config.seed)
    splits = add_extra_train(splits, config)
    check_splits(splits.train, splits.val, splits.test, config)
    return splits


def load_source(config: RunConfig, source: str | None) -> list[Problem]:
    """The problems of ``source`` (``config.data`` or ``config.extra_train_data``), loaded with
    ``config``'s instantiation settings (``n_per_template``, ``seed``, integer answers, bad
    templates)."""
    from cca_fast.data import InstantiateConfig, load_problems

    c = config
    return load_problems(source, n_per_template=c.n_per_template, seed=c.seed,
                         instantiate_config=InstantiateConfig(integer_answers=c.integer_answers),
                         skip_bad_templates=c.skip_bad_templates)


def add_extra_train(splits: "DataSplits", config: RunConfig) -> "DataSplits":
    """``splits`` with the problems of ``config.extra_train_data`` (at most ``extra_train_max``,
    a seeded draw, in file order, after leaving out repeats of main-data questions:
    :func:`cca_fast.data.splits.fresh_extra`) added to the training split only, ids prefixed
    ``extra:``; ``splits`` itself without extra data.

    Raises:
        DataError / TemplateError: naming ``--extra-train-data`` and the source when it
            cannot be loaded (a missing file, a line without an answer, ...), before any model
            is loaded.
    """
    source = config.extra_train_data
    if source is None:
        return splits
    import dataclasses
    import logging

    from cca_fast.data.splits import as_extra, fresh_extra
    from cca_fast.evaluation.suites.common import seeded_subset

    where = f"--extra-train-data {source}"
    try:
        extra = as_extra(load_source(config, source))
    except CCAError as e:  # DataError, TemplateError: the message says which file and line
        raise type(e)(f"{where}: {e}") from None
    fresh, repeats = fresh_extra(splits, extra, where)
    if repeats:
        logging.getLogger("cca_fast.data").warning(
            "%s: %d problem(s) left out: their question is also a question of the main data %s", where,
            repeats, config.data or "(built-in templates)")
    kept = seeded_subset(fresh, config.extra_train_max, config.seed, "extra_train")
    return dataclasses.replace(splits, train=[*splits.train, *kept])


def check_gold_solutions(train: Sequence[Problem], config: RunConfig) -> None:
    """:class:`CCAError` before any generation when the objective trains on gold solutions
    (``gold_nll``, recipe ``circuit-sft``) and a training problem has none (or no ``#### N``)."""
    if config.update.objective != "gold_nll":
        return
    from cca_fast.baselines.lora.sft import gold_target
    from cca_fast.errors import DataError

    for p in train:
        try:
            gold_target(p)
        except DataError as e:
            raise CCAError(f"objective gold_nll trains the selected rows on the training problems' gold solutions, "
                           f"and {e}: give every problem an 'answer' solution ending '#### N', or use a pivot "
                           "objective (--recipe paper, or --objective logit_diff / hinge)") from None


def min_per_template() -> int:
    """The fewest instances per template whose split gives every part at least one problem."""
    from cca_fast.data.splits import split_counts

    return next(n for n in range(1, 10_000) if min(split_counts(n)) > 0)


def check_splits(train: Sequence[Problem], val: Sequence[Problem], test: Sequence[Problem],
                 config: RunConfig) -> None:
    """Refuse an empty split: an empty validation split scores 0.0 at every update step (every
    update is discarded), an empty test split reports 0.0% vs 0.0%, an empty training split
    gives stage 1 nothing. The message names the split, the counts and the fix."""
    counts = {"train": len(train), "val": len(val), "test": len(test)}
    empty = [s for s, n in counts.items() if n == 0]
    if not empty:
        return
    from cca_fast.data.splits import PAPER_FRACTIONS

    sizes = ", ".join(f"{s} {n}" for s, n in counts.items())
    need = min_per_template()
    percent = "/".join(f"{f * 100:g}" for f in PAPER_FRACTIONS)
    fix = (f"raise --n-per-template to at least {need} (now {config.n_per_template})" if config.data is None
           else f"give each template of {config.data} at least {need} problems (or use --n-per-template "
                f">= {need} for a template folder)")
    raise CCAError(f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty ({sizes} "
                   f"problems): each template is split {percent}% "
                   f"into train/val/test, so small templates leave a split without problems; {fix}")


class BaseEvalStage:
    """Greedy traces of the training split (kept with token ids) and the base test accuracy."""

    name = "base_eval"
    outputs = (RunDir.BASE_TRAIN, RunDir.BASE_TEST)
    all_ranks = True

    def load(self, ctx: RunContext) -> BaseEval | None:
        from cca_fast.evaluation.evaluate import summarize

        splits: Splits = ctx.results["data"]
        train = _read_records(ctx.rd.base_train, splits.train)
        test = _read_records(ctx.rd.base_test, splits.test)
        if train is None or test is None:
            return None
        return BaseEval(train, summarize(train), summarize(test))

    def run(self, ctx: RunContext) -> BaseEval:
        from cca_fast.evaluation.evaluate import summarize
        from cca_fast.experiments.pipeline import eval_resumable

        splits: Splits = ctx.results["data"]
        c, gen = ctx.config, ctx.settings.generation
        train = eval_resumable(ctx.model, ctx.tokenizer, splits.train, c.prompt, gen, ctx.rd.base_train,
                               "base eval (train)", ctx.progress, prefix_cache=ctx.prefix_cache, dist=ctx.dist)
        test = eval_resumable(ctx.model, ctx.tokenizer, splits.test, c.prompt, gen, ctx.rd.base_test,
                              "base eval (test)", ctx.progress, keep_ids=False, prefix_cache=ctx.prefix_cache,
                              dist=ctx.dist)
        return BaseEval(train, summarize(train), summarize(test))


class TracesStage:
    """Stage 1a: the training problems of weak templates (recorded in ``training_set.json``),
    and for each a flipped sample if one of ``trace.k`` has the opposite correctness."""

    name = "traces"
    outputs = (RunDir.TRAINING_SET, RunDir.TRACES)
    all_ranks = True

    def _training_set(self, ctx: RunContext) -> tuple[list[Problem], list[str]]:
        from cca_fast.experiments.pipeline import training_problems

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
        records = _read_records(ctx.rd.traces, chosen, key="problem_id")
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


class PivotsStage:
    """Stage 1b: the pivotal token of every flipped pair (``pivot_method``)."""

    name = "pivots"
    outputs = (RunDir.PIVOTS,)
    all_ranks = True

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
        from cca_fast.experiments.pipeline import pivot_totals

        return self._checked(*pivot_totals(flipped, done))

    def run(self, ctx: RunContext) -> Pivots:
        from cca_fast.experiments.pipeline import find_pivots

        s = ctx.settings
        examples, stats = find_pivots(ctx.model, ctx.tokenizer, ctx.results["traces"].pairs, ctx.config.pivot_method,
                                      s.branching, s.generation, ctx.rd.pivots, ctx.progress,
                                      prefix_cache=ctx.prefix_cache, dist=ctx.dist)
        return self._checked(examples, stats)


class TrainingExamplesStage:
    """Stage 3's training pivots: the paper's (``pivots.jsonl``), greedy-path forks of the
    training problems (:mod:`cca_fast.stages.pivots.fork`), or both (``pivot_source``); then
    ``pivot_filter``. With the paper's settings they are ``pivots.jsonl`` as it is."""

    name = "examples"
    outputs = (RunDir.TRAINING_EXAMPLES,)
    all_ranks = True  # the forks are shared out; the filter runs on every rank (cheap), rank 0 writes

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


class LocalizeStage:
    """Stage 2: the components of ``selector`` (none for the no-mask baseline)."""

    name = "localize"
    outputs = (RunDir.SELECTION,)
    all_ranks = False

    def load(self, ctx: RunContext) -> Localized | None:
        from cca_fast.stages.localize.select import Selection

        total = ctx.space.total if ctx.space is not None else 0
        if ctx.config.selector == "none":
            return Localized(None, total)
        if not ctx.rd.selection.exists():
            return None
        return Localized(Selection.from_dict(read_json(ctx.rd.selection)), total)

    def run(self, ctx: RunContext) -> Localized:
        from cca_fast.experiments.pipeline import localize

        selection = localize(ctx.model, ctx.space, ctx.results["examples"].examples, ctx.config, ctx.progress)
        atomic_write_json(ctx.rd.selection, selection.to_dict())
        return Localized(selection, ctx.space.total)


def gold_examples(ctx: RunContext) -> list | None:
    """The gold-solution examples of stage 1's training problems (``None`` when a problem has no
    solution text, e.g. a template without one)."""
    from cca_fast.baselines.lora.sft import build_sft_examples
    from cca_fast.errors import DataError

    try:
        return build_sft_examples(ctx.results["traces"].problems, ctx.tokenizer, ctx.config.prompt)
    except DataError:
        return None


def validation_problems(config: RunConfig, splits: "Splits", training_ids: Sequence[str]) -> list[Problem]:
    """The problems every update step (and the LoRA baseline's epochs) is selected on: the
    validation split plus ``val_from_train`` training-split problems stage 1 did not use (a
    seeded draw; never extra training problems, ``RunConfig.extra_train_data``), so that one
    problem moves validation accuracy less."""
    if not config.val_from_train:
        return list(splits.val)
    import random

    from cca_fast.data.splits import is_extra

    used = set(training_ids)
    unused = [p for p in splits.train if p.id not in used and not is_extra(p)]
    extra = random.Random(f"val_from_train:{config.seed}").sample(unused, min(config.val_from_train, len(unused)))
    return list(splits.val) + sorted(extra, key=lambda p: p.id)


class DiagnosticsStage:
    """Why the update will or will not transfer, before stage 3 spends the evaluation
    (:func:`cca_fast.experiments.diagnostics.diagnose`): the pivot table (direction, position,
    desired token already the argmax, on the greedy path), the pairwise alignment of per-pivot
    gradients on the selected rows, the leave-fold-out gain of one step relative to its training
    gain, and the alignment with lowering the gold solutions' loss. The no-mask baseline gets the
    pivot table only (its per-pivot gradients would be whole models)."""

    name = "diagnostics"
    outputs = (RunDir.DIAGNOSTICS,)
    all_ranks = False

    def load(self, ctx: RunContext) -> Diagnostics | None:
        if not ctx.config.diagnostics:
            return Diagnostics(None)
        return Diagnostics(read_json(ctx.rd.diagnostics)) if ctx.rd.diagnostics.exists() else None

    def run(self, ctx: RunContext) -> Diagnostics:
        from cca_fast.experiments.diagnostics import diagnose, pivot_table, summarize_pivots

        examples = ctx.results["examples"].examples
        greedy = {r["id"]: r["output_ids"] for r in ctx.results["base_eval"].train_records if "output_ids" in r}
        selection = ctx.results["localize"].selection
        if selection is None:
            rows = pivot_table(ctx.model, examples, greedy)
            data: dict[str, Any] = {"n_examples": len(examples), "pivots": {"rows": rows, "summary": summarize_pivots(rows)}}
        else:
            data = diagnose(ctx.model, ctx.space, examples, selection.indices, greedy=greedy, gold=gold_examples(ctx),
                            lr=ctx.settings.update.lr, folds=min(5, max(2, len(examples))), seed=ctx.config.seed,
                            max_examples=32)
        atomic_write_json(ctx.rd.diagnostics, data)
        return Diagnostics(data)


class UpdateStage:
    """Stage 3: gradient descent on the selected rows (every weight for the no-mask baseline),
    the best step by validation accuracy; the delta is saved and the model reverted to the base
    (the no-mask delta holds no base rows: the model then keeps the update)."""

    name = "update"
    outputs = (RunDir.UPDATE, RunDir.DELTA)
    all_ranks = False

    def load(self, ctx: RunContext) -> UpdateInfo | None:
        return UpdateInfo(**read_json(ctx.rd.update)) if ctx.rd.update.exists() else None

    def run(self, ctx: RunContext) -> UpdateInfo:
        import dataclasses

        from cca_fast.delta import revert_delta
        from cca_fast.evaluation.evaluate import summarize
        from cca_fast.experiments.pipeline import eval_resumable
        from cca_fast.stages.update import run_update

        selection = ctx.results["localize"].selection
        c, s, tok = ctx.config, ctx.settings, ctx.tokenizer
        val = validation_problems(c, ctx.results["data"], [p.id for p in ctx.results["traces"].problems])
        # the no-mask baseline changes every row: its delta is a full model, so no base copy in it
        ucfg = s.update if selection is not None else dataclasses.replace(s.update, scope="all", store_base_rows=False)

        def validate(m) -> float:
            recs = eval_resumable(m, tok, val, c.prompt, s.generation, None, "validation", False, keep_ids=False,
                                  prefix_cache=ctx.prefix_cache)
            return summarize(recs)["accuracy"]

        gold = gold_examples(ctx) if ucfg.objective == "gold_nll" else None
        if ucfg.objective == "gold_nll" and not gold:
            raise CCAError("objective gold_nll needs gold solutions of the training problems, and this data has "
                           "none (a template without a solution?): use a pivot objective")
        result = run_update(ctx.model, ctx.space, selection.indices if selection is not None else [],
                            ctx.results["examples"].examples, ucfg, validate=validate, progress=ctx.progress,
                            gold=gold)
        result.delta.meta.update({"selection": selection.to_dict() if selection is not None else None,
                                  "run_config": c.to_dict()})
        result.delta.save(ctx.rd.delta)
        if selection is not None:
            revert_delta(ctx.model, result.delta)  # back to the base: the test stage applies the saved delta
        else:
            ctx.model_holds_update = True
        info = {"best_step": result.best_step, "best_val": result.best_val, "history": result.history,
                "config": result.config}
        atomic_write_json(ctx.rd.update, info)
        return UpdateInfo(**read_json(ctx.rd.update))


class CCAEvalStage:
    """The updated model (base + the saved delta) on the test problems."""

    name = "cca_eval"
    outputs = (RunDir.CCA_TEST,)
    all_ranks = False

    def load(self, ctx: RunContext) -> CCAEval | None:
        from cca_fast.evaluation.evaluate import summarize

        records = _read_records(ctx.rd.cca_test, ctx.results["data"].test)
        return None if records is None else CCAEval(summarize(records))

    def run(self, ctx: RunContext) -> CCAEval:
        from cca_fast.delta import SparseDelta, apply_delta
        from cca_fast.evaluation.evaluate import summarize
        from cca_fast.experiments.pipeline import eval_resumable

        if not ctx.model_holds_update:
            apply_delta(ctx.model, SparseDelta.load(ctx.rd.delta))
            ctx.model_holds_update = True
        records = eval_resumable(ctx.model, ctx.tokenizer, ctx.results["data"].test, ctx.config.prompt,
                                 ctx.settings.generation, ctx.rd.cca_test, "CCA eval (test)", ctx.progress,
                                 keep_ids=False)
        return CCAEval(summarize(records))


def diagnostics_summary(data: dict[str, Any] | None, rd: RunDir) -> dict[str, Any]:
    """The report's diagnostics: the summaries of ``diagnostics.json`` (no per-pivot rows) and
    how many test traces the update changed at all (base vs updated greedy outputs)."""
    from cca_fast.experiments.diagnostics import changed_traces

    out: dict[str, Any] = {}
    if data:
        out["pivots"] = (data.get("pivots") or {}).get("summary")
        for key in ("alignment", "gold", "gradient_subsample"):
            if data.get(key) is not None:
                out[key] = data[key] if key != "gradient_subsample" else {
                    k: v for k, v in data[key].items() if k != "indices"}
        if data.get("transfer"):
            out["transfer"] = {k: v for k, v in data["transfer"].items() if k != "per_fold"}
    if rd.base_test.exists() and rd.cca_test.exists():
        out["changed_traces"] = changed_traces(read_jsonl(rd.base_test), read_jsonl(rd.cca_test))
    return out


class ReportStage:
    """``report.json``, ``report.md`` and ``components.png`` (always rewritten: cheap, and the
    seconds change on every resumption)."""

    name = "report"
    outputs = (RunDir.REPORT_JSON, RunDir.REPORT_MD, RunDir.COMPONENTS_PNG)
    all_ranks = False

    def load(self, ctx: RunContext) -> None:
        return None

    def run(self, ctx: RunContext):
        from cca_fast.experiments.report import RunReport, write_report

        c, r, space = ctx.config, ctx.results, ctx.space
        selection = r["localize"].selection
        base, update, cca_test = r["base_eval"], r["update"], r["cca_eval"].test
        step0 = next((h for h in update.history if h.get("step") == 0 and h.get("val") is not None), None)
        n_sel = len(selection.indices) if selection is not None else space.total
        report = RunReport(
            model=c.model or "default (SmolLM2-135M-Instruct)",
            data=c.data or "builtin",
            seed=c.seed,
            selector=c.selector,
            pivot_method=c.pivot_method + (f" ({ctx.settings.branching})" if c.pivot_method == "branching" else ""),
            procedure=c.procedure,
            base_accuracy=base.test["accuracy"],
            cca_accuracy=cca_test["accuracy"],
            base_micro_accuracy=base.test["micro_accuracy"],
            cca_micro_accuracy=cca_test["micro_accuracy"],
            n_test=cca_test["n"],
            base_train_accuracy=base.train["accuracy"],
            base_val_accuracy=step0.get("val") if step0 else None,
            best_val_accuracy=update.best_val,
            best_step=update.best_step,
            weak_templates=r["traces"].weak_templates,
            n_train_problems=len(r["traces"].problems),
            n_flipped=r["traces"].n_flipped,
            n_examples=len(r["examples"].examples),
            pivot_search=r["pivots"].stats,
            components_selected=n_sel,
            components_total=space.total,
            fraction=n_sel / space.total,
            per_kind=(selection.counts if selection is not None
                      else {k: space.counts[k] * space.n_layers for k in space.counts}),
            component_space=space.describe(),
            delta=str(ctx.rd.delta),
            seconds=ctx.rd.seconds(),
            training_examples=r["examples"].stats,
            diagnostics=diagnostics_summary(r["diagnostics"].data, ctx.rd),
            attn_implementation=runtime.attention_backend(ctx.model),
        )
        per_layer = (space.layer_kind_counts(selection.indices) if selection is not None
                     else {k: [space.counts[k]] * space.n_layers for k in space.counts})
        write_report(ctx.rd.path, report, per_layer, space.counts)
        return report


#: the stages of ``cca run``, in order
STAGES: tuple[Stage, ...] = (DataStage(), BaseEvalStage(), TracesStage(), PivotsStage(), TrainingExamplesStage(),
                             LocalizeStage(), DiagnosticsStage(), UpdateStage(), CCAEvalStage(), ReportStage())
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def outputs_through(stage: str) -> tuple[str, ...]:
    """The :class:`RunDir` names written by the stages up to and including ``stage``."""
    if stage not in STAGE_NAMES:
        raise CCAError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_NAMES)}")
    return tuple(o for s in STAGES[: STAGE_NAMES.index(stage) + 1] for o in s.outputs)
