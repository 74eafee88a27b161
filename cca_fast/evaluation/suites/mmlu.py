"""MMLU, k-shot multiple choice from local CSV files, prompted and scored as lm-eval-harness ``mmlu``.

Files: ``<root>/mmlu/dev/<subject>_dev.csv`` (the shots) and ``<root>/mmlu/test/<subject>_test.csv``,
header ``question,choice0,choice1,choice2,choice3,answer`` with ``answer`` in 0-3.

Prompt (lm-eval's ``mmlu`` task, ``first_n`` shots from dev)::

    The following are multiple choice questions (with answers) about <subject with spaces>.\\n\\n
    <shot question>\\nA. <c0>\\nB. <c1>\\nC. <c2>\\nD. <c3>\\nAnswer: <letter>\\n\\n     (x k)
    <question>\\nA. <c0>\\nB. <c1>\\nC. <c2>\\nD. <c3>\\nAnswer:

The four continuations ``" A"``, ``" B"``, ``" C"``, ``" D"`` are scored by summed log-likelihood;
the prediction is the argmax (the first on ties), accuracy = prediction == answer.
"""
from __future__ import annotations

import csv
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cca_fast.errors import DataError
from cca_fast.evaluation.suites.common import SuiteResult, check_limit, require_file
from cca_fast.evaluation.suites.loglik import LoglikConfig, LoglikStats, loglikelihood

LETTERS = ("A", "B", "C", "D")
HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


@dataclass(frozen=True)
class MMLUItem:
    """One question. ``id`` is ``"<subject>/<row index in the CSV>"``."""

    id: str
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int


def subject_title(subject: str) -> str:
    """``"high_school_physics"`` -> ``"high school physics"``."""
    return " ".join(subject.split("_"))


def read_csv(path: Path, subject: str) -> list[MMLUItem]:
    """The items of one MMLU CSV file.

    Raises:
        DataError: unreadable file, wrong header, or a row with a bad answer / column count.
    """
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read MMLU file {path}: {e}") from None
    if not rows or rows[0] != HEADER:
        raise DataError(f"{path}: expected the header {','.join(HEADER)}, got {','.join(rows[0]) if rows else 'nothing'}")
    items = []
    for i, row in enumerate(rows[1:]):
        if len(row) != 6 or row[5].strip() not in ("0", "1", "2", "3"):
            raise DataError(f"{path}:{i + 2}: expected 6 columns with answer 0-3, got {row!r:.200}")
        items.append(MMLUItem(f"{subject}/{i}", subject, row[0], tuple(row[1:5]), int(row[5])))  # type: ignore[arg-type]
    return items


def subjects(root: Path) -> list[str]:
    """Subjects with a test file under ``root/mmlu/test`` (sorted)."""
    d = root / "mmlu" / "test"
    names = sorted(p.name[:-len("_test.csv")] for p in d.glob("*_test.csv")) if d.is_dir() else []
    if not names:
        require_file(d / "<subject>_test.csv", "MMLU test")
    return names


def load(root: Path, split: str = "test") -> dict[str, list[MMLUItem]]:
    """``{subject: items}`` of ``split`` (``"test"`` or ``"dev"``) for every subject."""
    out = {}
    for s in subjects(root):
        path = require_file(root / "mmlu" / split / f"{s}_{split}.csv", f"MMLU {split}")
        out[s] = read_csv(path, s)
    return out


def format_question(item: MMLUItem, with_answer: bool = False) -> str:
    """``"<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"`` (+ ``" <letter>"`` for a shot)."""
    c = item.choices
    text = f"{item.question.strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    return text + f" {LETTERS[item.answer]}" if with_answer else text


def build_prompt(item: MMLUItem, shots: list[MMLUItem]) -> str:
    """Header, ``shots`` (each followed by a blank line), then the question ending ``"Answer:"``."""
    header = f"The following are multiple choice questions (with answers) about {subject_title(item.subject)}.\n\n"
    return header + "".join(format_question(s, True) + "\n\n" for s in shots) + format_question(item)


