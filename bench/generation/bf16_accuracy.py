"""bf16 generation judged by accuracy: ``cca eval`` in float32 (the default) vs
``--generation-dtype bfloat16`` on the same built-in test problems, paired.

    python bench/generation/bf16_accuracy.py [--work DIR] [--n-per-template 50]

Runs ``cca eval --output WORK/<dtype> --generation-dtype <dtype>`` for both dtypes, one after the
other in this process's machine (a run whose ``eval.json`` exists is reused), then compares the
two per-problem records: accuracy of each, the paired difference with a 95% stratified
(per-template) bootstrap interval, problems gained / lost, identical outputs, generated tokens and
the wall time of each ``cca eval`` (model load included). Results: ``results/bf16_accuracy.json``,
``results/bf16_accuracy.md``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from harness import environment, environment_line, markdown_table  # noqa: E402

DTYPES = ("float32", "bfloat16")


def _eval(work: Path, dtype: str, n_per_template: int) -> tuple[dict, float | None]:
    out = work / dtype
    if not (out / "eval.json").exists():
        t = time.perf_counter()
        subprocess.run(["cca", "eval", "--output", str(out), "--generation-dtype", dtype, "--quiet",
                        "--n-per-template", str(n_per_template)], check=True)
        seconds: float | None = time.perf_counter() - t
        (out / "seconds.txt").write_text(f"{seconds}\n")
    else:
        f = out / "seconds.txt"
        seconds = float(f.read_text()) if f.exists() else None
    return json.loads((out / "eval.json").read_text()), seconds


def compare(f32: dict, bf16: dict) -> dict:
    """Paired comparison of two ``eval.json`` record lists (the same problem ids)."""
    from cca_fast.evaluation.stats import StratifiedBootstrap

    a = {r["id"]: r for r in f32["records"]}
    b = {r["id"]: r for r in bf16["records"]}
    if set(a) != set(b):
        raise SystemExit("the two evaluations ran on different problems: delete WORK and run again")
    ids = list(a)
    x = [float(b[i]["correct"]) for i in ids]
    y = [float(a[i]["correct"]) for i in ids]
    bs = StratifiedBootstrap([a[i]["template"] for i in ids], n_resamples=10_000, seed=0)
    return {"n": len(ids), "float32_accuracy": sum(y) / len(y), "bfloat16_accuracy": sum(x) / len(x),
            "difference": bs.difference(x, y, 0.95).to_dict(),
            "gained": sum(1 for p, q in zip(x, y) if p > q), "lost": sum(1 for p, q in zip(x, y) if p < q),
            "identical_outputs": sum(1 for i in ids if a[i]["output"] == b[i]["output"]),
            "tokens": {"float32": sum(a[i]["n_generated"] for i in ids),
                       "bfloat16": sum(b[i]["n_generated"] for i in ids)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/bench_bf16_accuracy", help="where the two evaluations are written")
    ap.add_argument("--n-per-template", type=int, default=50)
    args = ap.parse_args()
    work = Path(args.work)
    evals = {d: _eval(work, d, args.n_per_template) for d in DTYPES}
    res = compare(evals["float32"][0], evals["bfloat16"][0])
    res["seconds"] = {d: evals[d][1] for d in DTYPES}
    env = environment("cpu")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "bf16_accuracy.json").write_text(json.dumps({"environment": env, **res}, indent=1) + "\n")
    d = res["difference"]
    s = res["seconds"]
    speed = f"{s['float32'] / s['bfloat16']:.2f}x" if s["float32"] and s["bfloat16"] else ""
    rows = [["float32", f"{100 * res['float32_accuracy']:.1f}%", "-", "-", res["tokens"]["float32"], s["float32"], ""],
            ["bfloat16", f"{100 * res['bfloat16_accuracy']:.1f}%",
             f"{100 * d['value']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]",
             f"{res['gained']} / {res['lost']}", res["tokens"]["bfloat16"], s["bfloat16"], speed]]
    md = ["# bf16 generation, judged by accuracy", "", environment_line(env), "",
          f"`cca eval` on {res['n']} built-in test problems (the embedded default model, greedy, 160 new tokens), "
          f"float32 vs `--generation-dtype bfloat16`, paired; {res['identical_outputs']} of {res['n']} outputs "
          "identical.", "",
          markdown_table(["generation", "accuracy", "vs float32, points [95% CI]", "gained / lost", "new tokens",
                          "cca eval s (load included)", "x float32 speed"], rows), "",
          "Interval: 95% stratified (per-template) bootstrap of the paired difference. "
          f"Command: `python bench/generation/bf16_accuracy.py --n-per-template {args.n_per_template}`."]
    (HERE / "results" / "bf16_accuracy.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
