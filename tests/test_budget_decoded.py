"""Decoded follow-ups of the budget curve (``cca_fast.experiments.budget_decoded``) on the tiny
model: a condition's weights rebuilt by the replay are those the curve trained (its greedy
answers equal those of an independent training with the curve's own validation), the accuracy
report's numbers are the plain means of the per-problem records, the comparison with the random
draws pools every decoded draw, bad names are refused before the model loads, and a record that
does not reproduce is refused before decoding."""
from __future__ import annotations

import json
import math
import statistics

import pytest

from cca_fast.errors import CCAError
from cca_fast.evaluation.prompting import PromptConfig
from cca_fast.evaluation.suites import SuiteConfig
from cca_fast.experiments.budget_curve import BudgetCurveConfig, run_budget_curve
from cca_fast.experiments.budget_decoded import DecodedConfig, pending_decoded, run_decoded
from cca_fast.experiments.budget_report import minimum_detectable
from cca_fast.experiments.config import GenerationSettings
from cca_fast.io import read_json
from cca_fast.stages.update import UpdateConfig
from helpers import make_suite_data


def _curve(d, out) -> BudgetCurveConfig:
    return BudgetCurveConfig(
        output=str(out), model=str(d / "model"), data=str(d / "data.jsonl"), n_per_template=10,
        prompt=PromptConfig(exemplars=str(d / "shots.json"), n_shots=1), n_train=4, budgets=[0.25],
        selectors=["fisher"], anti=False, random_seeds=2, layer_seeds=0, batch_size=4,
        update=UpdateConfig(optimizer="adamw", lr=3e-2, max_steps=2, batch_size=4, eval_every=1,
                            eval_every_early=1, early_steps=1))


