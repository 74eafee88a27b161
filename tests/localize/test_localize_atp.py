"""Stage 2 AtP (``cca_fast.stages.localize.atp``).

Tolerance 1e-12 absolute: every comparison is between two exact float64 autograd computations
of the same quantity (scores ~0.1 to 10) that differ only in summation order / batching.
"""
from __future__ import annotations

import pytest
import torch

from cca_fast.attribution import attribute
from cca_fast.errors import CCAError
from cca_fast.stages.examples import PivotExample, collate
from cca_fast.stages.localize import AtPConfig, dcm_loss, run_atp
from cca_fast.stages.localize.atp import check_examples, length_chunks
from cca_fast.models.components import ComponentSpace
from cca_fast.models import runtime
from helpers import examples, tiny

TOL = 1e-12


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_atp_sums_over_batches_independently_of_batch_size(arch):
    model = tiny(arch)
    ex = examples(arch, n=5)
    whole = attribute(model, collate(ex, pad_id=0)).scores
    for bs in (1, 2, 8):
        got = run_atp(model, ex, AtPConfig(batch_size=bs))
        assert got.n_batches == -(-len(ex) // bs)
        torch.testing.assert_close(got.scores, whole, rtol=0, atol=TOL)
    assert whole.abs().max() > 1e-2


def test_token_budget_splits_batches_and_keeps_the_scores():
    model = tiny("llama")
    ex = examples("llama", n=5)
    whole = attribute(model, collate(ex, pad_id=0)).scores
    longest = max(len(e.prefix_ids) for e in ex)
    for budget in (1, longest, 2 * longest + 1):
        got = run_atp(model, ex, AtPConfig(batch_size=8, max_batch_tokens=budget))
        want_chunks = length_chunks([len(e.prefix_ids) for e in ex], 8, budget)
        assert got.n_batches == len(want_chunks) > 1
        torch.testing.assert_close(got.scores, whole, rtol=0, atol=TOL)
    with pytest.raises(CCAError, match="max_batch_tokens"):
        AtPConfig(max_batch_tokens=0)


def test_length_chunks():
    lengths = [5, 3, 9, 3, 4, 20]
    assert length_chunks(lengths, 2) == [[1, 3], [4, 0], [2, 5]]
    # budget 10: (3, 3) -> 6 tokens; + 4 would be 12; (4, 5) -> 10; 9 alone; 20 alone (over the budget)
    assert length_chunks(lengths, 8, 10) == [[1, 3], [4, 0], [2], [5]]
    assert length_chunks([], 4, 10) == []
    for bs, budget in ((1, None), (3, 12), (8, 100)):
        chunks = length_chunks(lengths, bs, budget)
        assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
        assert all(len(c) <= bs and (budget is None or len(c) == 1 or len(c) * max(lengths[i] for i in c) <= budget)
                   for c in chunks)


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2", "gemma2"])
@pytest.mark.parametrize("mode", ["full", "last"])
def test_atp_is_half_the_dcm_mask_derivative_at_one_half(arch, mode):
    """At m = 0.5 the DCM scale 2m is 1 (the unmodified model), and d/dm = 2 d/ds: with
    lambda = 0 the DCM loss is -mean(logit diff), so d(sum logit diff)/dm = -B * grad."""
    model = tiny(arch)
    space = ComponentSpace(model)
    ex = examples(arch, n=4, seed=3)
    batch = collate(ex, pad_id=0)
    m = torch.full((space.total,), 0.5, dtype=torch.float64, requires_grad=True)
    loss, _, _ = dcm_loss(model, space, batch, m, 0.0, mode)
    loss.backward()
    d_sum_ld_dm = -len(ex) * m.grad
    atp = run_atp(model, ex).scores
    torch.testing.assert_close(atp, d_sum_ld_dm / 2, rtol=0, atol=TOL)
    assert atp.abs().max() > 1e-2


def test_progress_callback_and_kinds():
    model = tiny("llama")
    ex = examples("llama", n=5)
    seen = []
    res = run_atp(model, ex, AtPConfig(batch_size=2, kinds=("mlp",), backend="torch"), progress=seen.append)
    assert len(seen) == 3 and all("logit_diff" in s for s in seen)
    space = ComponentSpace(model)
    for (layer, kind), v in space.split(res.scores).items():
        assert (v.abs().max() > 0) == (kind == "mlp")


def test_pad_id_and_example_checks():
    model = tiny("llama")
    assert runtime.pad_id(model, explicit=5) == 5
    assert runtime.pad_id(model) == model.config.pad_token_id == 0
    model.config.pad_token_id = None
    assert runtime.pad_id(model) == model.config.eos_token_id
    with pytest.raises(CCAError, match="no pivot examples"):
        run_atp(model, [])
    with pytest.raises(CCAError, match="empty prefix"):
        check_examples([PivotExample("x", (), 3, 4)])
    with pytest.raises(CCAError, match="outside"):
        run_atp(model, [PivotExample("x", (3, 500), 3, 4)])
    with pytest.raises(CCAError, match="batch_size"):
        AtPConfig(batch_size=0)
