"""Held-out gold-solution log-likelihood (``cca_fast.evaluation.gold_loglik``): equal to a naive
per-problem teacher-forced sum of log-probs, one float64 forward per problem, no padding."""
from __future__ import annotations

import pytest
import torch

from cca_fast.errors import CCAError
from cca_fast.evaluation.gold_loglik import gold_loglik_examples, summarize_loglik
from cca_fast.stages.sft import SFTExample
from helpers import VOCAB, tiny


def naive(model, e: SFTExample) -> float:
    ids = torch.tensor([list(e.prompt_ids) + list(e.target_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    P = len(e.prompt_ids)
    return float(sum(logp[P - 1 + j, t] for j, t in enumerate(e.target_ids)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gold_loglik_equals_a_naive_teacher_forced_sum(arch):
    g = torch.Generator().manual_seed(4)
    shared = torch.randint(3, VOCAB, (20,), generator=g).tolist()  # a common exemplar prefix: it is shared
    exs = []
    for i in range(7):
        own = torch.randint(3, VOCAB, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        tgt = torch.randint(3, VOCAB, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
        exs.append(SFTExample(tuple(shared + own), tuple(tgt), f"p{i}"))
    model = tiny(arch)
    got = gold_loglik_examples(model, exs, batch_size=3, templates=[f"t{i % 2}" for i in range(7)])
    assert [r.id for r in got] == [e.id for e in exs] and [r.template for r in got] == [f"t{i % 2}" for i in range(7)]
    for r, e in zip(got, exs):
        assert r.n_tokens == len(e.target_ids)
        # float64 model: padding, the shared prefix and batching change only the summation order
        assert r.logprob == pytest.approx(naive(model, e), rel=1e-10, abs=1e-10)
    s = summarize_loglik(got)
    assert s["n"] == 7 and s["mean_logprob"] == pytest.approx(sum(r.logprob for r in got) / 7)
    with pytest.raises(CCAError, match="no problems"):
        gold_loglik_examples(model, [])
