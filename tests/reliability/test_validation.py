"""Issue 13, point 2: every input is checked before any work and before ``config.json`` is
written, so a refused command never leaves a saved configuration that refuses the corrected one.

Each bad input is refused with exit status 2 (``CCAError`` through the Python API), a message
naming the flag (or the field) and the fix, no ``config.json``, and, where the check can come
first, without loading the model. Fixtures are built in ``tmp_path`` (the tiny model of
``helpers.make_pipeline_workdir``, through the ``workdir`` fixture)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import cca_fast.models.loading as loading
from cca_fast.cli.main import main
from cca_fast.errors import CCAError
from cca_fast.experiments.config import RunConfig
from cca_fast.experiments.pipeline import run_cca
from cca_fast.stages.localize.dcm import DCMConfig
from cca_fast.stages.traces import TraceConfig
from cca_fast.stages.update import UpdateConfig
from helpers import make_tiny, run_config

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model is loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loading, "load_model", refuse)


def run_argv(wd: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(wd / "model"), "--data", str(wd / "data.jsonl"), "--shots", str(wd / "shots.json"),
            "--n-shots", "1", "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "8",
            "--output", str(out), "--quiet", *extra]


def refused(argv: list[str], capsys) -> str:
    """The error message of a command that must exit with status 2: a checked value (``error: ...``)
    or a flag refused while the command line is parsed (``cca run: error: argument --lr: ...``)."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: a value no flag can take (NaN, an integer beyond 2**63 - 1)
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after any progress bars of a load
    assert last.startswith("error: ") or last.startswith("cca run: error: argument "), err
    return last


# ---- cca run: bad values, refused before config.json and before the model load -----------------------
BAD_FLAGS = [
    (["--selector", "atp-fraction", "--select-fraction", "1.5"], "--select-fraction", "(0, 1]"),
    (["--selector", "random", "--select-fraction", "-0.5"], "--select-fraction", "(0, 1]"),
    (["--lr", "-1"], "--lr", "> 0"),
    (["--lr", "0"], "--lr", "> 0"),
    (["--lr", "nan"], "--lr", "finite"),
    (["--lr", "inf"], "--lr", "finite"),
    (["--dcm-lambda", "-1"], "--dcm-lambda", ">= 0"),
    (["--dcm-lambda", "nan"], "--dcm-lambda", "finite"),
    (["--selector", "atp-topk", "--select-k", "-5"], "--select-k", "positive integer"),
    (["--selector", "random", "--select-count", "0"], "--select-count", "positive integer"),
    (["--selector", "random", "--select-count", "-3"], "--select-count", "positive integer"),
    (["--max-train-problems", "-2"], "--max-train-problems", "0 on the command line"),
    (["--max-val-problems", "-1"], "--max-val-problems", "0 on the command line"),
    (["--weak-threshold", "nan"], "--weak-threshold", "finite"),
    (["--update-steps", "-1"], "--update-steps", ">= 0"),
    (["--k", "0"], "--k", "positive integer"),
    (["--dcm-epochs", "0"], "--dcm-epochs", "positive integer"),
    (["--dtype", "float8"], "--dtype", "bfloat16"),
]


@pytest.mark.parametrize("extra,flag,fix", BAD_FLAGS, ids=[" ".join(b[0]) for b in BAD_FLAGS])
def test_run_bad_value_refused_before_anything(workdir, tmp_path, capsys, no_load, extra, flag, fix):
    out = tmp_path / "run"
    err = refused(run_argv(workdir, out, *extra), capsys)
    assert f"({flag})" in err or f"argument {flag}:" in err
    assert fix in err
    assert not (out / "config.json").exists()


def test_run_missing_inputs_refused_before_anything(workdir, tmp_path, capsys, no_load):
    out = tmp_path / "run"
    no_config = tmp_path / "not_a_model"
    no_config.mkdir()
    bad_json = tmp_path / "bad_shots.json"
    bad_json.write_text("[{")
    cases = [
        (["--model", str(tmp_path / "no" / "such" / "model")], ["--model", "not found", "save_pretrained"]),
        (["--model", str(tmp_path / "missing.gguf")], ["--model", "not found"]),
        (["--model", str(no_config)], ["--model", "no config.json"]),
        (["--model", str(workdir / "data.jsonl")], ["--model", "not a .gguf"]),
        (["--shots", str(tmp_path / "missing.json")], ["--shots", "not found"]),
        (["--shots", str(bad_json)], ["--shots", "not valid JSON"]),
        (["--n-shots", "5"], ["--n-shots", "only 1 exemplars"]),
    ]
    for extra, words in cases:
        err = refused(run_argv(workdir, out, *extra), capsys)
        for w in words:
            assert w in err, (extra, err)
        assert not (out / "config.json").exists()


