"""Held-out gold-solution log-likelihood: a continuous metric beside accuracy.

For each test problem: ``sum_j log p(target_j | prompt, target_<j)`` of its gold solution in the
exemplar style (:func:`~cca_fast.stages.sft.build_sft_examples`: the evaluation prompt, then the
solution stage 3's ``gold_nll`` trains on), teacher-forced. One forward per problem (batched),
through :func:`~cca_fast.evaluation.suites.loglik.loglikelihood_tokens`: the rows share the
pinned few-shot exemplar prefix, which runs once and is reused for every batch.

Why the few-shot prompt and not zero-shot: it is the context every test answer is generated in
and the one the update trains in, so the metric measures the distribution accuracy is drawn
from; with the prefix computed once, a problem costs only its own ~100 question and solution
tokens either way.

Per problem, so conditions are compared *paired* on the same problems
(:class:`~cca_fast.evaluation.stats.StratifiedBootstrap`): a per-problem log-likelihood differs
between two conditions on every problem, where accuracy differs on the few whose answer flips.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from torch import nn

from cca_fast.errors import CCAError


@dataclass(frozen=True)
class GoldLoglik:
    """One problem's gold-solution score: ``logprob`` (nats, summed over its ``n_tokens``
    target tokens)."""

    id: str
    template: str
    logprob: float
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gold_loglik_examples(model: nn.Module, examples: Sequence, *, batch_size: int = 16,
                         templates: Sequence[str] | None = None) -> list[GoldLoglik]:
    """:class:`GoldLoglik` of each :class:`~cca_fast.stages.sft.SFTExample` (``prompt_ids`` the
    context, ``target_ids`` the scored continuation), in order. No gradients; any device/dtype."""
    from cca_fast.evaluation.suites.loglik import LoglikConfig, loglikelihood_tokens

    if not examples:
        raise CCAError("no problems to score the gold-solution log-likelihood of")
    out = loglikelihood_tokens(model, [(e.prompt_ids, e.target_ids) for e in examples],
                               LoglikConfig(batch_size=batch_size))  # float64 models score in float64
    tpl = list(templates) if templates is not None else [""] * len(examples)
    return [GoldLoglik(str(e.id), str(t), float(r.logprob), int(r.n_tokens)) for e, t, r in zip(examples, tpl, out)]


def gold_loglik(model: nn.Module, tokenizer: Any, problems: Sequence, prompt, *, batch_size: int = 16) -> list[GoldLoglik]:
    """:class:`GoldLoglik` of each :class:`~cca_fast.data.problem.Problem` under ``prompt``
    (a :class:`~cca_fast.evaluation.prompting.PromptConfig`), in order."""
    from cca_fast.stages.sft import build_sft_examples

    examples = build_sft_examples(problems, tokenizer, prompt)
    return gold_loglik_examples(model, examples, batch_size=batch_size, templates=[p.template for p in problems])


def summarize_loglik(records: Sequence[GoldLoglik]) -> dict[str, float]:
    """``{"mean_logprob": per-problem mean (nats), "per_token": sum / tokens, "n": problems}``."""
    if not records:
        return {"mean_logprob": float("nan"), "per_token": float("nan"), "n": 0}
    tot = sum(r.logprob for r in records)
    return {"mean_logprob": tot / len(records), "per_token": tot / max(1, sum(r.n_tokens for r in records)),
            "n": len(records)}
