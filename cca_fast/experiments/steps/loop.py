"""The loop of ``cca run``'s steps: a :class:`Step` reads its result back from the run directory
(:meth:`Step.load`) or computes it (:meth:`Step.run`); :func:`run_steps` is the one place that
times steps and stops after ``until``. The steps themselves are listed in
:mod:`cca_fast.experiments.steps`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from cca_fast.data.problem import Problem
from cca_fast.distributed import Dist
from cca_fast.errors import CCAError
from cca_fast.experiments.config import ProcedureSettings, RunConfig, procedure_settings
from cca_fast.experiments.rundir import RunDir
from cca_fast.io import DISK_FULL, disk_full_error, read_jsonl


#: configuration fields that only stages 2 and 3 read (a study shares stage 1's steps between
#: conditions that differ in them); see :attr:`Step.ignores`
LATER_STAGE_FIELDS = ("selector", "select_k", "select_fraction", "select_count", "select_kinds", "dcm", "update",
                      "val_from_train", "diagnostics")
#: the fields that choose stage 3's training pivots (the ``examples`` step reads them)
PIVOT_CHOICE_FIELDS = ("pivot_source", "pivot_filter", "fork")
#: :attr:`Step.ignores` of a step whose outputs are rewritten at every run (never read back)
EVERY_FIELD = ("*",)


class Step(Protocol):
    """One step of a run.

    Attributes:
        name: the step's name (``--until`` takes it; ``stages.json`` times it).
        outputs: the :class:`RunDir` names of the files the step writes.
        all_ranks: under ``torchrun``, every rank runs the step (sharing out its generation;
            rank 0 writes); else rank 0 alone, after the other ranks have returned.
        ignores: configuration fields (dotted keys of ``RunConfig.to_dict()``, a name standing for
            everything below it) the step's outputs do not depend on: a resumed run whose
            configuration differs from the one recorded for the step only in them still reads
            them back (:func:`check_made_with`); :data:`EVERY_FIELD` for outputs never read back.
            ``()`` (the default) when unsure.
    """

    name: str
    outputs: tuple[str, ...]
    all_ranks: bool
    ignores: tuple[str, ...]

    def load(self, ctx: "RunContext") -> Any | None:
        """The result read back from complete outputs (no model work), else ``None``."""

    def run(self, ctx: "RunContext") -> Any:
        """Compute the result (resuming from partial outputs) and write the outputs."""


@dataclass
class RunContext:
    """What the steps of one run share: the configuration, its directory, the loaded model
    (``None`` where only files are read) and the results of the steps so far."""

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


def run_steps(steps: Sequence[Step], ctx: RunContext, *, until: str | None = None) -> Any | None:
    """Run (or load) ``steps`` in order; returns the last step's result, or ``None`` when
    stopped by ``until`` before it. Seconds of every step that ran go to ``stages.json``.

    On ranks other than 0 (``ctx.dist``) it returns ``None`` at the first step without
    ``all_ranks``, after every rank has left the process group together (rank 0 then runs the
    other steps as one process; also after ``until`` among the shared steps); an ``all_ranks``
    step is loaded by every rank between barriers (so no rank reads while rank 0 writes), and the
    ranks must agree on whether it is complete."""
    names = [s.name for s in steps]
    if until is not None and until not in names:
        raise CCAError(f"unknown step {until!r} (--until); steps: {', '.join(names)}")
    for step in steps:
        if ctx.dist.world > 1 and not step.all_ranks and not _part_ways(ctx):
            return None
        try:
            result = _run_or_load(step, ctx)
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            raise disk_full_error(e, f"step {step.name} of {ctx.rd.path}",
                                  f"run the same command again: it resumes at step {step.name}") from None
        ctx.results[step.name] = result
        ctx.say(result.message() if hasattr(result, "message") else None)
        if step.name == until and step is not steps[-1]:
            if ctx.dist.world > 1:
                _part_ways(ctx)
            return None
    return ctx.results[steps[-1].name]


def _part_ways(ctx: RunContext) -> bool:
    """Where the steps shared by the ranks end, every rank leaves the process group together
    (:meth:`Dist.leave`: a barrier, then the group destroyed; no group outlives the collectives,
    and nobody tears down a connection another rank still uses); rank 0 goes on as one process.
    Returns whether this process goes on."""
    main = ctx.dist.main
    ctx.dist.leave()
    ctx.dist = Dist()
    return main


def _run_or_load(step: Step, ctx: RunContext) -> Any:
    """``step``'s result: read back when its outputs are complete, else computed (and timed)."""
    result = _load(step, ctx)
    if result is None:
        if ctx.writes:  # before the first output: partial outputs are covered too
            ctx.rd.record_made_with(step.name, ctx.config.to_dict())
        t = time.perf_counter()
        result = step.run(ctx)
        if ctx.writes:
            ctx.rd.record_seconds(step.name, time.perf_counter() - t)
    return result


