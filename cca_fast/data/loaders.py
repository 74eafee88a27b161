"""Load problem sets from templates, JSONL / CSV / Parquet / JSON files or the Hugging Face Hub.

``load_problems(source)`` accepts:

* ``None`` or ``"builtin"``: the package's own templates, instantiated;
* a folder of template ``.json`` files, or one template ``.json``: instantiated;
* a ``.jsonl`` file: GSM8K lines (``question``, ``answer`` ending ``#### N``) or this package's
  lines (``id``, ``question``, ``answer``, ``gold``, ``template``), detected per line;
* other local files (``.csv``, ``.parquet``, a ``.json`` list): read with ``datasets``;
* hub names (``openai/gsm8k``, ``apple/GSM-Symbolic``, ``hf:NAME[:CONFIG]``): downloaded with
  ``datasets.load_dataset`` (needs network access).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

from cca_fast.errors import CCAError, DataError
from cca_fast.io import refuse_special_file
from cca_fast.data.problem import Problem
from cca_fast.data.templates import (SKIP_HINT, InstantiateConfig, SkipReport, instantiate, load_template,
                                     load_template_dir)

_log = logging.getLogger("cca_fast.data")

#: Folder of the package's own templates.
BUILTIN_TEMPLATES = Path(__file__).resolve().parent / "builtin" / "templates"

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_KNOWN_HUB_CONFIGS = MappingProxyType({"openai/gsm8k": "main", "gsm8k": "main",
                                       "apple/GSM-Symbolic": "main"})
#: A GSM8K gold: an integer or a decimal, optional thousands commas, an optional ``$`` and sign.
_GOLD_TEXT = re.compile(r"(-?)\$?(-?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")
_GOLD_FORMS = "an integer or a decimal such as 42, -3.5, 1,000 or $40"
#: the longest ``question`` or ``answer`` text accepted, in characters (a GSM8K question has a few
#: hundred): a longer one is a damaged or wrong file, and tens of megabytes abort the tokenizer
MAX_TEXT_CHARS = 100_000
#: the longest line of a ``.jsonl`` data file, in characters, refused before it is parsed
MAX_LINE_CHARS = 4 * MAX_TEXT_CHARS


def parse_gold(text: str, where: str, what: str = "the gold answer") -> float:
    """A gold answer written as text, read strictly (GSM8K golds are integers or decimals,
    optionally with thousands commas and a ``$``).

    Fractions (``3/4``), exponents (``1e3``), ``nan`` / ``inf`` and trailing words are refused
    rather than half-read: ``3/4`` is not a GSM8K gold (answers are compared as exact floats,
    which cannot hold 1/3), so write it as a decimal (``0.75``).

    Raises:
        DataError: naming ``where``, the text, what is wrong and the accepted forms.
    """
    t = text.strip()
    m = _GOLD_TEXT.fullmatch(t)
    if m and not (m.group(1) and m.group(2)):
        value = float(("-" if m.group(1) or m.group(2) else "") + m.group(3).replace(",", ""))
        if math.isfinite(value):
            return value
        raise DataError(f"{where}: {what} has {len(m.group(3))} digits, beyond what a float holds (it would "
                        "become inf, and every huge prediction would then count as correct); fix the data file")
    low = t.lower()
    if re.fullmatch(r"[-+]?\$?\s*\d+\s*/\s*\d+", t):
        why = ("a fraction; GSM8K golds are integers or decimals and are compared as exact "
               "floats: write it as a decimal (3/4 -> 0.75)")
    elif re.fullmatch(r"[-+]?\$?[\d,.]+e[-+]?\d+", low):
        why = "scientific notation; write the number out in full (1e3 -> 1000)"
    elif low.lstrip("+-") in ("nan", "inf", "infinity"):
        why = "not a finite number"
    elif not t:
        why = "empty"
    else:
        why = "not a plain number (extra text, units or a malformed number)"
    raise DataError(f"{where}: {what} is not a number: {t[:40]!r} is {why}. A gold must be "
                    f"{_GOLD_FORMS}; fix the data file.")


def gold_from_answer(answer: str, where: str) -> float:
    """The number after the last ``####`` of a GSM8K answer, read strictly (:func:`parse_gold`)."""
    if not isinstance(answer, str) or "####" not in answer:
        raise DataError(f"{where}: the answer has no final '#### N' line; GSM8K answers end with "
                        "'#### <number>' (or give a numeric 'gold' field)")
    return parse_gold(answer.rsplit("####", 1)[1], where, "the text after '####'")


