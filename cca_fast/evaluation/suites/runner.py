"""Run the side-effect suites on a model and compare two runs (before / after a delta)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import torch

from cca_fast.errors import CCAError
from cca_fast.evaluation.suites.common import resolve_data_root
from cca_fast.evaluation.suites.loglik import LoglikConfig
from cca_fast.evaluation.suites.mmlu import evaluate_mmlu
from cca_fast.evaluation.suites.perplexity import evaluate_perplexity
from cca_fast.evaluation.suites.truthfulqa import evaluate_truthfulqa

SUITES = ("mmlu", "truthfulqa", "perplexity")
_ALIASES = {"ppl": "perplexity", "tqa": "truthfulqa", "truthful_qa": "truthfulqa"}


def parse_suites(names: Any) -> tuple[str, ...]:
    """Suite names from a tuple/list or a comma-separated string (``ppl`` = ``perplexity``)."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out = []
    for n in names:
        n = _ALIASES.get(n.strip().lower(), n.strip().lower())
        if n not in SUITES:
            raise CCAError(f"unknown side-effect suite {n!r}; choose from {', '.join(SUITES)}")
        if n not in out:
            out.append(n)
    if not out:
        raise CCAError(f"no side-effect suite selected; choose from {', '.join(SUITES)}")
    return tuple(out)


@dataclass
class SuiteConfig:
    """Settings of :func:`run_suites`.

    Attributes:
        data_root: folder with ``mmlu/``, ``truthfulqa/``, ``gsm8k/``; default ``$CCA_SHARED_DATA``,
            else ``../shared/data`` relative to the current directory.
        suites: which suites to run, in this order.
        mmlu_limit / truthfulqa_limit / ppl_limit: items per suite (``None``: all). MMLU takes a
            subset stratified over subjects, the others a seeded random subset.
        mmlu_shots: dev examples before each MMLU question (lm-eval: 5).
        truthfulqa_preamble: lm-eval's 6-question QA primer before each TruthfulQA question.
        ppl_context: condition the GSM8K solution on ``"Question: ...\\nAnswer:"``.
        ppl_strip_calculator: remove the ``<<a*b=c>>`` annotations from the solutions.
        batch_size: distinct model inputs per forward pass.
        seed: seed of every subset.
        logprob_dtype: ``"float32"`` or ``"float64"`` log-softmax.
        share_prefix: compute shared few-shot prefixes once per batch (same numbers, faster).
        progress: tqdm bars.
    """

    data_root: str | None = None
    suites: tuple[str, ...] = SUITES
    mmlu_limit: int | None = None
    truthfulqa_limit: int | None = None
    ppl_limit: int | None = None
    mmlu_shots: int = 5
    truthfulqa_preamble: bool = True
    ppl_context: bool = True
    ppl_strip_calculator: bool = True
    batch_size: int = 8
    seed: int = 0
    logprob_dtype: str = "float32"
    share_prefix: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        self.suites = parse_suites(self.suites)
        if self.data_root is not None:
            self.data_root = str(self.data_root)
        self.loglik()  # validates batch_size and logprob_dtype

    def loglik(self) -> LoglikConfig:
        return LoglikConfig(batch_size=self.batch_size, logprob_dtype=self.logprob_dtype,
                            share_prefix=self.share_prefix, progress=self.progress)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["suites"] = list(self.suites)
        return d


def _model_info(model: torch.nn.Module) -> dict[str, Any]:
    source = getattr(model, "cca_source", None)
    info = source.to_dict() if hasattr(source, "to_dict") else {
        "name": getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__}
    p = next(model.parameters())
    return {**info, "dtype": str(p.dtype).replace("torch.", ""), "device": str(p.device)}


