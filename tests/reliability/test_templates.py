"""Reliability of the data layer (issue 13, points 4, 5 and 9): the template engine is bounded,
gold answers are parsed strictly, and one bad template does not sink a folder.

Every bad input is written by the test itself (templates as JSON in ``tmp_path``, like the
built-in ones). Each test asserts the error type (or the CLI's exit code 2), that the message
names the cause, the template (file and line) and the fix, and runs fast: the budget stops the
runaway work (tests use small limits where the default would take seconds).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from cca_fast.cli.main import build_parser, main
from cca_fast.cli.common import load_problems_from_args
from cca_fast.data import load_problems, read_problems_jsonl
from cca_fast.data.loaders import gold_from_field, parse_gold, repeated_questions
from cca_fast.data.safe_eval import EvalLimits, eval_limits
from cca_fast.data.templates import InstantiateConfig, instantiate, load_template, load_template_dir
from cca_fast.errors import DataError, TemplateError
from cca_fast.evaluation.prompting import gold_from_answer


def write_template(folder: Path, name: str, init: list[str], answer: str, *,
                   conditions: list[str] = (), question: str | None = None,
                   solution: str | None = None) -> Path:
    """A template file ``folder/name.json`` in the built-in templates' format."""
    variables = [line.split("=")[0].strip().lstrip("$") for line in init]
    q = question or " and ".join(f"{{{v},1}}" for v in variables if "," not in v) + "?"
    text = q + "\n\n#init:\n" + "".join(f"- {line}\n" for line in init)
    if conditions:
        text += "\n#conditions:\n" + "".join(f"- {c}\n" for c in conditions)
    text += f"\n#answer: {answer}"
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"id": name, "question_annotated": text,
                                "answer_annotated": solution or f"So.\n#### {{{answer}}}"}),
                    encoding="utf-8")
    return path


def fast():
    """The block runs with small per-template budgets (operations, tries), so that a runaway
    template is stopped by a limit (what the tests assert through the error) quickly; no test
    asserts a duration."""
    return eval_limits(EvalLimits(max_ops=200_000))


def instantiate_file(path: Path, n: int = 3, **config) -> list:
    return instantiate(load_template(path), n, seed=0, config=InstantiateConfig(**config))


# ------------------------------------------------------------------ point 4: a bounded engine


@pytest.mark.parametrize("answer, cause, limit", [
    ("round(x / 3, 10 ** 7)", r"ndigits is too large", "max_round_digits"),
    ("9 ** 9 ** 9", r"9 \*\* 387420489 .*too large", "max_int_bits"),
    ("len(range(2 ** 100))", r"range\(\) of \d+ items is too large", "max_range_len"),
    ("sum(range(x * 10 ** 6))", r"sum\(\) over a list of \d+ items is too large", "max_seq_len"),
])
def test_runaway_answer_names_template_line_limit_and_fix(tmp_path, answer, cause, limit):
    path = write_template(tmp_path, "t1", ["$x = range(2, 9)"], answer)
    with fast(), pytest.raises(TemplateError) as e:
        instantiate_file(path)
    msg = str(e.value)
    assert str(path) in msg and "template t1, line 6 (#answer)" in msg
    assert "exceeds the evaluation budget" in msg and f"{limit}=" in msg
    assert f"EvalLimits({limit}=...)" in msg  # how to raise it
    assert re.search(cause, msg)
    assert "#answer is not a number" not in msg


def test_operation_budget_is_configurable(tmp_path):
    path = write_template(tmp_path, "ops", ["$x = range(2000, 3000)"], "sum(range(x))")
    with fast(), pytest.raises(TemplateError, match=r"more than 1000 operations.*max_ops=1000"):
        instantiate_file(path, limits=EvalLimits(max_ops=1000))
    assert len(instantiate_file(path)) == 3  # within the default budget


def test_round_digits_limit_can_be_raised(tmp_path):
    path = write_template(tmp_path, "rd", ["$x = range(3, 30, 3)"], "round(x / 3, 150)")
    with pytest.raises(TemplateError, match="max_round_digits=100"):
        instantiate_file(path)
    assert len(instantiate_file(path, limits=EvalLimits(max_round_digits=200))) == 3


