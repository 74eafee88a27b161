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
            **update_and_loglik_fields(ctx, selection),
        )
        per_layer = (space.layer_kind_counts(selection.indices) if selection is not None
                     else {k: [space.counts[k]] * space.n_layers for k in space.counts})
        write_report(ctx.rd.path, report, per_layer, space.counts)
        return report


def update_and_loglik_fields(ctx: RunContext, selection) -> dict:
    """The report's ``n_val``, ``best_val_loglik``, ``test_loglik`` and parameter fields."""
    from cca_fast.evaluation.gold_loglik import GoldLoglik
    from cca_fast.evaluation.stats import StratifiedBootstrap
    from cca_fast.experiments.steps.update import validation_problems
    from cca_fast.io import read_json

    r, space = ctx.results, ctx.space
    update = r["update"]
    kept = next((h for h in update.history if h.get("step") == update.best_step and "val" in h), {})
    out = {"n_val": len(validation_problems(ctx.config, r["data"], [p.id for p in r["traces"].problems])),
           "best_val_loglik": kept.get("val_tiebreak")}
    params = runtime.base_parameters(ctx.model)
    if selection is not None:
        rows = space.owned_rows(selection.indices)
        n = sum(s.index.numel() * params[k].numel() // params[k].shape[s.dim] for k, s in rows.items())
        out["kind_share"] = {k: selection.counts.get(k, 0) / (space.counts[k] * space.n_layers) for k in space.counts}
    else:
        n = sum(p.numel() for p in params.values())
        out["kind_share"] = {k: 1.0 for k in space.counts}
    out["parameters"], out["parameter_share"] = n, n / sum(p.numel() for p in params.values())
    if ctx.rd.loglik_test.exists():
        d = read_json(ctx.rd.loglik_test)
        cca = [GoldLoglik(**x) for x in d["cca"]]
        boot = StratifiedBootstrap([x.template for x in cca], seed=ctx.config.seed)
        ll = {"cca": boot.accuracy([x.logprob for x in cca]).value, "n": len(cca)}
        if d.get("base"):
            base = [GoldLoglik(**x) for x in d["base"]]
            ll["base"] = boot.accuracy([x.logprob for x in base]).value
            ll["difference"] = boot.difference([x.logprob for x in cca], [x.logprob for x in base]).to_dict()
        out["test_loglik"] = ll
    return out