def test_run_output_not_writable(workdir, tmp_path, capsys, no_load):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = refused(run_argv(workdir, blocker / "run"), capsys)
    assert "--output" in err and str(blocker) in err and "is a file" in err


def test_select_count_larger_than_model_refused_after_load_before_config(workdir, tmp_path, capsys):
    """The component count is known only once the model is loaded: refused right then, before
    stage 1 and before config.json, so the corrected command then runs in the same folder."""
    out = tmp_path / "run"
    err = refused(run_argv(workdir, out, "--selector", "random", "--select-count", "1000000000"), capsys)
    assert "--select-count" in err and "only" in err and "components" in err
    total = int(err.split("only ")[1].split()[0])
    assert total > 0
    assert not (out / "config.json").exists() and not (out / "data").exists()
    err = refused(run_argv(workdir, out, "--selector", "atp-topk", "--select-k", str(total + 1)), capsys)
    assert "--select-k" in err and f"only {total} components" in err
    assert main(run_argv(workdir, out, "--selector", "random", "--select-count", "3", "--until", "data")) == 0
    assert json.loads((out / "config.json").read_text())["select_count"] == 3


def test_resume_with_other_config_refused_before_load(workdir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(run_argv(workdir, out, "--lr", "0.01", "--until", "data")) == 0
    assert main(run_argv(workdir, out, "--lr", "0.01", "--until", "data")) == 0  # the identical command resumes
    saved = (out / "config.json").read_text()
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded before the config check"))
    err = refused(run_argv(workdir, out, "--lr", "0.02", "--until", "data"), capsys)
    assert "different configuration" in err and "update.lr" in err
    assert (out / "config.json").read_text() == saved


# ---- the Python API: the same checks, in the dataclass that owns the field --------------------------
@pytest.mark.parametrize("make,field", [
    (lambda: RunConfig(selector="atp-fraction", select_fraction=1.5), "RunConfig.select_fraction"),
    (lambda: RunConfig(selector="random", select_fraction=-0.5), "RunConfig.select_fraction"),
    (lambda: RunConfig(selector="atp-fraction", select_fraction=math.nan), "RunConfig.select_fraction"),
    (lambda: RunConfig(selector="atp-topk", select_k=-5), "RunConfig.select_k"),
    (lambda: RunConfig(max_train_problems=-2), "RunConfig.max_train_problems"),
    (lambda: RunConfig(max_train_problems=0), "RunConfig.max_train_problems"),
    (lambda: RunConfig(weak_threshold=math.inf), "RunConfig.weak_threshold"),
    (lambda: RunConfig(dtype="float8"), "RunConfig.dtype"),
    (lambda: RunConfig(model=""), "RunConfig.model"),
    (lambda: UpdateConfig(lr=-1), "UpdateConfig.lr"),
    (lambda: UpdateConfig(lr=math.nan), "UpdateConfig.lr"),
    (lambda: UpdateConfig(lr=0.0), "UpdateConfig.lr"),
    (lambda: UpdateConfig(weight_decay=math.nan), "UpdateConfig.weight_decay"),
    (lambda: DCMConfig(lambda_l1=-1), "DCMConfig.lambda_l1"),
    (lambda: DCMConfig(lambda_l1=math.nan), "DCMConfig.lambda_l1"),
    (lambda: DCMConfig(lr=math.inf), "DCMConfig.lr"),
    (lambda: DCMConfig(threshold=math.nan), "DCMConfig.threshold"),
    (lambda: TraceConfig(top_p=math.nan), "TraceConfig.top_p"),
    (lambda: TraceConfig(temperature_if_wrong=0.0), "TraceConfig.temperature_if_wrong"),
    (lambda: RunConfig.from_dict({"update": {"lr": math.nan}}), "UpdateConfig.lr"),
    (lambda: RunConfig.from_dict({"dcm": {"lambda_l1": -1.0}}), "DCMConfig.lambda_l1"),
])
def test_api_bad_value(make, field):
    with pytest.raises(CCAError) as e:
        make()
    assert field in str(e.value)


def test_api_run_cca_checks_inputs_before_writing(workdir, tmp_path, no_load):
    out = tmp_path / "api"
    for kw, words in [(dict(model=str(tmp_path / "no" / "such" / "dir")), ["--model", "not found"]),
                      (dict(prompt=type(RunConfig().prompt)(exemplars=str(tmp_path / "none.json"), n_shots=1)),
                       ["--shots", "not found"])]:
        with pytest.raises(CCAError) as e:
            run_cca(run_config(workdir, out, **kw))
        for w in words:
            assert w in str(e.value)
        assert not (out / "config.json").exists()


def test_study_refuses_bad_fraction_and_missing_model(tmp_path, no_load):
    from cca_fast.experiments.study import StudyConfig, run_study

    with pytest.raises(CCAError, match="select_fraction"):
        StudyConfig(output=str(tmp_path / "s"), selectors=["atp-fraction"], select_fraction=1.5, controls=[])
    cfg = StudyConfig(output=str(tmp_path / "s"), run=RunConfig(model=str(tmp_path / "no" / "such" / "m")))
    with pytest.raises(CCAError, match="--model"):
        run_study(cfg, progress=False)
    assert not (tmp_path / "s" / "study_config.json").exists()


# ---- cca eval / cca side-effects: the output checked before the model loads -------------------------
def test_eval_output_not_writable(workdir, tmp_path, capsys, no_load):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for output in (blocker, blocker / "sub"):
        err = refused(["eval", "--model", str(workdir / "model"), "--data", str(workdir / "data.jsonl"),
                       "--output", str(output), "--quiet"], capsys)
        assert "--output" in err and str(output) in err and "is a file" in err


def test_eval_and_side_effects_missing_model_refused_before_load(workdir, tmp_path, capsys, no_load):
    missing = str(tmp_path / "no" / "such" / "model")
    err = refused(["eval", "--model", missing, "--data", str(workdir / "data.jsonl"),
                   "--output", str(tmp_path / "e"), "--quiet"], capsys)
    assert "--model" in err and "not found" in err
    err = refused(["side-effects", "--model", missing, "--side-data", str(tmp_path),
                   "--output", str(tmp_path / "se.json"), "--quiet"], capsys)
    assert "--model" in err and "not found" in err


@pytest.mark.skipif(ROOT, reason="root writes into read-only folders")
def test_eval_output_read_only(workdir, tmp_path, capsys, no_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        err = refused(["eval", "--model", str(workdir / "model"), "--data", str(workdir / "data.jsonl"),
                       "--output", str(ro / "out"), "--quiet"], capsys)
        assert "--output" in err and "cannot be written" in err
    finally:
        ro.chmod(0o700)


def test_side_effects_output_not_writable(workdir, tmp_path, capsys, no_load):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    base = ["side-effects", "--model", str(workdir / "model"), "--side-data", str(tmp_path), "--quiet"]
    err = refused(base + ["--output", str(blocker / "se.json")], capsys)
    assert "--output" in err and str(blocker) in err and "is a file" in err
    err = refused(base + ["--output", str(tmp_path)], capsys)
    assert "--output" in err and "is a folder" in err


def test_side_effects_delta_checked_before_the_before_suites(tmp_path, capsys, monkeypatch):
    """A delta made for other weights is refused before the "before" suites run."""
    import cca_fast.evaluation.suites as suites

    from cca_fast.delta import SparseDelta
    from helpers import char_tokenizer

    model = make_tiny("llama", dtype=torch.float32, seed=0)
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    other = make_tiny("llama", dtype=torch.float32, seed=1)
    new = make_tiny("llama", dtype=torch.float32, seed=1)
    with torch.no_grad():
        new.lm_head.weight[3:5] += 1.0
    SparseDelta.from_models(other, new).save(tmp_path / "delta")
    monkeypatch.setattr(suites, "run_suites", lambda *a, **k: pytest.fail("suites ran before the delta check"))
    err = refused(["side-effects", "--model", str(tmp_path / "model"), "--device", "cpu", "--delta",
                   str(tmp_path / "delta"), "--side-data", str(tmp_path), "--output", str(tmp_path / "se.json"),
                   "--quiet"], capsys)
    assert "not made for this model" in err
    assert not (tmp_path / "se.json").exists()
