"""The study's comparison table: ``study.json``, ``study.md`` and ``study.png``.

One row per condition (base, each CCA selector, the random control, the no-mask update, LoRA):
test accuracy with its bootstrap interval, the paired difference to the base (and, for CCA
selectors, to the random control), what changed (components; parameters), and the side-effect
suites' deltas. The verdict sentences say plainly whether each CCA selector beat the base and the
random control on the held-out test problems, and by how much.
"""
from __future__ import annotations

import io
import json
from typing import Any, Sequence

from cca_fast.delta import CONFIG_NAME as DELTA_CONFIG
from cca_fast.evaluation.stats import StratifiedBootstrap, aligned_correct
from cca_fast.experiments.rundir import StudyDir
from cca_fast.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, read_jsonl

LABELS = {"base": "base", "dcm": "CCA (DCM)", "atp-fraction": "CCA (AtP top fraction)",
          "atp-topk": "CCA (AtP top-k)", "random": "random control", "none": "no-mask update",
          "lora": "LoRA (r=16, alpha=32)"}
#: side-effect metrics shown in the table: (suite, metric key, label, scale for display)
SIDE_METRICS = (("mmlu", "metric", "MMLU 5-shot %", 100.0), ("truthfulqa", "metric", "TruthfulQA MC1 %", 100.0),
                ("perplexity", "metric", "GSM8K ppl", 1.0))


def _test_records(sd: StudyDir, name: str) -> list[dict[str, Any]]:
    path = sd.test_records(name)
    return list(read_jsonl(path)) if path.exists() else []


def _changed(sd: StudyDir, name: str, n_params: int | None) -> dict[str, Any]:
    """Components and parameters changed by a condition."""
    if name == "base":
        return {"components": 0, "components_fraction": 0.0, "parameters": 0, "parameters_fraction": 0.0}
    if name == "lora":
        info = read_json(sd.lora_info) if sd.lora_info.exists() else {}
        p = info.get("n_trainable_params")
        return {"components": None, "components_fraction": None, "parameters": p,
                "parameters_fraction": (p / n_params) if p is not None and n_params else None}
    rd = sd.condition(name)
    rep = read_json(rd.report_json)
    cfg_path = rd.delta / DELTA_CONFIG
    elements = read_json(cfg_path).get("summary", {}).get("elements") if cfg_path.exists() else None
    return {"components": rep["components_selected"], "components_fraction": rep["fraction"],
            "parameters": elements, "parameters_fraction": (elements / n_params) if elements and n_params else None}


def _side(sd: StudyDir, name: str) -> dict[str, Any] | None:
    f = sd.side_effect(name)
    return read_json(f) if f.exists() else None


def _side_row(base: dict[str, Any] | None, cond: dict[str, Any] | None, is_base: bool) -> dict[str, Any]:
    """Per suite: the condition's metric, its change from the base and the paired bootstrap
    interval of that change (:func:`cca_fast.evaluation.suites.compare`)."""
    out: dict[str, Any] = {}
    cmp: dict[str, Any] = {}
    if base and cond and not is_base:
        from cca_fast.evaluation.suites import compare

        cmp = compare(base, cond)
    for suite, key, _, _ in SIDE_METRICS:
        v = cond[suite][key] if cond and suite in cond else None
        c = cmp.get(suite, {})
        out[suite] = {"metric": v, "delta": c.get("delta"), "delta_paired": c.get("delta_paired"),
                      "ci": c.get("ci"), "n": cond[suite]["n"] if cond and suite in cond else None}
    return out


