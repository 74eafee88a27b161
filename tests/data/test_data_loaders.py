"""load_problems and the JSONL reader/writer: formats, ids, and clear errors on bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cca_fast.data import (Problem, gold_from_answer, load_problems, read_problems_jsonl,
                           write_problems_jsonl)
from cca_fast.errors import DataError, TemplateError


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GSM_LINE = json.dumps({"question": "Q one?", "answer": "1 + 1 = <<1+1=2>>2\n#### 1,234"})


def test_gsm8k_jsonl_ids_and_gold(tmp_path):
    f = _write(tmp_path / "mini.jsonl", [GSM_LINE, "", json.dumps({"question": "Q2", "answer": "#### -7.5"})])
    ps = load_problems(f)
    assert [p.id for p in ps] == ["mini-0", "mini-2"]  # 0-based line index, blank line skipped
    assert [p.gold for p in ps] == [1234.0, -7.5] and ps[0].template == ""


def test_shared_gsm8k_test_file(shared_data):
    ps = load_problems(shared_data / "gsm8k" / "test.jsonl")
    assert len(ps) == 1319 and ps[0].id == "test-0" and ps[0].gold == 18.0
    lines = (shared_data / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    for i in (0, 500, 1318):  # gold is the number after '####', commas dropped
        tail = json.loads(lines[i])["answer"].split("####")[-1].strip().replace(",", "")
        assert ps[i].gold == float(tail)
    assert len(load_problems(shared_data / "gsm8k" / "test.jsonl", limit=5)) == 5


def test_round_trip_package_format_and_mixed_lines(tmp_path):
    probs = [Problem("a-1", "What?", "x\n#### 3", 3.0, "t1", {"bindings": {"n": 2}}),
             Problem("a-2", "Why?", "", 2.5, "")]
    out = write_problems_jsonl(probs, tmp_path / "sub" / "p.jsonl")
    assert [p.name for p in out.parent.iterdir()] == ["p.jsonl"]  # no temp file left behind
    back = read_problems_jsonl(out)
    assert back == probs and back[0].meta == {"bindings": {"n": 2}}
    with out.open("a", encoding="utf-8") as fh:  # GSM8K and package lines may be mixed
        fh.write(GSM_LINE + "\n")
    mixed = load_problems(out)
    assert [p.id for p in mixed] == ["a-1", "a-2", "p-2"]


def test_write_is_atomic_on_failure(tmp_path):
    target = tmp_path / "p.jsonl"
    write_problems_jsonl([Problem("k", "q", "", 1.0)], target)
    before = target.read_text()

    def bad():
        yield Problem("x", "q", "", 1.0)
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        write_problems_jsonl(bad(), target)
    assert target.read_text() == before and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "answer": "no final line"}', r"line 2: the answer has no final '#### N'"),
    ('{"question": "q", "answer": "#### seven"}', r"line 2: the text after '####' is not a number"),
    ('{"answer": "#### 3"}', r"line 2: missing 'question'"),
    ('{"question": "q"}', r"line 2: missing 'answer'"),
    ('{"question": "q", "gold": "abc"}', r"line 2: 'gold' is not a number"),
    ('{"question": "q", "answer": ', r"line 2: not valid JSON"),
    ('[1, 2]', r"line 2: expected a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    f = _write(tmp_path / "bad.jsonl", [GSM_LINE, line])
    with pytest.raises(DataError, match=message) as e:
        load_problems(f)
    assert str(f) in str(e.value)


def test_missing_empty_and_bad_sources(tmp_path):
    with pytest.raises(DataError, match="data source not found: .*nope.jsonl"):
        load_problems(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no problems in"):
        load_problems(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_problems(_write(tmp_path / "x.txt", ["hi"]))
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="no template .json files"):
        load_problems(empty_dir)
    with pytest.raises(DataError, match="duplicate problem id 'a'"):
        load_problems(_write(tmp_path / "dup.jsonl", ['{"id": "a", "question": "q", "gold": 1}'] * 2))
    with pytest.raises(DataError, match="limit must be a positive integer, got 0"):
        load_problems(None, limit=0)
    with pytest.raises(DataError, match="n_per_template must be a positive integer"):
        load_problems(None, n_per_template=0)


def test_template_file_and_folder(tmp_path):
    t = {"id": "t7", "question_annotated": "{name,Ana} has {a,3} cats and gets {b,2}.\n#init:\n"
         "- name = sample(names)\n- $a = range(1, 9)\n- $b = range(1, 9)\n#answer: a + b",
         "answer_annotated": "{a} + {b} = <<{a}+{b}={a+b}>>{a+b}\n#### {a+b}"}
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "t7.json").write_text(json.dumps(t), encoding="utf-8")
    ps = load_problems(folder, n_per_template=4, seed=1)
    assert [p.id for p in ps] == [f"mine-t7-{i}" for i in range(4)]
    assert all(p.gold == p.meta["bindings"]["a"] + p.meta["bindings"]["b"] for p in ps)
    assert load_problems(folder / "t7.json", n_per_template=4, seed=1) == ps
    assert load_problems(folder, n_per_template=4, seed=2) != ps
    bad = dict(t, question_annotated=t["question_annotated"].replace("a + b", "a + q"))
    (folder / "t7.json").write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(TemplateError, match=r"template t7, line 6 \(#answer\): undefined variable 'q'"):
        load_problems(folder)


def test_csv_parquet_and_json_list(tmp_path):
    csv = tmp_path / "set.csv"
    csv.write_text('question,answer\n"How many, really?","2+2=4\n#### 4"\nQ2,#### 9\n', encoding="utf-8")
    ps = load_problems(csv)
    assert [(p.id, p.gold) for p in ps] == [("set-0", 4.0), ("set-1", 9.0)]
    js = tmp_path / "list.json"
    js.write_text(json.dumps([{"question": "q", "gold": 5, "template": "g"}]), encoding="utf-8")
    (p,) = load_problems(js)
    assert (p.id, p.gold, p.template) == ("list-0", 5.0, "g")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.table({"question": ["a", "b"], "answer": ["#### 1", "#### 2,000"]}),
                   tmp_path / "set.parquet")
    assert [(p.id, p.gold) for p in load_problems(tmp_path / "set.parquet")] == [
        ("set-0", 1.0), ("set-1", 2000.0)]
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,answer\nq,#### 1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no 'question' column; columns: \['answer', 'prompt'\]"):
        load_problems(bad)


def test_hub_names_offline_give_clear_error(monkeypatch):
    import datasets

    calls = []

    def offline(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        raise ConnectionError("Couldn't reach the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load 'openai/gsm8k'.*needs network access"):
        load_problems("openai/gsm8k")
    with pytest.raises(DataError, match="could not load 'my/set'"):
        load_problems("hf:my/set:cfg", split="train")
    assert calls == [("openai/gsm8k", "main", "test"), ("my/set", "cfg", "train")]


def test_hub_gsm_symbolic_records_group_by_original_id(monkeypatch):
    import datasets

    rows = [{"id": 0, "instance": i, "question": f"q{i}", "answer": f"#### {i}", "original_id": 473}
            for i in range(3)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows)
    ps = load_problems("apple/GSM-Symbolic")
    assert [(p.id, p.template, p.gold) for p in ps] == [
        (f"GSM-Symbolic-test-{i}", "473", float(i)) for i in range(3)]


def test_gold_from_answer():
    assert gold_from_answer("x\n#### $1,000", "w") == 1000.0
    with pytest.raises(DataError, match="w: the answer has no final"):
        gold_from_answer("x = 3", "w")