def gold_from_field(value: Any, where: str) -> float:
    """A ``gold`` field: a finite JSON number, or text read by :func:`parse_gold`; ``true`` /
    ``false``, ``NaN``, ``Infinity`` and other types are refused."""
    if isinstance(value, bool):
        raise DataError(f"{where}: 'gold' is not a number: {str(value).lower()} is a boolean. A "
                        f"gold must be {_GOLD_FORMS}; fix the data file.")
    if isinstance(value, int) and not -2**1023 < value < 2**1023:  # float(value) would overflow
        raise DataError(f"{where}: 'gold' is not a number a float can hold ({len(str(abs(value)))} digits); fix "
                        "the data file")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise DataError(f"{where}: 'gold' is not a number: {value} is not finite. A gold must "
                            f"be {_GOLD_FORMS}; fix the data file.")
        return float(value)
    if isinstance(value, str):
        return parse_gold(value, where, "'gold'")
    raise DataError(f"{where}: 'gold' is not a number: {type(value).__name__} "
                    f"{str(value)[:40]!r}. A gold must be {_GOLD_FORMS}; fix the data file.")


def problem_from_record(rec: Mapping[str, Any], *, default_id: str, where: str) -> Problem:
    """A :class:`Problem` from one record: this package's format when it has ``gold``, else
    GSM8K (``question`` + ``answer`` ending ``#### N``)."""
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    question = rec.get("question")
    if isinstance(question, str) and not question.strip():
        raise DataError(f"{where}: 'question' is empty; write the problem's text there, or remove the line")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: missing 'question' (need 'question' and 'answer' ending "
                        f"'#### N', or 'question' and 'gold'); fields present: {sorted(rec)}")
    for key in ("question", "answer"):
        text = rec.get(key)
        if isinstance(text, str) and len(text) > MAX_TEXT_CHARS:
            raise DataError(f"{where}: '{key}' is {len(text):,} characters long, more than the {MAX_TEXT_CHARS:,} "
                            "a problem may have (no model's context holds it): is this the right file? Shorten "
                            "or remove that record")
    if rec.get("gold") is not None:
        gold = gold_from_field(rec["gold"], where)
        answer = rec.get("answer") or ""
        if not isinstance(answer, str):
            raise DataError(f"{where}: 'answer' must be text")
        meta = rec.get("meta") or {}
        if not isinstance(meta, Mapping):
            raise DataError(f"{where}: 'meta' must be a JSON object")
        pid = rec.get("id")
        return Problem(id=str(pid) if pid not in (None, "") else default_id, question=question,
                       answer=answer, gold=gold, template=str(rec.get("template") or ""),
                       meta=dict(meta))
    if "answer" not in rec:
        raise DataError(f"{where}: missing 'answer' (need 'answer' ending '#### N' or a "
                        f"numeric 'gold'); fields present: {sorted(rec)}")
    return Problem(id=default_id, question=question, answer=str(rec["answer"]),
                   gold=gold_from_answer(rec["answer"], where), template=str(rec.get("template") or ""))


def read_problems_jsonl(path: str | Path) -> list[Problem]:
    """Read a JSONL file of GSM8K or package-format lines (format detected per line).

    GSM8K lines get ``id = f"{stem}-{i}"`` (``i``: 0-based line index). Blank lines are skipped.
    """
    p = Path(path)
    refuse_special_file(p, "the data file", error=DataError)
    if not p.is_file():
        raise DataError(f"file not found: {p}")
    problems: list[Problem] = []
    try:
        with p.open(encoding="utf-8") as fh:
            for i, line in enumerate(iter(lambda: fh.readline(MAX_LINE_CHARS + 1), "")):
                where = f"{p}, line {i + 1}"
                if len(line.rstrip("\n")) > MAX_LINE_CHARS:
                    raise DataError(f"{where} is longer than {MAX_LINE_CHARS:,} characters (one problem per line is "
                                    "expected, a few hundred characters each): is this the right file? Shorten or "
                                    "remove that line")
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                except RecursionError:
                    raise DataError(f"{where}: the JSON nests too deeply to be a problem record (one flat "
                                    "object per line is expected); fix the data file") from None
                problems.append(problem_from_record(rec, default_id=f"{p.stem}-{i}", where=where))
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e})") from None
    _check_ids(problems, str(p))
    return problems