def build_study(config, sd: StudyDir, val: Sequence[Any], test: Sequence[Any], names: Sequence[str],
                phases: dict[str, float]) -> dict[str, Any]:
    """The comparison of every finished condition of ``config`` (a
    :class:`~cca_fast.experiments.study.StudyConfig`) in the study directory ``sd``.

    Args:
        val, test: the study's validation and test problems (``Problem`` s, read from the shared
            run directory by :func:`~cca_fast.experiments.study.study_problems`).
        names: the conditions in table order (``"base"`` first:
            :func:`~cca_fast.experiments.study.table_names`).
        phases: seconds per phase (``phases.json``).
    """
    ids = [p.id for p in test]
    boot = StratifiedBootstrap([p.template for p in test], config.bootstrap, seed=config.run.seed)
    info = read_json(sd.model_info) if sd.model_info.exists() else {}
    n_params = info.get("n_params")

    partners = config.random_partners()
    correct = {n: aligned_correct(recs, ids) for n in names if (recs := _test_records(sd, n))}
    sides = {n: _side(sd, n) for n in names}
    rows = []
    for n in names:
        if n not in correct:
            continue
        acc = boot.accuracy(correct[n], config.level)
        row: dict[str, Any] = {"condition": n, "label": config.label(n) or LABELS.get(n, n), "test_accuracy": acc.to_dict(),
                               **_changed(sd, n, n_params)}
        if n != "base":
            row["vs_base"] = boot.difference(correct[n], correct["base"], config.level).to_dict()
        done = [c for c in partners.get(n, []) if c in correct]
        if done:  # the table's column: the last (strictest) control listed; every one in vs_randoms
            # a random variant of several draws: the difference to their pool (problems and draws resampled)
            pools = {c: [correct[x] for x in config.seeds_of(c) if x in correct] for c in done}
            row["vs_randoms"] = {c: {**boot.pooled_difference(correct[n], pool, config.level,
                                                              seed=config.run.seed).to_dict(), "draws": len(pool)}
                                 for c, pool in pools.items()}
            row["random_control"] = done[-1]
            row["vs_random"] = row["vs_randoms"][done[-1]]
        if n in config.condition_names():
            rep = read_json(sd.condition(n).report_json)
            row.update({"best_step": rep["best_step"], "best_val_accuracy": rep["best_val_accuracy"],
                        "base_val_accuracy": rep["base_val_accuracy"], "diagnostics": rep.get("diagnostics"),
                        "training_examples": rep.get("training_examples")})
        elif n == "lora" and sd.lora_info.exists():
            li = read_json(sd.lora_info)
            row.update({"best_epoch": li.get("best_epoch"), "best_val_accuracy": li.get("best_val")})
        row["side_effects"] = _side_row(sides.get("base"), sides.get(n), n == "base")
        rows.append(row)

    first = config.condition_names()[0]
    first_report = sd.condition(first).report_json
    shared_report = read_json(first_report) if first_report.exists() else {}
    return {
        "model": config.run.model or "default (SmolLM2-135M-Instruct)",
        "data": config.run.data or "builtin",
        "shots": config.run.prompt.exemplars or "builtin",
        "seed": config.run.seed,
        "n_test": len(ids),
        "n_val": len(val),
        "n_train_problems": shared_report.get("n_train_problems"),
        "n_examples": shared_report.get("n_examples"),
        "n_flipped": shared_report.get("n_flipped"),
        "weak_templates": len(shared_report.get("weak_templates", [])),
        "interval": f"{int(round(100 * config.level))}% stratified bootstrap over test problems "
                    f"({config.bootstrap} resamples; differences paired)",
        "n_params": n_params,
        "components_total": shared_report.get("components_total"),
        "rows": rows,
        "verdicts": verdicts(rows, [*config.selectors, *(v for v, spec in config.variants.items()
                                                           if not spec.get("random_like"))]),
        "variants": config.variants,
        "phases_seconds": phases,
        "shared_seconds": sum(sd.shared().seconds().values()),
        "config": config.to_dict(),
    }


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _ci(d: dict[str, Any], signed: bool = False) -> str:
    f = _pts if signed else (lambda x: f"{100 * x:.1f}")
    return f"{f(d['value'])} [{f(d['low'])}, {f(d['high'])}]"


