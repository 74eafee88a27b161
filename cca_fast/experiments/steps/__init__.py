"""The steps of ``cca run``, in order. A :class:`~cca_fast.experiments.steps.loop.Step` reads its
result back from the run directory (``load``) or computes it (``run``);
:func:`~cca_fast.experiments.steps.loop.run_steps` is the one place that times steps and stops
after ``until``. ("Stage" means one of the method's three stages, :mod:`cca_fast.stages`: stage 1
is the ``traces``, ``pivots`` and ``examples`` steps, stage 2 ``localize``, stage 3 ``update``.)

===============  ============================================  ========================================
step             outputs (:class:`RunDir` names)               result
===============  ============================================  ========================================
``data``         ``data/{train,val,test}.jsonl``               :class:`~.data.Splits`
``base_eval``    ``eval_base_{train,test}.jsonl``              :class:`~.evaluation.BaseEval`
``traces``       ``training_set.json``, ``traces.jsonl``       :class:`~.pivots.Traces`
``pivots``       ``pivots.jsonl``                              :class:`~.pivots.Pivots`
``examples``     ``training_examples.json``                    :class:`~.pivots.TrainingExamples`
``localize``     ``selection.json``                            :class:`~.localize.Localized`
``diagnostics``  ``diagnostics.json``                          :class:`~.diagnostics.Diagnostics`
``update``       ``update.json``, ``delta/``                   :class:`~.update.UpdateInfo`
``cca_eval``     ``eval_cca_test.jsonl``                       :class:`~.evaluation.CCAEval`
``report``       ``report.json``, ``report.md``, ``components.png``  :class:`~cca_fast.experiments.report.RunReport`
===============  ============================================  ========================================

Before a step writes, the configuration it runs with is recorded in ``made_with.json``; a resumed
run is refused when a step with outputs was made with other settings than the ones asked for
(``config.json`` edited by hand), on the fields the step depends on
(:func:`~cca_fast.experiments.steps.loop.check_made_with`).

``load`` returns ``None`` unless the step's outputs are complete; ``run`` resumes from partial
outputs (evaluations, traces and pivots append one line per finished item) and writes them.

Under ``torchrun`` (:attr:`RunContext.dist` of several ranks) the steps with ``all_ranks`` (data,
``base_eval``, ``traces``, ``pivots``, ``examples``: stage 1's generation) run on every rank: their
generation batches / problems are shared out across the ranks
(:func:`cca_fast.distributed.sharded`), every rank gets every result, and only rank 0 writes
(appending in the order one process appends, so the files are the same). Then every rank leaves
the process group together (a barrier, then the group destroyed: no rank tears down a connection
another still uses, and no group outlives the collectives); the other ranks return and rank 0 runs
the later steps alone, as one process (localization, the update and its evaluation need
one model copy and no collective, so nothing waits on a barrier for hours). Every rank reads a
step's outputs between two barriers (:func:`run_steps`), so all ranks agree on what is done.
"""
from __future__ import annotations

from cca_fast.errors import CCAError
from cca_fast.experiments.steps.data import DataStep
from cca_fast.experiments.steps.diagnostics import DiagnosticsStep
from cca_fast.experiments.steps.evaluation import BaseEvalStep, CCAEvalStep
from cca_fast.experiments.steps.localize import LocalizeStep
from cca_fast.experiments.steps.loop import RunContext, Step, check_made_with, run_steps
from cca_fast.experiments.steps.pivots import PivotsStep, TracesStep, TrainingExamplesStep
from cca_fast.experiments.steps.report import ReportStep
from cca_fast.experiments.steps.update import UpdateStep

__all__ = ["Step", "RunContext", "run_steps", "check_made_with", "STEPS", "STEP_NAMES", "outputs_through"]

#: the steps of ``cca run``, in order
STEPS: tuple[Step, ...] = (DataStep(), BaseEvalStep(), TracesStep(), PivotsStep(), TrainingExamplesStep(),
                           LocalizeStep(), DiagnosticsStep(), UpdateStep(), CCAEvalStep(), ReportStep())
#: their names (``cca run --until`` takes one)
STEP_NAMES: tuple[str, ...] = tuple(s.name for s in STEPS)


def outputs_through(step: str) -> tuple[str, ...]:
    """The :class:`RunDir` names written by the steps up to and including ``step``."""
    if step not in STEP_NAMES:
        raise CCAError(f"unknown step {step!r}; steps: {', '.join(STEP_NAMES)}")
    return tuple(o for s in STEPS[: STEP_NAMES.index(step) + 1] for o in s.outputs)
