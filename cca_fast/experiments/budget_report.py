"""The budget curve's report: the decoded sections, the Markdown tables and the plot.

Pure functions of files and dicts (no model): :func:`accuracy_section` and
:func:`side_effect_section` read the decoded follow-ups that
:mod:`cca_fast.experiments.budget_decoded` writes; :func:`render_markdown` and :func:`plot` draw
``study.json`` (:func:`cca_fast.experiments.budget_curve.build_study`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from cca_fast.errors import CCAError
from cca_fast.io import read_json

RANDOM_KINDS = ("random", "random-layers")


def minimum_detectable(diffs: list[float], level: float = 0.95, power: float = 0.8) -> float:
    """The mean paired difference a two-sided test at ``level`` detects with probability
    ``power``, from per-problem differences ``diffs`` [n]: ``(z_level + z_power) sd / sqrt(n)``
    (same units as ``diffs``; ``inf`` for fewer than 2)."""
    from statistics import NormalDist, stdev

    if len(diffs) < 2:
        return math.inf
    z = NormalDist().inv_cdf((1 + level) / 2) + NormalDist().inv_cdf(power)
    return z * stdev(diffs) / math.sqrt(len(diffs))


def _decoded_files(folder: Path) -> dict[str, dict[str, Any]]:
    if not folder.is_dir():
        return {}
    return {p.stem: read_json(p) for p in sorted(folder.glob("*.json"))}


def _accuracy_files(output: Path, split_only: bool) -> dict[str, dict[str, Any]]:
    """The decoded accuracy files by condition; ``split_only``: their records on the curve's
    test split (extra problems dropped), with ``accuracy_split/``'s files added."""
    files = _decoded_files(output / "accuracy")
    if not split_only:
        return files
    files = {n: {**f, "records": [r for r in f["records"] if not r["id"].startswith("extra:")]}
             for n, f in files.items()}
    return {**{n: f for n, f in _decoded_files(output / "accuracy_split").items() if n not in files}, **files}