def verdicts(rows: list[dict[str, Any]], selectors: list[str]) -> list[str]:
    """Plain sentences: did each CCA selector beat the base and the random control?"""
    out = []
    by = {r["condition"]: r for r in rows}
    for s in selectors:
        r = by.get(s)
        if r is None:
            continue
        parts = []
        others = [(r.get("vs_base"), "the base model")]
        randoms = r.get("vs_randoms") or ({"random": r["vs_random"]} if r.get("vs_random") else {})
        others += [(d, (by[c]["label"] if c in by else c) if len(randoms) > 1 else "the random control")
                   for c, d in randoms.items()]
        for d, other in others:
            if d is None:
                continue
            ci = f"95% CI [{_pts(d['low'])}, {_pts(d['high'])}]"
            if d["low"] > 0:
                parts.append(f"beat {other} by {_pts(d['value'])} points ({ci})")
            elif d["high"] < 0:
                parts.append(f"did worse than {other}, by {_pts(d['value'])} points ({ci})")
            else:
                parts.append(f"did not differ significantly from {other} ({_pts(d['value'])} points, {ci})")
        out.append(f"{r['label']} " + "; it ".join(parts) + f", on {r['test_accuracy']['n']} held-out test problems.")
    return out


def diagnostics_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: the diagnostics of each condition that has them (report.json ``diagnostics``)."""
    diag = [r for r in rows if r.get("diagnostics")]
    if not diag:
        return []

    def f(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = ["**Diagnostics** (training pivots; per-pivot gradients on the condition's selected rows; a step's "
             "held-out / training logit-difference gain, leave-fold-out; cosine with lowering the gold solutions' "
             "loss; test traces the update changed):", "",
             "| condition | pivots | desired already argmax | on greedy path | mean pairwise cos | "
             "transfer ratio | gold cos | test traces changed (w->c / c->w) |", "|---" * 8 + "|"]
    for r in diag:
        d = r["diagnostics"]
        pv, al, tr, gd, ch = (d.get(k) or {} for k in ("pivots", "alignment", "transfer", "gold", "changed_traces"))
        pct = (lambda x: "-" if x is None else f"{100 * x:.0f}%")
        changed = (f"{ch['output_changed']} of {ch['n']} ({ch['wrong_to_correct']} / {ch['correct_to_wrong']})"
                   if ch else "-")
        lines.append(f"| {r['label']} | {pv.get('n', '-')} | {pct(pv.get('fraction_desired_is_argmax'))} | "
                     f"{pct(pv.get('fraction_on_greedy_path'))} | {f(al.get('mean_pairwise_cos'), '.3f')} | "
                     f"{f(tr.get('ratio'), '.2f')} | {f(gd.get('cos'), '.3f')} | {changed} |")
    return lines + [""]


def render_markdown(study: dict[str, Any]) -> str:
    head = ["| condition | test accuracy % [95% CI] | vs base, points [95% CI] | vs random, points | "
            "components selected | parameters updatable | best val % (step) | "
            + " | ".join(f"{label} (delta)" for _, _, label, _ in SIDE_METRICS) + " |",
            "|---" * (7 + len(SIDE_METRICS)) + "|"]
    lines = [f"# CCA study: {study['model']} on `{study['data']}`", "",
             f"- exemplars: `{study['shots']}`, seed {study['seed']}; {study['n_test']} test problems, "
             f"{study['n_val']} validation problems (model selection), {study['n_examples']} pivot examples from "
             f"{study['n_flipped']} flipped traces of {study['n_train_problems']} training problems "
             f"({study['weak_templates']} weak templates)",
             f"- intervals: {study['interval']}", ""]
    lines += head
    for r in study["rows"]:
        comp = ("all (" + f"{r['components']}" + ")" if r["condition"] == "none" else
                "-" if r.get("components") is None else f"{r['components']} ({100 * r['components_fraction']:.2f}%)")
        par = "-" if not r.get("parameters") else f"{r['parameters']:,} ({100 * r['parameters_fraction']:.2f}%)" \
            if r.get("parameters_fraction") is not None else f"{r['parameters']:,}"
        bv = r.get("best_val_accuracy")
        step = r.get("best_step", r.get("best_epoch"))
        val = "-" if bv is None else f"{100 * bv:.1f} ({'step' if 'best_step' in r else 'epoch'} {step})"
        side = []
        for suite, key, _, scale in SIDE_METRICS:
            s = r["side_effects"][suite]
            if s["metric"] is None:
                side.append("-")
            elif s["delta"] is None or r["condition"] == "base":
                side.append(f"{scale * s['metric']:.2f}")
            elif suite == "perplexity":  # the interval is on the mean NLL change, not on ppl
                side.append(f"{s['metric']:.3f} ({s['delta']:+.3f})")
            else:
                ci = f" [{scale * s['ci'][0]:+.1f}, {scale * s['ci'][1]:+.1f}]" if s.get("ci") else ""
                side.append(f"{scale * s['metric']:.1f} ({scale * s['delta']:+.1f}{ci})")
        lines.append(f"| {r['label']} | {_ci(r['test_accuracy'])} | "
                     f"{_ci(r['vs_base'], True) if 'vs_base' in r else '-'} | "
                     f"{_ci(r['vs_random'], True) if 'vs_random' in r else '-'} | {comp} | {par} | {val} | "
                     + " | ".join(side) + " |")
    lines += ["", "**Verdict.**", ""] + [f"- {v}" for v in study["verdicts"]] + ["", f"![test accuracy]({StudyDir.STUDY_PNG})", ""]
    lines += diagnostics_table(study["rows"])
    if study.get("variants"):
        lines += ["Variants (RunConfig overrides of the study's shared settings):", ""]
        lines += [f"- `{name}`: `{json.dumps(spec, sort_keys=True)}`" for name, spec in study["variants"].items()]
        lines += [""]
    lines += ["Best step 0 (epoch 0) means validation accuracy never rose above the base's: the condition "
              "keeps the base weights, bit for bit (its side effects are the base's).", ""]
    phases = {**({"shared stages (data, base eval, traces, pivots)": study["shared_seconds"]}
                 if study.get("shared_seconds") else {}),
              **{k: v for k, v in (study.get("phases_seconds") or {}).items() if k != "shared"}}
    if phases:
        lines += ["| phase | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in phases.items()]
        lines += [f"| total | {sum(phases.values()):.0f} |", ""]
    return "\n".join(lines)


def plot_study(study: dict[str, Any]) -> bytes:
    """PNG bytes: test accuracy per condition with its interval; side-effect deltas beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = study["rows"]
    labels = [r["label"] for r in rows]
    acc = [100 * r["test_accuracy"]["value"] for r in rows]
    err = [[100 * (r["test_accuracy"]["value"] - r["test_accuracy"]["low"]) for r in rows],
           [100 * (r["test_accuracy"]["high"] - r["test_accuracy"]["value"]) for r in rows]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.55 * len(rows) + 1.6), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    ax.barh(range(len(rows)), acc, xerr=err, color="#4C72B0", capsize=3)
    ax.axvline(acc[0] if rows and rows[0]["condition"] == "base" else 0, color="grey", ls="--", lw=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"test accuracy, % ({study['n_test']} problems, 95% CI)", fontsize=8)
    ax = axes[1]
    width = 0.38
    for j, (suite, key, label, scale) in enumerate(SIDE_METRICS[:2]):
        vals = [scale * (r["side_effects"][suite]["delta"] or 0.0) for r in rows]
        ax.barh([i + (j - 0.5) * width for i in range(len(rows))], vals, height=width, label=label)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(rows)), [""] * len(rows))
    ax.invert_yaxis()
    ax.set_xlabel("side effect: change vs base, points", fontsize=8)
    ax.legend(fontsize=7)
    fig.suptitle(f"CCA study: {study['model']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_study(sd: StudyDir, study: dict[str, Any]) -> None:
    """Write ``study.json``, ``study.md`` and ``study.png`` into the study directory ``sd`` (atomically)."""
    atomic_write_bytes(sd.study_png, plot_study(study))
    atomic_write_json(sd.study_json, study)
    atomic_write_text(sd.study_md, render_markdown(study))