@pytest.mark.parametrize("answer, cause", [
    ("-" * 20_000 + "x", "nests too deeply to parse"),
    ("+".join(["x"] * 20_000), r"sum\(\[a, b, c, \.\.\.\]\)"),
    ("+".join(["x"] * 300), r"nests more than 200 levels deep .*max_depth=200"),
])
def test_deep_expressions_are_refused_at_load_not_recursion_error(tmp_path, answer, cause):
    path = write_template(tmp_path, "deep", ["$x = range(2, 9)"], answer)
    with fast(), pytest.raises(TemplateError, match=cause) as e:
        load_template(path)
    assert str(path) in str(e.value) and "template deep, line 6 (#answer)" in str(e.value)
    assert "Fix" in str(e.value) or "split" in str(e.value)


def test_text_arithmetic_names_the_real_cause(tmp_path):
    path = write_template(tmp_path, "txt", ["$x = range(2, 9)"], "len('a' * 10 ** 9)")
    with fast(), pytest.raises(TemplateError, match=r"line 6 \(#answer\).*arithmetic on text") as e:
        instantiate_file(path)
    assert "#answer is not a number" not in str(e.value)


@pytest.mark.parametrize("answer, cause", [
    ("x / 0", r"#answer `x / 0`: division by zero"),
    ("[1, 2, 3][x]", r"#answer `\[1, 2, 3\]\[x\]`: index 5 out of range \(the list has 3 items\)"),
])
def test_failing_answer_names_the_real_cause(tmp_path, answer, cause):
    path = write_template(tmp_path, "fail", ["$x = range(5, 9)"], answer)
    with fast(), pytest.raises(TemplateError, match=cause) as e:
        instantiate_file(path, max_tries=50)
    msg = str(e.value)
    assert "the space is empty" in msg and "Fix:" in msg and str(path) in msg
    assert "#answer is not a number" not in msg


def test_slow_template_reports_progress_then_stops_at_time_budget(tmp_path, caplog):
    # a large dynamic domain and an unsatisfiable condition: hours without a budget
    path = write_template(tmp_path, "slow", ["$x = range(1, 100)", "$y = list(range(x, x + 20000))"],
                          "x + y", conditions=["y < 0"])
    with caplog.at_level(logging.WARNING, logger="cca_fast.data"), fast(), \
            pytest.raises(TemplateError) as e:
        instantiate_file(path, max_seconds=0.6, progress_every=0.2)
    msg = str(e.value)
    assert str(path) in msg and "gave up after" in msg and "max_seconds=0.6" in msg
    assert "`y < 0` failed" in msg and "Fix:" in msg
    assert any("still sampling" in r.getMessage() and "template slow" in r.getMessage()
               for r in caplog.records)


# ------------------------------------------------------------------ point 5: strict golds


@pytest.mark.parametrize("line, cause", [
    ({"question": "q", "answer": "x\n#### 3/4"}, "is a fraction"),
    ({"question": "q", "answer": "x\n#### 1e3"}, "scientific notation"),
    ({"question": "q", "answer": "x\n#### 12 apples"}, "not a plain number"),
    ({"question": "q", "gold": "nan"}, "not a finite number"),
    ({"question": "q", "gold": "inf"}, "not a finite number"),
    ({"question": "q", "gold": True}, "is a boolean"),
    ({"question": "q", "gold": [1]}, "'gold' is not a number"),
])
def test_bad_gold_is_refused_with_file_line_and_fix(tmp_path, capsys, line, cause):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "#### 1,000"}) + "\n" + json.dumps(line)
                 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=cause) as e:
        read_problems_jsonl(f)
    msg = str(e.value)
    assert f"{f}, line 2" in msg and "integer or a decimal" in msg and "fix the data file" in msg
    assert main(["eval", "--data", str(f), "--split", "all", "--output", str(tmp_path / "o")]) == 2
    assert f"{f}, line 2" in capsys.readouterr().err


