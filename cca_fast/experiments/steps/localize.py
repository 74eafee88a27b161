"""Stage 2 in the run: the ``localize`` step (the components of ``RunConfig.selector``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from cca_fast.errors import CCAError
from cca_fast.experiments.config import RunConfig, procedure_settings
from cca_fast.experiments.rundir import RunDir
from cca_fast.experiments.steps.loop import RunContext
from cca_fast.io import atomic_write_json, read_json
from cca_fast.models.components import ComponentSpace
from cca_fast.stages.examples import PivotExample


def per_kind_budget(config: RunConfig) -> dict[str, float] | None:
    """The per-kind budget of ``config``: ``select_per_kind``, else for the objective selectors
    ``select_fraction`` of every kind, else ``None``."""
    from cca_fast.experiments.config import OBJECTIVE_SELECTORS
    from cca_fast.models.adapters import KINDS

    if config.select_per_kind:
        return dict(config.select_per_kind)
    if config.selector in OBJECTIVE_SELECTORS and config.select_fraction:
        return {k: float(config.select_fraction) for k in KINDS}
    return None


def localize(model, space: ComponentSpace, examples: Sequence[PivotExample], config: RunConfig,
             progress: bool = True, gold: Sequence | None = None):
    """Stage 2: the :class:`~cca_fast.stages.localize.select.Selection` of ``config.selector``
    (``gold``: the training problems' gold-solution examples, for fisher / grad-weight /
    movement)."""
    from cca_fast.experiments.config import OBJECTIVE_SELECTORS
    from cca_fast.stages.localize.select import kind_budget_counts, select_per_kind

    budget = per_kind_budget(config)
    if config.selector in OBJECTIVE_SELECTORS:
        from cca_fast.stages.localize import objective_scores

        if not gold:
            raise CCAError(f"selector {config.selector} scores the training problems' gold solutions, and this "
                           "data has none (a template without a solution?): use atp-fraction or dcm")
        if config.selector == "movement":
            import dataclasses

            upd = procedure_settings(config).update
            scores = objective_scores.movement_scores(model, gold, space, dataclasses.replace(
                upd, max_steps=min(3, upd.max_steps)))
        else:
            scores = objective_scores.gold_gradient_scores(model, gold, space)[config.selector]
        return select_per_kind(scores, space, budget, anti=config.select_anti, method=config.selector)
    from cca_fast.stages.localize.atp import AtPConfig, run_atp
    from cca_fast.stages.localize.dcm import run_dcm
    from cca_fast.stages.localize.select import select

    if config.selector == "atp-fraction" and budget:  # AtP ranked within each kind
        scores = run_atp(model, examples, AtPConfig(batch_size=config.generation.batch_size), progress=progress,
                         space=space)
        return select_per_kind(scores, space, budget, anti=config.select_anti, method="atp-fraction")
    seed = config.select_seed if config.select_seed is not None else config.seed
    if config.selector == "random" and config.select_layer_kinds:
        from cca_fast.stages.localize.select import select_random

        return select_random(space, dict(config.select_layer_kinds), seed=seed, match_layers=True)
    if config.selector == "random" and budget:
        return select("random", space, like=kind_budget_counts(space, budget), seed=seed)

    sel = config.selector
    if sel == "dcm":
        result = run_dcm(model, examples, procedure_settings(config).dcm, progress=progress,
                         space=space)
        selection = select("dcm", space, mask=result.mask, threshold=result.config.threshold)
        selection.params.update({"epochs": result.epochs, "stopped_early": result.stopped_early})
        return selection
    if sel in ("atp-topk", "atp-fraction"):
        scores = run_atp(model, examples, AtPConfig(batch_size=config.generation.batch_size), progress=progress, space=space)
        return select(sel, space, scores=scores, k=config.select_k, fraction=config.select_fraction)
    if sel == "random":
        if config.select_kinds:  # as many of each kind (and so as many parameters) as another selection
            return select("random", space, like=dict(config.select_kinds), seed=seed)
        count = config.select_count or max(1, round(config.select_fraction * space.total))
        return select("random", space, like=int(count), seed=seed)
    raise CCAError(f"selector {sel!r} selects nothing")


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


class LocalizeStep:
    """Stage 2: the components of ``selector`` (none for the no-mask baseline)."""

    name = "localize"
    outputs = (RunDir.SELECTION,)
    all_ranks = False
    ignores = ("update", "val_from_train", "diagnostics")  # stage 3's settings

    def load(self, ctx: RunContext) -> Localized | None:
        from cca_fast.stages.localize.select import Selection

        total = ctx.space.total if ctx.space is not None else 0
        if ctx.config.selector == "none":
            return Localized(None, total)
        if not ctx.rd.selection.exists():
            return None
        return Localized(Selection.from_dict(read_json(ctx.rd.selection)), total)

    def run(self, ctx: RunContext) -> Localized:
        from cca_fast.experiments.config import OBJECTIVE_SELECTORS
        from cca_fast.experiments.steps.update import gold_examples

        gold = gold_examples(ctx) if ctx.config.selector in OBJECTIVE_SELECTORS else None
        selection = localize(ctx.model, ctx.space, ctx.results["examples"].examples, ctx.config, ctx.progress,
                             gold=gold)
        atomic_write_json(ctx.rd.selection, selection.to_dict())
        return Localized(selection, ctx.space.total)
