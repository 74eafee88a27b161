"""The budget curve (``cca_fast.experiments.budget_curve``) end to end on the tiny model: every
condition at a budget has exactly the same per-kind counts, the random draws are reproducible from
their seeds, the layer-matched draws copy the selector's per-(layer, kind) counts, the
anti-selection is the tail of the same ranking, the step is the validation argmax, and the
report compares each selector with the pooled draws. Resuming recomputes nothing."""
from __future__ import annotations

import pytest
import torch

from cca_fast.errors import CCAError
from cca_fast.evaluation.prompting import PromptConfig
from cca_fast.experiments.budget_curve import BudgetCurveConfig, build_study, pending, run_budget_curve
from cca_fast.io import read_json
from cca_fast.models.adapters import KINDS
from cca_fast.stages.localize.select import Selection, kind_budget_counts, select_per_kind, select_random
from cca_fast.stages.update import UpdateConfig


def curve_config(d, out) -> BudgetCurveConfig:
    return BudgetCurveConfig(
        output=str(out), model=str(d / "model"), data=str(d / "data.jsonl"), n_per_template=10,
        prompt=PromptConfig(exemplars=str(d / "shots.json"), n_shots=1), n_train=4, budgets=[0.25],
        selectors=["fisher", "grad-weight"], random_seeds=3, layer_seeds=2, batch_size=4,
        update=UpdateConfig(optimizer="adamw", lr=1e-2, max_steps=2, batch_size=4, eval_every=1,
                            eval_every_early=1, early_steps=1))


def test_budget_curve_conditions_match_counts_and_draws_reproduce(workdir, tmp_path):
    cfg = curve_config(workdir, tmp_path / "curve")
    assert run_budget_curve(cfg, limit=3, progress=False) and len(pending(cfg)) == len(cfg.conditions()) - 3
    assert run_budget_curve(cfg, progress=False) == []
    out = tmp_path / "curve"
    recs = {c["name"]: read_json(out / "conditions" / f"{c['name']}.json") for c in cfg.conditions()}
    from cca_fast.models.components import ComponentSpace
    from cca_fast.models.loading import load_model

    model, _ = load_model(cfg.model)
    space = ComponentSpace(model)
    want = kind_budget_counts(space, {k: 0.25 for k in KINDS})
    for name, r in recs.items():
        assert r["counts"] == want, name  # every condition: the same counts of each kind
        hist = [h for h in r["history"] if "val" in h]
        assert r["best_step"] == max(hist, key=lambda h: h["val"])["step"]  # the validation argmax (first on ties)
    for seed in range(3):  # the random distribution is reproducible from its seeds
        assert recs[f"random-s{seed}@0.25"]["selection"]["indices"] == select_random(space, want, seed=seed).indices
    fisher = Selection.from_dict(recs["fisher@0.25"]["selection"])
    for seed in range(2):
        draw = Selection.from_dict(recs[f"random-layers-s{seed}@0.25"]["selection"])
        assert space.layer_kind_counts(draw.indices) == space.layer_kind_counts(fisher.indices)
        assert draw.indices == select_random(space, fisher, seed=seed, match_layers=True).indices
    scores = torch.load(out / "scores" / "fisher.pt")
    anti = select_per_kind(scores, space, {k: 0.25 for k in KINDS}, anti=True)
    assert recs["fisher-anti@0.25"]["selection"]["indices"] == anti.indices
    study = read_json(out / "study.json")
    assert not study["pending"] and study["n_test"] == len(read_json(out / "base.json")["test"])
    got = {(c["condition"], c["against"]): c["draws"] for c in study["vs_random"]}
    assert got[("fisher@0.25", "random")] == 3 and got[("fisher@0.25", "random-layers")] == 2
    md = (out / "study.md").read_text()
    assert "| fisher@0.25 | random | 3 |" in md and "| fisher@0.25 | random-layers | 2 |" in md
    assert (out / "study.png").exists()
    before = {p: p.stat().st_mtime_ns for p in (out / "conditions").iterdir()}
    run_budget_curve(cfg, progress=False)  # resumed: nothing recomputed
    assert {p: p.stat().st_mtime_ns for p in (out / "conditions").iterdir()} == before
    assert build_study(cfg)["conditions"] == study["conditions"]


def test_budget_curve_config_errors(workdir, tmp_path):
    with pytest.raises(CCAError, match="unknown selectors"):
        BudgetCurveConfig(selectors=["magic"])
    with pytest.raises(CCAError, match="pivots"):
        BudgetCurveConfig(selectors=["atp"])
    with pytest.raises(CCAError, match="budgets"):
        BudgetCurveConfig(budgets=[0.0])
    with pytest.raises(CCAError, match="lrs is empty"):
        BudgetCurveConfig(lrs=[])
    with pytest.raises(CCAError, match="lrs"):
        BudgetCurveConfig(lrs=[1e-3, 0.0])


def test_learning_rate_is_chosen_per_condition_on_validation(workdir, tmp_path):
    """With ``lrs`` every condition trains at each rate and keeps the rate of the highest
    validation log-likelihood; its test records are those of the model trained afresh at that
    rate (the kept delta re-applied is the trained weights), every rate's history is recorded, and
    the decoded follow-ups replay the chosen rate."""
    import dataclasses

    from cca_fast.evaluation.gold_loglik import summarize_loglik
    from cca_fast.experiments.budget_curve import _Session
    from cca_fast.experiments.budget_decoded import DecodedConfig, run_decoded, split_accuracy_path
    from cca_fast.experiments.config import GenerationSettings
    from cca_fast.stages.update import run_update

    cfg = dataclasses.replace(curve_config(workdir, tmp_path / "lr"), selectors=["fisher"], anti=False, random_seeds=1,
                              layer_seeds=0, lrs=[1e-4, 3e-2])
    assert run_budget_curve(cfg, progress=False) == []
    s = _Session(cfg)
    for name in ("fisher@0.25", "random-s0@0.25"):
        rec = read_json(tmp_path / "lr" / "conditions" / f"{name}.json")
        sweep = rec["lr_sweep"]
        assert [r["lr"] for r in sweep] == [1e-4, 3e-2] and sweep[0]["best_val"] != sweep[1]["best_val"]
        chosen = max(sweep, key=lambda r: r["best_val"])
        assert rec["lr"] == chosen["lr"] and rec["best_step"] == chosen["best_step"] and rec["history"] == chosen["history"]
        for r in sweep:  # each rate's best validation score is its history's maximum
            assert r["best_val"] == max(h["val"] for h in r["history"] if "val" in h)
        result = run_update(s.model, s.space, Selection.from_dict(rec["selection"]), [],
                            dataclasses.replace(cfg.update, lr=rec["lr"]),
                            validate=lambda m: summarize_loglik(s.loglik(s.val_ex, s.val))["mean_logprob"], gold=s.gold)
        assert result.best_step == rec["best_step"]
        fresh = [r.to_dict() for r in s.loglik(s.test_ex, s.test)]
        from cca_fast.delta import revert_delta

        revert_delta(s.model, result.delta)
        assert fresh == rec["test"]  # bit-identical: the same weights
    assert "lr" in read_json(tmp_path / "lr" / "study.json")["conditions"][0]
    dec = DecodedConfig(split_accuracy=["fisher@0.25"], generation=GenerationSettings(max_new_tokens=4, batch_size=4,
                                                                                       slots=4))
    assert run_decoded(cfg, dec, progress=False) == []  # the replay reproduced the chosen rate's losses
    assert read_json(split_accuracy_path(cfg.output, "fisher@0.25"))["replay"]["max_relative_loss_difference"] == 0.0
