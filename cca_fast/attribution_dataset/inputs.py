"""Data sets for :func:`cca_fast.attribute_dataset`: reading, checking, tokenizing, batching.

Three sources (:func:`read_records`):

* a JSON Lines file, one object per line, with the fields of :data:`FIELDS` (a string field or
  its ``*_ids`` twin holding token ids)::

      {"prompt": "The capital of France is", "desired": " Paris", "undesired": " Rome"}
      {"prompt": "2 + 2 =", "target": " 4", "corrupt": "2 + 3 ="}

* a ``cca run`` directory: its ``pivots.jsonl`` (records ``{"example": PivotExample | null}``),
  prompt = the pivot prefix, desired / undesired = the pivot tokens;
* a local ``.json`` / ``.csv`` / ``.parquet`` table (pandas), columns mapped onto the fields
  with ``fields={"prompt": "question", ...}``.

Every record is checked before any model work (:func:`check_records`: an empty file, a line
without what the metric or method needs), then tokenized (:func:`tokenize_records`: a desired /
undesired string the tokenizer splits into several tokens); each error is a
:class:`~cca_fast.errors.CCAError` naming the file and line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from cca_fast import checks
from cca_fast.errors import CCAError
from cca_fast.io import refuse_special_file

#: what each metric needs from a record
METRICS: tuple[str, ...] = ("logit_diff", "logprob", "loss")
#: where components are scored
POSITIONS: tuple[str, ...] = ("last", "all", "target")
#: attribution methods
METHODS: tuple[str, ...] = ("gradxact", "patch", "mean")
#: record fields (each also as ``<name>_ids``: token ids, except desired / undesired which may be ints)
FIELDS: tuple[str, ...] = ("prompt", "target", "desired", "undesired", "corrupt")


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from (``source`` = ``"file:line"``)."""

    source: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class Example:
    """One tokenized example.

    Attributes:
        index: position in the data set (chunks and per-example scores follow it).
        source: ``"file:line"`` of the record.
        prompt_ids: prompt tokens; its last one is the ``last`` position.
        target_ids: continuation tokens appended after the prompt (``logprob``; optional for ``loss``).
        desired, undesired: next-token ids at the last prompt position (``logit_diff``).
        corrupt_ids: the corrupted prompt (``method="patch"``), or ``None``.
    """

    index: int
    source: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...] = ()
    desired: int | None = None
    undesired: int | None = None
    corrupt_ids: tuple[int, ...] | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


# ---- reading --------------------------------------------------------------------------------

