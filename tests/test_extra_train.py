"""Extra training problems (``--extra-train-data D``, ``--extra-train-max N``): a second source
whose problems join the training split only, ids prefixed ``extra:``, their own template group;
validation and test unchanged; bad input refused at the data stage, before the model loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cca_fast.cli.main import build_parser, main
from cca_fast.cli.run import config_from_args
from cca_fast.errors import CCAError, DataError
from cca_fast.experiments.config import RunConfig
from cca_fast.experiments.pipeline import run_cca
from cca_fast.experiments.steps.data import make_splits
from cca_fast.experiments.steps.update import validation_problems
from cca_fast.io import check_or_write_config, read_json, read_jsonl
from helpers import run_argv, run_config

N_EXTRA = 12


def write_extra(d: Path, *, with_template: bool = False, repeat_main: bool = False) -> Path:
    """``N_EXTRA`` GSM8K-style lines (answers 0 or 1) in ``d/extra.jsonl``; ``with_template``:
    package-format lines of template ``e``; ``repeat_main``: one more line repeating a question of
    the main data (``make_pipeline_workdir``'s ``What is 0 0?``)."""
    rows = [{"question": f"How much is {i} and {i + 1}?", "answer": f"So {i % 2}.\n#### {i % 2}"}
            for i in range(N_EXTRA)]
    if with_template:
        rows = [{"id": f"e-{i}", **r, "gold": i % 2, "template": "e"} for i, r in enumerate(rows)]
    if repeat_main:
        rows.append({"question": "What is 0 0?", "answer": "#### 0"})
    path = d / ("extra_t.jsonl" if with_template else "extra.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_extra_problems_join_the_training_split_only(workdir, tmp_path):
    extra = write_extra(tmp_path, repeat_main=True)
    plain = make_splits(run_config(workdir, tmp_path / "a"))
    cfg = run_config(workdir, tmp_path / "b", extra_train_data=str(extra))
    splits = make_splits(cfg)
    assert splits.val == plain.val and splits.test == plain.test
    assert splits.train[:len(plain.train)] == plain.train
    added = splits.train[len(plain.train):]
    # the repeat of a main-data question is left out; the rest keep file order, ids prefixed
    assert [p.id for p in added] == [f"extra:extra-{i}" for i in range(N_EXTRA)]
    assert {p.template for p in added} == {"extra"} and [p.gold for p in added] == [i % 2 for i in range(N_EXTRA)]
    ids = [p.id for p in splits.train + splits.val + splits.test]
    assert len(ids) == len(set(ids))
    assert not {p.id for p in added} & {p.id for p in splits.val + splits.test}


def test_extra_train_max_is_a_seeded_deterministic_draw(workdir, tmp_path):
    extra = write_extra(tmp_path)
    cfg = run_config(workdir, tmp_path / "a", extra_train_data=str(extra), extra_train_max=5)
    first, again = make_splits(cfg), make_splits(cfg)
    plain = make_splits(run_config(workdir, tmp_path / "p"))
    added = [p for p in first.train if p.id.startswith("extra:")]
    assert len(added) == 5 and first.train == again.train
    assert len(first.train) == len(plain.train) + 5
    assert [p.id for p in added] == sorted((p.id for p in added), key=lambda i: int(i.rsplit("-", 1)[1]))
    draws = {tuple(p.id for p in make_splits(run_config(workdir, tmp_path / "s", extra_train_data=str(extra),
                                                         extra_train_max=5, seed=s)).train if p.id.startswith("extra:"))
             for s in range(4)}
    assert len(draws) > 1  # the seed picks the draw
    big = make_splits(run_config(workdir, tmp_path / "b", extra_train_data=str(extra), extra_train_max=100))
    assert sum(p.id.startswith("extra:") for p in big.train) == N_EXTRA


def test_extra_templates_stay_their_own_groups(workdir, tmp_path):
    extra = write_extra(tmp_path, with_template=True)
    splits = make_splits(run_config(workdir, tmp_path / "a", extra_train_data=str(extra)))
    added = [p for p in splits.train if p.id.startswith("extra:")]
    assert [p.id for p in added] == [f"extra:e-{i}" for i in range(N_EXTRA)]
    assert {p.template for p in added} == {"extra:e"}


def test_val_from_train_never_draws_extra_problems(workdir, tmp_path):
    extra = write_extra(tmp_path)
    cfg = run_config(workdir, tmp_path / "a", extra_train_data=str(extra), val_from_train=1000)
    splits = make_splits(cfg)
    val = validation_problems(cfg, splits, training_ids=[])
    assert not any(p.id.startswith("extra:") for p in val)
    plain_cfg = run_config(workdir, tmp_path / "p", val_from_train=3)
    with_extra = run_config(workdir, tmp_path / "b", extra_train_data=str(extra), val_from_train=3)
    assert (validation_problems(plain_cfg, make_splits(plain_cfg), [])
            == validation_problems(with_extra, make_splits(with_extra), []))


@pytest.mark.parametrize("content, match", [
    (None, "data source not found"),
    ('{"question": "How much is 1?", "answer": "#### 1"}\n{"question": "How much is 2?"}\n',
     r"line 2: missing 'answer'"),
    ('{"question": "How much is 1?", "answer": "it is 1"}\n', r"line 1: the answer has no final '#### N'"),
])
def test_a_bad_extra_file_fails_at_the_data_stage_naming_the_file(workdir, tmp_path, monkeypatch, content, match):
    bad = tmp_path / "bad.jsonl"
    if content is not None:
        bad.write_text(content)
    out = tmp_path / "run"

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the extra data was checked")

    monkeypatch.setattr("cca_fast.models.loading.load_model", no_model)
    cfg = run_config(workdir, out, extra_train_data=str(bad))
    with pytest.raises(DataError, match=match) as e:
        run_cca(cfg, progress=False)
    assert f"--extra-train-data {bad}" in str(e.value) and str(bad) in str(e.value)
    assert not (out / "config.json").exists()
    assert main(run_argv(workdir, tmp_path / "cli", "--extra-train-data", str(bad))) == 2


def test_config_fields_flags_and_round_trip(workdir, tmp_path):
    assert RunConfig().extra_train_data is None and RunConfig().extra_train_max is None
    args = build_parser().parse_args(run_argv(workdir, tmp_path / "o", "--extra-train-data", "x.jsonl",
                                              "--extra-train-max", "7"))
    cfg = config_from_args(args)
    assert (cfg.extra_train_data, cfg.extra_train_max) == ("x.jsonl", 7)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    args = build_parser().parse_args(run_argv(workdir, tmp_path / "o", "--extra-train-data", "x.jsonl",
                                              "--extra-train-max", "0"))
    assert config_from_args(args).extra_train_max is None  # 0 = all
    study = build_parser().parse_args(["study", "--extra-train-data", "x.jsonl", "--extra-train-max", "3"])
    assert (study.extra_train_data, study.extra_train_max) == ("x.jsonl", 3)
    with pytest.raises(CCAError, match="needs extra_train_data"):
        RunConfig(extra_train_max=3)
    with pytest.raises(CCAError, match="extra_train_max"):
        RunConfig(extra_train_data="x.jsonl", extra_train_max=0)
    with pytest.raises(CCAError, match="extra_train_data"):
        RunConfig(extra_train_data="  ")
    # a run directory written before these fields existed resumes: missing keys count at their default
    saved = RunConfig().to_dict()
    del saved["extra_train_data"], saved["extra_train_max"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    check_or_write_config(path, RunConfig().to_dict(), RunConfig().to_dict(), "old run")
    with pytest.raises(CCAError, match="extra_train_data"):
        check_or_write_config(path, RunConfig(extra_train_data="x.jsonl").to_dict(), RunConfig().to_dict(), "old run")


@pytest.mark.slow
def test_run_until_pivots_with_extra_training_problems(workdir, tmp_path):
    extra = write_extra(tmp_path)
    out = tmp_path / "run"
    argv = run_argv(workdir, out, "--extra-train-data", str(extra), "--extra-train-max", "6", "--until", "pivots")
    assert main(argv) == 0
    train = [r["id"] for r in read_jsonl(out / "data" / "train.jsonl")]
    extra_ids = [i for i in train if i.startswith("extra:")]
    assert len(extra_ids) == 6
    assert not any(r["id"].startswith("extra:") for s in ("val", "test") for r in read_jsonl(out / "data" / f"{s}.jsonl"))
    assert {r["id"] for r in read_jsonl(out / "eval_base_train.jsonl")} == set(train)
    training_set = read_json(out / "training_set.json")
    assert "extra" in training_set["weak_templates"]  # weak threshold 1.01: every group trains
    assert set(extra_ids) <= set(training_set["problem_ids"])
    assert (out / "pivots.jsonl").exists()
    assert read_json(out / "config.json")["extra_train_max"] == 6
    assert main(argv) == 0  # resumes: the same configuration, nothing recomputed
    other = run_argv(workdir, out, "--extra-train-data", str(extra), "--extra-train-max", "5", "--until", "pivots")
    assert main(other) == 2  # another extra draw is another configuration


def test_extra_test_problems_join_the_test_split_only(workdir, tmp_path):
    extra = write_extra(tmp_path, repeat_main=True)
    plain = make_splits(run_config(workdir, tmp_path / "a"))
    splits = make_splits(run_config(workdir, tmp_path / "b", extra_test_data=str(extra)))
    assert splits.train == plain.train and splits.val == plain.val
    assert splits.test[:len(plain.test)] == plain.test
    added = splits.test[len(plain.test):]
    assert [p.id for p in added] == [f"extra:extra-{i}" for i in range(N_EXTRA)]  # the repeat left out
    capped = make_splits(run_config(workdir, tmp_path / "c", extra_test_data=str(extra), extra_test_max=5))
    assert len(capped.test) == len(plain.test) + 5
    assert capped.test == make_splits(run_config(workdir, tmp_path / "d", extra_test_data=str(extra),
                                                 extra_test_max=5)).test  # seeded
    with pytest.raises(CCAError, match="--extra-test-max"):
        RunConfig(extra_test_max=3)
    with pytest.raises(CCAError, match="extra-test-data"):
        make_splits(run_config(workdir, tmp_path / "e", extra_test_data=str(tmp_path / "missing.jsonl")))
    args = build_parser().parse_args(["run", "--extra-test-data", str(extra), "--extra-test-max", "0"])
    cfg = config_from_args(args)
    assert cfg.extra_test_data == str(extra) and cfg.extra_test_max is None  # 0 = all
