"""``cca attribute``: outputs, resuming an interrupted run, bad input, and a 2-process torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cca_fast.attribution_dataset import AttributeConfig, attribute_dataset
from cca_fast.attribution_dataset import methods as methods_mod
from cca_fast.cli.main import main
from cca_fast.errors import CCAError
from cca_fast.models.loading import load_model
from helpers import char_tokenizer, make_tiny

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny float64 llama and the char tokenizer, saved like a local model."""
    d = tmp_path_factory.mktemp("tiny_model")
    make_tiny("llama", torch.float64, attn="sdpa").save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


def _data(path: Path, n: int = 7) -> Path:
    lines = []
    for i in range(n):
        p = "abc d" * (i % 3 + 1) + str(i)
        lines.append({"prompt": p, "desired": "x", "undesired": "y", "target": " 4" + str(i), "corrupt": p[::-1]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _argv(data: Path, out: Path, model_dir: Path, *extra: str) -> list[str]:
    return ["attribute", str(data), "-o", str(out), "--model", str(model_dir), "--dtype", "float64",
            "--device", "cpu", "--quiet", "--chunk-size", "3", "--batch-size", "2", *extra]


def test_cli_writes_scores_tables_plots(tmp_path, model_dir, capsys):
    data = _data(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    assert main(_argv(data, out, model_dir, "--method", "patch", "--per-example")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_examples"] == 7 and summary["chunks_scored_now"] == 3
    t = load_file(out / "scores.safetensors")
    L = 2
    assert t["q"].shape == (L, 6) and t["k"].shape == (L, 2) and t["mlp"].shape == (L, 22)
    assert t["attn_out"].shape == (L,) and t["per_example"].shape == (7, t["scores"].numel())
    torch.testing.assert_close(t["per_example"].sum(0), t["scores"], rtol=1e-12, atol=1e-12)  # fp64 sums
    for f in ("top_components.csv", "top_components.md", "plots/heads.png", "plots/neurons.png", "summary.json"):
        assert (out / f).stat().st_size > 0, f
    # the Python twin gives the same scores
    model, tok = load_model(str(model_dir), dtype="float64", device="cpu")
    api = attribute_dataset(model, tok, data, tmp_path / "api", AttributeConfig(method="patch", chunk_size=3,
                            batch_size=2, plots=False), progress=False)
    torch.testing.assert_close(api.scores, t["scores"], rtol=0, atol=0)  # same chunks, same batches: bitwise


def test_interrupted_run_resumes_without_recomputing(tmp_path, model_dir, monkeypatch):
    model, tok = load_model(str(model_dir), dtype="float64", device="cpu")
    data = _data(tmp_path / "d.jsonl", n=8)
    cfg = AttributeConfig(chunk_size=2, batch_size=2, plots=False, per_example=True)
    full = attribute_dataset(model, tok, data, tmp_path / "full", cfg, progress=False)
    calls = {"n": 0}
    real = methods_mod.Scorer.score

    def flaky(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while scoring chunk 2
        return real(self, batch)

    monkeypatch.setattr(methods_mod.Scorer, "score", flaky)
    with pytest.raises(KeyboardInterrupt):
        attribute_dataset(model, tok, data, tmp_path / "run", cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "chunks").iterdir()) == ["chunk_00000.safetensors",
                                                                                 "chunk_00001.safetensors"]
    calls["n"] = -100
    again = attribute_dataset(model, tok, data, tmp_path / "run", cfg, progress=False)
    assert (again.chunks_skipped, again.chunks_done) == (2, 2)
    assert calls["n"] == -100 + 2  # only the two missing chunks were scored
    assert torch.equal(again.scores, full.scores) and torch.equal(again.per_example, full.per_example)
    with pytest.raises(CCAError, match="different configuration"):
        attribute_dataset(model, tok, data, tmp_path / "run", AttributeConfig(chunk_size=2, metric="loss",
                          plots=False, per_example=True), progress=False)


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_bad_input_names_file_and_line(tmp_path, model_dir, capsys):
    bad_model = ["--model", str(tmp_path / "no_such_model")]  # structure errors come before any model loading
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(_argv(empty, tmp_path / "o1", model_dir) + bad_model) == 2
    assert f"{empty}: no examples" in _err(capsys)

    no_target = tmp_path / "nt.jsonl"
    no_target.write_text('{"prompt": "ab", "target": " 1"}\n{"prompt": "cd"}\n')
    assert main(_argv(no_target, tmp_path / "o2", model_dir, "--metric", "logprob") + bad_model) == 2
    assert f"{no_target}:2: no 'target'" in _err(capsys)

    unknown = tmp_path / "um.jsonl"
    unknown.write_text('{"prompt": "ab", "desired": "x", "undesired": "y", "metric": "kl"}\n')
    assert main(_argv(unknown, tmp_path / "o3", model_dir) + bad_model) == 2
    assert f"{unknown}:1: unknown metric 'kl'" in _err(capsys)
    assert main(_argv(unknown, tmp_path / "o3", model_dir, "--metric", "accuracy")) == 2
    assert "unknown metric 'accuracy'" in _err(capsys)

    split = tmp_path / "split.jsonl"
    split.write_text('{"prompt": "ab", "desired": "x", "undesired": "y"}\n\n{"prompt": "ab", "desired": "xy", "undesired": "y"}\n')
    assert main(_argv(split, tmp_path / "o4", model_dir)) == 2
    assert f"{split}:3: desired 'xy' is 2 tokens" in _err(capsys)


def test_torchrun_two_processes_equal_one(tmp_path, model_dir):
    """2 gloo ranks, each scoring every other chunk, all-reduced, equal the one-process scores.
    Chunk contents are computed by the same code on the same batches; only the summation order
    (rank partial sums, then the all-reduce) and BLAS threading (torchrun sets one thread) differ,
    which in float64 moves the sums by ~1e-15 relative: rtol 1e-9 leaves a wide margin while any
    lost or double-counted chunk changes them by O(1)."""
    data = _data(tmp_path / "d.jsonl")
    one = tmp_path / "one"
    assert main(_argv(data, one, model_dir, "--no-plots", "--per-example")) == 0
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cca_fast.cli", *_argv(data, tmp_path / "two", model_dir, "--no-plots", "--per-example")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["world_size"] == 2
    a, b = load_file(one / "scores.safetensors"), load_file(tmp_path / "two" / "scores.safetensors")
    for k in ("scores", "per_example", "metric"):
        torch.testing.assert_close(b[k], a[k], rtol=1e-9, atol=1e-12)
    assert len(list((tmp_path / "two" / "chunks").iterdir())) == 3


def test_device_map_passthrough(tmp_path, model_dir, monkeypatch):
    """``load_model(device_map=...)`` hands the map to ``from_pretrained`` (accelerate); the scorer
    follows the layers' devices (here all CPU: the multi-GPU path needs GPUs and is not exercised
    on the CPU machine)."""
    from transformers import AutoModelForCausalLM

    plain, tok = load_model(str(model_dir), dtype="float64", device="cpu")
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    mapped, _ = load_model(str(model_dir), dtype="float64", device_map="auto")
    assert seen.get("device_map") == "auto"
    data = _data(tmp_path / "d.jsonl", n=3)
    cfg = AttributeConfig(plots=False)
    a = attribute_dataset(plain, tok, data, tmp_path / "a", cfg, progress=False).scores
    b = attribute_dataset(mapped, tok, data, tmp_path / "b", cfg, progress=False).scores
    torch.testing.assert_close(b, a, rtol=0, atol=0)  # same weights, same device, same arithmetic
