"""The ``data`` step: the run's seeded per-template splits, extra training problems, and the
checks that refuse an empty split or missing gold solutions before any model work."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from cca_fast.data.problem import Problem
from cca_fast.errors import CCAError
from cca_fast.experiments.config import RunConfig
from cca_fast.experiments.rundir import SPLITS, RunDir
from cca_fast.experiments.steps.loop import LATER_STAGE_FIELDS, PIVOT_CHOICE_FIELDS, RunContext

if TYPE_CHECKING:
    from cca_fast.data.splits import Splits as DataSplits


@dataclass
class Splits:
    """The run's problems: the training split, and the validation and test problems (capped)."""

    train: list[Problem]
    val: list[Problem]
    test: list[Problem]

    def message(self) -> str:
        return f"data: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test problems"


def subset(problems: list[Problem], limit: int | None, seed: int) -> list[Problem]:
    if limit is None or limit >= len(problems):
        return problems
    idx = sorted(random.Random(seed).sample(range(len(problems)), limit))
    return [problems[i] for i in idx]


class DataStep:
    """Seeded per-template splits of the data; validation and test problems capped."""

    name = "data"
    outputs = tuple(RunDir.split_name(s) for s in SPLITS)
    all_ranks = True
    ignores = LATER_STAGE_FIELDS + PIVOT_CHOICE_FIELDS  # stage 1 (a study shares it between conditions)

    def load(self, ctx: RunContext) -> Splits | None:
        if not all((ctx.rd / o).exists() for o in self.outputs):
            return None
        c = ctx.config
        train, val, test = (ctx.rd.read_split(s) for s in SPLITS)
        splits = Splits(train, subset(val, c.max_val_problems, c.seed), subset(test, c.max_test_problems, c.seed))
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
    splits = add_extra_test(splits, config)
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


def _fresh_extra(splits: "DataSplits", config: RunConfig, source: str, limit: int | None, flag: str,
                 what: str) -> list[Problem]:
    """The problems of ``source`` (ids ``extra:``) whose question is no question of ``splits``, at
    most ``limit`` (a draw seeded by ``config.seed`` and ``what``)."""
    import logging

    from cca_fast.data.splits import as_extra, fresh_extra
    from cca_fast.evaluation.suites.common import seeded_subset

    where = f"{flag} {source}"
    try:
        extra = as_extra(load_source(config, source))
    except CCAError as e:  # DataError, TemplateError: the message says which file and line
        raise type(e)(f"{where}: {e}") from None
    fresh, repeats = fresh_extra(splits, extra, where)
    if repeats:
        logging.getLogger("cca_fast.data").warning(
            "%s: %d problem(s) left out: their question is also a question of the main data %s", where,
            repeats, config.data or "(built-in templates)")
    return seeded_subset(fresh, limit, config.seed, what)


def add_extra_test(splits: "DataSplits", config: RunConfig) -> "DataSplits":
    """``splits`` with the problems of ``config.extra_test_data`` (at most ``extra_test_max``)
    added to the test split only (ids ``extra:``; repeats of main-data questions left out)."""
    if config.extra_test_data is None:
        return splits
    import dataclasses

    kept = _fresh_extra(splits, config, config.extra_test_data, config.extra_test_max, "--extra-test-data",
                        "extra_test")
    return dataclasses.replace(splits, test=[*splits.test, *kept])


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
    if config.extra_train_data is None:
        return splits
    import dataclasses

    kept = _fresh_extra(splits, config, config.extra_train_data, config.extra_train_max, "--extra-train-data",
                        "extra_train")
    return dataclasses.replace(splits, train=[*splits.train, *kept])


def check_gold_solutions(train: Sequence[Problem], config: RunConfig) -> None:
    """:class:`CCAError` before any generation when the objective trains on gold solutions
    (``gold_nll``, recipe ``circuit-sft``) and a training problem has none (or no ``#### N``)."""
    if config.update.objective != "gold_nll":
        return
    from cca_fast.stages.sft import gold_target
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
