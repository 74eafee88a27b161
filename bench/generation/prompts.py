"""The prompts of the default run's base evaluation (what ``cca run``'s ``base_eval`` stage builds):
its 136 training and 102 test problems, the paper's 8-shot prompt, the embedded model's tokenizer."""
from __future__ import annotations

from typing import Any


def base_eval_prompts(tokenizer: Any) -> tuple[list[list[int]], list[Any]]:
    """``(token ids of every prompt, the problems)``, train then test, as the default run orders them."""
    from cca_fast.evaluation.prompting import build_prompt, encode_prompts
    from cca_fast.experiments.config import RunConfig
    try:
        from cca_fast.experiments.steps.data import make_splits, subset as _subset
    except ImportError:  # the baseline commit's layout
        from cca_fast.experiments.pipeline import _subset
        from cca_fast.experiments.stages import make_splits

    c = RunConfig()
    s = make_splits(c)
    problems = list(s.train) + list(_subset(s.test, c.max_test_problems, c.seed))
    ids = encode_prompts([build_prompt(p.question, c.prompt, tokenizer) for p in problems], tokenizer, c.prompt)
    return [list(x) for x in ids], problems