def run_suites(model: torch.nn.Module, tokenizer: Any, config: SuiteConfig | None = None) -> dict[str, Any]:
    """Run the selected suites.

    Returns:
        ``{suite: {name, metric_name, metric, higher_is_better, n, details, per_item, seconds},
        ..., "meta": {config, data_root, model, versions}}`` (JSON-serialisable). ``per_item``
        rows carry an ``id`` that is stable across models, for :func:`compare`.
    Raises:
        DataError: a data file is missing (the message names it and what to pass).
    """
    config = config or SuiteConfig()
    root = resolve_data_root(config.data_root)
    ll = config.loglik()
    out: dict[str, Any] = {}
    for name in config.suites:
        t0 = time.perf_counter()
        if name == "mmlu":
            res = evaluate_mmlu(model, tokenizer, root, limit=config.mmlu_limit, seed=config.seed,
                                n_shots=config.mmlu_shots, loglik=ll)
        elif name == "truthfulqa":
            res = evaluate_truthfulqa(model, tokenizer, root, limit=config.truthfulqa_limit, seed=config.seed,
                                      preamble=config.truthfulqa_preamble, loglik=ll)
        else:
            res = evaluate_perplexity(model, tokenizer, root, limit=config.ppl_limit, seed=config.seed,
                                      context=config.ppl_context, strip_calculator=config.ppl_strip_calculator,
                                      loglik=ll)
        res.seconds = time.perf_counter() - t0
        out[name] = res.to_dict()
    import transformers

    from cca_fast.version import __version__
    out["meta"] = {"config": config.to_dict(), "data_root": str(root), "model": _model_info(model),
                   "versions": {"cca_fast": __version__, "torch": torch.__version__,
                                "transformers": transformers.__version__}}
    return out


def _ci(samples: np.ndarray, confidence: float) -> list[float]:
    lo = (1 - confidence) / 2
    return [float(np.quantile(samples, lo)), float(np.quantile(samples, 1 - lo))]


def _paired(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    a_by_id = {r["id"]: r for r in after.get("per_item") or []}
    pairs = [(r, a_by_id[r["id"]]) for r in before.get("per_item") or [] if r["id"] in a_by_id]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def compare(before: Mapping[str, Any], after: Mapping[str, Any], *, n_boot: int = 1000, seed: int = 0,
            confidence: float = 0.95) -> dict[str, Any]:
    """Deltas (after - before) of two :func:`run_suites` results, per suite present in both.

    Each entry has ``before``, ``after``, ``delta`` of the headline metric (each run on its own
    items) and, over the items both runs scored (matched by ``id``): ``n_paired`` and a paired
    ``delta_paired`` with a bootstrap ``ci`` (``n_boot`` resamples of the items, seeded).
    Accuracy suites add ``gained`` (wrong -> right) and ``lost`` (right -> wrong), MMLU a
    per-subject delta; perplexity reports ``delta_mean_nll`` (token-weighted, over paired items)
    and ``ppl_ratio`` = exp of it, with CIs.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for name in SUITES:
        if name not in before or name not in after:
            continue
        b, a = before[name], after[name]
        e: dict[str, Any] = {"metric_name": b["metric_name"], "higher_is_better": b["higher_is_better"],
                             "before": b["metric"], "after": a["metric"], "delta": a["metric"] - b["metric"],
                             "n_before": b["n"], "n_after": a["n"]}
        pb, pa = _paired(b, a)
        n = len(pb)
        e["n_paired"] = n
        idx = rng.integers(0, n, size=(n_boot, n)) if n else None
        if n and b["metric_name"] == "accuracy":
            xb = np.array([float(r["correct"]) for r in pb])
            xa = np.array([float(r["correct"]) for r in pa])
            d = xa - xb
            e.update(before_paired=float(xb.mean()), after_paired=float(xa.mean()), delta_paired=float(d.mean()),
                     gained=int((d > 0).sum()), lost=int((d < 0).sum()), ci=_ci(d[idx].mean(1), confidence))
        elif n and name == "perplexity":
            nb = np.array([r["nll"] for r in pb])
            na = np.array([r["nll"] for r in pa])
            tok = np.array([r["n_tokens"] for r in pb], dtype=float)
            if any(r1["n_tokens"] != r2["n_tokens"] for r1, r2 in zip(pb, pa)):
                e["warning"] = "token counts differ between the runs (different tokenizers?); paired deltas use before's"
            d = (na - nb)[idx].sum(1) / tok[idx].sum(1)
            dm = float((na - nb).sum() / tok.sum())
            e.update(delta_mean_nll=dm, delta_paired=dm, ci=_ci(d, confidence), ppl_ratio=float(np.exp(dm)),
                     ppl_ratio_ci=[float(np.exp(x)) for x in _ci(d, confidence)])
        if name == "mmlu":
            sb, sa = b["details"].get("per_subject", {}), a["details"].get("per_subject", {})
            e["per_subject_delta"] = {s: sa[s]["accuracy"] - sb[s]["accuracy"] for s in sorted(set(sb) & set(sa))}
        out[name] = e
    if not out:
        raise CCAError("the two results have no suite in common; compare outputs of run_suites")
    out["bootstrap"] = {"n_boot": n_boot, "seed": seed, "confidence": confidence}
    return out