def test_nan_literal_gold_is_refused(tmp_path):
    f = tmp_path / "nan.jsonl"
    f.write_text('{"question": "q", "gold": NaN}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: 'gold' is not a number: nan is not finite"):
        read_problems_jsonl(f)


def test_good_golds_still_read():
    assert parse_gold("$1,000", "w") == 1000.0 and parse_gold("-3.5", "w") == -3.5
    assert gold_from_field(7, "w") == 7.0 and gold_from_field("12.5", "w") == 12.5
    assert gold_from_answer("a\n#### 1,024") == 1024.0
    for bad in ("#### 3/4", "#### 1e3", "#### nan"):
        with pytest.raises(DataError, match="not a number"):
            gold_from_answer(bad)


def test_too_small_domain_says_so_instead_of_repeating(tmp_path, caplog):
    path = write_template(tmp_path, "small", ["$x = range(1, 4)"], "x + 1")
    with fast(), pytest.raises(TemplateError) as e:
        instantiate_file(path, n=5, max_duplicate_streak=50)
    msg = str(e.value)
    assert "domain is too small" in msg and "only 3 distinct instance(s) exist" in msg
    assert "--n-per-template 3" in msg and "allow_duplicates=True" in msg and str(path) in msg
    with caplog.at_level(logging.WARNING, logger="cca_fast.data"):
        got = instantiate_file(path, n=5, max_duplicate_streak=50, allow_duplicates=True)
    assert len(got) == 5 and len({p.question for p in got}) == 3
    assert any("only 3 distinct questions among 5" in r.getMessage() for r in caplog.records)


def test_repeated_questions_in_a_file_are_counted(tmp_path, caplog):
    f = tmp_path / "rep.jsonl"
    f.write_text("".join(json.dumps({"id": f"p{i}", "question": "same?", "gold": 1,
                                     "template": "t"}) + "\n" for i in range(3)), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="cca_fast.data"):
        problems = load_problems(str(f))
    assert repeated_questions(problems) == {"t": 2}
    assert any("2 problem(s) repeat" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ point 9: bad templates in a folder


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "tpl"
    d.mkdir()
    write_template(d, "a_good", ["$x = range(2, 50)"], "x + 1")
    (d / "b_broken.json").write_text('{"question_annotated": "no init", "answer_annotated": "#### 1"}')
    write_template(d, "c_never_int", ["$x = range(1, 7)"], "x / 7")
    write_template(d, "d_good", ["$y = range(2, 50)"], "y * 2")
    return d


def test_folder_strict_by_default_names_the_flag(tmp_path):
    d = _folder(tmp_path)
    with pytest.raises(TemplateError) as e:
        load_problems(str(d), n_per_template=3)
    msg = str(e.value)
    assert "b_broken.json" in msg and "no '#answer" in msg
    assert "skip_bad_templates=True" in msg and "--skip-bad-templates" in msg


def test_folder_skip_bad_templates_loads_the_rest_and_reports_each(tmp_path):
    d = _folder(tmp_path)
    skipped: list[tuple[str, str]] = []
    with fast():
        problems = load_problems(str(d), n_per_template=3, skip_bad_templates=True,
                                 on_skip=lambda w, r: skipped.append((w, r)),
                                 instantiate_config=InstantiateConfig(max_tries=200))
    assert sorted({p.template for p in problems}) == ["a_good", "d_good"] and len(problems) == 6
    assert [Path(w).name for w, _ in skipped] == ["b_broken.json", "c_never_int.json"]
    assert "no '#answer" in skipped[0][1]
    assert "non-integer #answer" in skipped[1][1] and "--non-integer-answers" in skipped[1][1]
    assert len(load_template_dir(d, skip_bad=True, on_skip=lambda w, r: None)) == 3


def test_cli_skip_bad_templates_and_integer_setting(tmp_path, capsys):
    d = _folder(tmp_path)
    parser = build_parser()
    assert main(["eval", "--data", str(d), "--n-per-template", "3", "--split", "all",
                 "--output", str(tmp_path / "o")]) == 2
    assert "--skip-bad-templates" in capsys.readouterr().err
    args = parser.parse_args(["eval", "--data", str(d), "--n-per-template", "3", "--split", "all",
                              "--skip-bad-templates"])
    problems = load_problems_from_args(args)
    err = capsys.readouterr().err
    assert len(problems) == 6 and "skipped bad template" in err and "b_broken.json" in err
    assert "c_never_int.json" in err and "skipped 2 bad template(s)" in err
    args = parser.parse_args(["eval", "--data", str(d), "--n-per-template", "3", "--split", "all",
                              "--skip-bad-templates", "--non-integer-answers"])
    problems = load_problems_from_args(args)
    assert sorted({p.template for p in problems}) == ["a_good", "c_never_int", "d_good"]


def test_empty_space_is_told_apart_from_an_unlucky_sampler(tmp_path):
    never = write_template(tmp_path, "never", ["$x = range(1, 7)"], "x / 7")
    with fast(), pytest.raises(TemplateError) as e:
        instantiate_file(never, max_tries=100)
    msg = str(e.value)
    assert "found only 0 of 3 instances: the space is empty" in msg
    assert "non-integer #answer" in msg and "--non-integer-answers" in msg
    # a space with enough instances that rejection sampling misses: enumerated, not refused
    rare = write_template(tmp_path, "rare", ["$x = range(0, 20000)"], "x + 1",
                          conditions=["divides(x, 5000)"])
    with fast():
        got = instantiate_file(rare, n=3, max_tries=20)
    assert len({p.question for p in got}) == 3
    assert all(int(p.gold) - 1 in (0, 5000, 10000, 15000) for p in got)
    # a large space that runs out of tries says it could not be enumerated
    big = write_template(tmp_path, "big", ["$x = range(0, 10 ** 7)"], "x",
                         conditions=["x == 123456"])
    with fast(), pytest.raises(TemplateError, match=r"ran out of tries.*max_enumerate=1000"):
        instantiate_file(big, n=1, max_tries=20, max_enumerate=1000)


@pytest.mark.parametrize("init, conditions, where, cause", [
    (["$x = range(2 ** 100)"], [], r"line 4 \(#init\)", "max_range_len"),
    (["$x = range(2, 9)", "$y = range(x, 9 ** 9 ** 9)"], [], r"line 5 \(#init\)", "max_int_bits"),
    (["$x = range(2, 9)"], ["x ** (10 ** 6) > 1"], r"line 7 \(#conditions\)", "max_int_bits"),
])
def test_runaway_init_and_condition_lines_are_named(tmp_path, init, conditions, where, cause):
    path = write_template(tmp_path, "t2", init, "x", conditions=conditions)
    with fast(), pytest.raises(TemplateError, match=rf"{re.escape(str(path))}: template t2, {where}: .*"
                                                    rf"exceeds the evaluation budget.*{cause}="):
        instantiate_file(path)


def test_cca_run_maps_the_data_flags_and_its_data_stage_skips_bad_templates(tmp_path, capsys, monkeypatch):
    """``cca run`` has the same two data settings (``RunConfig.skip_bad_templates`` /
    ``integer_answers``), and its data stage (no model needed) uses them."""
    from cca_fast.cli.run import config_from_args

    d = _folder(tmp_path)
    parser = build_parser()
    args = parser.parse_args(["run", "--data", str(d), "--skip-bad-templates", "--non-integer-answers"])
    cfg = config_from_args(args)
    assert cfg.skip_bad_templates is True and cfg.integer_answers is False
    default = config_from_args(parser.parse_args(["run"]))
    assert default.skip_bad_templates is False and default.integer_answers is True

    def no_load(*a, **k):
        raise AssertionError("the data stage needs no model")

    monkeypatch.setattr("cca_fast.models.loading.load_model", no_load)
    out = tmp_path / "run"
    argv = ["run", "--data", str(d), "--n-per-template", "7", "--output", str(out), "--until", "data", "--quiet"]
    assert main(argv) == 2  # strict by default: the error names the flag, nothing written
    assert "--skip-bad-templates" in capsys.readouterr().err and not (out / "config.json").exists()
    assert main(argv + ["--skip-bad-templates"]) == 0
    templates = {json.loads(line)["template"] for s in ("train", "val", "test")
                 for line in (out / "data" / f"{s}.jsonl").read_text().splitlines()}
    assert templates == {"a_good", "d_good"}
