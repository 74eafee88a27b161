"""The quick start end to end, padded decoder vs slot decoder, in one sitting.

    python bench/pipeline/quickstart_decoders.py [--work DIR]

Runs the quick start's job (``cca run --output DIR/<decoder>``: the default recipe on the embedded
default model) twice, one after the other, each in its own process on the same machine: first
with every generation through the padded-batch decoder (``GenerationSettings.continuous=False``,
batches of ``batch_size`` rows), then with the slot decoder (the default: continuous batching over
a preallocated cache, the exemplars stored once). Everything else is the same configuration.
A side whose ``report.json`` exists is reused (resume after an interruption).

Reported: seconds per stage (``stages.json``) and wall time of each run, the ratio per stage, and
whether the two runs computed the same things: the base and updated test evaluations record by
record, the traces, the pivots, the selected components, the update's kept step and the report's
accuracies. Results: ``results/quickstart_decoders.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from harness import environment, environment_line, markdown_table  # noqa: E402

DECODERS = ("padded", "slots")  # padded first: any warm-up (page cache) favours the padded run


def run_side(work: Path, decoder: str) -> None:
    """One quick-start run (in this process): ``cca run --output work/decoder``'s configuration,
    the padded decoder for ``decoder == "padded"``."""
    from cca_fast.cli.main import build_parser
    from cca_fast.cli.run import config_from_args
    from cca_fast.experiments.pipeline import run_cca

    cfg = config_from_args(build_parser().parse_args(["run", "--output", str(work / decoder)]))
    if decoder == "padded":
        cfg = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, continuous=False))
    t = time.perf_counter()
    run_cca(cfg, progress=False)
    (work / decoder / "wall_seconds.txt").write_text(f"{time.perf_counter() - t}\n")


def _jsonl(path: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    key = "id" if rows and "id" in rows[0] else "problem_id"
    return {r[key]: r for r in rows}


def compare(a: Path, b: Path) -> dict[str, Any]:
    """What the two run directories agree on, each as a bool (with counts where records differ)."""
    out: dict[str, Any] = {}
    for name in ("eval_base_train", "eval_base_val", "eval_base_test", "eval_cca_test", "traces", "pivots"):
        fa, fb = a / f"{name}.jsonl", b / f"{name}.jsonl"
        if not (fa.exists() and fb.exists()):
            continue
        ra, rb = _jsonl(fa), _jsonl(fb)
        drop = ("generated_tokens",)  # trace samples drawn in groups of another size
        same = [k for k in ra if k in rb and {x: y for x, y in ra[k].items() if x not in drop}
                == {x: y for x, y in rb[k].items() if x not in drop}]
        out[name] = {"records": len(ra), "identical": len(same), "same": len(same) == len(ra) == len(rb)}
    out["selection"] = json.loads((a / "selection.json").read_text())["indices"] == \
        json.loads((b / "selection.json").read_text())["indices"]
    ua, ub = (json.loads((d / "update.json").read_text()) for d in (a, b))
    out["update_best_step"] = [ua["best_step"], ub["best_step"]]
    rep = [json.loads((d / "report.json").read_text()) for d in (a, b)]
    out["accuracy"] = {k: [r[k] for r in rep] for k in ("base_accuracy", "cca_accuracy", "n_test")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/quickstart_decoders", help="run directories (one per decoder)")
    ap.add_argument("--side", choices=DECODERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.side:
        run_side(work, args.side)
        return
    for d in DECODERS:
        if not (work / d / "report.json").exists():
            subprocess.run([sys.executable, __file__, "--work", str(work), "--side", d], check=True)
    stages = {d: json.loads((work / d / "stages.json").read_text()) for d in DECODERS}
    wall = {d: float((work / d / "wall_seconds.txt").read_text()) for d in DECODERS}
    names = [s for s in stages["slots"] if s in stages["padded"]]
    rows = [[s, round(stages["padded"][s], 1), round(stages["slots"][s], 1),
             f"{stages['padded'][s] / stages['slots'][s]:.2f}x" if stages["slots"][s] >= 0.5 else ""] for s in names]
    total = {d: sum(stages[d][s] for s in names) for d in DECODERS}
    rows.append(["**total**", round(total["padded"], 1), round(total["slots"], 1),
                 f"{total['padded'] / total['slots']:.2f}x"])
    same = compare(work / "padded", work / "slots")
    env = environment("cpu")
    res = {"environment": env, "stages": stages, "wall_seconds": wall, "same": same,
           "command": "python bench/pipeline/quickstart_decoders.py"}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "quickstart_decoders.json").write_text(json.dumps(res, indent=1) + "\n")
    acc = same["accuracy"]
    lines = ["# Quick start, padded decoder vs slot decoder", "", environment_line(env), "",
             "`cca run --output DIR` (the default recipe on the embedded default model), run twice in one sitting, "
             "each in its own process, one after the other: every generation through the padded-batch decoder "
             "(`GenerationSettings(continuous=False)`, batches of 8 rows), then through the slot decoder (the "
             "default: continuous batching over 128 slots, the exemplars stored once). Same configuration otherwise.",
             "", markdown_table(["stage", "padded decoder (s)", "slot decoder (s)", "ratio"], rows), "",
             f"Wall time (model load to report): {wall['padded']:.0f} s -> {wall['slots']:.0f} s "
             f"({wall['padded'] / wall['slots']:.2f}x).", "",
             "Same results: " + ", ".join(
                 f"{k} {v['identical']}/{v['records']}" for k, v in same.items() if isinstance(v, dict)
                 and "records" in v) + f"; selection identical: {same['selection']}; kept update step "
             f"{same['update_best_step'][0]} vs {same['update_best_step'][1]}; test accuracy base "
             f"{100 * acc['base_accuracy'][0]:.1f}% vs {100 * acc['base_accuracy'][1]:.1f}%, after CCA "
             f"{100 * acc['cca_accuracy'][0]:.1f}% vs {100 * acc['cca_accuracy'][1]:.1f}% "
             f"({acc['n_test'][0]} problems).", "",
             "Absolute CPU times are indicative only (2-core machine); the ratios are the measurement."]
    (HERE / "results" / "quickstart_decoders.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
