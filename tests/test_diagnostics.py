"""Update diagnostics (:mod:`cca_fast.experiments.diagnostics`) on tiny float64 models.

Padded float64 batches use SDPA attention (eager float64 attention turns fully masked padding rows
into NaN); llama (separate q/k/v, gate/up) and gpt2 (fused Conv1D, rows along dim 1, biases) cover
both row layouts. GPT-2 (LayerNorm, learned positions) is float64 end to end; Llama-like models
compute RMSNorm in float32 even for a float64 model, so two different batchings of the same
forward agree only to ~1e-7 relative there, and a finite difference is only possible on GPT-2.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from cca_fast import ComponentSpace
from cca_fast.stages.sft import SFTExample, sft_nll
from cca_fast.delta import bitwise_equal
from cca_fast.errors import CCAError
from cca_fast.experiments import diagnostics as dg
from cca_fast.stages.examples import PivotExample, collate, logit_diff
from helpers import VOCAB, make_tiny

ARCHS = ["llama", "gpt2"]

#: |difference| allowed between two batchings of the same float64 forward (module docstring):
#: summation order only for GPT-2; float32 RMSNorm rounding (~1e-7 relative on values ~1) for Llama.
BATCHING_TOL = {"gpt2": 1e-10, "llama": 1e-6}


def _model(arch):
    return make_tiny(arch, dtype=torch.float64, attn="sdpa")


def _examples(n=6, seed=0):
    """``n`` pivots sharing an 18-token prompt (over ``collate_for_loss``'s 16-token minimum, so
    mini-batches run their common prefix once), trace parts of 1 to 5 tokens."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, VOCAB, (18,), generator=g).tolist()
    out = []
    for i in range(n):
        trace = torch.randint(3, VOCAB, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        d, u = (torch.randperm(VOCAB - 3, generator=g)[:2] + 3).tolist()
        out.append(PivotExample(f"p{i}", tuple(prompt + trace), d, u, direction="greedy_correct" if i % 2 else
                                "greedy_wrong", method="branching", meta={"t": len(trace)}))
    return out


def _selection(space):
    o = space.offset
    return sorted({o(0, "q") + 1, o(1, "k") + 0, o(0, "v") + 1, o(0, "mlp") + 2, o(1, "mlp") + space.counts["mlp"] - 1})


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_unchanged(model, before, flags=None):
    for n, p in model.named_parameters():
        assert bitwise_equal(p.detach(), before[n]), f"{n} changed"
        assert p.grad is None, f"{n} has a .grad left"
        if flags is not None:
            assert p.requires_grad == flags[n], f"{n} requires_grad flag changed"


@torch.no_grad()
def _ld(model, e):
    b = collate([e], 0)
    return float(logit_diff(model(**b.model_inputs()).logits[:, -1], b.desired, b.undesired)[0])


def _direction_step(model, plan, base_rows, v):
    """Selected rows <- base rows + v (flat, plan order), literally."""
    params = dict(model.named_parameters())
    off = 0
    with torch.no_grad():
        for n, s in plan.items():
            b = base_rows[n]
            params[n].index_copy_(s.dim, s.index, b + v[off:off + b.numel()].view(b.shape))
            off += b.numel()
    assert off == v.numel()


def test_per_example_gradient_matches_finite_difference():
    model, ex = _model("gpt2"), _examples(4)
    space = ComponentSpace(model)
    sel = _selection(space)
    before = _state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    G = dg.per_example_gradients(model, space, ex, sel)
    _assert_unchanged(model, before, flags)
    assert G.dtype == torch.float64 and G.shape == (4, dg.row_count(model, space, sel))
    plan = space.owned_rows(torch.tensor(sel))
    params = dict(model.named_parameters())
    base_rows = {n: params[n].detach().index_select(s.dim, s.index).clone() for n, s in plan.items()}
    v = torch.randn(G.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = 1e-5
    for i, e in enumerate(ex):
        with torch.no_grad():
            _direction_step(model, plan, base_rows, h * v)
            fp = _ld(model, e)
            _direction_step(model, plan, base_rows, -h * v)
            fm = _ld(model, e)
            _direction_step(model, plan, base_rows, 0 * v)
        fd = (fp - fm) / (2 * h)
        # central differences, GPT-2 float64 end to end: truncation ~h^2 |f'''| (measured ~4e-9
        # at h = 1e-5, ~4e-7 at h = 1e-4: O(h^2)) plus rounding ~1e-16 |f| / h (~1e-10) on
        # derivatives of size 2-6: 1e-7 relative (plus 1e-9 absolute) is 50x above both.
        assert abs(float(G[i] @ v) - fd) <= 1e-7 * abs(fd) + 1e-9, (i, float(G[i] @ v), fd)
        assert abs(fd) > 1e-3  # the check is not vacuous
    for n, p in model.named_parameters():
        assert bitwise_equal(p.detach(), before[n])


@pytest.mark.parametrize("arch", ARCHS)
def test_per_example_gradient_is_the_gathered_dense_gradient(arch):
    model, ex = _model(arch), _examples(3, seed=5)
    space = ComponentSpace(model)
    sel = _selection(space)
    G = dg.per_example_gradients(model, space, ex, sel)
    plan = space.owned_rows(torch.tensor(sel))
    params = dict(model.named_parameters())
    for i, e in enumerate(ex):
        b = collate([e], 0)
        ld = logit_diff(model(**b.model_inputs()).logits[:, -1], b.desired, b.undesired)[0]
        grads = torch.autograd.grad(ld, [params[n] for n in plan])
        ref = torch.cat([g.index_select(s.dim, s.index).flatten() for g, s in zip(grads, plan.values())])
        # the same float64 autograd graph, run twice: identical up to summation order
        torch.testing.assert_close(G[i], ref, rtol=0, atol=1e-12)


def test_gradient_alignment_on_hand_made_matrices():
    eye = torch.eye(4, 7, dtype=torch.float64) * torch.tensor([[1.0], [2.0], [3.0], [0.5]], dtype=torch.float64)
    a = dg.gradient_alignment(eye)
    assert a["mean_pairwise_cos"] == 0.0 and a["median_pairwise_cos"] == 0.0
    assert a["fraction_positive_pairs"] == 0.0 and a["mean_cos_with_rest"] == 0.0 and a["n_zero"] == 0
    same = torch.randn(1, 9, dtype=torch.float64).repeat(5, 1) * torch.tensor([[1.0], [2.0], [0.3], [4.0], [1.0]],
                                                                              dtype=torch.float64)
    b = dg.gradient_alignment(same)
    # identical directions: cosines are 1 up to float64 rounding of the normalisation
    assert abs(b["mean_pairwise_cos"] - 1) < 1e-12 and abs(b["median_pairwise_cos"] - 1) < 1e-12
    assert b["fraction_positive_pairs"] == 1.0 and abs(b["mean_cos_with_rest"] - 1) < 1e-12
    # a row and its negative; a zero row is left out and counted
    c = dg.gradient_alignment(torch.tensor([[1.0, 2.0], [-1.0, -2.0], [0.0, 0.0]], dtype=torch.float64))
    assert abs(c["mean_pairwise_cos"] + 1) < 1e-12 and c["fraction_positive_pairs"] == 0.0 and c["n_zero"] == 1
    R = torch.randn(5, 2_000_003 // 1000, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    # chunked float64 accumulation vs one float64 product: summation order only
    torch.testing.assert_close(dg.gram(R, chunk=7), R.double() @ R.double().T, rtol=0, atol=1e-11)
    json.dumps(a), json.dumps(b), json.dumps(c)
    with pytest.raises(CCAError):
        dg.gradient_alignment(torch.ones(1, 3))


@pytest.mark.parametrize("arch", ARCHS)
def test_transfer_ratio_equals_literal_step_and_restores_weights(arch):
    model, ex = _model(arch), _examples(7, seed=1)
    space = ComponentSpace(model)
    sel = _selection(space)
    before = _state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    lr = 0.05
    res = dg.transfer_ratio(model, space, ex, sel, lr, folds=3, seed=2)
    _assert_unchanged(model, before, flags)
    G = dg.per_example_gradients(model, space, ex, sel)
    res_g = dg.transfer_ratio(model, space, ex, sel, lr, folds=3, seed=2, gradients=G)
    _assert_unchanged(model, before, flags)

    plan = space.owned_rows(torch.tensor(sel))
    split = dg.fold_indices(len(ex), 3, 2)
    assert sorted(i for f in split for i in f) == list(range(len(ex)))
    base_ld = torch.tensor([_ld(model, e) for e in ex], dtype=torch.float64)
    assert res["folds"] == 3 and len(res["per_fold"]) == 3
    for f, held in enumerate(split):
        train = [i for i in range(len(ex)) if i not in held]
        ref = copy.deepcopy(model)
        params = dict(ref.named_parameters())
        b = collate([ex[i] for i in train], 0)  # the literal step: dense autograd on the plain batch
        loss = logit_diff(ref(**b.model_inputs()).logits[:, -1], b.desired, b.undesired).mean()
        grads = torch.autograd.grad(loss, [params[n] for n in plan])
        with torch.no_grad():
            for (n, s), g in zip(plan.items(), grads):
                mask = torch.zeros(params[n].shape[s.dim], dtype=torch.bool)
                mask[s.index] = True
                shape = [1] * g.dim()
                shape[s.dim] = -1
                params[n].add_(lr * g * mask.view(shape))
        gain = torch.tensor([_ld(ref, e) for e in ex], dtype=torch.float64) - base_ld
        for r in (res, res_g):
            row = r["per_fold"][f]
            assert row["n_train"] == len(train) and row["n_heldout"] == len(held)
            # the diagnostics batch with a shared prefix and left padding, the reference runs
            # each example alone (BATCHING_TOL; gains are ~1e-1)
            assert abs(row["train_gain"] - float(gain[train].mean())) < BATCHING_TOL[arch]
            assert abs(row["heldout_gain"] - float(gain[held].mean())) < BATCHING_TOL[arch]
    assert abs(res["ratio"] - res["mean_heldout_gain"] / res["mean_train_gain"]) < 1e-15
    assert res["mean_train_gain"] > 0  # an ascent step raises the training pivots' margin
    json.dumps(res)


def test_gold_alignment_is_the_cosine_of_the_two_gradients():
    model, ex = _model("gpt2"), _examples(4)
    space = ComponentSpace(model)
    sel = _selection(space)
    before = _state(model)
    gold = [SFTExample(tuple(e.prefix_ids[:18]), (7, 8, 9 + i), f"g{i}") for i, e in enumerate(ex[:3])]
    res = dg.gold_alignment(model, space, ex, gold, sel, 0)
    G = dg.per_example_gradients(model, space, ex, sel)
    res_g = dg.gold_alignment(model, space, ex, gold, sel, 0, gradients=G, batch_size=2)
    _assert_unchanged(model, before)
    plan = space.owned_rows(torch.tensor(sel))
    params = dict(model.named_parameters())
    nll, n = sft_nll(model, gold, pad_id=0)
    nll_value = float(nll.detach())
    grads = torch.autograd.grad(nll, [params[k] for k in plan])
    b = -torch.cat([g.index_select(s.dim, s.index).flatten() for g, s in zip(grads, plan.values())])
    a = G.sum(0)
    cos = float(a @ b / (a.norm() * b.norm()))
    # float64, two summation orders of the same gradients
    assert abs(res["cos"] - cos) < 1e-10 and abs(res_g["cos"] - cos) < 1e-10
    assert res["gold_tokens"] == n == 9 and abs(res["gold_nll_mean"] - nll_value / n) < 1e-10
    assert 0 <= res_g["fraction_examples_positive"] <= 1
    for p in model.parameters():
        p.grad = None


def test_changed_traces_counts():
    base = [{"id": "a", "output": "x", "correct": True}, {"id": "b", "output": "y", "correct": False},
            {"id": "c", "output": "z", "correct": False}, {"id": "d", "output": "w", "correct": True},
            {"id": "only_base", "output": "", "correct": True}]
    new = [{"id": "b", "output": "y2", "correct": True}, {"id": "a", "output": "x", "correct": True},
           {"id": "c", "output": "z2", "correct": False}, {"id": "d", "output": "w2", "correct": False},
           {"id": "e", "output": "", "correct": False}]
    r = dg.changed_traces(base, new)
    assert r == {"n": 4, "output_changed": 3, "wrong_to_correct": 1, "correct_to_wrong": 1, "fraction_changed": 0.75,
                 "base_correct": 2, "new_correct": 2, "only_base": 1, "only_new": 1}
    with pytest.raises(CCAError):
        dg.changed_traces(base + base[:1], new)
    with pytest.raises(CCAError):
        dg.changed_traces([{"id": "a", "output": "x"}], new)


def test_pivot_table_argmax_rank_and_greedy_path():
    model = _model("gpt2")
    prompt = (5, 9, 13, 17)
    trace = (20, 30, 40)
    ids = prompt + trace
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double()
    order = logits.argsort(descending=True).tolist()
    top, third = order[0], order[2]
    greedy = {"p": list(trace) + [50, 60], "q": [21, 30, 40, 1]}
    ex = [
        PivotExample("p", ids, top, third, "greedy_correct", "branching", {"t": 3}),   # argmax, on path
        PivotExample("q", ids, third, top, "greedy_wrong", "branching", {"t": 3}),     # rank 2, off path
        PivotExample("p", ids, third, top, "greedy_wrong", "prefix", {"t": 0}),        # t = 0: on path
        PivotExample("missing", ids, top, third, "greedy_correct", "branching", {"t": 2}),
        PivotExample("p", ids, top, third, "greedy_correct", "branching", {}),         # no t
    ]
    before = _state(model)
    rows = dg.pivot_table(model, ex, greedy)
    _assert_unchanged(model, before)
    assert [r["desired_is_argmax"] for r in rows] == [True, False, False, True, True]
    assert [r["desired_rank"] for r in rows] == [0, 2, 2, 0, 0]
    assert [r["on_greedy_path"] for r in rows] == [True, False, True, None, None]
    assert [r["t"] for r in rows] == [3, 3, 0, 2, None]
    p = logits.softmax(-1)
    # float64 softmax of the same logits (one forward vs another: rounding only)
    assert abs(rows[0]["p_desired"] - float(p[top])) < 1e-12 and abs(rows[0]["p_undesired"] - float(p[third])) < 1e-12
    assert abs(rows[1]["logit_diff"] - float(logits[third] - logits[top])) < 1e-10
    assert all(r["on_greedy_path"] is None for r in dg.pivot_table(model, ex, None))
    s = dg.summarize_pivots(rows)
    assert s["n"] == 5 and s["by_direction"] == {"greedy_correct": 3, "greedy_wrong": 2}
    assert s["fraction_desired_is_argmax"] == 0.6 and s["fraction_desired_is_argmax_by_direction"]["greedy_wrong"] == 0
    assert s["n_greedy_path_known"] == 3 and abs(s["fraction_on_greedy_path"] - 2 / 3) < 1e-15
    assert s["median_t"] == 2.5
    json.dumps(rows), json.dumps(s)


def test_diagnose_bundles_everything_and_subsamples():
    model, ex = _model("llama"), _examples(6, seed=4)
    space = ComponentSpace(model)
    sel = _selection(space)
    before = _state(model)
    gold = [SFTExample(tuple(ex[0].prefix_ids[:18]), (7, 8), "g0"), SFTExample(tuple(ex[1].prefix_ids[:18]), (9,), "g1")]
    greedy = {e.problem_id: list(e.prefix_ids[18:]) for e in ex[:3]}
    out = dg.diagnose(model, space, ex, sel, greedy=greedy, gold=gold, lr=0.05, folds=2, max_examples=4, seed=1)
    _assert_unchanged(model, before)
    json.dumps(out)
    sub = out["gradient_subsample"]
    assert sub["subsampled"] and sub["n_used"] == 4 and sub["indices"] == dg.subsample(6, 4, 1)
    assert sub["limited_by"] == "max_examples"
    assert len(out["pivots"]["rows"]) == 6 and out["pivots"]["summary"]["fraction_on_greedy_path"] == 1.0
    assert out["alignment"]["n"] == 4 and out["transfer"]["folds"] == 2 and out["gold"]["n_gold"] == 2
    assert out["rows_dim"] == dg.row_count(model, space, sel) and out["n_components"] == len(sel)
    D = out["rows_dim"]
    capped = dg.diagnose(model, space, ex, sel, lr=0.05, folds=2, max_gradient_bytes=3 * D * 8 + 7)
    assert capped["gradient_subsample"]["n_used"] == 3
    assert capped["gradient_subsample"]["limited_by"] == "max_gradient_bytes" and capped["gold"] is None
    _assert_unchanged(model, before)
    with pytest.raises(CCAError, match="max_gradient_bytes"):
        dg.diagnose(model, space, ex, sel, max_gradient_bytes=D * 8)
    with pytest.raises(CCAError):
        dg.diagnose(model, space, ex, [])
    with pytest.raises(CCAError):
        dg.transfer_ratio(model, space, ex, sel, lr=-1.0)


def test_gradient_alignment_equals_direct_cosines():
    G = torch.randn(6, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    G[:, :3] += 2.0  # some shared direction: cosines of both signs
    a = dg.gradient_alignment(G)
    cos = torch.nn.functional.cosine_similarity(G[:, None], G[None], dim=-1)
    iu = torch.triu_indices(6, 6, offset=1)
    pair = cos[iu[0], iu[1]]
    rest = torch.stack([torch.nn.functional.cosine_similarity(G[i], G.sum(0) - G[i], dim=0) for i in range(6)])
    # float64 Gram-matrix formulas vs direct cosines: rounding only
    assert abs(a["mean_pairwise_cos"] - float(pair.mean())) < 1e-12
    assert abs(a["median_pairwise_cos"] - float(pair.median())) < 1e-12
    assert a["fraction_positive_pairs"] == float((pair > 0).double().mean())
    assert abs(a["mean_cos_with_rest"] - float(rest.mean())) < 1e-12


def test_float32_model_gets_float32_gradients_and_is_restored_bitwise():
    model = make_tiny("llama", dtype=torch.float32, attn="sdpa")
    ex = _examples(5, seed=2)
    space = ComponentSpace(model)
    sel = _selection(space)
    before = _state(model)
    out = dg.diagnose(model, space, ex, sel, lr=0.1, folds=2)
    _assert_unchanged(model, before)
    assert dg.per_example_gradients(model, space, ex[:2], sel).dtype == torch.float32
    assert out["transfer"]["mean_train_gain"] > 0
    json.dumps(out)
