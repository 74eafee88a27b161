"""Accuracy of a model on word problems (docs/method.md section 0): few-shot prompt, greedy decoding with
the answer-sentence stop, the paper's answer extractor, exact float match, accuracy per template
averaged over templates."""
from __future__ import annotations

import dataclasses

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cca_fast.data.problem import Problem
from cca_fast.errors import CCAError
from cca_fast.models.lengths import check_generation_fits
from cca_fast.generation.decode import Generation, GenerationConfig, GenerationStats, generate
from cca_fast.evaluation.prompting import (PromptConfig, build_prompt, encode_prompts, extract_answer, is_correct,
                                          paper_stops)


@dataclass
class EvalResult:
    """Evaluation outcome.

    Attributes:
        accuracy: mean over templates of the per-template accuracy (docs/method.md: "per template,
            averaged"); problems without a template form one group ``""``.
        micro_accuracy: correct / n over all problems.
        n: number of problems.
        per_template: ``{template: {"n", "correct", "accuracy"}}``.
        records: one dict per problem: ``id, template, question, gold, output, prediction,
            correct, finish_reason, n_generated``.
        seconds: wall time of the evaluation.
        generated_tokens: total new tokens.
        meta: free-form JSON-serialisable context (configs, model name) saved with the result.
    """

    accuracy: float
    micro_accuracy: float
    n: int
    per_template: dict[str, dict[str, Any]]
    records: list[dict[str, Any]]
    seconds: float = 0.0
    generated_tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``meta`` entries are merged at the top level)."""
        d = {"accuracy": self.accuracy, "micro_accuracy": self.micro_accuracy, "n": self.n,
             "per_template": self.per_template, "seconds": self.seconds,
             "generated_tokens": self.generated_tokens}
        d.update(self.meta)
        d["records"] = self.records
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EvalResult":
        known = {"accuracy", "micro_accuracy", "n", "per_template", "records", "seconds", "generated_tokens"}
        try:
            return cls(accuracy=float(d["accuracy"]), micro_accuracy=float(d["micro_accuracy"]), n=int(d["n"]),
                       per_template=dict(d["per_template"]), records=list(d["records"]),
                       seconds=float(d.get("seconds", 0.0)), generated_tokens=int(d.get("generated_tokens", 0)),
                       meta={k: v for k, v in d.items() if k not in known})
        except (KeyError, TypeError, ValueError) as e:
            raise CCAError(f"not an evaluation result ({e!r}); expected the JSON written by `cca eval`") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (temporary file + ``os.replace``)."""
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalResult":
        p = Path(path)
        try:
            return cls.from_json(json.loads(p.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise CCAError(f"evaluation result not found: {p}") from None
        except json.JSONDecodeError as e:
            raise CCAError(f"{p} is not valid JSON: {e}") from None

    def summary(self) -> str:
        """One line: accuracy, micro accuracy, counts, time."""
        correct = sum(1 for r in self.records if r["correct"])
        return (f"accuracy {self.accuracy:.4f} (per-template mean over {len(self.per_template)} templates), "
                f"micro {self.micro_accuracy:.4f} ({correct}/{self.n}), {self.generated_tokens} tokens "
                f"in {self.seconds:.1f}s")


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON atomically (see :func:`cca_fast.io.atomic_write_json`)."""
    from cca_fast.io import atomic_write_json

    atomic_write_json(path, data)
    return Path(path)


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (per template, averaged: docs/method.md section 0), micro accuracy, ``n`` and the
    per-template table ``{template: {n, correct, accuracy}}`` of scored records."""
    per: dict[str, dict[str, Any]] = {}
    for r in records:
        t = per.setdefault(r.get("template", ""), {"n": 0, "correct": 0})
        t["n"] += 1
        t["correct"] += int(bool(r["correct"]))
    for t in per.values():
        t["accuracy"] = t["correct"] / t["n"]
    n = len(records)
    return {
        "accuracy": sum(t["accuracy"] for t in per.values()) / len(per) if per else 0.0,
        "micro_accuracy": sum(int(bool(r["correct"])) for r in records) / n if n else 0.0,
        "n": n,
        "per_template": dict(sorted(per.items())),
    }


def score(problems: Sequence[Problem], generations: Sequence[Generation]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], float, float]:
    """Records, per-template table, macro accuracy and micro accuracy of ``generations``
    (aligned with ``problems``)."""
    records: list[dict[str, Any]] = []
    for p, g in zip(problems, generations):
        pred = extract_answer(g.text)
        ok = is_correct(pred, p.gold)
        records.append({"id": p.id, "template": p.template, "question": p.question, "gold": p.gold,
                        "output": g.text, "prediction": pred, "correct": ok,
                        "finish_reason": g.finish_reason, "n_generated": g.n_generated})
    summary = summarize(records)
    return records, summary["per_template"], summary["accuracy"], summary["micro_accuracy"]


def evaluate(model: Any, tokenizer: Any, problems: Sequence[Problem], *, prompt: PromptConfig | None = None,
             generation: GenerationConfig | None = None, progress: bool = True,
             stats: GenerationStats | None = None) -> EvalResult:
    """Greedy (or as configured) few-shot evaluation of ``model`` on ``problems``.

    Args:
        problems: the problems (their ``gold`` and ``template`` are used).
        prompt: how to build prompts (default: the paper's plain 8-shot prompt).
        generation: decoding settings (default: greedy); without ``stops`` of its own, the
            paper's stops of docs/method.md section 0 (:func:`~cca_fast.evaluation.prompting.paper_stops`).
        progress: show a tqdm bar over problems.
        stats: token counters to accumulate into.
    Returns:
        :class:`EvalResult` with ``meta`` holding the prompt and generation configs.
    """
    if not problems:
        raise CCAError("no problems to evaluate; check the data source, split and --limit")
    prompt = prompt or PromptConfig()
    generation = generation or GenerationConfig()
    if not generation.stops:  # the paper prompt's stops (docs/method.md section 0) unless the caller chose others
        generation = dataclasses.replace(generation, stops=paper_stops())
    stats = stats if stats is not None else GenerationStats()
    texts = [build_prompt(p.question, prompt, tokenizer) for p in problems]
    ids = encode_prompts(texts, tokenizer, prompt)
    check_generation_fits(model, [len(x) for x in ids], generation.max_new_tokens, generation.batch_size,
                          names=[f"problem {p.id}" for p in problems], where="evaluation")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(problems), desc="eval", unit="problem")
    t0 = time.perf_counter()
    before = stats.generated_tokens
    try:
        gens = generate(model, tokenizer, ids, generation, stats=stats,
                        callback=(lambda rows, _: bar.update(len(rows))) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    records, per, macro, micro = score(problems, gens)
    return EvalResult(accuracy=macro, micro_accuracy=micro, n=len(records), per_template=per, records=records,
                      seconds=seconds, generated_tokens=stats.generated_tokens - before,
                      meta={"prompt_config": prompt.to_dict(), "generation_config": generation.to_dict()})
