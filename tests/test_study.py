"""``cca study`` end to end on the tiny biased model of test_pipeline.py: every condition (two
selectors, the random control, the no-mask update, LoRA), side effects on tiny local suite files,
the comparison table, and resumption.

The tiny model's accuracies are meaningless; what is checked is that every condition saw the same
problems and examples, that the table's numbers are the ones recomputed from the records, that the
random control has the size of the selection it controls for, and that a resumed study recomputes
nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cca_fast.cli.main import main
from cca_fast.errors import CCAError
from cca_fast.evaluation.evaluate import summarize
from cca_fast.io import read_json, read_jsonl
from cca_fast.baselines.lora.train import LoRAConfig
from cca_fast.evaluation.suites import SuiteConfig
from cca_fast.experiments.study import StudyConfig, run_study, seed_from_shared
from helpers import make_suite_data, run_config

pytest.importorskip("peft")


def _study(workdir: Path, out: Path, side: Path) -> StudyConfig:
    run = run_config(workdir, out / "unused")
    return StudyConfig(output=str(out), run=run, selectors=["dcm", "atp-fraction"], select_fraction=0.05,
                       controls=["random", "none", "lora"], random_like="atp-fraction",
                       lora=LoRAConfig(epochs=2, lr=1e-3, batch_size=4),
                       suites=SuiteConfig(data_root=str(side), mmlu_limit=4, truthfulqa_limit=3, ppl_limit=3,
                                          batch_size=4),
                       bootstrap=400)


@pytest.mark.slow
def test_study_every_condition_and_resume(workdir, tmp_path):
    side = make_suite_data(tmp_path / "side")
    out = tmp_path / "study"
    study = run_study(_study(workdir, out, side), progress=False)

    names = [r["condition"] for r in study["rows"]]
    assert names == ["base", "dcm", "atp-fraction", "random", "none", "lora"]
    # every condition shares the stage-1 files byte for byte, and its test records cover the same problems
    shared_pivots = (out / "shared" / "pivots.jsonl").read_bytes()
    for c in ("dcm", "atp-fraction", "random", "none"):
        assert (out / c / "pivots.jsonl").read_bytes() == shared_pivots
        assert (out / c / "data" / "test.jsonl").read_bytes() == (out / "shared" / "data" / "test.jsonl").read_bytes()
    test_ids = [json.loads(line)["id"] for line in (out / "shared" / "data" / "test.jsonl").read_text().splitlines()]
    assert study["n_test"] == len(test_ids)

    rows = {r["condition"]: r for r in study["rows"]}
    # the table's accuracies are the records' (per-template averaged) accuracies
    files = {"base": out / "shared" / "eval_base_test.jsonl", "lora": out / "lora" / "eval_test.jsonl",
             **{c: out / c / "eval_cca_test.jsonl" for c in ("dcm", "atp-fraction", "random", "none")}}
    for c, f in files.items():
        recs = list(read_jsonl(f))
        assert sorted(r["id"] for r in recs) == sorted(test_ids)
        assert rows[c]["test_accuracy"]["value"] == pytest.approx(summarize(recs)["accuracy"], abs=1e-12)
        if c != "base":  # paired difference = difference of the two accuracies
            assert rows[c]["vs_base"]["value"] == pytest.approx(
                rows[c]["test_accuracy"]["value"] - rows["base"]["test_accuracy"]["value"], abs=1e-12)
    # the random control has exactly the size of the selection it controls for
    assert rows["random"]["components"] == rows["atp-fraction"]["components"]
    assert read_json(out / "random" / "config.json")["select_count"] == rows["atp-fraction"]["components"]
    assert "vs_random" in rows["dcm"] and "vs_random" not in rows["none"]
    assert rows["none"]["components_fraction"] == 1.0
    assert 0 < rows["lora"]["parameters"] and 0 < rows["lora"]["parameters_fraction"] < 1
    # side effects: the base has metrics; every other condition has a delta against it
    for c in names:
        se = rows[c]["side_effects"]
        assert se["mmlu"]["n"] == 4 and se["truthfulqa"]["n"] == 3 and se["perplexity"]["n"] == 3
        if c != "base":
            assert se["mmlu"]["delta"] == pytest.approx(se["mmlu"]["metric"] - rows["base"]["side_effects"]["mmlu"]["metric"])
    # a condition whose validation kept step 0 reuses the base's suite results: check the premise
    # (its delta leaves the weights bit-identical, so the suites give the same per-item numbers)
    kept = [c for c in ("dcm", "atp-fraction", "random", "none") if read_json(out / c / "update.json")["best_step"] == 0]
    assert kept, "the tiny study should have a condition whose update was rejected"
    from cca_fast.delta import SparseDelta, apply_delta
    from cca_fast.models.loading import load_model
    from cca_fast.evaluation.suites import run_suites

    model, tok = load_model(str(workdir / "model"), dtype="float32", device="cpu")
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    apply_delta(model, SparseDelta.load(out / kept[0] / "delta"))
    assert all(torch.equal(base_sd[k], v) for k, v in model.state_dict().items())
    fresh = run_suites(model, tok, _study(workdir, out, side).suites)
    reused = read_json(out / "side_effects" / f"{kept[0]}.json")
    assert reused["same_weights_as"] == "base"
    for suite in ("mmlu", "truthfulqa", "perplexity"):
        assert fresh[suite]["per_item"] == reused[suite]["per_item"]
    assert len(study["verdicts"]) == 2
    for f in ("study.json", "study.md", "study.png"):
        assert (out / f).stat().st_size > 0
    md = (out / "study.md").read_text()
    assert "random control" in md and "LoRA" in md and "Verdict" in md

    # resume: nothing is recomputed (every file keeps its bytes), the table is the same
    snapshot = {p: p.read_bytes() for p in out.rglob("*.jsonl")}
    again = run_study(_study(workdir, out, side), progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*.jsonl")} == snapshot
    assert [r["test_accuracy"] for r in again["rows"]] == [r["test_accuracy"] for r in study["rows"]]

    # another configuration in the same directory is refused, with what differs
    other = _study(workdir, out, side)
    other.selectors = ["dcm"]
    other.random_like = "dcm"
    with pytest.raises(CCAError, match="selectors"):
        run_study(other, progress=False)


def test_study_config_errors(workdir, tmp_path):
    bad = _study(workdir, tmp_path / "s", tmp_path)
    bad.selectors = ["random"]
    with pytest.raises(CCAError, match="controls"):
        bad.validate()
    bad = _study(workdir, tmp_path / "s", tmp_path)
    bad.random_like = "atp-topk"
    with pytest.raises(CCAError, match="random control copies"):
        bad.validate()
    bad = _study(workdir, tmp_path / "s", tmp_path)
    bad.controls = ["sft"]
    with pytest.raises(CCAError, match="unknown controls"):
        bad.validate()


def test_seed_from_shared_keeps_existing_files(tmp_path):
    shared, target = tmp_path / "shared", tmp_path / "c"
    (shared / "data").mkdir(parents=True)
    (shared / "data" / "train.jsonl").write_text("shared\n")
    (shared / "pivots.jsonl").write_text("p\n")
    (shared / "stages.json").write_text(json.dumps({"data": 1.0, "pivots": 2.0, "update": 9.0}))
    (target / "data").mkdir(parents=True)
    (target / "data" / "train.jsonl").write_text("own\n")
    seed_from_shared(shared, target)
    assert (target / "data" / "train.jsonl").read_text() == "own\n"
    assert (target / "pivots.jsonl").read_text() == "p\n"
    assert read_json(target / "stages.json") == {"data": 1.0, "pivots": 2.0}  # shared stages only
    assert not list(target.rglob("*.tmp-copy"))


def test_cli_study_help_and_bad_input(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    assert "random control" in capsys.readouterr().out
    assert main(["study", "--selectors", "random", "--output", "/nonexistent/x"]) == 2
    assert "controls" in capsys.readouterr().err