def read_records(path: str | Path, fields: Mapping[str, str] | None = None, limit: int | None = None) -> list[Record]:
    """Raw records of a JSONL file, a ``cca run`` directory or a local table (see the module
    docstring). ``fields`` maps a field name to the column / key holding it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CCAError(f"data not found: {p} (pass a .jsonl file, a `cca run` directory with pivots.jsonl, "
                       "or a .json/.csv/.parquet file)")
    refuse_special_file(p, "the data", folder_ok=True)
    if p.is_dir():
        records = _read_run_dir(p)
    elif p.suffix.lower() == ".jsonl":
        records = _read_jsonl(p)
    elif p.suffix.lower() in (".json", ".csv", ".parquet"):
        records = _read_table(p)
    else:
        raise CCAError(f"{p}: unknown data format {p.suffix!r}; pass a .jsonl, .json, .csv or .parquet file or a "
                       "`cca run` directory")
    if fields:
        unknown = sorted(set(fields) - set(FIELDS) - {f"{f}_ids" for f in FIELDS})
        if unknown:
            raise CCAError(f"unknown field(s) {unknown} in the field mapping; fields are {list(FIELDS)} "
                           "(and their *_ids twins)")
        records = [Record(r.source, _mapped(r.data, fields)) for r in records]
    if not records:
        raise CCAError(f"{p}: no examples (the file is empty); add one JSON object per line")
    return records[:limit] if limit is not None else records


def _mapped(d: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    out = dict(d)
    for name, column in fields.items():
        if column in d:
            out[name] = d[column]
    return out


def _read_jsonl(p: Path) -> list[Record]:
    refuse_special_file(p, "the data file")
    out: list[Record] = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise CCAError(f"{p}:{i}: not a JSON object ({e.msg}); each line must be one JSON object") from None
            if not isinstance(d, dict):
                raise CCAError(f"{p}:{i}: expected a JSON object, got {type(d).__name__}")
            out.append(Record(f"{p}:{i}", d))
    return out


def _read_run_dir(p: Path) -> list[Record]:
    from cca_fast.experiments.rundir import RunDir  # noqa: PLC0415
    from cca_fast.stages.examples import PivotExample  # noqa: PLC0415

    f = p / RunDir.PIVOTS
    if not f.exists():
        raise CCAError(f"{p} is a directory without {RunDir.PIVOTS}: pass a `cca run` directory whose stage 1 "
                       "finished (or a .jsonl file)")
    out: list[Record] = []
    for rec in _read_jsonl(f):
        ex = rec.data.get("example")
        if ex is None:
            continue  # a flipped pair without a pivot
        try:
            e = PivotExample.from_dict(ex)
        except (KeyError, TypeError, ValueError) as err:
            raise CCAError(f"{rec.source}: not a pivot example ({err})") from None
        out.append(Record(rec.source, {"prompt_ids": list(e.prefix_ids), "desired": e.desired,
                                       "undesired": e.undesired, "problem_id": e.problem_id}))
    if not out:
        raise CCAError(f"{f}: no pivot examples (every pair lacks a pivot, or the file is empty)")
    return out


def _read_table(p: Path) -> list[Record]:
    import pandas as pd  # noqa: PLC0415

    try:
        if p.suffix.lower() == ".csv":
            df = pd.read_csv(p)
        elif p.suffix.lower() == ".parquet":
            df = pd.read_parquet(p)
        else:
            df = pd.read_json(p)
    except Exception as e:  # noqa: BLE001 - pandas raises many types
        raise CCAError(f"{p}: cannot read the table ({str(e)[:200]})") from None
    # line numbers: a CSV header is line 1, so row r is on line r + 2; other formats count rows from 1
    first = 2 if p.suffix.lower() == ".csv" else 1
    rows = df.to_dict(orient="records")
    return [Record(f"{p}:{i + first}", {k: v for k, v in r.items() if not _is_missing(v)}) for i, r in enumerate(rows)]


def _is_missing(v: Any) -> bool:
    return isinstance(v, float) and v != v  # NaN cell


# ---- checking (no tokenizer) -------------------------------------------------------------------

def needs(metric: str, method: str) -> list[str]:
    """Fields a record must have for ``metric`` and ``method``."""
    out = ["prompt"]
    if metric == "logit_diff":
        out += ["desired", "undesired"]
    elif metric == "logprob":
        out += ["target"]
    if method == "patch":
        out += ["corrupt"]
    return out


#: the most integrated-gradient steps (each is a forward and backward pass of every batch)
MAX_IG_STEPS = 1000


def check_options(metric: str, method: str, positions: str, ig_steps: int) -> None:
    """:class:`CCAError` for an unknown metric / method / positions or a bad combination."""
    if metric not in METRICS:
        raise CCAError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if method not in METHODS:
        raise CCAError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if positions not in POSITIONS:
        raise CCAError(f"unknown positions {positions!r}; choose one of {', '.join(POSITIONS)}")
    checks.integer("AttributeConfig.ig_steps", ig_steps, flag="--ig-steps", lo=0, hi=MAX_IG_STEPS,
                   hint=f"each step is one more forward and backward pass of every batch ({ig_steps} would be "
                        f"{ig_steps}x the work of plain attribution patching); EAP-IG uses 5 to 100, e.g. 20")
    if ig_steps and method != "patch":
        raise CCAError("--ig-steps needs --method patch: integrated gradients interpolate the input embeddings "
                       "between the corrupted and the clean prompt (EAP-IG)")


def _has(d: Mapping[str, Any], name: str) -> bool:
    for key in (name, f"{name}_ids"):
        v = d.get(key)
        if v is not None and not (isinstance(v, (str, list, tuple)) and len(v) == 0):
            return True
    return False


def check_records(records: Sequence[Record], metric: str, method: str) -> None:
    """Every record has what ``metric`` and ``method`` need, and an optional ``"metric"`` field
    names this run's metric (:class:`CCAError` naming the file and line)."""
    why = {"prompt": "every example needs one",
           "desired": "the logit_diff metric needs desired and undesired next tokens",
           "undesired": "the logit_diff metric needs desired and undesired next tokens",
           "target": "the logprob metric needs a target continuation",
           "corrupt": "--method patch needs a corrupted prompt per example"}
    for r in records:
        m = r.data.get("metric")
        if m is not None and m not in METRICS:
            raise CCAError(f"{r.source}: unknown metric {m!r}; choose one of {', '.join(METRICS)}")
        if m is not None and m != metric:
            raise CCAError(f"{r.source}: metric {m!r} but this run scores {metric!r} (one metric per run: pass "
                           f"--metric {m} or drop the line's metric field)")
        for name in needs(metric, method):
            if not _has(r.data, name):
                raise CCAError(f"{r.source}: no {name!r} (or {name + '_ids'!r}): {why[name]}")