def write_problems_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    """Write problems as JSONL (package format) atomically: temp file, then ``os.replace``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for prob in problems:
                fh.write(json.dumps(prob.to_dict(), ensure_ascii=False) + "\n")
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def _check_ids(problems: Sequence[Problem], where: str) -> None:
    seen: set[str] = set()
    for prob in problems:
        if prob.id in seen:
            raise DataError(f"{where}: duplicate problem id {prob.id!r}; ids must be unique")
        seen.add(prob.id)


def _from_templates(templates: Sequence[Any], source: str, n: int, seed: int,
                    config: InstantiateConfig | None = None, *, skip_bad: bool = False,
                    on_skip: SkipReport | None = None, folder: bool = False) -> list[Problem]:
    out: list[Problem] = []
    config = config or InstantiateConfig()
    report = on_skip or _log_skip
    for t in templates:
        try:
            out.extend(instantiate(t, n, seed, source=source, config=config))
        except DataError:
            raise
        except CCAError as e:
            if skip_bad:
                report(str(t.path or f"template {t.id}"), str(e))
                continue
            if folder:
                raise type(e)(f"{e}\n({SKIP_HINT})") from None
            raise
    return out


def _log_skip(where: str, reason: str) -> None:
    _log.warning("skipped bad template %s: %s", where, reason)


def repeated_questions(problems: Sequence[Problem]) -> dict[str, int]:
    """Per template, how many problems repeat the exact question of an earlier one (such
    repeats can land in both the training and the test split)."""
    seen: set[tuple[str, str]] = set()
    out: dict[str, int] = {}
    for p in problems:
        key = (p.template, " ".join(p.question.split()))
        if key in seen:
            out[p.template] = out.get(p.template, 0) + 1
        seen.add(key)
    return out


def _load_records_with_datasets(kind: str, path: Path) -> list[dict[str, Any]]:
    datasets = _import_datasets()
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - any reader failure is a data problem for the user
        raise DataError(f"cannot read {path} as {kind}: {type(e).__name__}: {e}") from None
    return [dict(r) for r in ds]


def _import_datasets() -> Any:
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise DataError("reading this source needs the 'datasets' package: "
                        "pip install 'cca_fast[datasets]'") from None
    return datasets


def _records_to_problems(records: Sequence[Mapping[str, Any]], stem: str, where: str,
                         template_key: str | None = None) -> list[Problem]:
    if records and "question" not in records[0]:
        raise DataError(f"{where}: no 'question' column; columns: {sorted(records[0])}. Need "
                        "'question' plus 'answer' (ending '#### N') or 'gold'")
    out = []
    for i, rec in enumerate(records):
        rec = dict(rec)
        if template_key and rec.get(template_key) is not None and not rec.get("template"):
            rec["template"] = str(rec[template_key])
        out.append(problem_from_record(rec, default_id=f"{stem}-{i}", where=f"{where}, row {i}"))
    return out


def _load_local_file(p: Path, n: int, seed: int, config: InstantiateConfig | None) -> list[Problem]:
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return read_problems_jsonl(p)
    if suffix == ".json":
        try:
            head = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{p}: not valid JSON ({e})") from None
        except RecursionError:
            raise DataError(f"{p}: the JSON nests too deeply to be a template or a list of records") from None
        if isinstance(head, dict) and "question_annotated" in head:
            return _from_templates([load_template(p)], p.parent.name or "tmpl", n, seed, config)
        if isinstance(head, list):
            return _records_to_problems(head, p.stem, str(p))
        raise DataError(f"{p}: a .json source must be a template object (with "
                        "'question_annotated') or a list of records")
    if suffix in (".csv", ".parquet"):
        return _records_to_problems(_load_records_with_datasets(suffix[1:], p), p.stem, str(p))
    raise DataError(f"{p}: unsupported file type '{suffix}'; use .jsonl, .json, .csv, .parquet "
                    "or a folder of template .json files")


def _load_hub(spec: str, split: str) -> list[Problem]:
    name = spec[3:] if spec.startswith("hf:") else spec
    config: str | None = None
    if ":" in name:
        name, config = name.split(":", 1)
    config = config or _KNOWN_HUB_CONFIGS.get(name)
    datasets = _import_datasets()
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad split: all user-fixable
        raise DataError(
            f"could not load '{name}' (config {config!r}, split {split!r}) from the Hugging Face "
            f"Hub: {type(e).__name__}: {e}. This needs network access; offline, pass a local "
            "file instead (a GSM8K-style .jsonl, a folder of template .json files, or None for "
            f"the built-in set). No local file or folder named '{spec}' exists either.") from None
    records = [dict(r) for r in ds]
    stem = re.sub(r"[^\w.-]+", "_", name.split("/")[-1]) + f"-{split}"
    template_key = "original_id" if "GSM-Symbolic" in name else None
    return _records_to_problems(records, stem, f"hub dataset {name}", template_key=template_key)


def load_problems(source: str | Path | None = None, *, n_per_template: int = 50, seed: int = 0,
                  split: str = "test", limit: int | None = None,
                  instantiate_config: InstantiateConfig | None = None,
                  skip_bad_templates: bool = False,
                  on_skip: SkipReport | None = None) -> list[Problem]:
    """Load a problem set.

    Args:
        source: ``None`` / ``"builtin"``, a template folder or ``.json``, a ``.jsonl`` /
            ``.csv`` / ``.parquet`` / ``.json`` list file, or a hub name (``openai/gsm8k``,
            ``apple/GSM-Symbolic``, ``hf:NAME[:CONFIG]``).
        n_per_template: instances drawn per template (template sources only).
        seed: instantiation seed (template sources only).
        split: split of hub data sets.
        limit: keep only the first ``limit`` problems.
        instantiate_config: how templates are instantiated (integer answers, budgets, ...).
        skip_bad_templates: for a template folder, leave out templates that cannot be parsed
            or instantiated instead of stopping at the first; each is reported to
            ``on_skip(path, reason)`` (default: a WARNING on logger ``cca_fast.data``).

    Returns:
        Problems with unique ids; template sources give ``f"{source}-{template}-{i}"`` ids.

    Raises:
        DataError / TemplateError: missing files, malformed lines (file and line number), no
            problems, no network for hub names.
    """
    from cca_fast import checks

    checks.positive("n_per_template", n_per_template, error=DataError)
    checks.positive("limit", limit, allow_none=True, hint="or None for all", error=DataError)
    if source is None or (isinstance(source, str) and source == "builtin"):
        problems = _from_templates(load_template_dir(BUILTIN_TEMPLATES), "builtin",
                                   n_per_template, seed, instantiate_config)
        where = "the built-in templates"
    else:
        text = str(source)
        p = Path(text).expanduser()
        where = text
        refuse_special_file(p, "the data source", folder_ok=True, error=DataError)
        if p.is_dir():
            templates = load_template_dir(p, skip_bad=skip_bad_templates, on_skip=on_skip)
            problems = _from_templates(templates, p.name or "tmpl", n_per_template, seed,
                                       instantiate_config, skip_bad=skip_bad_templates,
                                       on_skip=on_skip, folder=True)
            if not problems and skip_bad_templates:
                raise DataError(f"no usable template in {p}: every template was skipped as bad")
        elif p.is_file():
            problems = _load_local_file(p, n_per_template, seed, instantiate_config)
        elif isinstance(source, str) and (text.startswith("hf:") or (
                _HUB_NAME.match(text) and not p.suffix)):
            problems = _load_hub(text, split)
        else:
            raise DataError(f"data source not found: {text} (not a file or folder; hub data "
                            "sets are written 'owner/name' or 'hf:NAME[:CONFIG]')")
    if not problems:
        raise DataError(f"no problems in {where}")
    _check_ids(problems, where)
    repeats = repeated_questions(problems)
    if repeats:
        _log.warning("%s: %d problem(s) repeat the exact question of another problem of the same "
                     "template (%s); a split can put identical problems in training and test",
                     where, sum(repeats.values()),
                     ", ".join(f"{t or '(no template)'}: {k}" for t, k in sorted(repeats.items())[:5]))
    return problems[:limit] if limit is not None else problems
