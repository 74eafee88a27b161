"""One side of the generation benchmark, run in its own process: whichever ``cca_fast`` is first on
``sys.path`` (the benchmark runs today's decoder from a checkout of the baseline commit through
``PYTHONPATH``, the new one from this tree), or transformers' own ``generate`` with a static cache.

    python bench/generation/side.py JOB.json OUT.json

``JOB.json``: ``{"mode": "eval" | "generate" | "hf", ...}``:

* ``eval``: the default run's base evaluation as the ``base_eval`` stage runs it (``eval_parts`` as
  ``base_eval_records`` calls it: train and test decoded together; ``eval_resumable`` on each in turn in versions without it; a fresh ``PrefixCache`` as the run has), ``"limit"`` problems at most;
* ``generate``: ``generate`` on ``"prompts"`` with the default run's decoding settings updated by
  ``"config"`` (fields the checked-out version lacks are dropped), ``"seeds"`` for sampling;
* ``hf``: ``model.generate(cache_implementation="static")``, greedy, left-padded batches of
  ``"batch_size"``, each row stopped after ``"lengths"[i]`` new tokens (a per-row stopping
  criterion), so that it produces the same number of tokens as the decoder it is compared to.

``OUT.json``: ``{"seconds", "outputs": [token ids per row], "cca_fast": path of the package}``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _model():
    from cca_fast.models.loading import load_model

    model, tok = load_model(None)
    return model.eval(), tok


def _gen_config(overrides: dict):
    from cca_fast.experiments.config import RunConfig, procedure_settings

    gen = procedure_settings(RunConfig()).generation
    names = {f.name for f in dataclasses.fields(gen)}
    return dataclasses.replace(gen, **{k: v for k, v in overrides.items() if k in names})


def run_eval(job: dict) -> dict:
    from prompts import base_eval_prompts

    from cca_fast.experiments.config import RunConfig
    from cca_fast.experiments.pipeline import eval_resumable
    from cca_fast.generation.prefix import PrefixCache

    model, tok = _model()
    _, problems = base_eval_prompts(tok)
    problems = problems[: job.get("limit") or len(problems)]
    n_train = min(job.get("n_train", 136), len(problems))
    gen, c = _gen_config(job.get("config", {})), RunConfig()
    cache = PrefixCache()
    try:  # the stage decodes both splits together (base_eval_records: one sequence of chunks, one tail)
        from cca_fast.experiments.steps.evaluation import EvalPart, eval_parts
    except ImportError:  # a version that evaluates them one after the other
        eval_parts = None
    t0 = time.perf_counter()
    if eval_parts is not None:  # as base_eval_records, with the test split's token ids kept for the comparison
        train, test = eval_parts(model, tok, [EvalPart(problems[:n_train], None, "train"),
                                              EvalPart(problems[n_train:], None, "test")], c.prompt, gen,
                                 progress=False, prefix_cache=cache)
        recs = train + test
    else:
        recs = eval_resumable(model, tok, problems[:n_train], c.prompt, gen, None, "train", False, prefix_cache=cache)
        if n_train < len(problems):
            recs += eval_resumable(model, tok, problems[n_train:], c.prompt, gen, None, "test", False,
                                   prefix_cache=cache)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "outputs": [r["output_ids"] for r in recs], "correct": [bool(r["correct"]) for r in recs]}


def timed_generate(model, tok, prompts: list[list[int]], cfg, seeds: list[int] | None = None,
                   stats: Any = None) -> tuple[float, list[list[int]]]:
    """``(seconds, token ids per row)`` of one ``generate`` call with a fresh ``PrefixCache``,
    after a 2-token warm-up on the first prompt (``stats``: a ``GenerationStats`` to fill)."""
    from cca_fast.generation import generate
    from cca_fast.generation.prefix import PrefixCache

    generate(model, tok, prompts[:1], dataclasses.replace(cfg, max_new_tokens=2))  # warm-up
    extra = {} if stats is None else {"stats": stats}
    t0 = time.perf_counter()
    gens = generate(model, tok, prompts, cfg, row_seeds=seeds, prefix_cache=PrefixCache(), **extra)
    return time.perf_counter() - t0, [g.output_ids for g in gens]


def run_generate(job: dict) -> dict:
    model, tok = _model()
    secs, outputs = timed_generate(model, tok, job["prompts"], _gen_config(job.get("config", {})), job.get("seeds"))
    return {"seconds": secs, "outputs": outputs}


def hf_generate(model, tok, prompts: list[list[int]], lengths: list[int], batch_size: int = 8) -> list[list[int]]:
    """``model.generate(cache_implementation="static")``, greedy, left-padded batches of
    ``batch_size`` (longest prompts first), row ``i`` stopped after ``lengths[i]`` new tokens."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    outputs: list[list[int]] = [[] for _ in prompts]

    class RowLengths(StoppingCriteria):
        def __init__(self, start: int, want: list[int]):
            self.start, self.want = start, torch.tensor(want)

        def __call__(self, input_ids, scores, **kw):
            return (input_ids.shape[1] - self.start) >= self.want

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        S = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), S), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(rows):
            ids[j, S - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[j, S - len(prompts[i]):] = 1
        want = [lengths[i] for i in rows]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max(want),
                                 cache_implementation="static", pad_token_id=pad, eos_token_id=None,
                                 stopping_criteria=StoppingCriteriaList([RowLengths(S, want)]))
        for j, i in enumerate(rows):
            outputs[i] = out[j, S:S + want[j]].tolist()
    return outputs


def run_hf(job: dict) -> dict:
    model, tok = _model()
    t0 = time.perf_counter()
    outputs = hf_generate(model, tok, job["prompts"], job["lengths"], job.get("batch_size", 8))
    secs = time.perf_counter() - t0
    return {"seconds": secs, "outputs": outputs}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    torch.manual_seed(0)
    res = {"eval": run_eval, "generate": run_generate, "hf": run_hf}[job["mode"]](job)
    import cca_fast

    res["cca_fast"] = str(Path(cca_fast.__file__).parent)
    Path(sys.argv[2]).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
