"""The ``diagnostics`` step: why the update will or will not transfer, before stage 3 spends the
evaluation, and the report's summary of it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cca_fast.experiments.rundir import RunDir
from cca_fast.experiments.steps.loop import RunContext
from cca_fast.experiments.steps.update import gold_examples
from cca_fast.io import atomic_write_json, read_json, read_jsonl


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


class DiagnosticsStep:
    """Why the update will or will not transfer, before stage 3 spends the evaluation
    (:func:`cca_fast.experiments.diagnostics.diagnose`): the pivot table (direction, position,
    desired token already the argmax, on the greedy path), the pairwise alignment of per-pivot
    gradients on the selected rows, the leave-fold-out gain of one step relative to its training
    gain, and the alignment with lowering the gold solutions' loss. The no-mask baseline gets the
    pivot table only (its per-pivot gradients would be whole models)."""

    name = "diagnostics"
    outputs = (RunDir.DIAGNOSTICS,)
    all_ranks = False
    ignores: tuple[str, ...] = ()

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
