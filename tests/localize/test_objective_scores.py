"""Selectors scored on the training objective (``cca_fast.stages.localize.objective_scores``), the
per-kind budgets and anti-selections, and the layer-matched random control: each score equals a
literal float64 loop over examples and component rows on a tiny model."""
from __future__ import annotations

import argparse

import pytest
import torch

from cca_fast import checks
from cca_fast.errors import CCAError
from cca_fast.models.adapters import KINDS
from cca_fast.models.components import ComponentSpace
from cca_fast.stages.localize.objective_scores import gold_gradient_scores, movement_scores
from cca_fast.stages.localize.select import kind_budget_counts, select_per_kind, select_random
from cca_fast.stages.sft import SFTExample
from cca_fast.stages.update import UpdateConfig
from helpers import VOCAB, tiny


def gold_examples(n: int = 4, seed: int = 0) -> list[SFTExample]:
    """Examples of odd lengths: prompts 3..8 tokens, targets 2..5."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        t = torch.randint(3, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        out.append(SFTExample(tuple(p), tuple(t), f"g{i}"))
    return out


def naive_nll(model, e: SFTExample) -> torch.Tensor:
    """Summed NLL of the target tokens: the whole sequence, one forward, no padding."""
    ids = torch.tensor([list(e.prompt_ids) + list(e.target_ids)])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    P = len(e.prompt_ids)
    return -sum(logp[P - 1 + j, t] for j, t in enumerate(e.target_ids))


def per_component(space, model, tensors: dict[str, torch.Tensor], elementwise) -> torch.Tensor:
    """For every component, ``sum over its owned slices of elementwise(tensor slice, weight slice)``."""
    params = dict(model.named_parameters())
    out = torch.zeros(space.total, dtype=torch.float64)
    for flat, c in enumerate(space):
        for ws in space.owned_slices(c):
            sl = [slice(None)] * params[ws.param].dim()
            sl[ws.dim] = slice(ws.start, ws.stop)
            out[flat] += float(elementwise(tensors[ws.param][tuple(sl)], params[ws.param].detach()[tuple(sl)]).sum())
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases are owned rows too
def test_fisher_and_grad_weight_equal_a_loop_over_examples_and_rows(arch):
    model = tiny(arch)
    space = ComponentSpace(model)
    gold = gold_examples()
    T = sum(len(e.target_ids) for e in gold)
    params = dict(model.named_parameters())
    base = {n: p.detach().clone() for n, p in params.items()}
    owned = sorted({ws.param for c in space for ws in space.owned_slices(c)})
    fisher_t = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in owned}
    gsum = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in owned}
    for e in gold:
        grads = torch.autograd.grad(naive_nll(model, e) / T, [params[n] for n in owned])
        for n, g in zip(owned, grads):
            fisher_t[n] += g.double() ** 2
            gsum[n] += g.double()
    ref_fisher = per_component(space, model, fisher_t, lambda t, w: t)
    ref_gw = per_component(space, model, gsum, lambda t, w: (t * w).abs())

    got = gold_gradient_scores(model, gold, space, pad_id=0)
    assert got["fisher"].dtype == torch.float64 and got["fisher"].shape == (space.total,)
    # float64 throughout; only the summation order differs
    torch.testing.assert_close(got["fisher"], ref_fisher, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got["grad-weight"], ref_gw, rtol=1e-10, atol=1e-14)
    assert (ref_fisher > 0).all()  # every component is on the loss's path: the test can tell them apart
    for n, p in model.named_parameters():  # scoring changes no weight, leaves no gradient, restores the flags
        assert torch.equal(p.detach(), base[n]) and p.grad is None and p.requires_grad


def test_movement_of_one_sgd_step_is_lr_times_the_gradient_and_the_model_is_reset():
    model = tiny("llama")
    space = ComponentSpace(model)
    gold = gold_examples(3, seed=1)
    T = sum(len(e.target_ids) for e in gold)
    params = dict(model.named_parameters())
    base = {n: p.detach().clone() for n, p in params.items()}
    owned = sorted({ws.param for c in space for ws in space.owned_slices(c)})
    loss = sum(naive_nll(model, e) for e in gold) / T
    grads = dict(zip(owned, torch.autograd.grad(loss, [params[n] for n in owned])))
    lr = 0.05
    ref = per_component(space, model, grads, lambda t, w: lr * t.abs())  # W1 - W0 = -lr g
    got = movement_scores(model, gold, space, UpdateConfig(optimizer="sgd", lr=lr, max_steps=1, batch_size=2,
                                                           mode="reference"))
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-15)  # float64; one subtraction's rounding
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), base[n]), f"{n} not reset to the base"


def test_objective_scores_need_gold():
    model = tiny("llama")
    with pytest.raises(CCAError, match="gold solutions"):
        gold_gradient_scores(model, [])


@pytest.fixture(scope="module")
def space():
    return ComponentSpace(tiny("llama"))  # 2 layers x (6 q + 2 k + 2 v + 22 mlp)


def test_per_kind_budget_counts_ranking_and_anti(space):
    scores = torch.randn(space.total, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    budget = {"q": 0.25, "k": 0.5, "mlp": 0.1}  # 12 q -> 3, 4 k -> 2, 0 v, 44 mlp -> 4
    counts = kind_budget_counts(space, budget)
    assert counts == {"q": 3, "k": 2, "v": 0, "mlp": 4}
    top = select_per_kind(scores, space, budget, method="fisher")
    anti = select_per_kind(scores, space, budget, method="fisher", anti=True)
    assert top.counts == counts and anti.counts == counts
    assert top.method == "fisher" and anti.method == "fisher-anti"
    comps = list(space)
    for kind in KINDS:
        idx = [i for i, c in enumerate(comps) if c.kind == kind]
        ranked = sorted(idx, key=lambda i: -float(scores[i]))  # literal per-kind ranking
        n = counts[kind]
        assert sorted(i for i in top.indices if comps[i].kind == kind) == sorted(ranked[:n])
        assert sorted(i for i in anti.indices if comps[i].kind == kind) == sorted(ranked[len(ranked) - n:])
    assert not set(top.indices) & set(anti.indices)


def test_per_kind_same_fraction_is_that_share_of_component_parameters(space):
    sel = select_per_kind(torch.arange(space.total, dtype=torch.float64), space, {k: 0.5 for k in KINDS})
    rows = space.owned_rows(sel.indices)
    every = space.owned_rows(range(space.total))
    model = tiny("llama")
    p = dict(model.named_parameters())
    n_sel = sum(r.index.numel() * p[n].numel() // p[n].shape[r.dim] for n, r in rows.items())
    n_all = sum(r.index.numel() * p[n].numel() // p[n].shape[r.dim] for n, r in every.items())
    assert n_sel * 2 == n_all  # every count even here: exactly half


@pytest.mark.parametrize("bad, match", [({}, "must map kinds"), ({"x": 0.1}, "unknown kind 'x'"),
                                        ({"q": 1.5}, r"in \[0, 1\]"), ({"q": 0.0}, "selects nothing"),
                                        ({"q": float("nan")}, "finite")])
def test_kind_budget_errors(space, bad, match):
    with pytest.raises(CCAError, match=match):
        kind_budget_counts(space, bad)


def test_kind_budget_arg_parsing():
    assert checks.kind_budget_arg("q=0.05,k=0.05,v=0.05,mlp=0.01") == {"q": 0.05, "k": 0.05, "v": 0.05, "mlp": 0.01}
    assert checks.kind_budget_arg("0.01") == {k: 0.01 for k in KINDS}
    for bad in ("q0.05", "q=0.1,q=0.2", "q=nan", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            checks.kind_budget_arg(bad)


def test_random_matched_per_layer_and_kind_reproducible(space):
    like = select_per_kind(torch.randn(space.total, generator=torch.Generator().manual_seed(0)), space,
                           {"q": 0.5, "k": 0.5, "v": 0.25, "mlp": 0.2})
    want = space.layer_kind_counts(like.indices)
    draws = [select_random(space, like, seed=s, match_layers=True) for s in range(4)]
    for d in draws:
        assert space.layer_kind_counts(d.indices) == want and d.params["match_layers"]
    assert select_random(space, like, seed=2, match_layers=True).indices == draws[2].indices  # from its seed
    assert len({tuple(d.indices) for d in draws}) > 1  # seeds differ
    kinds_only = select_random(space, like, seed=0)
    assert kinds_only.counts == like.counts
    assert select_random(space, want, seed=2, match_layers=True).indices == draws[2].indices  # from the counts
    with pytest.raises(CCAError, match="match_layers needs"):
        select_random(space, 5, match_layers=True)
    with pytest.raises(CCAError, match="match_layers needs"):
        select_random(space, {"q": [7, 0]}, match_layers=True)  # 7 > 6 q heads per layer
