"""Issue 13, point 1: a JSON Lines file torn by a kill or a full disk never gets a record appended
after the fragment (which left a malformed line mid-file and lost a finished record)."""
from __future__ import annotations

import json

import pytest

from helpers import run_argv

from cca_fast.cli.main import main
from cca_fast.errors import CCAError
from cca_fast.io import MalformedLineError, append_jsonl, read_jsonl, repair_torn_tail


def _ids(path, strict: bool = True) -> list[int]:
    return [r["id"] for r in read_jsonl(path, tolerate_torn_tail=not strict)]


def test_append_cuts_a_torn_tail_first(tmp_path):
    path = tmp_path / "records.jsonl"
    for i in range(2):
        append_jsonl(path, {"id": i, "output": "x" * 10})
    with open(path, "ab") as f:  # the disk filled up in the middle of record 2
        f.write(b'{"id": 2, "outp')
    assert _ids(path, strict=False) == [0, 1]
    append_jsonl(path, {"id": 2, "output": "x" * 10})  # the resumed run redoes record 2
    append_jsonl(path, {"id": 3, "output": "x" * 10})
    assert _ids(path) == [0, 1, 2, 3]  # no malformed line in the middle; nothing finished lost


def test_a_whole_record_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"id": 0}\n{"id": 1}')  # killed between the record and its newline
    append_jsonl(path, {"id": 2})
    assert _ids(path) == [0, 1, 2]


def test_repair_torn_tail(tmp_path):
    path = tmp_path / "records.jsonl"
    assert repair_torn_tail(path) == 0  # missing: nothing to do
    path.write_bytes(b'{"id": 0')  # a first record torn: the file holds no whole line
    assert repair_torn_tail(path) == 8 and path.read_bytes() == b""
    big = json.dumps({"id": 1, "output": "y" * 200_000}).encode()  # longer than one tail block
    path.write_bytes(b'{"id": 0}\n' + big[:150_000])
    assert repair_torn_tail(path) == 150_000 and _ids(path) == [0]
    assert repair_torn_tail(path) == 0 and path.read_bytes() == b'{"id": 0}\n'  # whole: untouched
    path.write_bytes(b'{"id": 0}\n\x00\x00\x00\x00')  # zero-filled tail after a crash
    assert repair_torn_tail(path) == 4 and _ids(path) == [0]


def test_resume_after_a_torn_evaluation_record_loses_nothing(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = run_argv(workdir, out, "--until", "base_eval")
    assert main(argv) == 0
    path = out / "eval_base_test.jsonl"
    whole = path.read_bytes()
    lines = whole.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # the last record torn
    assert main(argv) == 0  # resumes: redoes the torn record only
    records = list(read_jsonl(path, tolerate_torn_tail=False))
    assert [r["id"] for r in records] == [json.loads(x)["id"] for x in lines]
    assert path.read_bytes() == whole  # byte-identical: every finished record kept
    assert main(argv) == 0  # and a later command still reads it
    damaged = b"".join(lines[:1]) + lines[1][:20] + b"".join(lines[2:])  # damaged mid-way (an older version)
    path.write_bytes(damaged)
    assert main(argv) == 2
    assert f"{path}:2: malformed JSON line" in capsys.readouterr().err
    assert path.read_bytes() == damaged  # refused, not rewritten


def test_a_file_damaged_mid_way_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"id": 0}\n{"id": 1, "ou{"id": 2}\n{"id": 3}\n')  # as an older version left it
    with pytest.raises(MalformedLineError) as e:
        list(read_jsonl(path))
    assert isinstance(e.value, CCAError) and isinstance(e.value, ValueError)
    assert f"{path}:2: malformed JSON line" in str(e.value)  # where
    assert "delete line 2 and the lines after it" in str(e.value)  # the fix
