"""The ``cca`` command line: help texts, ``cca eval`` end to end on a tiny local model, and user
errors reported as one line with exit status 2."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from cca_fast.cli.main import COMMANDS, build_parser, main
from cca_fast.errors import CCAError, KernelError
from helpers import char_tokenizer, make_tiny

PROBLEMS = [
    {"question": "Ann has 2 apples and buys 3 more. How many apples?", "answer": "2 + 3 = 5\n#### 5"},
    {"question": "Bo has 9 pens and loses 4. How many pens are left?", "answer": "9 - 4 = 5\n#### 5"},
    {"question": "A box holds 6 eggs. How many eggs are in 2 boxes?", "answer": "6 * 2 = 12\n#### 12"},
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny llama + char tokenizer saved with save_pretrained, a GSM8K-format JSONL and a
    one-shot exemplar file."""
    d = tmp_path_factory.mktemp("cli")
    model = make_tiny("llama", dtype=torch.float32, seed=0)
    model.config.max_position_embeddings = 512
    model.save_pretrained(d / "model")
    char_tokenizer().save_pretrained(d / "model")
    (d / "data.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    (d / "shots.json").write_text(json.dumps([{"question": "What is 1 + 1?", "target": "1 + 1 = 2. The final answer is 2."}]))
    return d


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", COMMANDS)
def test_every_flag_of_every_command_is_described(name, capsys):
    sub = _subparsers(build_parser())[name]
    for action in sub._actions:
        if action.option_strings:
            assert action.help and len(action.help) > 8, (name, action.option_strings)
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage: cca " + sub.prog.split()[-1] in capsys.readouterr().out  # a command may be an alias of its module's name


def test_eval_help_shows_defaults_and_paper_setting(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--model", "--data", "--split", "--limit", "--output", "--seed", "--n-per-template", "--shots",
                 "--prompt-mode", "--batch-size", "--max-new-tokens", "--dtype", "--device", "--attn-implementation"):
        assert flag in out
    assert "(default: 8)" in out and "(default: test)" in out and "(default: plain)" in out
    assert "--max-new-tokens 1500" in out


def test_eval_end_to_end_tiny_model(workdir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code = main(["eval", "--model", str(workdir / "model"), "--data", str(workdir / "data.jsonl"), "--split", "all",
                 "--shots", str(workdir / "shots.json"), "--n-shots", "1", "--max-new-tokens", "6",
                 "--batch-size", "2", "--output", str(out_dir), "--quiet", "--device", "cpu", "--dtype", "float32"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert stdout.count("\n") == 1 and stdout.startswith("eval: accuracy ") and "eval.json" in stdout
    res = json.loads((out_dir / "eval.json").read_text())
    assert res["n"] == 3 and len(res["records"]) == 3
    assert {r["question"] for r in res["records"]} == {p["question"] for p in PROBLEMS}
    assert sorted(r["gold"] for r in res["records"]) == [5.0, 5.0, 12.0]
    for r in res["records"]:
        assert 1 <= r["n_generated"] <= 6 and r["finish_reason"] in ("answer", "eos", "new_question", "length")
        assert r["correct"] == (r["prediction"] == r["gold"])
    assert res["accuracy"] == sum(r["correct"] for r in res["records"]) / 3  # one template ("")
    assert res["config"]["split"] == "all" and res["config"]["dtype"] == "float32"
    assert res["model"]["kind"] == "local"
    assert res["generation_config"]["max_new_tokens"] == 6 and res["prompt_config"]["n_shots"] == 1


def test_eval_limit_round_robin(workdir, tmp_path, capsys):
    code = main(["eval", "--model", str(workdir / "model"), "--data", str(workdir / "data.jsonl"), "--split", "all",
                 "--limit", "2", "--n-shots", "0", "--max-new-tokens", "2", "--output", str(tmp_path), "--quiet"])
    assert code == 0
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 2


@pytest.mark.parametrize("extra,message", [
    (["--data", "{tmp}/nope.jsonl"], "nope.jsonl"),
    (["--shots", "{tmp}/nope.json"], "exemplar file not found"),
    (["--limit", "0"], "--limit"),
    (["--batch-size", "0"], "--batch-size"),
    (["--n-shots", "20"], "n_shots=20"),
    (["--model", "{tmp}/no-model-dir", "--data", "{work}/data.jsonl"], "no-model-dir"),
])
def test_eval_user_errors_exit_2(workdir, tmp_path, capsys, extra, message):
    argv = ["eval", "--data", str(workdir / "data.jsonl"), "--split", "all", "--output", str(tmp_path), "--quiet"]
    argv += [a.format(tmp=tmp_path, work=workdir) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "eval.json").exists()


def test_debug_flag_raises_and_argparse_errors(workdir, tmp_path, capsys):
    argv = ["eval", "--data", str(tmp_path / "nope.jsonl"), "--quiet"]
    with pytest.raises(CCAError):
        main(["--debug"] + argv)
    with pytest.raises(CCAError):
        main(argv + ["--debug"])
    with pytest.raises(SystemExit) as e:
        main(["eval", "--split", "sideways"])
    assert e.value.code == 2
    assert main([]) == 2  # no command: help on stderr
    assert "usage: cca" in capsys.readouterr().err


def test_kernel_errors_are_user_errors(workdir, tmp_path, capsys, monkeypatch):
    """A KernelError (the kernels' own family, not a CCAError) is reported like a CCAError: one
    line, status 2; ``--debug`` re-raises it."""
    import cca_fast.cli.eval as eval_cmd

    def refuse(args):
        raise KernelError("backend='triton' needs CUDA tensors (got cpu)")

    monkeypatch.setattr(eval_cmd, "run", refuse)
    argv = ["eval", "--data", str(workdir / "data.jsonl"), "--output", str(tmp_path), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "error: backend='triton' needs CUDA tensors (got cpu)\n"
    with pytest.raises(KernelError):
        main(["--debug"] + argv)


def test_console_process_exit_status(tmp_path):
    """The real process: one error line on stderr, status 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "cca_fast.cli", "eval", "--data", str(tmp_path / "missing.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "missing.jsonl" in proc.stderr and "Traceback" not in proc.stderr


def test_round_robin_limit_interleaves_templates():
    from cca_fast.cli.common import round_robin
    from cca_fast.data.problem import Problem

    probs = [Problem(f"{t}-{i}", "q", "", 1.0, t) for t in "abc" for i in range(3 if t != "b" else 1)]
    picked = [p.id for p in round_robin(probs, 5)]
    assert picked == ["a-0", "b-0", "c-0", "a-1", "c-1"]
    assert round_robin(probs, None) == probs and round_robin(probs, 100) == probs