# ---- tokenizing ---------------------------------------------------------------------------------

def _ids(value: Any, where: str, name: str, vocab: int | None) -> tuple[int, ...]:
    try:
        ids = tuple(int(t) for t in value)
    except (TypeError, ValueError):
        raise CCAError(f"{where}: {name} must be a list of token ids, got {value!r}") from None
    if vocab is not None and ids and (min(ids) < 0 or max(ids) >= vocab):
        raise CCAError(f"{where}: {name} has a token id outside [0, {vocab}); were the ids made with another tokenizer?")
    return ids


def _text_or_ids(d: Mapping[str, Any], name: str, where: str, tokenizer: Any, vocab: int | None,
                 special: bool) -> tuple[int, ...]:
    if d.get(f"{name}_ids") is not None:
        return _ids(d[f"{name}_ids"], where, f"{name}_ids", vocab)
    v = d.get(name)
    if v is None:
        return ()
    if not isinstance(v, str):
        if isinstance(v, (list, tuple)):
            return _ids(v, where, name, vocab)
        raise CCAError(f"{where}: {name} must be a string or a list of token ids, got {type(v).__name__}")
    if tokenizer is None:
        raise CCAError(f"{where}: {name} is text but no tokenizer was given")
    return tuple(tokenizer(v, add_special_tokens=special)["input_ids"])