def stratified_subset(by_subject: dict[str, list[MMLUItem]], limit: int | None, seed: int) -> list[MMLUItem]:
    """``limit`` items taken round-robin over subjects (subject order and the order inside each
    subject shuffled with ``seed``), so a small limit covers as many subjects as it can; all items
    when ``limit`` is ``None``. Returned sorted by (subject, row)."""
    check_limit(limit, "MMLU")
    everything = [it for s in sorted(by_subject) for it in by_subject[s]]
    if limit is None or limit >= len(everything):
        return everything
    order = sorted(by_subject)
    random.Random(f"mmlu:{seed}").shuffle(order)
    pools = []
    for s in order:
        pool = list(by_subject[s])
        random.Random(f"mmlu:{seed}:{s}").shuffle(pool)
        pools.append(pool)
    picked: list[MMLUItem] = []
    depth = 0
    while len(picked) < limit:
        for pool in pools:
            if depth < len(pool):
                picked.append(pool[depth])
                if len(picked) == limit:
                    break
        depth += 1
    rank = {s: i for i, s in enumerate(sorted(by_subject))}
    return sorted(picked, key=lambda it: (rank[it.subject], int(it.id.rsplit("/", 1)[1])))


def requests_for(items: list[MMLUItem], dev: dict[str, list[MMLUItem]], n_shots: int) -> list[tuple[str, str]]:
    """4 ``(prompt, " <letter>")`` requests per item, in item order."""
    reqs = []
    for it in items:
        shots = dev.get(it.subject, [])
        if len(shots) < n_shots:
            raise DataError(f"MMLU subject {it.subject!r} has {len(shots)} dev examples, fewer than {n_shots} shots")
        prompt = build_prompt(it, shots[:n_shots])
        reqs.extend((prompt, f" {letter}") for letter in LETTERS)
    return reqs


def evaluate_mmlu(model: torch.nn.Module, tokenizer: Any, root: Path, *, limit: int | None = None, seed: int = 0,
                  n_shots: int = 5, loglik: LoglikConfig | None = None) -> SuiteResult:
    """Accuracy overall (micro: over questions) and per subject; ``details["macro_accuracy"]`` is
    the mean over the subjects present."""
    if not 0 <= n_shots <= 5:
        raise DataError(f"MMLU n_shots must be 0-5 (the dev split has 5 per subject), got {n_shots}")
    items = stratified_subset(load(root, "test"), limit, seed)
    dev = load(root, "dev") if n_shots else {}
    stats = LoglikStats()
    scores = loglikelihood(model, tokenizer, requests_for(items, dev, n_shots), loglik, stats=stats)
    per_item, per_subject = [], {}
    for k, it in enumerate(items):
        lps = [scores[4 * k + j].logprob for j in range(4)]
        pred = max(range(4), key=lambda j: (lps[j], -j))  # first maximum, as numpy's argmax
        correct = pred == it.answer
        per_item.append({"id": it.id, "subject": it.subject, "gold": it.answer, "pred": pred, "correct": correct,
                         "logprobs": lps})
        c, n = per_subject.get(it.subject, (0, 0))
        per_subject[it.subject] = (c + int(correct), n + 1)
    n = len(items)
    acc = sum(p["correct"] for p in per_item) / n if n else float("nan")
    subj = {s: {"accuracy": c / m, "n": m} for s, (c, m) in sorted(per_subject.items())}
    details = {"macro_accuracy": sum(v["accuracy"] for v in subj.values()) / len(subj) if subj else float("nan"),
               "per_subject": subj, "n_subjects": len(subj), "n_shots": n_shots, "limit": limit, "seed": seed,
               "scoring": "sum of log-probs of ' A'..' D' after the prompt; argmax (first on ties)",
               "work": asdict(stats)}
    return SuiteResult("mmlu", "accuracy", acc, True, n, details, per_item)
