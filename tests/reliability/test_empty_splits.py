"""Issue 13, point 8: an empty train, validation or test split is refused before the model is
loaded and before ``config.json`` is written (``--n-per-template 4`` gave 0 validation problems:
every update was discarded and the report said "0.0% vs 0.0%")."""
from __future__ import annotations

import json

import pytest

from helpers import run_argv

from cca_fast.cli.main import main
from cca_fast.experiments.steps.data import min_per_template


@pytest.fixture
def no_model_load(monkeypatch):
    """Make any model load fail the test: the refusal must come first."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the splits were checked")

    monkeypatch.setattr("cca_fast.models.loading.load_model", refuse)


def test_min_per_template():
    assert min_per_template() == 7  # 52/8/40: 7 instances give 4 / 1 / 2


def test_n_per_template_4_is_refused_up_front(workdir, tmp_path, capsys, no_model_load):
    out = tmp_path / "run"
    argv = run_argv(workdir, out, "--until", "update")
    at = argv.index("--data")
    del argv[at: at + 2]  # the built-in templates
    assert main(argv + ["--n-per-template", "4"]) == 2
    err = capsys.readouterr().err
    assert "val split is empty" in err and "val 0" in err  # the cause, with the counts
    assert "--n-per-template to at least 7 (now 4)" in err  # the fix
    assert not (out / "config.json").exists()  # nothing written: the corrected command is not refused
    assert main(argv + ["--n-per-template", "7", "--until", "data"]) == 0  # the corrected command runs
    assert all((out / "data" / f"{s}.jsonl").read_text() for s in ("train", "val", "test"))


def test_small_data_file_names_the_file(workdir, tmp_path, capsys, no_model_load):
    data = tmp_path / "small.jsonl"
    rows = [{"id": f"t{t}-{i}", "question": f"What is {t} {i}?", "answer": f"#### {i % 2}", "gold": i % 2,
             "template": f"t{t}"} for t in range(2) for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = run_argv(workdir, out)
    argv[argv.index("--data") + 1] = str(data)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "val split is empty (train 4, val 0, test 2" in err
    assert f"each template of {data} at least 7 problems" in err
    assert not out.exists() or not any(out.iterdir())


def test_an_empty_split_of_an_older_run_is_refused_before_the_model_loads(workdir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = run_argv(workdir, out, "--until", "data")
    assert main(argv) == 0
    (out / "data" / "val.jsonl").write_text("")  # as an older version wrote it
    kept = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    monkeypatch.setattr("cca_fast.models.loading.load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(run_argv(workdir, out, "--until", "update")) == 2
    err = capsys.readouterr().err
    assert "val split is empty" in err and "at least 7 problems" in err
    assert {p.name: p.read_bytes() for p in (out / "data").iterdir()} == kept  # nothing finished lost