def _one_token(d: Mapping[str, Any], name: str, where: str, tokenizer: Any, vocab: int | None) -> int:
    v = d.get(f"{name}_ids", d.get(name))
    if isinstance(v, bool):
        raise CCAError(f"{where}: {name} must be a token id or a string, got {v!r}")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == int(v):
        ids = (int(v),)
    elif isinstance(v, (list, tuple)) and len(v) == 1:
        ids = (int(v[0]),)
    elif isinstance(v, str):
        if tokenizer is None:
            raise CCAError(f"{where}: {name} is text but no tokenizer was given")
        ids = tuple(tokenizer(v, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            pieces = [tokenizer.decode([t]) for t in ids]
            raise CCAError(f"{where}: {name} {v!r} is {len(ids)} tokens for this tokenizer {pieces!r}; the "
                           "logit_diff metric needs one token: give a string that is one token (often with its "
                           "leading space) or its token id")
    else:
        raise CCAError(f"{where}: {name} must be one token: a token id or a one-token string, got {v!r}")
    if vocab is not None and not 0 <= ids[0] < vocab:
        raise CCAError(f"{where}: {name} token id {ids[0]} is outside [0, {vocab})")
    return ids[0]


def tokenize_records(records: Sequence[Record], tokenizer: Any, metric: str, method: str, positions: str,
                     ig_steps: int = 0, vocab_size: int | None = None, add_special_tokens: bool = True) -> list[Example]:
    """:class:`Example` s of ``records`` (checked with :func:`check_records` first).

    Text prompts are tokenized with ``add_special_tokens`` (e.g. a BOS token), targets and
    desired / undesired strings without. ``logit_diff`` ignores a target. A corrupted prompt
    must have as many tokens as the clean one for ``positions="all"`` and for ``ig_steps``
    (activations are compared position by position); otherwise the two are right-aligned.
    """
    check_records(records, metric, method)
    out: list[Example] = []
    for i, r in enumerate(records):
        d, where = r.data, r.source
        prompt = _text_or_ids(d, "prompt", where, tokenizer, vocab_size, add_special_tokens)
        if not prompt:
            raise CCAError(f"{where}: the prompt is empty (0 tokens)")
        target: tuple[int, ...] = ()
        if metric != "logit_diff":
            target = _text_or_ids(d, "target", where, tokenizer, vocab_size, False)
            if metric == "logprob" and not target:
                raise CCAError(f"{where}: the target is 0 tokens; the logprob metric needs a target continuation")
        desired = undesired = None
        if metric == "logit_diff":
            desired = _one_token(d, "desired", where, tokenizer, vocab_size)
            undesired = _one_token(d, "undesired", where, tokenizer, vocab_size)
            checks.token_contrast(desired, undesired, where, vocab_size)
        corrupt = None
        if method == "patch":
            corrupt = _text_or_ids(d, "corrupt", where, tokenizer, vocab_size, add_special_tokens)
            if not corrupt:
                raise CCAError(f"{where}: the corrupted prompt is empty (0 tokens)")
            if (positions == "all" or ig_steps) and len(corrupt) != len(prompt):
                raise CCAError(f"{where}: the corrupted prompt has {len(corrupt)} tokens and the prompt {len(prompt)}; "
                               + ("--positions all" if positions == "all" else "--ig-steps")
                               + " compares them position by position, so they must be as long")
        if positions == "target" and not target:
            raise CCAError(f"{where}: --positions target scores the positions predicting the target, and this "
                           "example has no target continuation: add a 'target' field, or use --positions last")
        out.append(Example(i, where, prompt, target, desired, undesired, corrupt))
    return out


def fingerprint(examples: Sequence[Example]) -> str:
    """sha256 of the token ids of every example (a resumed run must see the same data)."""
    import hashlib  # noqa: PLC0415

    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt_ids, e.target_ids, e.desired, e.undesired, e.corrupt_ids]).encode())
    return h.hexdigest()


# ---- batching -----------------------------------------------------------------------------------

@dataclass
class Batch:
    """Left-padded examples: prompt then target, the target ending in the last column.

    Attributes:
        input_ids, attention_mask, position_ids: ``LongTensor [B, T]``.
        prompt_end: ``LongTensor [B]``, column of each row's last prompt token.
        target_len: ``LongTensor [B]``.
        desired, undesired: ``LongTensor [B]`` (``logit_diff``) or ``None``.
        corrupt: ``(input_ids, attention_mask, position_ids)`` of the corrupted prompts (+ the same
            target), padded to the same ``T``, or ``None``.
        index: ``LongTensor [B]`` data-set index of each row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_end: torch.Tensor
    target_len: torch.Tensor
    desired: torch.Tensor | None
    undesired: torch.Tensor | None
    corrupt: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    index: torch.Tensor

    def inputs(self, corrupt: bool = False) -> dict[str, torch.Tensor]:
        ids, mask, pos = self.corrupt if corrupt else (self.input_ids, self.attention_mask, self.position_ids)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _pad(seqs: Sequence[Sequence[int]], T: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, T - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def make_batch(examples: Sequence[Example], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Left-pad ``examples`` into a :class:`Batch` on ``device``."""
    clean = [e.prompt_ids + e.target_ids for e in examples]
    corrupt = [e.corrupt_ids + e.target_ids for e in examples] if examples[0].corrupt_ids is not None else None
    T = max(len(s) for s in clean + (corrupt or []))
    ids, mask, pos = _pad(clean, T, pad_id)
    tl = torch.tensor([len(e.target_ids) for e in examples], dtype=torch.long)
    dev = torch.device(device)
    cor = tuple(t.to(dev) for t in _pad(corrupt, T, pad_id)) if corrupt is not None else None
    has_pair = examples[0].desired is not None
    return Batch(ids.to(dev), mask.to(dev), pos.to(dev), (T - 1 - tl).to(dev), tl.to(dev),
                 torch.tensor([e.desired for e in examples], device=dev) if has_pair else None,
                 torch.tensor([e.undesired for e in examples], device=dev) if has_pair else None,
                 cor, torch.tensor([e.index for e in examples], dtype=torch.long))
