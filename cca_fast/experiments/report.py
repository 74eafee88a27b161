"""The final report of a run: :class:`RunReport` (``report.json``), ``report.md`` and
``components.png``."""
from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cca_fast.experiments.rundir import RunDir
from cca_fast.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from cca_fast.models.adapters import KINDS


@dataclass
class RunReport:
    """What a run found and what it cost (``report.json`` holds :meth:`to_dict`, keys in this
    order). ``report["key"]`` reads a field too, for code written against the dict.

    Attributes:
        model, data, seed, selector, pivot_method, procedure: what ran.
        base_accuracy, cca_accuracy: test accuracy (per template, averaged) before and after;
            ``*_micro_accuracy``: over problems; ``n_test``: test problems.
        base_train_accuracy: the base model on the training split; ``base_val_accuracy``: on the
            validation problems (update step 0); ``best_val_accuracy``, ``best_step``: the step kept.
        weak_templates, n_train_problems, n_flipped, n_examples: stage 1's training set, pairs
            with a flipped sample and pivot examples; ``pivot_search``: what the search cost.
        components_selected, components_total, fraction, per_kind, component_space: stage 2.
        delta: the delta directory; ``seconds``: seconds per step (``stages.json``).
        training_examples: counts of stage 3's training pivots (source, filter, forks).
        diagnostics: :func:`~cca_fast.experiments.steps.diagnostics.diagnostics_summary` (pivot summary,
            gradient alignment, leave-fold-out transfer, gold alignment, changed test traces).
        attn_implementation: the attention backend the model ran (``auto`` resolved:
            ``sdpa``, ``flash_attention_2``...; ``""`` in reports written before it was recorded).
        n_val: validation problems (one problem = ``100 / n_val`` points of validation accuracy);
            ``best_val_loglik``: the kept step's validation gold log-likelihood (the tie-break).
        test_loglik: the test problems' gold-solution log-likelihood, base and updated (mean
            nats per problem, template-averaged) and their paired difference with its 95%
            bootstrap interval (``None`` without gold solutions).
        parameters, parameter_share, kind_share: parameters the update may change, their share
            of the model, and the share of each kind's heads / neurons selected.
    """

    model: str
    data: str
    seed: int
    selector: str
    pivot_method: str
    procedure: str
    base_accuracy: float
    cca_accuracy: float
    base_micro_accuracy: float
    cca_micro_accuracy: float
    n_test: int
    base_train_accuracy: float
    base_val_accuracy: float | None
    best_val_accuracy: float | None
    best_step: int
    weak_templates: list[str]
    n_train_problems: int
    n_flipped: int
    n_examples: int
    pivot_search: dict[str, int]
    components_selected: int
    components_total: int
    fraction: float
    per_kind: dict[str, int]
    component_space: dict[str, Any]
    delta: str
    seconds: dict[str, float]
    training_examples: dict[str, Any] | None = None
    diagnostics: dict[str, Any] | None = None
    attn_implementation: str = ""
    n_val: int | None = None
    best_val_loglik: float | None = None
    test_loglik: dict[str, Any] | None = None
    parameters: int | None = None
    parameter_share: float | None = None
    kind_share: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunReport":
        """A report read back from ``report.json``."""
        return cls(**d)

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def message(self) -> str:
        return (f"CCA: test accuracy {self.base_accuracy:.3f} -> {self.cca_accuracy:.3f} "
                f"({self.components_selected} of {self.components_total} components); "
                f"report in {RunDir(Path(self.delta).parent, create=False).report_md}")


def plot_components(per_layer: dict[str, list[int]], counts: dict[str, int], title: str = "") -> bytes:
    """PNG bytes: one panel per kind, the fraction of that kind's components selected per layer.

    Args:
        per_layer: ``{kind: [selected count per layer]}``.
        counts: components per layer of each kind (``ComponentSpace.counts``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KINDS), figsize=(3.2 * len(KINDS), 3.2), sharey=True)
    for ax, kind in zip(axes, KINDS):
        sel = per_layer.get(kind, [])
        layers = list(range(len(sel)))
        frac = [s / counts[kind] if counts.get(kind) else 0.0 for s in sel]
        ax.barh(layers, frac, color={"q": "#4C72B0", "k": "#55A868", "v": "#C44E52", "mlp": "#8172B2"}[kind])
        ax.set_title(f"{kind} ({sum(sel)} of {counts.get(kind, 0) * len(sel)})", fontsize=9)
        ax.set_xlabel("fraction selected", fontsize=8)
        ax.invert_yaxis()
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("layer")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def diagnostics_lines(d: dict[str, Any] | None) -> list[str]:
    """Markdown lines for a report's diagnostics (empty without any)."""
    if not d:
        return []
    lines = ["## Diagnostics: will the update transfer?", ""]
    piv = d.get("pivots") or {}
    if piv:
        lines.append(f"- pivots: {piv.get('n', 'n/a')}; by direction {piv.get('by_direction', {})}; desired token "
                     f"already the argmax: {_pct(piv.get('fraction_desired_is_argmax'))}; prefix on the greedy "
                     f"path: {_pct(piv.get('fraction_on_greedy_path'))}; median position {piv.get('median_t', 'n/a')}")
    al = d.get("alignment") or {}
    if al:
        lines.append(f"- per-pivot gradients on the selected rows: mean pairwise cosine "
                     f"{_num(al.get('mean_pairwise_cos'))}, positive pairs {_pct(al.get('fraction_positive_pairs'))}")
    tr = d.get("transfer") or {}
    if tr:
        lines.append(f"- one step, leave-fold-out: held-out logit-difference gain {_num(tr.get('mean_heldout_gain'), '.4f')}"
                     f" vs training gain {_num(tr.get('mean_train_gain'), '.4f')} (ratio {_num(tr.get('ratio'), '.2f')})")
    gold = d.get("gold") or {}
    if gold:
        lines.append(f"- cosine of the pivot gradient with lowering the gold solutions' loss: {_num(gold.get('cos'))}")
    ch = d.get("changed_traces") or {}
    if ch:
        lines.append(f"- test traces changed by the update: {ch.get('output_changed')} of {ch.get('n')} "
                     f"({ch.get('wrong_to_correct')} wrong -> correct, {ch.get('correct_to_wrong')} correct -> wrong)")
    return lines + [""]


