"""Round two, points 5, 6 and 7: lengths are bounded before any work, a template whose ``#answer``
disagrees with its ``####`` line is reported, a full disk names the step to rerun, and a FIFO, a
folder or ``/dev/zero`` where a file is read is a clear error, never a hang.

Every fixture is made here (``tmp_path``; the tiny model of ``helpers.make_pipeline_workdir``
through the ``workdir`` fixture, context 2048 tokens, a char-level tokenizer: one character is
one token). Each case checks the exit status, the cause and the fix in the message, and that
nothing finished (or outside the output folder) was touched."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest

import cca_fast.models.lengths as lengths
import cca_fast.models.loading as loading
from cca_fast.cli.main import main
from cca_fast.data.loaders import MAX_LINE_CHARS, MAX_TEXT_CHARS, load_problems, read_problems_jsonl
from cca_fast.data.templates import InstantiateConfig
from cca_fast.errors import DataError, TemplateError
from helpers import run_argv


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") or ": error: argument " in line, err
    return line


@contextlib.contextmanager
def no_hang(seconds: int = 60):
    """Fail (instead of hanging the suite) if the block blocks longer than ``seconds``."""
    def alarm(*_):
        raise AssertionError(f"blocked for more than {seconds} s (a FIFO opened?)")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def own(workdir, tmp_path) -> Path:
    """A copy of the workdir this test may change."""
    return Path(shutil.copytree(workdir, tmp_path / "wd"))


def _long_question(wd: Path, chars: int) -> str:
    rows = [json.loads(line) for line in (wd / "data.jsonl").read_text().splitlines()]
    rows[5]["question"] = "What is " + "1 " * (chars // 2) + "?"
    (wd / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows[5]["id"]


# ---- point 5: lengths bounded before work ------------------------------------------------------------
def test_a_prompt_longer_than_the_context_is_refused_before_any_generation(own, tmp_path, capsys):
    pid = _long_question(own, 3000)  # ~3000 tokens, the context is 2048
    out = tmp_path / "run"
    assert main(run_argv(own, out)) == 2
    err = last_error(capsys)
    assert f"problem {pid}" in err and "max_position_embeddings) is 2048" in err
    assert "shorten that question" in err and "fewer exemplars (--n-shots)" in err
    assert not (out / "eval_base_train.jsonl").exists() and not (out / "eval_base_test.jsonl").exists()
    # cca eval (of every problem: --split all): the same check, before the first generation
    assert main(["eval", "--model", str(own / "model"), "--data", str(own / "data.jsonl"), "--split", "all", "--shots",
                 str(own / "shots.json"), "--n-shots", "1", "--device", "cpu", "--dtype", "float32",
                 "--output", str(tmp_path / "eval"), "--quiet"]) == 2
    assert "max_position_embeddings) is 2048" in last_error(capsys)
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_max_new_tokens_beyond_the_context_is_refused_with_the_most_it_can_be(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = run_argv(workdir, out)
    argv[argv.index("--max-new-tokens") + 1] = "1000000000"
    assert main(argv) == 2
    err = last_error(capsys)
    assert "--max-new-tokens is 1000000000" in err and "context (max_position_embeddings) is 2048" in err
    longest = int(err.split("has ")[1].split(" tokens")[0])
    assert f"lower --max-new-tokens to at most {2048 - longest}" in err
    assert not (out / "eval_base_train.jsonl").exists()


def test_a_batch_that_cannot_fit_in_memory_is_refused_with_the_numbers(workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lengths, "available_bytes", lambda device: 1 << 10)  # 1 KiB free
    out = tmp_path / "run"
    assert main(run_argv(workdir, out)) == 2
    err = last_error(capsys)
    assert "a generation batch of 8 sequence(s)" in err and "GiB are free on cpu" in err
    assert "lower --batch-size (now 8) or --max-new-tokens" in err
    assert not (out / "eval_base_train.jsonl").exists()


def test_the_memory_estimate_is_the_key_value_cache_and_the_prefill_mask(workdir):
    model, _ = loading.load_model(str(workdir / "model"), dtype="float32", device="cpu")
    c = model.config  # 2 layers, 2 key/value heads of 6, float32
    got = lengths.generation_bytes(model, 100, 28, 3)
    assert got == 3 * ((100 + 28) * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim + 100 * 100) * 4
    assert lengths.context_length(model) == 2048


def test_a_50_mb_line_is_refused_before_it_is_parsed_or_tokenized(workdir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "huge.jsonl"
    with open(data, "w") as f:
        f.write(json.dumps({"question": "What is 1?", "answer": "#### 1"}) + "\n")
        f.write('{"question": "' + "x" * (50 << 20) + '", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match=rf"line 2 is longer than {MAX_LINE_CHARS:,} characters.*Shorten or remove"):
        read_problems_jsonl(data)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "run"
    argv = run_argv(workdir, out)
    argv[argv.index("--data") + 1] = str(data)
    assert main(argv) == 2
    assert "line 2 is longer than" in last_error(capsys)
    assert not (out / "config.json").exists()
    # a question too long in a .json list (no lines to bound) is refused by its length
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"question": "y" * (MAX_TEXT_CHARS + 1), "answer": "#### 1"}]))
    with pytest.raises(DataError, match=rf"'question' is {MAX_TEXT_CHARS + 1:,} characters long"):
        load_problems(str(listing))


def test_ig_steps_beyond_the_bound_are_refused_before_anything_is_written(workdir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "What is 1?", "corrupt": "What is 2?", "desired": "1",
                                "undesired": "2"}) + "\n")
    out = tmp_path / "attr"
    assert main(["attribute", str(rows), "--output", str(out), "--model", str(workdir / "model"), "--device",
                 "cpu", "--method", "patch", "--ig-steps", "1000000000"]) == 2
    err = last_error(capsys)
    assert "--ig-steps" in err and "[0, 1000]" in err and "1000000000x the work" in err and "e.g. 20" in err
    assert not out.exists() or not any(out.iterdir())


# ---- point 6: a template whose #answer disagrees with its #### line ----------------------------------
def test_a_template_whose_answer_disagrees_with_its_solution_is_reported_or_refused(tmp_path, caplog):
    t = {"id": "9001", "question_annotated": "What is {a,2} + {b,3}?\n\n#init:\n- $a = range(1, 9)\n"
                                             "- $b = range(1, 9)\n\n#answer: a + b",
         "answer_annotated": "{a} + {b} = {a*b}.\n#### {a*b}"}  # the solution multiplies
    path = tmp_path / "9001.json"
    path.write_text(json.dumps(t))
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="cca_fast.data"):
        problems = load_problems(str(path), n_per_template=5)
    warned = [r.getMessage() for r in caplog.records if "disagrees with #answer" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert "template 9001" in warned[0] and "of 5 instances the solution's final '####" in warned[0]
    assert "fix the template's #answer or its '####' line" in warned[0] and "answer_mismatch='error'" in warned[0]
    assert all("answer_mismatch" in p.meta for p in problems)  # each instance records #answer's value
    with pytest.raises(TemplateError, match=r"template 9001: the solution's final '#### \d+' disagrees with #answer"):
        load_problems(str(path), n_per_template=5, instantiate_config=InstantiateConfig(answer_mismatch="error"))
    assert path.read_bytes() == before


# ---- point 7: a full disk ------------------------------------------------------------------------------
def test_a_full_disk_names_the_step_to_rerun_and_keeps_finished_files(workdir, tmp_path, capsys, monkeypatch):
    import cca_fast.io as io

    out = tmp_path / "run"
    assert main(run_argv(workdir, out, "--until", "localize")) == 0
    finished = snapshot(out)
    real_write = io.atomic_write_bytes

    def full(path, data):  # the disk is full for every result file (the bookkeeping files still fit)
        if Path(path).name in ("stages.json", "made_with.json"):
            return real_write(path, data)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io, "atomic_write_bytes", full)
    inputs = snapshot(workdir)
    assert main(run_argv(workdir, out)) == 2
    assert snapshot(workdir) == inputs  # nothing outside the output folder touched
    err = last_error(capsys)
    assert f"no space left on the device (ENOSPC) writing {out / 'diagnostics.json'} during step diagnostics" in err
    assert "the files already finished are kept" in err and "it resumes at step diagnostics" in err
    now = snapshot(out)
    assert {k: now[k] for k in finished if k not in ("made_with.json", "stages.json")} == {
        k: v for k, v in finished.items() if k not in ("made_with.json", "stages.json")}
    assert not (out / "diagnostics.json").exists() and not (out / "delta").exists()
    monkeypatch.setattr(io, "atomic_write_bytes", real_write)
    assert main(run_argv(workdir, out)) == 0  # space freed: the same command resumes and finishes
    done = snapshot(out)
    assert all(done[k] == v for k, v in finished.items() if k not in ("made_with.json", "stages.json"))
    assert (out / "report.json").exists()

    def fsync_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    # another command: the same one line, naming it
    monkeypatch.setattr(os, "fsync", fsync_full)
    assert main(["eval", "--model", str(workdir / "model"), "--data", str(workdir / "data.jsonl"), "--shots",
                 str(workdir / "shots.json"), "--n-shots", "1", "--device", "cpu", "--dtype", "float32",
                 "--max-new-tokens", "4", "--limit", "2", "--output", str(tmp_path / "eval"), "--quiet"]) == 2
    err = last_error(capsys)
    assert "no space left on the device" in err and "during cca eval" in err and "run the same command again" in err


# ---- point 7: FIFOs, folders and devices where a file is read --------------------------------------------
def _special(kind: str, path: Path) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
        return path
    if kind == "folder":
        path.mkdir()
        return path
    return Path("/dev/zero")


SPECIAL = [k for k in ("fifo", "folder", "device") if k != "device" or Path("/dev/zero").exists()]
WORDS = {"fifo": "a FIFO (named pipe), not a regular file", "folder": "a folder, not a regular file",
         "device": "a device, not a regular file"}


@pytest.mark.parametrize("flag,name,what,kind", [
    *(("--shots", "shots.json", "the exemplar file", k) for k in SPECIAL),
    *(("--data", "data.jsonl", "the data source", k) for k in SPECIAL if k != "folder"),  # a folder: templates
])
def test_special_shots_or_data_file_is_a_clear_error_not_a_hang(workdir, tmp_path, capsys, monkeypatch, flag, name,
                                                                what, kind):
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "run"
    argv = run_argv(workdir, out)
    argv[argv.index(flag) + 1] = str(_special(kind, tmp_path / name))
    with no_hang():
        assert main(argv) == 2
    err = last_error(capsys)
    assert WORDS[kind] in err and what in err and "pass the file itself" in err
    assert not (out / "config.json").exists()
    if flag == "--data":  # the reader itself too
        with no_hang():
            with pytest.raises(DataError, match="not a regular file"):
                read_problems_jsonl(_special(kind, tmp_path / "other.jsonl") if kind == "fifo" else "/dev/zero")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
@pytest.mark.parametrize("kind", SPECIAL)
def test_special_model_file_is_a_clear_error_not_a_hang(workdir, tmp_path, capsys, name, kind):
    model = Path(shutil.copytree(workdir / "model", tmp_path / "model"))
    (model / name).unlink()
    if kind == "device":
        (model / name).symlink_to("/dev/zero")
    else:
        _special(kind, model / name)
    out = tmp_path / "run"
    argv = run_argv(workdir, out)
    argv[argv.index("--model") + 1] = str(model)
    with no_hang():
        assert main(argv) == 2
    err = last_error(capsys)
    assert str(model / name) in err and WORDS[kind] in err
    assert not (out / "config.json").exists()
    with no_hang():
        assert main(["apply", str(tmp_path / "no-delta"), "--model", str(model)]) == 2  # the loader's own check
    capsys.readouterr()
    with no_hang():
        with pytest.raises(Exception, match="not a regular file"):
            loading.load_model(str(model), device="cpu")
