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
import os
import re
import tempfile
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

from cca_fast.errors import DataError
from cca_fast.data.problem import Problem
from cca_fast.data.templates import InstantiateConfig, instantiate, load_template, load_template_dir

#: Folder of the package's own templates.
BUILTIN_TEMPLATES = Path(__file__).resolve().parent / "builtin" / "templates"

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_KNOWN_HUB_CONFIGS = MappingProxyType({"openai/gsm8k": "main", "gsm8k": "main",
                                       "apple/GSM-Symbolic": "main"})
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def gold_from_answer(answer: str, where: str) -> float:
    """The number after the last ``####`` of a GSM8K answer (commas and ``$`` dropped)."""
    if not isinstance(answer, str) or "####" not in answer:
        raise DataError(f"{where}: the answer has no final '#### N' line; GSM8K answers end with "
                        "'#### <number>' (or give a numeric 'gold' field)")
    tail = answer.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "")
    m = _NUMBER.fullmatch(tail) or _NUMBER.match(tail)
    if not m:
        raise DataError(f"{where}: the text after '####' is not a number: {tail[:40]!r}")
    return float(m.group(0))


def problem_from_record(rec: Mapping[str, Any], *, default_id: str, where: str) -> Problem:
    """A :class:`Problem` from one record: this package's format when it has ``gold``, else
    GSM8K (``question`` + ``answer`` ending ``#### N``)."""
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: missing 'question' (need 'question' and 'answer' ending "
                        f"'#### N', or 'question' and 'gold'); fields present: {sorted(rec)}")
    if rec.get("gold") is not None:
        try:
            gold = float(rec["gold"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: 'gold' is not a number: {rec['gold']!r}") from None
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
    if not p.is_file():
        raise DataError(f"file not found: {p}")
    problems: list[Problem] = []
    try:
        with p.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                where = f"{p}, line {i + 1}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
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


def _from_templates(templates: Sequence[Any], source: str, n: int, seed: int) -> list[Problem]:
    out: list[Problem] = []
    config = InstantiateConfig()
    for t in templates:
        out.extend(instantiate(t, n, seed, source=source, config=config))
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


def _load_local_file(p: Path, n: int, seed: int) -> list[Problem]:
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return read_problems_jsonl(p)
    if suffix == ".json":
        try:
            head = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{p}: not valid JSON ({e})") from None
        if isinstance(head, dict) and "question_annotated" in head:
            return _from_templates([load_template(p)], p.parent.name or "tmpl", n, seed)
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
                  split: str = "test", limit: int | None = None) -> list[Problem]:
    """Load a problem set.

    Args:
        source: ``None`` / ``"builtin"``, a template folder or ``.json``, a ``.jsonl`` /
            ``.csv`` / ``.parquet`` / ``.json`` list file, or a hub name (``openai/gsm8k``,
            ``apple/GSM-Symbolic``, ``hf:NAME[:CONFIG]``).
        n_per_template: instances drawn per template (template sources only).
        seed: instantiation seed (template sources only).
        split: split of hub data sets.
        limit: keep only the first ``limit`` problems.

    Returns:
        Problems with unique ids; template sources give ``f"{source}-{template}-{i}"`` ids.

    Raises:
        DataError / TemplateError: missing files, malformed lines (file and line number), no
            problems, no network for hub names.
    """
    if n_per_template < 1:
        raise DataError(f"n_per_template must be >= 1, got {n_per_template}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1 (or None for all), got {limit}")
    if source is None or (isinstance(source, str) and source == "builtin"):
        problems = _from_templates(load_template_dir(BUILTIN_TEMPLATES), "builtin",
                                   n_per_template, seed)
        where = "the built-in templates"
    else:
        text = str(source)
        p = Path(text).expanduser()
        where = text
        if p.is_dir():
            problems = _from_templates(load_template_dir(p), p.name or "tmpl", n_per_template, seed)
        elif p.is_file():
            problems = _load_local_file(p, n_per_template, seed)
        elif isinstance(source, str) and (text.startswith("hf:") or (
                _HUB_NAME.match(text) and not p.suffix)):
            problems = _load_hub(text, split)
        else:
            raise DataError(f"data source not found: {text} (not a file or folder; hub data "
                            "sets are written 'owner/name' or 'hf:NAME[:CONFIG]')")
    if not problems:
        raise DataError(f"no problems in {where}")
    _check_ids(problems, where)
    return problems[:limit] if limit is not None else problems
