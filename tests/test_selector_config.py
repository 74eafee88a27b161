"""The objective selectors, per-kind budgets and anti-selections in ``RunConfig`` / ``cca run``:
clear errors before any work, the flags parsed into the configuration, and stage 2's
``localize`` giving exactly the per-kind counts (and the anti-selection the tail of the ranking)."""
from __future__ import annotations

import argparse

import pytest
import torch

from cca_fast.cli import run as run_cli_module
from cca_fast.cli.run import config_from_args
from cca_fast.errors import CCAError
from cca_fast.experiments.config import RunConfig
from cca_fast.experiments.recipes import recipe_config
from cca_fast.experiments.steps.localize import localize
from cca_fast.models.adapters import KINDS
from cca_fast.models.components import ComponentSpace
from cca_fast.stages.localize.objective_scores import gold_gradient_scores
from cca_fast.stages.localize.select import kind_budget_counts
from cca_fast.stages.sft import SFTExample
from helpers import VOCAB, tiny


@pytest.mark.parametrize("kw, match", [
    (dict(selector="fisher"), "needs a budget"),
    (dict(selector="dcm", select_per_kind={"q": 0.1}), "does not take it"),
    (dict(selector="atp-fraction", select_fraction=0.02, select_anti=True), "--anti"),
    (dict(selector="fisher", select_per_kind={"z": 0.1}), "unknown kind 'z'"),
    (dict(selector="movement", select_per_kind={"q": 2.0}), r"in \[0, 1\]"),
])
def test_bad_selector_settings_are_refused_on_construction(kw, match):
    with pytest.raises(CCAError, match=match):
        RunConfig(**kw)


def test_cli_flags_set_the_budget_and_anti():
    parser = argparse.ArgumentParser()
    run_cli_module.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["run", "--selector", "fisher", "--select-per-kind", "q=0.05,mlp=0.01", "--anti"])
    cfg = config_from_args(args)
    assert cfg.selector == "fisher" and cfg.select_per_kind == {"q": 0.05, "mlp": 0.01} and cfg.select_anti
    plain = config_from_args(parser.parse_args(["run", "--recipe", "paper"]))
    assert plain.select_per_kind is None and plain.select_anti is False
    # the default recipe's budget belongs to its selector: another --selector drops it
    assert config_from_args(parser.parse_args(["run"])).select_per_kind == {"q": 0.03, "k": 0.03, "v": 0.03, "mlp": 0.03}
    other = config_from_args(parser.parse_args(["run", "--selector", "atp-topk", "--select-k", "5"]))
    assert (other.selector, other.select_k, other.select_per_kind) == ("atp-topk", 5, None)
    assert other.update == recipe_config().update  # the rest of the recipe stays
    rand = config_from_args(parser.parse_args(["run", "--selector", "random", "--select-per-kind", "mlp=0.1"]))
    assert rand.select_per_kind == {"mlp": 0.1}  # a budget given with it stays
    with pytest.raises(SystemExit):  # not KIND=FRACTION: argparse refuses it while parsing
        parser.parse_args(["run", "--select-per-kind", "q0.05"])


def test_localize_objective_selector_counts_and_anti():
    model = tiny("llama")
    space = ComponentSpace(model)
    g = torch.Generator().manual_seed(2)
    gold = [SFTExample(tuple(torch.randint(3, VOCAB, (5 + i,), generator=g).tolist()),
                       tuple(torch.randint(3, VOCAB, (3,), generator=g).tolist()), f"g{i}") for i in range(3)]
    budget = {"q": 0.25, "k": 0.25, "v": 0.5, "mlp": 0.1}
    top = localize(model, space, [], RunConfig(selector="grad-weight", select_per_kind=budget), False, gold=gold)
    anti = localize(model, space, [], RunConfig(selector="grad-weight", select_per_kind=budget, select_anti=True),
                    False, gold=gold)
    want = kind_budget_counts(space, budget)
    assert top.counts == want == anti.counts and top.method == "grad-weight" and anti.method == "grad-weight-anti"
    scores = gold_gradient_scores(model, gold, space)["grad-weight"]
    kinds = [c.kind for c in space]
    for kind in KINDS:
        mine = [i for i in range(space.total) if kinds[i] == kind]
        ranked = sorted(mine, key=lambda i: -float(scores[i]))
        assert sorted(i for i in top.indices if kinds[i] == kind) == sorted(ranked[:want[kind]])
        assert sorted(i for i in anti.indices if kinds[i] == kind) == sorted(ranked[len(ranked) - want[kind]:])
    frac = localize(model, space, [], RunConfig(selector="fisher", select_fraction=0.5), False, gold=gold)
    assert frac.counts == kind_budget_counts(space, {k: 0.5 for k in KINDS})
    with pytest.raises(CCAError, match="gold solutions"):
        localize(model, space, [], RunConfig(selector="fisher", select_fraction=0.5), False, gold=None)
    rnd = localize(model, space, [], RunConfig(selector="random", select_per_kind=budget, seed=3), False)
    assert rnd.counts == want


def test_study_random_variants_are_distributions_of_seeded_draws():
    from cca_fast.experiments.recipes import study_variants
    from cca_fast.experiments.study import StudyConfig, layer_kind_counts, side_effect_names

    cfg = StudyConfig(selectors=[], controls=[], side_effects=False, random_seeds=3,
                      variants=study_variants(["circuit-sft", "circuit-sft:random-kinds", "circuit-sft:random-layers"]))
    names = cfg.condition_names()
    assert names == ["circuit-sft", "circuit-sft-random-kinds", "circuit-sft-random-kinds-s1",
                     "circuit-sft-random-kinds-s2", "circuit-sft-random-layers", "circuit-sft-random-layers-s1",
                     "circuit-sft-random-layers-s2"]
    draws = [cfg.run_config(n, {"q": 3, "k": 1, "v": 0, "mlp": 9}) for n in names[1:4]]
    assert [d.select_seed for d in draws] == [None, cfg.run.seed + 1, cfg.run.seed + 2]  # draw 0 = the old control
    assert all(d.selector == "random" and d.seed == cfg.run.seed and d.select_kinds for d in draws)
    per_layer = cfg.run_config(names[5], {"q": [1, 2], "k": [0, 1], "v": [0, 0], "mlp": [4, 5]})
    assert per_layer.select_layer_kinds == {"q": [1, 2], "k": [0, 1], "v": [0, 0], "mlp": [4, 5]}
    assert per_layer.select_seed == cfg.run.seed + 1
    assert "circuit-sft-random-kinds-s1" not in side_effect_names(cfg)  # suites on the first draw only
    space = {"n_layers": 2, "per_layer": {"q": 6, "k": 2, "v": 2, "mlp": 22}}
    model_space = ComponentSpace(tiny("llama"))  # the same shape: the report's description agrees
    idx = [0, 5, 6, 9, 10, 31, 32, 38, 39, 63]
    assert layer_kind_counts(idx, space) == model_space.layer_kind_counts(idx)
    assert cfg.random_partners() == {"circuit-sft": ["circuit-sft-random-kinds", "circuit-sft-random-layers"]}