def check_made_with(steps: Sequence[Step], rd: RunDir, config: RunConfig) -> None:
    """Refuse to resume a run whose finished (or partial) step outputs were made with another
    configuration than ``config``: ``config.json`` says what the run is, but a hand edit of it
    (``lr`` 0.01 -> 0.05, then ``cca run --lr 0.05``) would otherwise pass off the old delta and
    report as the new ones. Each step's configuration is recorded in ``made_with.json`` before
    it writes (:meth:`RunDir.record_made_with`); a step is compared when one of its outputs
    exists, on the fields it depends on (:attr:`Step.ignores`). Steps without a record (a run
    directory of an older version, steps copied from a study's shared run) are not compared.

    Raises:
        CCAError: naming the steps, each differing field with its recorded and current value,
            the files to delete to recompute exactly those steps, and the other ways out. Nothing
            is written or deleted.
    """
    from cca_fast.io import config_differences

    records = rd.made_with()
    new, defaults = config.to_dict(), RunConfig().to_dict()
    stale: dict[str, dict[str, tuple[Any, Any]]] = {}
    for step in steps:
        old = records.get(step.name)
        ignores = getattr(step, "ignores", ())
        if old is None or ignores == EVERY_FIELD or not any((rd / o).exists() for o in step.outputs):
            continue
        diff = {k: v for k, v in config_differences(old, new, defaults).items()
                if not any(k == f or k.startswith(f + ".") for f in ignores)}
        if diff:
            stale[step.name] = diff
    if not stale:
        return
    fields = {k: v for d in stale.values() for k, v in d.items()}
    shown = "; ".join(f"{k}: {old!r} then, {now!r} now" for k, (old, now) in list(fields.items())[:6])
    more = f" and {len(fields) - 6} more" if len(fields) > 6 else ""
    files = [o + ("/" if (rd / o).is_dir() else "") for s in steps if s.name in stale for o in s.outputs
             if (rd / o).exists()]
    raise CCAError(
        f"{rd.path}: the outputs of step{'s' if len(stale) > 1 else ''} {', '.join(stale)} were made with another "
        f"configuration than the one asked for ({shown}{more}): {rd.CONFIG} was edited after they ran, so "
        f"resuming would return results of the old settings. To recompute exactly these steps with the new "
        f"settings, delete {' '.join(files)} in {rd.path} and run again; to keep them, put the old values back in "
        f"{rd.config} and run with the original flags; or use another --output directory")


def _load(step: Step, ctx: RunContext) -> Any | None:
    """``step.load(ctx)``; for an ``all_ranks`` step on several ranks, between barriers, and
    checked to be complete on every rank or on none."""
    if ctx.dist.world == 1 or not step.all_ranks:
        return step.load(ctx)
    ctx.dist.barrier()  # every write of the steps before is done
    result = step.load(ctx)
    complete = ctx.dist.all_gather_object(result is not None)  # and nobody writes before all have read
    if len(set(complete)) > 1:
        raise CCAError(f"the ranks disagree on whether step {step.name!r} is complete in {ctx.rd.path} "
                       f"(rank: complete {dict(enumerate(complete))}): is the run directory on storage that every "
                       "rank sees the same?")
    return result


def read_records(path, problems: Sequence[Problem], key: str = "id") -> list[dict[str, Any]] | None:
    """The records of ``path`` aligned with ``problems``, or ``None`` if any is missing."""
    if not path.exists():
        return None
    done = {r[key]: r for r in read_jsonl(path)}
    if any(p.id not in done for p in problems):
        return None
    return [done[p.id] for p in problems]

