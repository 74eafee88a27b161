"""``RunConfig.procedure="reference"`` (the authors' procedure) gives the same results as the fast
default, on a tiny local model in float64:

* generation without early stop (``GenerationConfig.early_stop=False``), one prompt at a time,
  gives token-for-token the generations of batched, early-stopping generation;
* a whole ``run_cca`` with ``procedure="reference"`` (batch-1 generation without early stop,
  literal branching, DCM ``mode="full"``, update ``mode="reference"`` without shared prefix) and
  one with ``procedure="fast"`` write the same base/test records, trace pairs, pivots, selection,
  update history and delta rows.

The tiny llama (char-level tokenizer) has its LM head biased toward "0", "1" and space and every
gold answer is 0 or 1, so traces are sometimes right and sometimes wrong and every stage runs on
real (if meaningless) data; DCM runs with a large learning rate so that masks cross the 0.5
threshold and the selection is not trivially "everything".
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from cca_fast.delta import SparseDelta
from cca_fast.errors import CCAError
from cca_fast.generation.stops import MarkerStop
from cca_fast.generation import GenerationConfig, GenerationStats, generate
from cca_fast.io import read_jsonl
from cca_fast.evaluation.prompting import PromptConfig, paper_stops
from cca_fast.experiments.config import GenerationSettings
from cca_fast.experiments.pipeline import RunConfig, procedure_settings, run_cca
from helpers import char_tokenizer, make_biased_tiny
from cca_fast.stages.localize.dcm import DCMConfig
from cca_fast.stages.update import UpdateConfig


def _config(d: Path, out: Path, procedure: str) -> RunConfig:
    # float64: batched and one-at-a-time forwards differ by ~1e-15, so greedy/sampled tokens and
    # the DCM threshold decisions cannot be flipped by summation order
    return RunConfig(output=str(out), model=str(d / "model"), dtype="float64", device="cpu",
                     data=str(d / "data.jsonl"), prompt=PromptConfig(exemplars=str(d / "shots.json"), n_shots=1),
                     weak_threshold=1.01, max_train_problems=8, max_val_problems=6,
                     generation=GenerationSettings(max_new_tokens=12, batch_size=8),
                     dcm=DCMConfig(epochs=3, lambda_l1=0.05, lr=0.1, batch_size=4, mode="last",
                                   reuse_prefix_cache=True),
                     update=UpdateConfig(max_steps=4, lr=1e-2, eval_every=2, eval_every_early=2),
                     procedure=procedure)


def test_no_early_stop_gives_the_same_generations():
    tok = char_tokenizer()
    model = make_biased_tiny(tok).to(torch.float64)
    prompts = [f"Q: What is {i}?\nA:" + " 1" * (i % 3) for i in range(6)]
    # "1" is a frequent token: rows stop (new_question marker) at different steps
    for sample in (False, True):
        base = GenerationConfig(max_new_tokens=16, batch_size=6, stops=(MarkerStop("1", reason="new_question"),),
                                do_sample=sample,
                                temperature=1.3, seed=5)
        fast_stats, ref_stats = GenerationStats(), GenerationStats()
        fast = generate(model, tok, prompts, base, stats=fast_stats)
        ref = generate(model, tok, prompts, dataclasses.replace(base, batch_size=1, share_prefix=False,
                                                                early_stop=False), stats=ref_stats)
        assert [(g.output_ids, g.text, g.finish_reason) for g in fast] == \
               [(g.output_ids, g.text, g.finish_reason) for g in ref]
        assert {g.finish_reason for g in fast} >= {"new_question"}
        assert any(g.n_generated < 16 for g in fast)
        # the reference decodes max_new_tokens for every prompt; only the cut part is kept
        assert ref_stats.generated_tokens == fast_stats.generated_tokens == sum(g.n_generated for g in fast)
        assert ref_stats.generated_tokens + ref_stats.discarded_tokens == 16 * len(prompts)
        assert fast_stats.discarded_tokens == 0
        assert ref_stats.sequences == fast_stats.sequences == len(prompts)


def test_procedure_settings_and_validation():
    cfg = RunConfig(dcm=DCMConfig(mode="last", reuse_prefix_cache=True, epochs=3), update=UpdateConfig(lr=1e-3),
                    procedure="reference")
    s = procedure_settings(cfg)
    assert s.generation == GenerationConfig(max_new_tokens=cfg.generation.max_new_tokens, batch_size=1,
                                            slots=1, share_prefix=False, early_stop=False, stops=paper_stops())
    assert s.branching == "reference" and s.trace.sample_batch == 1 and s.trace.k == cfg.trace.k
    # full mode has no prefix cache; reuse_prefix_cache keeps the batch schedule the same
    assert s.dcm == DCMConfig(mode="full", reuse_prefix_cache=True, epochs=3)
    assert s.update.mode == "reference" and s.update.lr == 1e-3
    s.update.check()  # every override is a real field
    fast = procedure_settings(dataclasses.replace(cfg, procedure="fast"))
    assert fast.dcm == cfg.dcm and fast.update == cfg.update and fast.branching == cfg.branching
    assert fast.generation == GenerationConfig(max_new_tokens=cfg.generation.max_new_tokens,
                                               batch_size=cfg.generation.batch_size,
                                               slots=cfg.generation.slots, stops=paper_stops())
    with pytest.raises(CCAError, match="unknown procedure"):
        RunConfig(procedure="slow").validate()
    assert RunConfig.from_dict(cfg.to_dict()).procedure == "reference"


def _by(key: str, rows) -> dict:
    return {r[key]: r for r in rows}


@pytest.mark.slow
def test_reference_and_fast_runs_give_the_same_results(workdir, tmp_path):
    reports, out = {}, {}
    for proc in ("fast", "reference"):
        out[proc] = tmp_path / proc
        reports[proc] = run_cca(_config(workdir, out[proc], proc), progress=False)
    f, r = out["fast"], out["reference"]
    assert json.loads((r / "config.json").read_text())["procedure"] == "reference"
    assert reports["reference"]["procedure"] == "reference"

    # base evaluation records (texts, token ids, correctness): identical
    for name in ("eval_base_train.jsonl", "eval_base_test.jsonl"):
        assert _by("id", read_jsonl(f / name)) == _by("id", read_jsonl(r / name)), name
    # trace pairs: identical except the tokens spent (the reference draws samples one at a time
    # and stops at the first flip, the fast path draws them 4 at a time)
    tf, tr = _by("problem_id", read_jsonl(f / "traces.jsonl")), _by("problem_id", read_jsonl(r / "traces.jsonl"))
    assert tf.keys() == tr.keys()
    n_flipped = 0
    for pid in tf:
        a, b = dict(tf[pid]), dict(tr[pid])
        assert b.pop("generated_tokens") <= a.pop("generated_tokens")
        assert a == b, pid
        n_flipped += a["sample_index"] >= 0
    assert n_flipped >= 2
    # pivots: the same examples (the literal loop costs more completions)
    pf, pr = _by("problem_id", read_jsonl(f / "pivots.jsonl")), _by("problem_id", read_jsonl(r / "pivots.jsonl"))
    assert pf.keys() == pr.keys()
    for pid in pf:
        a, b = pf[pid]["example"], pr[pid]["example"]
        assert (a is None) == (b is None), pid
        if a is not None:  # "method" names the search: "branching-fast" / "branching-reference"
            # (a mismatch here on length-capped traces: completions must be capped at
            # max_new_tokens trace tokens in all, see pivot_search.make_completer)
            assert {**a, "method": None} == {**b, "method": None}, pid
    assert sum(v["example"] is not None for v in pf.values()) >= 2
    assert sum(v["stats"]["completions"] for v in pr.values()) >= sum(v["stats"]["completions"] for v in pf.values())
    # selection: same components, and not trivially all or none
    sf, sr = json.loads((f / "selection.json").read_text()), json.loads((r / "selection.json").read_text())
    assert sf["indices"] == sr["indices"]
    assert 0 < len(sf["indices"]) < reports["fast"]["components_total"]
    # update: same best step and validation accuracies; train logit differences within 1e-6
    # relative. Float64, but the fast path's shared-prefix loss (update.share_prefix) gives
    # weight gradients ~3e-8 relative away from full sequences' (measured; forward equal to 1e-16)
    uf, ur = json.loads((f / "update.json").read_text()), json.loads((r / "update.json").read_text())
    assert (uf["best_step"], uf["best_val"]) == (ur["best_step"], ur["best_val"])
    for hf, hr in zip(uf["history"], ur["history"], strict=True):
        assert hf.get("val") == hr.get("val")
        assert hf["train_logit_diff"] == pytest.approx(hr["train_logit_diff"], rel=1e-6, abs=1e-9)
    # delta: the same rows of the same parameters; values within 1e-6 of the largest change
    # (4 SGD steps of lr 1e-2; measured ~1e-7, from the shared-prefix gradients above)
    df, dr = SparseDelta.load(f / "delta"), SparseDelta.load(r / "delta")
    assert df.params.keys() == dr.params.keys() and df.params
    scale = max(float((p.new - p.base).abs().max()) for p in dr.params.values())
    assert scale > 1e-6  # the update did move rows
    for name, a in df.params.items():
        b = dr.params[name]
        assert (a.dim, a.shape) == (b.dim, b.shape) and torch.equal(a.index, b.index), name
        assert torch.equal(a.base, b.base), name
        torch.testing.assert_close(a.new, b.new, rtol=0, atol=1e-6 * scale)
    # the updated model's test generations: identical
    assert _by("id", read_jsonl(f / "eval_cca_test.jsonl")) == _by("id", read_jsonl(r / "eval_cca_test.jsonl"))
    for key in ("base_accuracy", "cca_accuracy", "n_examples", "components_selected"):
        assert reports["fast"][key] == reports["reference"][key], key


@pytest.mark.slow
def test_gpu_scale_benchmark_runs_tiny_on_cpu(tmp_path):
    """The GPU scale of bench/pipeline (random Llama, fake judge, fixed-length traces, bf16) at toy
    size on the CPU: every pair, the whole run included, gives the same result both ways."""
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench" / "pipeline"
    sys.path.insert(0, str(bench))
    try:
        import bench_pipeline
    finally:
        sys.path.remove(str(bench))
    out = tmp_path / "tiny.json"
    assert bench_pipeline.main(["--scale", "gpu", "--tiny", "--device", "cpu", "--quiet", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["same"] and {"generation", "branching", "dcm", "attribution", "update", "whole_run"} <= set(res)
    assert res["model"]["greedy_repeats_token"] and res["model"]["top_k_within_alphabet"]
    assert res["whole_run"]["pivots_found"] >= 1 and res["branching"]["pivots_found"] >= 1
    assert (tmp_path / "tiny.md").read_text().startswith("# Pipeline benchmark")
