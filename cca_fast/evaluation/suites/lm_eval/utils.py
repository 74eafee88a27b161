"""lm-eval-harness glue (loaded by lm-eval from this folder through ``!function utils.*``).

Each ``*_dataset`` function is a task's ``custom_dataset``: lm-eval calls it with the task's
metadata, i.e. the ``--model_args`` (``pretrained=...``) merged with ``--metadata`` JSON. Keys
read (same names as :class:`cca_fast.evaluation.suites.SuiteConfig`): ``data_root`` (default
``$CCA_SHARED_DATA``, else ``../shared/data``), ``seed`` (0), ``mmlu_limit``, ``mmlu_shots`` (5),
``truthfulqa_limit``, ``truthfulqa_preamble`` (true), ``ppl_limit``, ``ppl_context`` (true),
``ppl_strip_calculator`` (true); the perplexity task also reads ``tokenizer`` or ``pretrained``
(and ``add_bos_token``) to count solution tokens exactly as the suite does.

The documents are built by cca_fast's own suite code, so prompts, subsets and continuations are
identical to ``cca side-effects`` (cca_fast must be importable where lm-eval runs).
"""
from __future__ import annotations

from typing import Any

from cca_fast.errors import DataError
from cca_fast.evaluation.suites import mmlu, perplexity, truthfulqa
from cca_fast.evaluation.suites.common import resolve_data_root, seeded_subset
from cca_fast.evaluation.suites.loglik import encode_pair


def _limit(kw: dict[str, Any], key: str) -> int | None:
    v = kw.get(key)
    return None if v in (None, "", "all", "None") else int(v)


def _flag(kw: dict[str, Any], key: str, default: bool) -> bool:
    v = kw.get(key, default)
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes")


def _dataset(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import datasets

    return {"test": datasets.Dataset.from_list(rows)}


def mmlu_rows(**kw: Any) -> list[dict[str, Any]]:
    """Documents of ``cca_mmlu_local``: ``id, subject, prompt, answer``."""
    root = resolve_data_root(kw.get("data_root"))
    n_shots = int(kw.get("mmlu_shots", 5))
    items = mmlu.stratified_subset(mmlu.load(root, "test"), _limit(kw, "mmlu_limit"), int(kw.get("seed", 0)))
    dev = mmlu.load(root, "dev") if n_shots else {}
    prompts = [r[0] for r in mmlu.requests_for(items, dev, n_shots)[::4]]
    return [{"id": it.id, "subject": it.subject, "prompt": p, "answer": it.answer} for it, p in zip(items, prompts)]


def truthfulqa_rows(**kw: Any) -> list[dict[str, Any]]:
    """Documents of ``cca_truthfulqa_mc1_local``: ``id, prompt, choices`` (best answer first)."""
    root = resolve_data_root(kw.get("data_root"))
    items = seeded_subset(truthfulqa.load(root / "truthfulqa" / "TruthfulQA.csv"), _limit(kw, "truthfulqa_limit"),
                          int(kw.get("seed", 0)), "truthfulqa")
    pre = _flag(kw, "truthfulqa_preamble", True)
    return [{"id": it.id, "prompt": truthfulqa.build_prompt(it.question, pre),
             "choices": [c[1:] for c in truthfulqa.candidates(it)]}  # lm-eval adds the " " (target_delimiter)
            for it in items]


def gsm8k_ppl_rows(tokenizer: Any = None, **kw: Any) -> list[dict[str, Any]]:
    """Documents of ``cca_gsm8k_ppl_local``: ``id, context, continuation, n_tokens, n_bytes``
    (``n_tokens`` is -1 without a tokenizer)."""
    root = resolve_data_root(kw.get("data_root"))
    items = seeded_subset(perplexity.load(root / "gsm8k" / "test.jsonl"), _limit(kw, "ppl_limit"),
                          int(kw.get("seed", 0)), "gsm8k_ppl")
    ctx_on, strip = _flag(kw, "ppl_context", True), _flag(kw, "ppl_strip_calculator", True)
    add_bos = _flag(kw, "add_bos_token", False)
    rows = []
    for it in items:
        ctx, cont = perplexity.request_for(it, context=ctx_on, strip_calculator=strip)
        n_tok = len(encode_pair(tokenizer, ctx, cont, add_special_tokens=add_bos)[1]) if tokenizer is not None else -1
        rows.append({"id": it.id, "context": ctx, "continuation": cont, "n_tokens": n_tok,
                     "n_bytes": len(cont.encode("utf-8"))})
    return rows


def mmlu_dataset(**kw: Any) -> dict[str, Any]:
    return _dataset(mmlu_rows(**kw))


def truthfulqa_dataset(**kw: Any) -> dict[str, Any]:
    return _dataset(truthfulqa_rows(**kw))


def gsm8k_ppl_dataset(**kw: Any) -> dict[str, Any]:
    kw = dict(kw)
    name = kw.pop("tokenizer", None) or kw.get("pretrained")
    if not name:
        raise DataError("cca_gsm8k_ppl_local counts solution tokens with the model's tokenizer: run with "
                        "--model_args pretrained=DIR, or pass --metadata '{\"tokenizer\": \"DIR\"}'")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name), trust_remote_code=_flag(kw, "trust_remote_code", False))
    return _dataset(gsm8k_ppl_rows(tokenizer=tok, **kw))


def ppl_process_results(doc: dict[str, Any], results: list[Any]) -> dict[str, Any]:
    """Per-document values of the perplexity task's metrics (``results[0]`` is ``(ll, is_greedy)``)."""
    ll = float(results[0][0])
    return {"perplexity": (ll, doc["n_tokens"]), "nll": -ll, "bits_per_byte": (ll, doc["n_bytes"])}
