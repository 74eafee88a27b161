"""Nothing escapes the output folder, nothing destroys an input.

* Writes never follow a symbolic link planted in an output folder: the lock and every JSON Lines
  append open with ``O_NOFOLLOW`` (:func:`cca_fast.io.open_for_write`), and a run, study or
  attribution folder holding a link (a file, ``data/``, ``delta/``, ``chunks/``) is refused before
  anything is written (:func:`cca_fast.io.refuse_links`).
* ``cca apply --merge`` refuses a target that is, contains or lies inside an input (the delta's
  folder, the base model's folder) or the current folder; an empty ``--merge`` / ``--output``.

Each case asserts the exit status (or the error type), the cause and the fix in the message, and
that the link's target, the input and everything finished are byte-identical afterwards.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from cca_fast.cli.main import main
from cca_fast.delta import SparseDelta, merge_delta
from cca_fast.errors import CCAError
from cca_fast.io import append_jsonl, repair_torn_tail
from cca_fast.experiments.lock import LOCK_NAME
from helpers import char_tokenizer, make_delta, make_tiny, run_argv, save_model_dir


def snapshot(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (links recorded by their target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "link->" + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    return last


# ---- writes never follow links ---------------------------------------------------------------------
@pytest.mark.parametrize("name", [LOCK_NAME, "eval_base_test.jsonl", "config.json", "data", "delta"])
def test_a_link_planted_in_the_run_folder_is_refused_and_its_target_untouched(workdir, tmp_path, capsys, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_bytes(b"precious\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(outside if name in ("data", "delta") else victim)
    before = snapshot(outside)
    err = refused(run_argv(workdir, out, "--until", "data"), capsys)
    assert "symbolic link" in err and str(out / name) in err  # the cause
    assert f"rm '{out / name}'" in err  # the fix
    assert snapshot(outside) == before  # nothing outside touched
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing written in the run folder
    # the fix works: without the link the same command runs
    (out / name).unlink()
    assert main(run_argv(workdir, out, "--until", "data")) == 0
    assert snapshot(outside) == before


def test_appends_and_tail_repairs_never_follow_a_link(tmp_path):
    victim = tmp_path / "victim.jsonl"
    victim.write_bytes(b'{"a": 1}\n{"torn')
    link = tmp_path / "out" / "records.jsonl"
    link.parent.mkdir()
    link.symlink_to(victim)
    for call in (lambda: append_jsonl(link, {"b": 2}), lambda: repair_torn_tail(link)):
        with pytest.raises(CCAError, match="symbolic link.*never writes or appends through a link.*rm "):
            call()
    assert victim.read_bytes() == b'{"a": 1}\n{"torn'


def test_a_fifo_where_a_record_file_goes_is_refused_not_a_hang(tmp_path):
    fifo = tmp_path / "records.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(CCAError, match=r"FIFO \(named pipe\), not a regular file.*remove it"):
        append_jsonl(fifo, {"a": 1})


def test_a_link_in_an_attribution_output_is_refused(tmp_path):
    from cca_fast.attribution_dataset.run import AttributeConfig, attribute_dataset

    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "attr"
    out.mkdir()
    (out / "chunks").symlink_to(outside)
    model = make_tiny("llama", dtype=torch.float32)
    data = [{"prompt_ids": [1, 2, 3], "desired_ids": 4, "undesired_ids": 5}]
    with pytest.raises(CCAError, match="symbolic link.*rm "):
        attribute_dataset(model, None, data, out, AttributeConfig(plots=False))
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == ["chunks"]


# ---- never destroy the input -----------------------------------------------------------------------
@pytest.fixture()
def run_with_delta(tmp_path):
    """A base model folder and a run folder holding ``delta/`` (a delta of that model) and a report."""
    base, _, delta = make_delta()
    base_dir = save_model_dir(base, char_tokenizer(), tmp_path / "base")
    run = tmp_path / "r"
    delta.save(run / "delta")
    (run / "report.json").write_text('{"finished": true}\n')
    return base_dir, run


def _apply(run: Path, base_dir: Path, merge: str, *extra: str) -> list[str]:
    return ["apply", str(run / "delta"), "--model", str(base_dir), "--dtype", "float32", "--device", "cpu",
            "--merge", merge, *extra]


@pytest.mark.parametrize("which,how", [("delta", "is the input"), ("run", "contains the input"),
                                       ("inside_delta", "lies inside the input"), ("model", "is the input"),
                                       ("cwd", "the current folder")])
def test_merge_onto_an_input_is_refused(run_with_delta, tmp_path, capsys, monkeypatch, which, how):
    base_dir, run = run_with_delta
    target = {"delta": run / "delta", "run": run, "inside_delta": run / "delta" / "merged", "model": base_dir,
              "cwd": Path(".")}[which]
    work = tmp_path / "work"  # the current folder, holding a user's file
    work.mkdir()
    (work / "notes.txt").write_text("mine\n")
    monkeypatch.chdir(work if which == "cwd" else tmp_path)
    before = snapshot(tmp_path)
    err = refused(_apply(run, base_dir, str(target), "--overwrite"), capsys)
    assert f"cannot merge into {target}" in err and how in err  # the cause
    assert "name a new folder outside" in err  # the fix
    assert snapshot(tmp_path) == before  # the delta, the report and the model untouched, no temp folder


def test_empty_merge_and_output_names_are_refused(run_with_delta, workdir, tmp_path, capsys, monkeypatch):
    base_dir, run = run_with_delta
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    err = refused(_apply(run, base_dir, ""), capsys)
    assert "merge target is empty" in err and "--merge merged_model" in err
    err = refused(run_argv(workdir, tmp_path / "unused", "--output", ""), capsys)
    assert "--output" in err and "''" in err
    err = refused(["eval", "--model", str(base_dir), "--output", "", "--limit", "1"], capsys)
    assert "--output is empty" in err and "name the folder" in err
    assert snapshot(tmp_path) == before  # nothing written into the current folder


def test_merge_delta_api_refuses_the_models_own_folder(run_with_delta):
    from cca_fast.models.loading import load_model

    base_dir, run = run_with_delta
    model, tok = load_model(str(base_dir), dtype="float32", device="cpu")
    delta = SparseDelta.load(run / "delta")
    before = snapshot(base_dir)
    with pytest.raises(CCAError, match="is the input"):
        merge_delta(model, delta, base_dir, tokenizer=tok, overwrite=True)
    with pytest.raises(CCAError, match="lies inside the input"):
        merge_delta(model, delta, run / "delta" / "m", tokenizer=tok, overwrite=True)
    assert snapshot(base_dir) == before
    out = merge_delta(model, delta, run.parent / "merged", tokenizer=tok)  # the fix: a new folder
    assert (out / "config.json").exists()
