"""Recipes (``cca run --recipe``) and study variants on the tiny biased model of test_pipeline.py.

``--recipe paper`` must be today's defaults exactly: the same configuration, and bit-identical
outputs (pivots, selection, delta, test evaluation) to a run with the paper's settings spelled out
flag by flag. A study with variants must run each variant on the shared stages, give a variant's
random control as many components as the variant selected, and put the diagnostics in the table.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cca_fast.cli.main import main
from cca_fast.errors import CCAError
from cca_fast.experiments.config import RunConfig
from cca_fast.experiments.recipes import RECIPES, recipe_config, study_variants
from cca_fast.experiments.study import StudyConfig, run_study
from cca_fast.io import read_json
from helpers import run_argv, run_config

OUTPUTS = ("pivots.jsonl", "training_examples.json", "selection.json", "eval_cca_test.jsonl",
           "eval_base_test.jsonl")


def test_paper_recipe_is_the_default_configuration():
    assert recipe_config("paper").to_dict() == RunConfig().to_dict()
    for name in RECIPES:  # every recipe is a valid configuration
        recipe_config(name).validate()
    with pytest.raises(CCAError, match="unknown recipe"):
        recipe_config("nope")


def test_default_recipe_is_fisher_sft():
    from cca_fast.cli.main import build_parser
    from cca_fast.cli.run import config_from_args
    from cca_fast.experiments.recipes import DEFAULT_RECIPE

    assert DEFAULT_RECIPE == "fisher-sft"
    cfg = config_from_args(build_parser().parse_args(["run"]))
    assert cfg == recipe_config("fisher-sft") != RunConfig()
    assert (cfg.selector, cfg.select_per_kind, cfg.update.objective, cfg.update.optimizer, cfg.update.lr) == (
        "fisher", {"q": 0.03, "k": 0.03, "v": 0.03, "mlp": 0.03}, "gold_nll", "adamw", 1e-3)


@pytest.mark.slow
def test_recipe_paper_gives_bit_identical_outputs_to_the_spelled_out_paper_flags(workdir, tmp_path):
    """The paper's procedure three ways: the Python API's ``RunConfig()`` (what ``cca run`` ran by
    default before circuit-sft became the default), ``--recipe paper``, and its settings flag by flag."""
    from cca_fast.experiments.pipeline import run_cca

    small = ("--max-train-problems", "8", "--selector", "atp-topk", "--select-k", "5")
    a, b, c = tmp_path / "default", tmp_path / "recipe", tmp_path / "flags"
    run_cca(run_config(workdir, a, max_train_problems=8, selector="atp-topk", select_k=5), progress=False)
    assert main(run_argv(workdir, b, *small, "--recipe", "paper")) == 0
    # the variants' flags at their paper values change nothing
    assert main(run_argv(workdir, c, *small, "--objective", "logit_diff", "--pivot-source", "paper",
                         "--pivot-filter", "all", "--retain-weight", "0", "--val-from-train", "0")) == 0
    for rel in OUTPUTS:
        assert (a / rel).read_bytes() == (b / rel).read_bytes() == (c / rel).read_bytes(), rel
    # the delta's tensors bit for bit (its metadata names the run directory, which differs)
    deltas = [load_file(d / "delta" / "delta.safetensors") for d in (a, b, c)]
    assert deltas[0] and set(deltas[0]) == set(deltas[1]) == set(deltas[2])
    for name, t in deltas[0].items():
        assert torch.equal(t, deltas[1][name]) and torch.equal(t, deltas[2][name]), name
    # (a: helpers.run_config builds DCMConfig() itself, reuse_prefix_cache False; DCM does not run here)
    configs = [json.loads((d / "config.json").read_text()) for d in (b, c)]
    assert [x.pop("output") for x in configs] == [str(b), str(c)]
    assert configs[0] == configs[1]


def test_study_variants_spec():
    v = study_variants(["circuit-sft", "circuit-sft:random", "circuit-sft:random-kinds", "circuit-sft:none"])
    assert list(v) == ["circuit-sft", "circuit-sft-random", "circuit-sft-random-kinds", "circuit-sft-none"]
    assert v["circuit-sft-random-kinds"]["match_kinds"] is True
    assert v["circuit-sft-random"]["random_like"] == "circuit-sft"
    assert v["circuit-sft-none"]["selector"] == "none"
    with pytest.raises(CCAError, match="suffix"):
        study_variants(["paper:odd"])
    with pytest.raises(CCAError, match="random_like"):
        StudyConfig(selectors=[], variants={"r": {"random_like": "later"}, "later": {}})


@pytest.mark.slow
def test_study_runs_variants_with_their_random_control_and_diagnostics(workdir, tmp_path):
    out = tmp_path / "study"
    run = run_config(workdir, out / "unused", max_train_problems=8, val_from_train=4)
    variants = study_variants(["circuit-sft", "circuit-sft:random", "circuit-sft:random-kinds", "fork-hinge"])
    for name in ("circuit-sft", "circuit-sft-random", "circuit-sft-random-kinds"):
        variants[name]["select_fraction"] = 0.05
    variants["fork-hinge"].update({"select_fraction": 0.05, "pivot_filter": "all", "fork": {"p_min": 0.05}})
    cfg = StudyConfig(output=str(out), run=run, selectors=[], controls=[], variants=variants, side_effects=False,
                      bootstrap=200, random_seeds=2)
    study = run_study(cfg, progress=False)
    rows = {r["condition"]: r for r in study["rows"]}
    assert set(rows) == {"base", "circuit-sft", "circuit-sft-random", "circuit-sft-random-s1", "circuit-sft-random-kinds",
                         "circuit-sft-random-kinds-s1", "fork-hinge"}  # each random control: 2 seeded draws
    # the second draw: same per-kind counts, another draw, on the same pivots; the comparison pools both
    k0, k1 = (read_json(out / n / "selection.json") for n in ("circuit-sft-random-kinds", "circuit-sft-random-kinds-s1"))
    assert k0["counts"] == k1["counts"] and k0["indices"] != k1["indices"]
    assert (out / "circuit-sft-random-kinds" / "training_examples.json").read_bytes() == \
        (out / "circuit-sft-random-kinds-s1" / "training_examples.json").read_bytes()
    assert {c: v["draws"] for c, v in rows["circuit-sft"]["vs_randoms"].items()} == \
        {"circuit-sft-random": 2, "circuit-sft-random-kinds": 2}
    sft = read_json(out / "circuit-sft" / "report.json")
    rnd = read_json(out / "circuit-sft-random" / "report.json")
    assert rnd["components_selected"] == sft["components_selected"] and rnd["selector"] == "random"
    kinds = read_json(out / "circuit-sft-random-kinds" / "report.json")
    assert kinds["per_kind"] == sft["per_kind"]  # as many q / k / v / MLP components: as many parameters
    assert set(rows["circuit-sft"]["vs_randoms"]) == {"circuit-sft-random", "circuit-sft-random-kinds"}
    assert rows["circuit-sft"]["random_control"] == "circuit-sft-random-kinds"
    # every condition trained on the same validation problems: 34-style split + 4 unused training problems
    assert read_json(out / "circuit-sft" / "update.json")["config"]["objective"] == "gold_nll"
    hist = read_json(out / "circuit-sft" / "update.json")["history"]
    assert all("train_loss" in h for h in hist)
    fork = read_json(out / "fork-hinge" / "training_examples.json")["stats"]
    assert fork["source"] == "both" and fork["fork"]["candidates"] > 0
    assert fork["examples"] == fork["paper"] + fork["fork"]["examples"]
    diag = sft["diagnostics"]
    assert diag["pivots"]["n"] == sft["n_examples"] and "mean_pairwise_cos" in diag["alignment"]
    assert diag["changed_traces"]["n"] == sft["n_test"]
    md = (out / "study.md").read_text()
    assert "**Diagnostics**" in md and "random control (circuit-sft)" in md


def test_gold_objective_without_solutions_fails_before_any_generation(workdir, tmp_path, capsys):
    """circuit-sft trains on gold solutions: data without them is refused at the data stage,
    naming the problem, before the base evaluation generates anything."""
    rows = [json.loads(line) for line in (workdir / "data.jsonl").read_text().splitlines()]
    for r in rows:
        r["answer"] = ""
    bad = tmp_path / "w"
    bad.mkdir()
    for f in ("model", "shots.json"):
        (bad / f).symlink_to(workdir / f)
    (bad / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(run_argv(bad, out, "--recipe", "circuit-sft")) != 0
    err = capsys.readouterr().err
    assert "gold_nll" in err and "has no solution text" in err and "--recipe paper" in err
    assert not (out / "eval_base_train.jsonl").exists()
    assert main(run_argv(bad, tmp_path / "paper", "--recipe", "paper", "--until", "data")) == 0
