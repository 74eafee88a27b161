"""``bench/gpu/check.sh``, the prepared device check: its ``--tiny`` rehearsal runs every section on
the CPU and leaves one folder of at most 8 files in the benchmark schema; the targets' verdicts
and the folder rules hold."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def check():
    return _module(ROOT / "bench" / "gpu" / "check.py", "gpu_check")


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import harness
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return harness


def test_verdicts_read_the_targets_from_the_results(check):
    att = {"results": [{"ratios": {"fused_all_vs_floor_time": 1.05, "fused_all_vs_caching_memory": 0.2,
                                   "fused_last_vs_floor_time": 1.01, "fused_last_vs_caching_memory": 0.1}},
                       {"ratios": {"fused_all_vs_floor_time": 1.2, "fused_all_vs_caching_memory": 0.3,
                                   "fused_last_vs_floor_time": 1.0, "fused_last_vs_caching_memory": 0.05}}]}
    sp = {"results": [
        {"measurement": "optimizer", "fraction_components": 0.016, "speedup": 12.0, "memory_ratio_state": 0.02},
        {"measurement": "optimizer", "fraction_components": 0.1, "speedup": 2.0, "memory_ratio_state": 0.2},
        {"measurement": "backward", "fraction_components": 0.016, "row_selective_ms": 1.0, "dense_ms": 2.0},
        {"measurement": "backward", "fraction_components": 0.016, "row_selective_ms": 3.0, "dense_ms": 2.0}]}
    gen = {"speedups": {"slots_vs_generate_static": 0.9}}
    got = {v["target"].split(" ")[0] + str(i): (v["measured"], v["met"])
           for i, v in enumerate(check.verdicts({"attribution": att, "sparse": sp, "generation": gen}))}
    assert list(got.values()) == [(1.2, False), (0.3, True), (12.0, True), (0.02, True), (1.0, False), (0.9, False)]
    gen["speedups"]["slots_vs_generate_compiled"] = 1.5  # on CUDA the compiled generate is the peer
    assert check.verdicts({"generation": gen})[-1]["measured"] == 1.5 and check.verdicts({"generation": gen})[-1]["met"]
    assert all(v["met"] is None and v["measured"] is None for v in check.verdicts({}))


def test_refuses_a_folder_that_is_not_empty(check, tmp_path):
    (tmp_path / "old.json").write_text("{}")
    assert check.main(["--tiny", "--out", str(tmp_path)]) == 2
    assert check.main(["--tiny", "--only", "tests,nonsense", "--out", str(tmp_path / "new")]) == 2


@pytest.mark.slow
def test_check_tiny_runs_every_section_on_cpu(tmp_path, check, harness):
    """The rehearsal the GPU session runs first: every section passes, the folder holds exactly
    the 8 files, every JSON follows the harness schema. (Tens of seconds on 2 idle cores; the
    budget is generous because CI machines are shared.)"""
    out = tmp_path / "check"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the check decides per section
    env["PYTHON"] = sys.executable
    # ~1 minute of CPU in all; the budget allows for a shared, busy machine (sections run niced there)
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "check.sh"), "--dry-run", "--budget", "600",
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    check_folder(out, check, harness)


def check_folder(out: Path, check, harness) -> None:
    """What a ``--tiny`` results folder must hold."""
    assert sorted(p.name for p in out.iterdir()) == sorted(check.FILES) and len(check.FILES) <= 8
    summary = json.loads((out / "summary.json").read_text())
    harness.validate(summary)
    assert summary["config"]["tiny"] and [r["section"] for r in summary["results"]] == list(check.SECTIONS)
    assert all(r["status"] == "ok" for r in summary["results"]), summary["results"]
    assert summary["tests"]["tests"] > 0 and summary["tests"]["skipped"] == summary["tests"]["tests"]  # no GPU
    assert summary["attn_implementation"] == "sdpa"
    assert len(summary["targets"]["verdicts"]) == 6
    assert all(v["measured"] is not None for v in summary["targets"]["verdicts"])
    for name in ("sparse", "row_grad_tiles", "attribution"):
        harness.validate(json.loads((out / f"{name}.json").read_text()))
    tiles = json.loads((out / "row_grad_tiles.json").read_text())
    assert {r["tiles"] for r in tiles["results"]} == {t.name for t in _tile_candidates()}
    pipe = json.loads((out / "pipeline.json").read_text())
    assert pipe["schema"] == harness.SCHEMA and pipe["same"] and pipe["tokenizer"] == "chars"
    gen = summary["generation"]  # embedded (the folder keeps its 8 files)
    harness.validate(gen)
    sides = {r["side"]: r for r in gen["results"]}
    assert sides["generate (static cache, compiled, CUDA graphs)"]["status"] == "skipped (CUDA only)"
    assert all(sides[s]["status"] == "ok" and sides[s]["new_tokens"] > 0
               for s in ("slots", "reference (1 slot)", "generate (static cache)"))
    # fp32 toy model: the slot decoder gives the batch-1 reference's tokens on every compared row
    assert gen["same_tokens"]["slots_vs_reference"] == gen["same_tokens"]["compared"] > 0
    md = (out / "check.md").read_text()
    assert md.startswith("# Device check (--tiny") and "## Targets" in md and "### Pipeline" in md
    assert "## Generation" in md


def _tile_candidates():
    from cca_fast.kernels.row_grad import TILE_CANDIDATES

    return TILE_CANDIDATES