def _validation_lines(report: dict[str, Any]) -> list[str]:
    """How coarse validation accuracy is, and the test gold log-likelihood beside accuracy."""
    out = []
    n = report.get("n_val")
    if n:
        out += ["", f"Validation: {n} problems, so one problem is {100 / n:.1f} points of validation accuracy; "
                    "among steps of equal validation accuracy the one with the highest validation gold-solution "
                    "log-likelihood is kept"
                    + (f" ({report['best_val_loglik']:.2f} nats per problem at the kept step)."
                       if report.get("best_val_loglik") is not None else ".")]
    ll = report.get("test_loglik")
    if ll:
        if ll.get("difference"):
            d = ll["difference"]
            out += ["", f"Test gold-solution log-likelihood (teacher-forced, paired per problem): base "
                        f"{ll['base']:.2f}, CCA {ll['cca']:.2f} nats per problem: {d['value']:+.2f} "
                        f"[{d['low']:+.2f}, {d['high']:+.2f}] (95% stratified bootstrap)."]
        else:
            out += ["", f"Test gold-solution log-likelihood (teacher-forced): CCA {ll['cca']:.2f} nats per problem "
                        "(the base's was not kept in memory: no-mask update)."]
    return out


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable summary of ``report`` (the dict written to ``report.json``)."""
    lines = [
        f"# CCA run report: {report.get('model', '')}",
        "",
        f"- data: `{report.get('data', '')}`, seed {report.get('seed', '')}",
        f"- selector: `{report.get('selector', '')}`, pivots: `{report.get('pivot_method', '')}`"
        + (f", attention `{report['attn_implementation']}`" if report.get("attn_implementation") else ""),
        f"- training examples (pivots): {report.get('n_examples', 0)} from {report.get('n_train_problems', 0)} "
        f"training problems of {len(report.get('weak_templates', []))} weak templates",
        "",
        "| | accuracy (test) |",
        "|---|---|",
        f"| base | {_pct(report.get('base_accuracy'))} |",
        f"| CCA | {_pct(report.get('cca_accuracy'))} |",
        "",
        f"Test problems: {report.get('n_test', 0)}. Change: "
        + (f"{100 * (report['cca_accuracy'] - report['base_accuracy']):+.1f} points"
           if report.get("cca_accuracy") is not None and report.get("base_accuracy") is not None else "n/a")
        + f" (best update step {report.get('best_step', 'n/a')}, validation accuracy "
        f"{_pct(report.get('best_val_accuracy'))} vs {_pct(report.get('base_val_accuracy'))} at step 0).",
        *(["", "No update step beat the base on validation: **the base weights are kept** and the delta is empty "
            "(applying it changes nothing)."] if report.get("best_step") == 0 else []),
        *_validation_lines(report),
        "",
        f"Components selected: {report.get('components_selected', 0)} of {report.get('components_total', 0)} "
        f"({100 * report.get('fraction', 0.0):.3f}%): "
        + ", ".join(f"{k} {v}" for k, v in report.get("per_kind", {}).items())
        + (f"; {report['parameters']:,} parameters ({100 * report['parameter_share']:.2f}% of the model); share of "
           "each kind: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in report["kind_share"].items())
           if report.get("parameters") is not None and report.get("kind_share") else ""),
        "",
        *(["**Every component was selected**: the selector kept the whole model (with few pivot examples, "
            "DCM's paper settings cannot move a mask below 0.5: raise --dcm-epochs or --max-train-problems, or "
            "use --selector atp-fraction).", ""]
          if report.get("components_selected") == report.get("components_total") and report.get("selector") != "none"
          else []),
        "![selected components per layer](components.png)",
        "",
        *diagnostics_lines(report.get("diagnostics")),
        "| stage | seconds |",
        "|---|---|",
    ]
    for stage, sec in report.get("seconds", {}).items():
        lines.append(f"| {stage} | {sec:.1f} |")
    lines.append("")
    return "\n".join(lines)


def write_report(run_dir: str | Path, report: RunReport | dict[str, Any], per_layer: dict[str, list[int]],
                 counts: dict[str, int]) -> None:
    """Write ``report.json``, ``report.md`` and ``components.png`` into ``run_dir`` (atomically)."""
    rd = RunDir(run_dir, create=False)
    if isinstance(report, RunReport):
        report = report.to_dict()
    atomic_write_bytes(rd.components_png,
                       plot_components(per_layer, counts, title=f"{report.get('selector', '')} selection"))
    atomic_write_json(rd.report_json, report)
    atomic_write_text(rd.report_md, render_markdown(report))