def accuracy_section(output: str | Path, conditions: Mapping[str, Mapping[str, Any]], *, split_only: bool = False,
                     level: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> dict[str, Any] | None:
    """Test accuracy of the decoded conditions (``OUTPUT/accuracy/<c>.json``), paired on the
    base's problems: per condition its accuracy (all problems, micro) with the curve's test split
    (``builtin``) and the extra test set (``extra``) apart, its difference to the base (problems
    gained / lost), and for each selector its difference to the pooled random draws decoded at its
    budget (problems and draws resampled) with the minimum detectable difference at 80% power.
    ``split_only``: the same on the curve's test split alone, over every condition decoded there
    (``accuracy/`` and ``accuracy_split/``). ``conditions``: the curve's condition records by name
    (budget, selector, parameter share). ``None`` until the base is decoded."""
    from cca_fast.evaluation.stats import StratifiedBootstrap

    files = _accuracy_files(Path(output), split_only)
    if "base" not in files:
        return None
    ids = [r["id"] for r in files["base"]["records"]]
    extra = [i.startswith("extra:") for i in ids]

    def correct(name: str) -> list[float]:
        by = {r["id"]: float(bool(r["correct"])) for r in files[name]["records"]}
        missing = [i for i in ids if i not in by]
        if missing:
            raise CCAError(f"the accuracy file of {name} lacks {len(missing)} of the base's test problems "
                           f"(e.g. {missing[0]}): it was decoded on other problems; delete it to decode it again")
        return [by[i] for i in ids]

    bs = StratifiedBootstrap(["all"] * len(ids), n_resamples=n_resamples, seed=seed)  # micro: one group
    base = correct("base")

    def part(x: list[float], want: bool) -> float | None:
        sel = [v for v, e in zip(x, extra) if e == want]
        return sum(sel) / len(sel) if sel else None

    rows = []
    for name in files:
        x = correct(name)
        rec = conditions.get(name, {})
        row = {"name": name, "selector": (rec.get("selector", "base") + ("-anti" if rec.get("anti") else "")),
               "budget": rec.get("budget"), "parameter_share": rec.get("parameter_share", 0.0),
               "accuracy": bs.accuracy(x, level).to_dict(), "builtin": part(x, False), "extra": part(x, True),
               "seconds": files[name].get("seconds")}
        if name != "base":
            row["vs_base"] = bs.difference(x, base, level).to_dict()
            row["gained"] = sum(1 for a, b in zip(x, base) if a > b)
            row["lost"] = sum(1 for a, b in zip(x, base) if a < b)
        rows.append(row)
    comparisons = []
    for name in files:
        rec = conditions.get(name)
        if rec is None or rec["selector"] in RANDOM_KINDS:
            continue
        for kind in RANDOM_KINDS:
            pool_names = [n for n in files if conditions.get(n, {}).get("selector") == kind
                          and conditions[n]["budget"] == rec["budget"]]
            if not pool_names:
                continue
            x, pool = correct(name), [correct(n) for n in pool_names]
            iv = bs.pooled_difference(x, pool, level, seed=seed)
            mean_pool = [sum(col) / len(col) for col in zip(*pool)]
            comparisons.append({"condition": name, "budget": rec["budget"], "against": kind, "draws": len(pool),
                                "difference": iv.to_dict(), "above_zero": iv.low > 0, "below_zero": iv.high < 0,
                                "minimum_detectable": minimum_detectable([a - b for a, b in zip(x, mean_pool)], level)})
    return {"metric": "test accuracy (greedy answers), all problems pooled (micro), paired", "n": len(ids),
            "scope": "test split" if split_only else "test split and extra",
            "n_builtin": extra.count(False), "n_extra": extra.count(True), "conditions": rows,
            "vs_random": comparisons}


def side_effect_section(output: str | Path) -> dict[str, Any] | None:
    """Each decoded condition's side-effect suites (``OUTPUT/side_effects/<c>.json``) against the
    base's (:func:`cca_fast.evaluation.suites.compare`, paired items); ``None`` without the base."""
    from cca_fast.evaluation.suites.runner import compare

    files = _decoded_files(Path(output) / "side_effects")
    if "base" not in files:
        return None
    return {name: compare(files["base"], f) for name, f in files.items() if name != "base"}


# ---- Markdown -------------------------------------------------------------------------------------
def _iv(d: dict[str, Any], fmt: str = "+.2f") -> str:
    return f"{d['value']:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]"


def _pct(d: dict[str, Any]) -> dict[str, float]:
    return {k: 100 * d[k] for k in ("value", "low", "high")}


def render_markdown(study: dict[str, Any]) -> str:
    """The tables of ``study.json`` (no verdict prose: the caller's docs interpret them)."""
    lrs = study["config"].get("lrs")  # learning rates chosen per condition on validation
    lines = [f"Metric: {study['metric']}; {study['n_test']} test problems, {study['n_val']} validation problems "
             f"(step{' and learning rate' if lrs else ''} choice), {study['n_train']} training problems. Intervals: {round(100 * study['level'])}% "
             f"stratified bootstrap ({study['n_resamples']} resamples).", "",
             f"Base model: {_iv(study['base_mean_logprob'], '.2f')} nats per problem.", "",
             "| condition | budget (each kind) | components q / k / v / mlp | parameters (share) | best step | "
             + ("learning rate (of " + ", ".join(f"{x:g}" for x in lrs) + ") | " if lrs else "")
             + "vs base, nats [95% CI] |", "|---|---|---|---|---|" + ("---|" if lrs else "") + "---|"]
    for r in sorted(study["conditions"], key=lambda r: (r["budget"], r["name"])):
        c = r["counts"]
        lines.append(f"| {r['name']} | {100 * r['budget']:.2f}% | {c['q']} / {c['k']} / {c['v']} / {c['mlp']} | "
                     f"{r['parameters']:,} ({100 * r['parameter_share']:.2f}%) | {r['best_step']} | "
                     + (f"{r['lr']:g} | " if lrs else "") + f"{_iv(r['vs_base'])} |")
    lines += ["", "Selector minus the pooled random draws (problems and draws resampled):", "",
              "| condition | against | draws | difference, nats [95% CI] | interval |", "|---|---|---|---|---|"]
    for c in sorted(study["vs_random"], key=lambda c: next(
            (r["budget"] for r in study["conditions"] if r["name"] == c["condition"]), 0.0)):
        verdict = "above 0" if c["above_zero"] else ("below 0" if c["below_zero"] else "includes 0")
        lines.append(f"| {c['condition']} | {c['against']} | {c['draws']} | {_iv(c['difference'])} | {verdict} |")
    if study["random_spread"]:
        lines += ["", "| budget | random draws | mean vs base | min | max | sd |", "|---|---|---|---|---|---|"]
        for b, s in sorted(study["random_spread"].items(), key=lambda kv: float(kv[0])):
            lines.append(f"| {100 * float(b):.2f}% | {s['draws']} | {s['mean']:+.2f} | {s['min']:+.2f} | "
                         f"{s['max']:+.2f} | {s['sd']:.2f} |")
    for key in ("accuracy_split", "accuracy"):
        if study.get(key):
            lines += ["", *_accuracy_markdown(study[key])]
    if study.get("side_effects"):
        lines += ["", *_side_effect_markdown(study["side_effects"])]
    if study["pending"]:
        lines += ["", f"Not run (pending): {', '.join(study['pending'])}."]
    return "\n".join(lines) + "\n"


def _accuracy_markdown(acc: dict[str, Any]) -> list[str]:
    if acc.get("scope") == "test split":
        head = (f"Accuracy on the curve's test split, every decoded condition ({acc['metric']}): {acc['n']} test "
                "problems.")
    else:
        head = (f"Accuracy ({acc['metric']}): {acc['n']} test problems ({acc['n_builtin']} of the curve's test "
                f"split, {acc['n_extra']} extra).")
    lines = [head, "",
             "| condition | accuracy, % [95% CI] | test split | extra | vs base, points [95% CI] | gained / lost |",
             "|---|---|---|---|---|---|"]

    def p(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    for r in sorted(acc["conditions"], key=lambda r: (r["name"] != "base", r["budget"] or 0, r["name"])):
        vs = f"{_iv(_pct(r['vs_base']), '+.1f')}" if "vs_base" in r else "-"
        gl = f"{r['gained']} / {r['lost']}" if "gained" in r else "-"
        lines.append(f"| {r['name']} | {_iv(_pct(r['accuracy']), '.1f')} | {p(r['builtin'])} | {p(r['extra'])} | "
                     f"{vs} | {gl} |")
    if acc["vs_random"]:
        lines += ["", "Accuracy, selector minus the pooled random draws:", "",
                  "| condition | against | draws | difference, points [95% CI] | detectable at 80% power | interval |",
                  "|---|---|---|---|---|---|"]
        for c in acc["vs_random"]:
            verdict = "above 0" if c["above_zero"] else ("below 0" if c["below_zero"] else "includes 0")
            lines.append(f"| {c['condition']} | {c['against']} | {c['draws']} | {_iv(_pct(c['difference']), '+.1f')} | "
                         f"{100 * c['minimum_detectable']:.1f} points | {verdict} |")
    return lines


def _side_effect_markdown(side: dict[str, Any]) -> list[str]:
    lines = ["Side effects (each suite on its seeded subset; paired items; MMLU and TruthfulQA sit near chance "
             "at this model size):", "", "| condition | suite | metric | base | after | paired delta [95% CI] |",
             "|---|---|---|---|---|---|"]
    for name, suites in side.items():
        for suite, e in suites.items():
            if suite == "bootstrap":
                continue
            ci = e.get("ci") or [math.nan, math.nan]
            lines.append(f"| {name} | {suite} | {e['metric_name']} | {e['before']:.4f} | {e['after']:.4f} | "
                         f"{e.get('delta_paired', e['delta']):+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}] |")
    return lines


# ---- the plot -------------------------------------------------------------------------------------
def plot(study: dict[str, Any], path: Path) -> None:
    """Gain in test gold log-likelihood vs parameter share, per selector, random draws as dots;
    beside it the decoded accuracies' gain over the base on the curve's test split when there are
    any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [r for r in (study.get("accuracy_split") or study.get("accuracy") or {}).get("conditions", [])
           if "vs_base" in r]
    fig, axes = plt.subplots(1, 2 if acc else 1, figsize=(12 if acc else 7, 4.5), squeeze=False)
    _panel(axes[0][0], study["conditions"], "test gold log-likelihood vs base (nats / problem)", 1.0)
    if acc:
        _panel(axes[0][1], acc, "test accuracy vs base, curve's test split (points)", 100.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _panel(ax, rows: list[dict[str, Any]], ylabel: str, scale: float) -> None:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["selector"], []).append(r)
    for sel, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["parameter_share"])
        x = [100 * r["parameter_share"] for r in rs]
        y = [scale * r["vs_base"]["value"] for r in rs]
        if sel.startswith("random"):
            ax.scatter(x, y, s=18, alpha=0.8, zorder=3, color="black" if sel == "random" else "grey",
                       label=f"{sel} (each draw)", marker="o" if sel == "random" else "x")
            continue
        err = [[scale * (r["vs_base"]["value"] - r["vs_base"]["low"]) for r in rs],
               [scale * (r["vs_base"]["high"] - r["vs_base"]["value"]) for r in rs]]
        ax.errorbar(x, y, yerr=err, capsize=3, marker="s", linestyle="--" if sel.endswith("-anti") else "-", label=sel)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sorted({100 * r["parameter_share"] for r in rows}))
    ax.set_xlabel("updatable parameters, % of the model")
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.legend(fontsize=7)
