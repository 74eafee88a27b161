"""The ``report`` step: ``report.json``, ``report.md`` and ``components.png``."""
from __future__ import annotations

from cca_fast.experiments.rundir import RunDir
from cca_fast.experiments.steps.diagnostics import diagnostics_summary
from cca_fast.experiments.steps.loop import EVERY_FIELD, RunContext
from cca_fast.models import runtime


class ReportStep:
    """``report.json``, ``report.md`` and ``components.png`` (always rewritten: cheap, and the
    seconds change on every resumption)."""

    name = "report"
    outputs = (RunDir.REPORT_JSON, RunDir.REPORT_MD, RunDir.COMPONENTS_PNG)
    all_ranks = False
    ignores = EVERY_FIELD  # rewritten at every run

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
