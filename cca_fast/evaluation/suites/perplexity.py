"""Perplexity of held-out GSM8K solutions (``<root>/gsm8k/test.jsonl``).

Each item is scored as the continuation ``" <solution>"`` of the context
``"Question: <question>\\nAnswer:"`` (with ``context=False``: the solution alone, after one
BOS/EOS prefix token). ``<solution>`` is the ``answer`` field with its calculator annotations
``<<48/2=24>>`` removed (``strip_calculator=True``, the default; they are not natural text) and
ending ``#### N``.

Metric: token-weighted mean NLL over all solution tokens, ``mean_nll = sum(nll) / sum(tokens)``,
and ``perplexity = exp(mean_nll)``. ``details`` also has ``nll_per_item_mean`` (mean of the
items' summed NLL) and ``bits_per_byte`` (``sum(nll) / ln 2 / sum(UTF-8 bytes)``), the two
numbers the lm-eval task ``cca_gsm8k_ppl_local`` reports (lm-eval knows no token counts).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cca_fast.errors import DataError
from cca_fast.evaluation.suites.common import SuiteResult, require_file, seeded_subset
from cca_fast.evaluation.suites.loglik import LoglikConfig, LoglikStats, loglikelihood

CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class SolutionItem:
    """One GSM8K test problem. ``id`` is ``"gsm8k/<line index>"``."""

    id: str
    question: str
    answer: str


def load(path: Path) -> list[SolutionItem]:
    """Every problem of a GSM8K JSONL file, in file order.

    Raises:
        DataError: missing file, malformed line, or a line without ``question`` / ``answer``.
    """
    require_file(path, "GSM8K")
    items = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                items.append(SolutionItem(f"gsm8k/{i}", str(rec["question"]).strip(), str(rec["answer"]).strip()))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{i + 1}: expected a JSON object with question and answer ({e})") from None
    return items


def clean_solution(answer: str, strip_calculator: bool = True) -> str:
    """The solution text as scored (calculator annotations removed when asked)."""
    return CALCULATOR.sub("", answer) if strip_calculator else answer


def request_for(item: SolutionItem, *, context: bool = True, strip_calculator: bool = True) -> tuple[str, str]:
    """``("Question: <q>\\nAnswer:", " <solution>")``, or ``("", "<solution>")`` without context."""
    sol = clean_solution(item.answer, strip_calculator)
    return (f"Question: {item.question}\nAnswer:", f" {sol}") if context else ("", sol)


def evaluate_perplexity(model: torch.nn.Module, tokenizer: Any, root: Path, *, limit: int | None = None,
                        seed: int = 0, context: bool = True, strip_calculator: bool = True,
                        loglik: LoglikConfig | None = None) -> SuiteResult:
    """Token-weighted perplexity of the solutions of a seeded subset of ``limit`` problems."""
    items = seeded_subset(load(root / "gsm8k" / "test.jsonl"), limit, seed, "gsm8k_ppl")
    reqs = [request_for(it, context=context, strip_calculator=strip_calculator) for it in items]
    cfg = LoglikConfig(**{**asdict(loglik or LoglikConfig()), "share_prefix": False})  # nothing long is shared
    stats = LoglikStats()
    scores = loglikelihood(model, tokenizer, reqs, cfg, stats=stats)
    per_item = [{"id": it.id, "nll": -s.logprob, "n_tokens": s.n_tokens, "n_bytes": len(r[1].encode("utf-8"))}
                for it, s, r in zip(items, scores, reqs)]
    tot_nll = sum(p["nll"] for p in per_item)
    tot_tok = sum(p["n_tokens"] for p in per_item)
    tot_bytes = sum(p["n_bytes"] for p in per_item)
    n = len(items)
    mean_nll = tot_nll / tot_tok if tot_tok else float("nan")
    details = {"mean_nll": mean_nll, "n_tokens": tot_tok, "nll_per_item_mean": tot_nll / n if n else float("nan"),
               "bits_per_byte": tot_nll / math.log(2) / tot_bytes if tot_bytes else float("nan"),
               "context": "Question: <question>\\nAnswer:" if context else None,
               "strip_calculator": strip_calculator, "limit": limit, "seed": seed, "work": asdict(stats)}
    return SuiteResult("perplexity", "perplexity", math.exp(mean_nll) if tot_tok else float("nan"), False, n,
                       details, per_item)
