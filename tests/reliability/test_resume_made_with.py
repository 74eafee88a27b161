"""Round two, point 3: a resume is checked against what the finished steps were made with (not
only ``config.json``), and every number flag of every command is bounded while the command line
is parsed.

The run directory records, before each step writes, the configuration it runs with
(``made_with.json``); a resumed run whose step outputs were made with other settings (a hand edit
of ``config.json``) is refused before the model is loaded, naming the steps, the fields with both
values and the files to delete to recompute exactly those steps. Fixtures are built in
``tmp_path`` (the tiny model of ``helpers.make_pipeline_workdir``, through the ``workdir``
fixture)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import cca_fast.models.loading as loading
from cca_fast.checks import cli_int, finite_float
from cca_fast.cli.main import build_parser, main
from helpers import run_argv


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def with_lr(argv: list[str], lr: str) -> list[str]:
    argv = list(argv)
    argv[argv.index("--lr") + 1] = lr
    return argv


def edit_config(out: Path, section: str, key: str, value) -> None:
    config = json.loads((out / "config.json").read_text())
    config[section][key] = value
    (out / "config.json").write_text(json.dumps(config, indent=1))


def test_a_hand_edited_config_is_refused_then_exactly_the_affected_steps_recompute(workdir, tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    inputs = snapshot(workdir)  # the model, the data, the shots: outside the output folder
    assert main(with_lr(run_argv(workdir, out), "0.01")) == 0
    made = json.loads((out / "made_with.json").read_text())
    assert made["update"]["update"]["lr"] == 0.01 and made["data"]["update"]["lr"] == 0.01
    edit_config(out, "update", "lr", 0.05)  # the hand edit
    before = snapshot(out)
    capsys.readouterr()

    real_load = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded before the step check"))
    assert main(with_lr(run_argv(workdir, out), "0.05")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # the cause: which steps, which field, both values
    assert err.startswith("error: ") and "steps diagnostics, update, cca_eval" in err
    assert "update.lr: 0.01 then, 0.05 now" in err and "config.json was edited" in err
    # the fix: exactly those steps' files, or the old values back, or another folder
    assert "delete diagnostics.json update.json delta/ eval_cca_test.jsonl" in err
    assert "put the old values back" in err and "--output" in err
    assert snapshot(out) == before  # nothing finished (or the edit) touched
    assert snapshot(workdir) == inputs

    # following the fix recomputes those steps only: stage 1 and 2's files stay byte-identical
    monkeypatch.setattr(loading, "load_model", real_load)
    for name in ("diagnostics.json", "update.json", "eval_cca_test.jsonl"):
        (out / name).unlink()
    for f in (out / "delta").iterdir():
        f.unlink()
    (out / "delta").rmdir()
    assert main(with_lr(run_argv(workdir, out), "0.05")) == 0
    after = snapshot(out)
    kept = [k for k in before if k.startswith("data/") or k in (
        "eval_base_train.jsonl", "eval_base_test.jsonl", "training_set.json", "traces.jsonl", "pivots.jsonl",
        "training_examples.json", "selection.json")]
    assert len(kept) == 10 and all(after[k] == before[k] for k in kept)
    made = json.loads((out / "made_with.json").read_text())
    assert made["update"]["update"]["lr"] == 0.05 and made["cca_eval"]["update"]["lr"] == 0.05
    assert made["traces"]["update"]["lr"] == 0.01  # stage 1 does not depend on it: not recomputed
    assert json.loads((out / "delta" / "delta_config.json").read_text())["run_config"]["update"]["lr"] == 0.05
    # and the corrected folder now resumes with the identical command
    assert main(with_lr(run_argv(workdir, out), "0.05")) == 0


def test_an_edit_of_a_field_no_finished_step_reads_is_accepted_and_partial_outputs_are_covered(workdir, tmp_path,
                                                                                               capsys):
    out = tmp_path / "run"
    assert main(run_argv(workdir, out, "--until", "pivots")) == 0
    edit_config(out, "dcm", "epochs", 3)  # stage 2's setting: stage 1's finished steps do not depend on it
    assert main(run_argv(workdir, out, "--until", "pivots", "--dcm-epochs", "3")) == 0
    # a step interrupted part-way (its record is written before its first output) is covered too
    lines = (out / "pivots.jsonl").read_text().splitlines(keepends=True)
    (out / "pivots.jsonl").write_text("".join(lines[:1]))
    edit_config(out, "generation", "max_new_tokens", 11)
    before = snapshot(out)
    capsys.readouterr()
    assert main(run_argv(workdir, out, "--until", "pivots", "--dcm-epochs", "3", "--max-new-tokens", "11")) == 2
    err = capsys.readouterr().err
    assert "data, base_eval, traces, pivots" in err and "generation.max_new_tokens: 12 then, 11 now" in err
    assert snapshot(out) == before


# ---- every number flag of every command, while the command line is parsed ---------------------------
def _flags() -> list[tuple[str, str, object]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [(name, action.option_strings[0], action.type) for name, command in sub.choices.items()
            for action in command._actions if action.option_strings and action.type is not None]


def test_no_number_flag_uses_a_raw_float_or_int_type():
    flags = _flags()
    assert any(t is finite_float for _, _, t in flags) and any(t is cli_int for _, _, t in flags)
    raw = [(c, f) for c, f, t in flags if t in (float, int)]
    assert raw == [], f"flags parsed with float()/int(), which accept nan / any size: {raw}"


@pytest.mark.parametrize("command,flag", [(c, f) for c, f, t in _flags() if t is finite_float])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_flag_refuses_non_finite_values(command, flag, value, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([command, f"{flag}={value}"])  # the = form: "-inf" would read as an option
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "must be a finite number" in err and "pass a number" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command,flag", [(c, f) for c, f, t in _flags() if t is cli_int])
def test_every_integer_flag_refuses_values_beyond_what_the_code_can_use(command, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([command, flag, "18446744073709551617"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "2**63 - 1" in err
    assert list(tmp_path.iterdir()) == []


def test_threads_minus_one_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["study", "--threads", "-1", "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "--threads must be a positive integer, got -1" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
