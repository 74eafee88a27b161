"""End to end: ``cca run`` (every stage), interrupted and resumed, on a tiny local model.

The tiny llama (char-level tokenizer, saved with ``save_pretrained``) has its LM head biased toward
"0", "1" and space, and every gold answer is 0 or 1, so its greedy and sampled traces are sometimes
right and sometimes wrong: stage 1 finds flipped pairs and pivots, and every later stage runs on
real (if meaningless) data in seconds. The real default model runs the same code in ``cca run``.
"""
from __future__ import annotations

import json

import pytest
import torch

import cca_fast.stages.traces as traces
from cca_fast.cli.main import main
from cca_fast.delta import SparseDelta, apply_delta, revert_delta
from cca_fast.errors import CCAError
from cca_fast.io import read_jsonl
from cca_fast.models.components import ComponentSpace
from cca_fast.models.loading import load_model
from cca_fast.experiments.config import GenerationSettings
from cca_fast.experiments.pipeline import run_cca
from helpers import assert_only_owned_rows_may_differ
from helpers import run_config as config


@pytest.mark.slow
def test_run_every_stage_interrupted_and_resumed(workdir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # 64 slots: stage 1's groups (slots // sample_batch problems) leave the tiny data set several groups
    cfg = config(workdir, out, generation=GenerationSettings(max_new_tokens=12, batch_size=8, slots=64))

    # 1) interrupt stage 1 after its first group of problems (as a kill would)
    real = traces._sample_rounds
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(traces, "_sample_rounds", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cca(cfg, progress=False)
    monkeypatch.setattr(traces, "_sample_rounds", real)
    first = (out / "traces.jsonl").read_text().splitlines()
    assert first, "the first group's pairs must be on disk before the interruption"
    base_eval = out / "eval_base_train.jsonl"
    base_eval_state = (base_eval.stat().st_mtime_ns, base_eval.read_bytes())

    # 2) a different configuration is refused; the same one resumes without recomputing
    with pytest.raises(CCAError, match="different configuration"):
        run_cca(config(workdir, out, seed=1), progress=False)
    report = run_cca(cfg, progress=False)
    assert (base_eval.stat().st_mtime_ns, base_eval.read_bytes()) == base_eval_state
    assert (out / "traces.jsonl").read_text().splitlines()[: len(first)] == first

    # the report has what issue 3 asks for, and consistent numbers
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report.to_dict()))
    space = ComponentSpace(load_model(cfg.model, dtype="float32")[0])
    assert report["components_total"] == space.total == 2 * (6 + 2 + 2 + 22)
    assert 0 < report["components_selected"] <= space.total
    assert report["fraction"] == pytest.approx(report["components_selected"] / space.total)
    assert sum(report["per_kind"].values()) == report["components_selected"]
    assert report["n_test"] == len(list(read_jsonl(out / "eval_cca_test.jsonl"))) == 16
    assert report["n_examples"] > 0
    assert {"base_eval", "traces", "pivots", "localize", "update", "cca_eval"} <= set(report["seconds"])
    assert (out / "report.md").read_text().startswith("# CCA run report")
    assert (out / "components.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # validation size and the held-out gold log-likelihood beside accuracy
    assert report["n_val"] > 0 and f"one problem is {100 / report['n_val']:.1f} points" in (out / "report.md").read_text()
    ll = json.loads((out / "loglik_test.json").read_text())
    assert [r["id"] for r in ll["base"]] == [r["id"] for r in ll["cca"]] and len(ll["cca"]) == 16
    from cca_fast.evaluation.gold_loglik import gold_loglik
    from cca_fast.data.loaders import read_problems_jsonl

    base_model, tok = load_model(cfg.model, dtype="float32")
    fresh = gold_loglik(base_model, tok, read_problems_jsonl(out / "data" / "test.jsonl"), cfg.prompt, batch_size=3)
    by_id = {r.id: r.logprob for r in fresh}
    for r in ll["base"]:  # the base log-likelihoods are the base model's (float32; another batching)
        assert r["logprob"] == pytest.approx(by_id[r["id"]], rel=1e-4, abs=1e-3)
    assert report["test_loglik"]["difference"]["n"] == 16
    owned = space.owned_rows(json.loads((out / "selection.json").read_text())["indices"])
    shapes = {n: p.shape for n, p in base_model.named_parameters()}
    assert report["parameters"] == sum(s.index.numel() * torch.Size(shapes[n]).numel() // shapes[n][s.dim]
                                       for n, s in owned.items())

    # 3) the delta changes only rows owned by the selected components; revert is bit-exact
    model, _ = load_model(cfg.model, dtype="float32")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    allowed = space.owned_rows(json.loads((out / "selection.json").read_text())["indices"])
    handle = apply_delta(model, SparseDelta.load(out / "delta"))
    params = dict(model.named_parameters())
    assert_only_owned_rows_may_differ(params, base, allowed)
    changed = sum(not torch.equal(params[name].detach(), base[name]) for name in allowed)
    assert changed > 0  # the update did change some owned rows (lr 1e-2 on a tiny model)
    revert_delta(model, handle)
    assert all(torch.equal(p.detach(), base[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("selector,extra", [("random", ["--select-count", "7"]), ("none", []),
                                            ("atp-topk", ["--select-k", "5"])])
def test_controls_run_through_the_same_command(workdir, tmp_path, selector, extra, capsys):
    out = tmp_path / selector
    args = ["run", "--output", str(out), "--model", str(workdir / "model"), "--dtype", "float32",
            "--device", "cpu", "--data", str(workdir / "data.jsonl"), "--shots", str(workdir / "shots.json"),
            "--n-shots", "1", "--weak-threshold", "1.01", "--max-train-problems", "8", "--max-new-tokens", "12",
            "--update-steps", "2", "--lr", "1e-2", "--selector", selector, "--quiet", *extra]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    expected = {"random": 7, "atp-topk": 5, "none": report["components_total"]}[selector]
    assert report["components_selected"] == expected
    assert report["selector"] == selector
