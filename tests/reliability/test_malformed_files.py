"""Malformed files are one-line errors, golds are finite, a delta save is never silent about what it
replaces. Fixtures are made here, in ``tmp_path``; each case checks the error type, the cause and
the fix in the message, and that the files already there are untouched."""
from __future__ import annotations

import json

import pytest
import torch

from cca_fast.cli.main import main
from cca_fast.data.loaders import load_problems, read_problems_jsonl
from cca_fast.delta import CONFIG_NAME, WEIGHTS_NAME, SparseDelta
from cca_fast.errors import CCAError, DataError
from helpers import make_delta


def _delta() -> SparseDelta:
    return make_delta((0, 3))[2]


def test_saving_over_a_delta_is_refused_unless_overwrite_and_a_killed_saves_temp_is_cleaned(tmp_path):
    d = _delta().save(tmp_path / "delta")
    before = {f: (d / f).read_bytes() for f in (CONFIG_NAME, WEIGHTS_NAME)}
    with pytest.raises(CCAError, match="already holds a delta.*overwrite=True"):
        _delta().save(d)
    assert {f: (d / f).read_bytes() for f in before} == before  # untouched
    stale = d / f".{WEIGHTS_NAME}.abc123"  # what a SIGKILL during the weights write leaves behind
    stale.write_bytes(b"half a file")
    _delta().save(d, overwrite=True)
    assert not stale.exists() and sorted(p.name for p in d.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    SparseDelta.load(d)


def _deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


def test_deeply_nested_json_is_a_one_line_error_not_recursion_error(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "q?", "answer": "#### 1"}) + "\n" + _deep() + "\n")
    with pytest.raises(DataError, match=r"line 2: the JSON nests too deeply.*fix the data file"):
        read_problems_jsonl(data)
    listing = tmp_path / "list.json"
    listing.write_text(_deep())
    with pytest.raises(DataError, match="nests too deeply"):
        load_problems(str(listing))
    d = _delta().save(tmp_path / "delta")
    (d / CONFIG_NAME).write_text(_deep())
    assert main(["apply", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "nests too deeply" in err and "re-create the delta" in err and "Traceback" not in err


def test_an_empty_question_is_named_as_empty(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "   ", "answer": "#### 1"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: 'question' is empty; write the problem's text"):
        read_problems_jsonl(data)


def test_a_gold_beyond_a_float_is_refused_as_text_and_as_a_json_number(tmp_path):
    big = "9" * 401
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "q?", "answer": f"#### {big}"}) + "\n")
    with pytest.raises(DataError, match="401 digits, beyond what a float holds.*fix the data file"):
        read_problems_jsonl(data)
    data.write_text('{"question": "q?", "gold": ' + big + "}\n")
    with pytest.raises(DataError, match="not a number a float can hold.*fix the data file"):
        read_problems_jsonl(data)
    data.write_text(json.dumps({"question": "q?", "answer": "#### " + "9" * 300}) + "\n")
    assert read_problems_jsonl(data)[0].gold == float("9" * 300)  # large but finite: kept


def test_nan_weights_are_reported_as_nan_weights(tmp_path, capsys):
    from helpers import char_tokenizer, make_tiny

    model = make_tiny("llama", dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    assert main(["eval", "--model", str(tmp_path / "m"), "--device", "cpu", "--limit", "1", "--output",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "NaN or Inf" in err and "up_proj" in err and "write or download it again" in err
    assert not (tmp_path / "out" / "eval.json").exists()