def _extra(path) -> str:
    rows = [{"id": f"x{i}", "question": f"How much is {i}?", "answer": f"#### {i % 2}"} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def decoded(workdir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decoded")
    curve = _curve(workdir, tmp / "curve")
    assert run_budget_curve(curve, progress=False) == []
    dec = DecodedConfig(accuracy=["base", "fisher@0.25", "random-s0@0.25", "random-s1@0.25"],
                        side_effects=["base", "fisher@0.25"], extra_test_data=_extra(tmp / "extra.jsonl"),
                        generation=GenerationSettings(max_new_tokens=8, batch_size=4, slots=4),
                        suites=SuiteConfig(data_root=str(make_suite_data(tmp / "side")), mmlu_limit=4,
                                           truthfulqa_limit=3, ppl_limit=3, batch_size=4))
    assert run_decoded(curve, dec, limit=2, progress=False)  # resumable: two conditions a call
    assert run_decoded(curve, dec, progress=False) == [] and pending_decoded(curve, dec) == []
    return curve, dec


def test_replayed_weights_are_the_trained_ones(decoded):
    """The accuracy records of a condition equal greedy answers of the model trained afresh with
    the curve's real validation (not the replayed scores): the same weights."""
    from cca_fast.evaluation.evaluate import evaluate
    from cca_fast.experiments.budget_curve import _Session
    from cca_fast.experiments.budget_decoded import test_problems
    from cca_fast.evaluation.gold_loglik import summarize_loglik
    from cca_fast.stages.localize.select import Selection
    from cca_fast.stages.update import run_update

    curve, dec = decoded
    rec = read_json(f"{curve.output}/conditions/fisher@0.25.json")
    acc = read_json(f"{curve.output}/accuracy/fisher@0.25.json")
    assert acc["replay"] == {"best_step": rec["best_step"], "max_relative_loss_difference": 0.0}  # same floats
    s = _Session(curve)
    result = run_update(s.model, s.space, Selection.from_dict(rec["selection"]), [], curve.update,
                        validate=lambda m: summarize_loglik(s.loglik(s.val_ex, s.val))["mean_logprob"], gold=s.gold)
    assert result.best_step == rec["best_step"] > 0  # the test is void if the base weights were kept
    problems = test_problems(curve, dec, s.test)
    fresh = evaluate(s.model, s.tokenizer, problems, prompt=curve.prompt, generation=dec.generation.config(),
                     progress=False)
    assert [(r["id"], r["output"]) for r in fresh.records] == [(r["id"], r["output"]) for r in acc["records"]]
    assert any(r["id"].startswith("extra:") for r in acc["records"])  # the extra test set was added
    base = read_json(f"{curve.output}/accuracy/base.json")
    assert [r["output"] for r in base["records"]] != [r["output"] for r in acc["records"]]  # the update changed answers


def test_accuracy_report_is_the_records_means(decoded):
    curve, _ = decoded
    study = read_json(f"{curve.output}/study.json")
    acc = study["accuracy"]
    files = {n: [float(r["correct"]) for r in read_json(f"{curve.output}/accuracy/{n}.json")["records"]]
             for n in ("base", "fisher@0.25", "random-s0@0.25", "random-s1@0.25")}
    rows = {r["name"]: r for r in acc["conditions"]}
    n = len(files["base"])
    assert acc["n"] == n == acc["n_builtin"] + acc["n_extra"] and acc["n_extra"] == 6
    for name, x in files.items():
        assert rows[name]["accuracy"]["value"] == pytest.approx(sum(x) / n, abs=1e-12)  # a mean of 0/1
        if name != "base":
            d = [a - b for a, b in zip(x, files["base"])]
            assert rows[name]["vs_base"]["value"] == pytest.approx(sum(d) / n, abs=1e-12)
            assert rows[name]["gained"] - rows[name]["lost"] == round(sum(d))
    (cmp,) = [c for c in acc["vs_random"] if c["condition"] == "fisher@0.25"]
    pool = [(a + b) / 2 for a, b in zip(files["random-s0@0.25"], files["random-s1@0.25"])]
    diffs = [a - b for a, b in zip(files["fisher@0.25"], pool)]
    assert cmp["draws"] == 2 and cmp["difference"]["value"] == pytest.approx(sum(diffs) / n, abs=1e-12)
    assert cmp["minimum_detectable"] == pytest.approx(minimum_detectable(diffs), rel=1e-12)
    side = study["side_effects"]["fisher@0.25"]
    assert set(side) >= {"mmlu", "truthfulqa", "perplexity"}
    md = open(f"{curve.output}/study.md").read()
    assert "| fisher@0.25 | random | 2 |" in md and "Side effects" in md


def test_minimum_detectable_is_the_normal_formula():
    diffs = [1.0, 0.0, -1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    z = 1.959963984540054 + 0.8416212335729143  # z_0.975 + z_0.8
    assert minimum_detectable(diffs) == pytest.approx(z * statistics.stdev(diffs) / math.sqrt(8), rel=1e-12)
    assert minimum_detectable([0.5]) == math.inf


def test_bad_names_and_unreproducible_records_are_refused(decoded, tmp_path):
    import shutil

    curve, dec = decoded
    with pytest.raises(CCAError, match="does not have: fisher@0.5"):
        run_decoded(curve, DecodedConfig(accuracy=["fisher@0.5"]), progress=False)
    other = GenerationSettings(max_new_tokens=9, batch_size=4, slots=4)  # files decoded otherwise would not compare
    with pytest.raises(CCAError, match="differs in: generation.max_new_tokens"):
        run_decoded(curve, DecodedConfig(accuracy=["base"], generation=other, suites=dec.suites,
                                         extra_test_data=dec.extra_test_data), progress=False)
    more = DecodedConfig(accuracy=["base", "fisher@0.25"], generation=dec.generation, suites=dec.suites,
                         extra_test_data=dec.extra_test_data)  # fewer or more conditions, same settings: accepted
    assert run_decoded(curve, more, progress=False) == []
    copy = tmp_path / "curve"
    shutil.copytree(curve.output, copy)
    for p in (copy / "accuracy").iterdir():
        p.unlink()
    (copy / "decoded.json").unlink()
    cond = copy / "conditions" / "random-s0@0.25.json"
    rec = read_json(cond)
    rec["history"][1]["train_loss"] *= 1.01  # another machine's floats
    cond.write_text(json.dumps(rec))
    c2 = BudgetCurveConfig.from_dict({**curve.to_dict(), "output": str(copy)})
    with pytest.raises(CCAError, match="random-s0@0.25 does not reproduce"):
        run_decoded(c2, DecodedConfig(accuracy=["random-s0@0.25"], generation=dec.generation), progress=False)
    assert not (copy / "accuracy" / "random-s0@0.25.json").exists()
    with pytest.raises(CCAError, match="extra"):
        run_decoded(c2, DecodedConfig(accuracy=["base"], extra_test_data=str(tmp_path / "missing.jsonl")),
                    progress=False)
