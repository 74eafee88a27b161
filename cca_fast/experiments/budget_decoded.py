"""Decoded follow-ups of chosen budget-curve conditions: test accuracy and side effects.

The budget curve (:mod:`cca_fast.experiments.budget_curve`) scores every condition by the test
problems' gold log-likelihood, which needs one teacher-forced forward per problem. Accuracy needs
greedy answers, about ten times the cost, and detects a 3-point paired difference only with
~1,300 problems; so it runs here, on the conditions that decide the curve's question (e.g. the
best selector and the random draws at its budget), on the curve's test split plus an extra test
set (``extra_test_data``: e.g. the GSM8K test split); on the curve's test split alone for the
other points of the curve (``split_accuracy``: fewer problems, wider intervals); and the
side-effect suites (:func:`cca_fast.evaluation.suites.run_suites`) on the best point of each
selector.

A condition's weights are rebuilt, not stored: its recorded selection is trained again with the
curve's update settings, the recorded validation scores replayed to pick the same step. Training
on the same machine repeats the same floats; the replay checks the training loss of every step
against the record (relative 1e-6: any larger drift means different weights) and raises before
decoding when they differ.

Layout (beside the curve's files)::

    OUTPUT/decoded.json                  the DecodedConfig's settings (every call must use the same)
    OUTPUT/accuracy/<c>.json             per test problem: id, template, gold, prediction, correct,
                                         output; the replay check; seconds
    OUTPUT/accuracy/<c>.partial.jsonl    finished chunks of an interrupted evaluation (resumed)
    OUTPUT/accuracy_split/<c>.json       the same, on the curve's test split only
    OUTPUT/side_effects/<c>.json         the suites' results (:func:`run_suites`)

``<c>`` is a condition name of the curve, or ``base`` (the base weights). The curve's report
(:func:`~cca_fast.experiments.budget_curve.write_report`) reads these files.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cca_fast.errors import CCAError
from cca_fast.evaluation.suites import SuiteConfig
from cca_fast.experiments import config_io
from cca_fast.experiments.budget_curve import BudgetCurveConfig, _Session, pending
from cca_fast.experiments.config import GenerationSettings
from cca_fast.io import atomic_write_json, check_or_write_config, read_json

#: relative tolerance of the replayed training loss: a replay on the same machine repeats the
#: recorded floats exactly; anything above float32 rounding of a mean loss means other weights
REPLAY_RTOL = 1e-6


def _suite_defaults() -> SuiteConfig:
    from cca_fast.experiments.study import study_suite_defaults

    return study_suite_defaults()


@dataclass
class DecodedConfig:
    """Which conditions are decoded, on which problems.

    Attributes:
        accuracy: condition names (the curve's, or ``base``) whose test accuracy is measured, in
            run order.
        split_accuracy: condition names whose test accuracy is measured on the curve's test split
            only (``extra_test_data`` left out: cheap enough for every point of the curve);
            written to ``accuracy_split/``; one already in ``accuracy`` is not decoded again (its
            records on the split are those).
        side_effects: condition names whose side-effect suites run (``base`` first, to compare).
        extra_test_data: a problem file or source added to the curve's test split for accuracy
            (as ``cca run --extra-test-data``: repeats of the curve's questions left out, ids
            ``extra:``); ``extra_test_max``: at most this many of them (a seeded draw).
        generation: greedy decoding settings (as ``cca run``'s).
        suites: the side-effect suites' sizes (default: those of ``cca study``).
    """

    accuracy: list[str] = field(default_factory=lambda: ["base"])
    side_effects: list[str] = field(default_factory=list)
    split_accuracy: list[str] = field(default_factory=list)
    extra_test_data: str | None = None
    extra_test_max: int | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    suites: SuiteConfig = field(default_factory=_suite_defaults)

    def to_dict(self) -> dict[str, Any]:
        return config_io.to_dict(self)

    def names(self) -> list[str]:
        """Every condition this config decodes (each once)."""
        return list(dict.fromkeys([*self.accuracy, *self.split_accuracy, *self.side_effects]))

    def settings(self) -> dict[str, Any]:
        """What the decoded files depend on (``decoded.json``): everything but the lists of
        conditions, so that a later call may decode more conditions with the same settings."""
        return {k: v for k, v in self.to_dict().items() if k not in ("accuracy", "split_accuracy", "side_effects")}


def accuracy_path(output: str | Path, name: str) -> Path:
    return Path(output) / "accuracy" / f"{name}.json"


def split_accuracy_path(output: str | Path, name: str) -> Path:
    return Path(output) / "accuracy_split" / f"{name}.json"


def side_effect_path(output: str | Path, name: str) -> Path:
    return Path(output) / "side_effects" / f"{name}.json"


def pending_decoded(curve: BudgetCurveConfig, decoded: DecodedConfig) -> list[str]:
    """``accuracy:<c>`` / ``split_accuracy:<c>`` / ``side_effects:<c>`` entries not yet written,
    in run order."""
    out = curve.output
    return ([f"accuracy:{n}" for n in decoded.accuracy if not accuracy_path(out, n).exists()]
            + [f"split_accuracy:{n}" for n in decoded.split_accuracy if n not in decoded.accuracy
               and not accuracy_path(out, n).exists() and not split_accuracy_path(out, n).exists()]
            + [f"side_effects:{n}" for n in decoded.side_effects if not side_effect_path(curve.output, n).exists()])


def _check_names(curve: BudgetCurveConfig, decoded: DecodedConfig) -> None:
    known = {c["name"] for c in curve.conditions()}
    bad = [n for n in decoded.names() if n != "base" and n not in known]
    if bad:
        raise CCAError(f"DecodedConfig names conditions the curve does not have: {', '.join(bad)}; "
                       f"use 'base' or one of {', '.join(sorted(known))}")
    not_run = set(pending(curve))
    missing = [n for n in decoded.names() if n in not_run]
    if missing:
        raise CCAError(f"conditions {', '.join(missing)} have not been run yet: run_budget_curve first "
                       f"(their weights are rebuilt from {Path(curve.output) / 'conditions'})")


def test_problems(curve: BudgetCurveConfig, decoded: DecodedConfig, session_test: list) -> list:
    """The curve's test problems, then ``extra_test_data``'s (seeded draw of ``extra_test_max``)."""
    if decoded.extra_test_data is None:
        return list(session_test)
    from cca_fast.data.splits import is_extra
    from cca_fast.experiments.config import RunConfig
    from cca_fast.experiments.steps.data import make_splits

    rc = RunConfig(data=curve.data, n_per_template=curve.n_per_template, seed=curve.seed,
                   extra_test_data=decoded.extra_test_data, extra_test_max=decoded.extra_test_max)
    return [*session_test, *(p for p in make_splits(rc).test if is_extra(p))]


def replay_condition(session: _Session, rec: dict[str, Any]):
    """Train ``rec``'s selection again (the curve's update settings), replaying its recorded
    validation scores; the model is left at the recorded best step. Returns the
    :class:`~cca_fast.stages.update.UpdateResult` and the largest relative difference of the
    replayed training losses. Raises :class:`CCAError` when they differ from the record by more
    than :data:`REPLAY_RTOL` or when another step would be chosen."""
    from cca_fast.delta import revert_delta
    from cca_fast.stages.localize.select import Selection
    from cca_fast.stages.update import run_update

    vals = iter([h["val"] for h in rec["history"] if "val" in h])
    update = dataclasses.replace(session.config.update, lr=rec.get("lr", session.config.update.lr))  # the chosen rate
    result = run_update(session.model, session.space, Selection.from_dict(rec["selection"]), [], update,
                        validate=lambda _m: next(vals), gold=session.gold)
    want = [h.get("train_loss") for h in rec["history"]]
    got = [h.get("train_loss") for h in result.history]
    drift = max((abs(g - w) / max(abs(w), 1e-12) for g, w in zip(got, want) if g is not None and w is not None),
                default=0.0)
    if len(got) != len(want) or drift > REPLAY_RTOL or result.best_step != rec["best_step"]:
        revert_delta(session.model, result.delta)
        raise CCAError(f"condition {rec['name']} does not reproduce: training losses {got} vs recorded {want}, "
                       f"best step {result.best_step} vs {rec['best_step']} (another machine, library version or "
                       "thread count gives other floats): rerun the curve's conditions here, in a new output folder")
    return result, drift


def _accuracy(session: _Session, decoded: DecodedConfig, name: str, problems: list, replay: dict[str, Any] | None,
              progress: bool, out: Path) -> None:
    """Greedy answers of the session's model on ``problems``, written to ``out`` (resumable
    through ``<name>.partial.jsonl`` beside it)."""
    from cca_fast.experiments.steps.evaluation import eval_resumable
    from cca_fast.generation.prefix import PrefixCache

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{name}.partial.jsonl")
    t = time.perf_counter()
    recs = eval_resumable(session.model, session.tokenizer, problems, session.config.prompt, decoded.generation.config(),
                          partial, f"accuracy {name}", progress=progress, keep_ids=False, prefix_cache=PrefixCache())
    keep = ("id", "template", "gold", "prediction", "correct", "finish_reason", "n_generated", "output")
    atomic_write_json(out, {"name": name, "n": len(recs), "replay": replay, "seconds": time.perf_counter() - t,
                            "records": [{k: r.get(k) for k in keep} for r in recs]})
    partial.unlink(missing_ok=True)


def run_decoded(curve: BudgetCurveConfig, decoded: DecodedConfig, *, limit: int | None = None,
                progress: bool = True) -> list[str]:
    """Run up to ``limit`` pending entries of ``decoded`` (all: ``None``; every accuracy before
    any side effect), then rewrite the curve's report; returns the entries still pending
    (:func:`pending_decoded`).

    Raises:
        CCAError: before the model loads, for an unknown or not yet run condition, an
            unreadable ``extra_test_data``, or a ``decoded.json`` of other settings.
    """
    from cca_fast.delta import revert_delta
    from cca_fast.experiments.budget_curve import write_report

    out = Path(curve.output)
    _check_names(curve, decoded)
    if decoded.extra_test_data is not None:  # bad data is refused before the model loads
        test_problems(curve, decoded, [])
    check_or_write_config(out / "decoded.json", decoded.settings(), DecodedConfig().settings(), "budget curve decoding")
    todo = pending_decoded(curve, decoded)
    todo = todo[: limit if limit is not None else len(todo)]
    if todo:
        s = _Session(curve)
        problems = test_problems(curve, decoded, s.test) if any(t.startswith("accuracy:") for t in todo) else []
        paths = {"accuracy": (accuracy_path, problems), "split_accuracy": (split_accuracy_path, s.test)}
        for task in todo:
            what, name = task.split(":", 1)
            if progress:
                print(f"budget curve, {what}: {name}", flush=True)
            result, replay = None, None
            if name != "base":
                result, drift = replay_condition(s, read_json(out / "conditions" / f"{name}.json"))
                replay = {"best_step": result.best_step, "max_relative_loss_difference": drift}
            try:
                if what in paths:
                    where, probs = paths[what]
                    _accuracy(s, decoded, name, probs, replay, progress, where(out, name))
                else:
                    from cca_fast.evaluation.suites import run_suites

                    path = side_effect_path(out, name)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_json(path, {**run_suites(s.model, s.tokenizer, decoded.suites), "replay": replay})
            finally:
                if result is not None:
                    revert_delta(s.model, result.delta)
    write_report(curve)
    return pending_decoded(curve, decoded)
