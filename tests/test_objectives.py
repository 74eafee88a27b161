"""Stage-3 objectives (:mod:`cca_fast.stages.objectives`) against literal float64 references.

Each objective's loss is recomputed here one example at a time from full forwards (no shared
prefix, no batching), and its gradient on the selected rows is checked against the central finite
difference of that reference loss along a random direction in those rows.

Tolerances: GPT-2 runs entirely in float64 (LayerNorm included), so the batched, prefix-shared
loss equals the literal one up to float64 summation order (1e-10 absolute on losses of order 1).
The central difference with step h = 1e-5 has truncation error O(h^2 * |L'''|) ~ 1e-10 and
rounding error ~1e-16 / h ~ 1e-11, so gradient . v agrees with it to 1e-7 relative (+1e-9).
"""
from __future__ import annotations

import pytest
import torch

from cca_fast import ComponentSpace
from cca_fast.stages.sft import SFTExample
from cca_fast.errors import CCAError
from cca_fast.stages.examples import PivotExample
from cca_fast.stages.objectives import TrainingObjective
from cca_fast.stages.update import UpdateConfig, run_update
from helpers import VOCAB, make_tiny

PROMPT = 19  # shared prompt tokens (odd)


def _pivots(seed: int = 0, ts=(0, 3, 5, 2, 7)) -> list[PivotExample]:
    """Pivot examples: one shared prompt + a per-example question, then ``t`` trace tokens."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(3, VOCAB, (PROMPT,), generator=g).tolist()
    out = []
    for i, t in enumerate(ts):
        question = torch.randint(3, VOCAB, (2 + i % 3,), generator=g).tolist()
        trace = torch.randint(3, VOCAB, (t,), generator=g).tolist()
        d, u = (torch.randperm(VOCAB - 3, generator=g)[:2] + 3).tolist()
        out.append(PivotExample(f"p{i}", tuple(common + question + trace), d, u, meta={"t": t}))
    return out


def _gold(seed: int = 1) -> list[SFTExample]:
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(3, VOCAB, (PROMPT,), generator=g).tolist()
    return [SFTExample(tuple(common + torch.randint(3, VOCAB, (1 + i,), generator=g).tolist()),
                       tuple(torch.randint(3, VOCAB, (3 + 2 * i,), generator=g).tolist()), f"g{i}")
            for i in range(4)]


def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=torch.tensor([list(ids)])).logits[0]  # [T, V]


def _reference_loss(model, base, cfg: UpdateConfig, pivots, gold) -> torch.Tensor:
    """The objective written out literally, one full sequence at a time; ``base`` is a frozen
    copy of the model at the base weights (the retain term's reference)."""
    if cfg.objective == "gold_nll":
        total = sum(len(e.target_ids) for e in gold)
        nll = 0.0
        for e in gold:
            ids = list(e.prompt_ids) + list(e.target_ids)
            logp = torch.log_softmax(_logits(model, ids), -1)
            P = len(e.prompt_ids)
            nll = nll - sum(logp[P - 1 + k, tok] for k, tok in enumerate(e.target_ids))
        return nll / total
    loss, kl, m = 0.0, 0.0, 0
    for e in pivots:
        logits = _logits(model, e.prefix_ids)
        ld = logits[-1, e.desired] - logits[-1, e.undesired]
        loss = loss + (-ld if cfg.objective == "logit_diff" else torch.relu(cfg.margin - ld))
        if cfg.retain_weight:
            t = e.meta["t"]
            if t:
                with torch.no_grad():
                    pb = torch.log_softmax(_logits(base, e.prefix_ids)[-1 - t : -1], -1)
                lp = torch.log_softmax(logits[-1 - t : -1], -1)
                kl = kl + (pb.exp() * (pb - lp)).sum()
                m += t
    loss = loss / len(pivots)
    return loss + cfg.retain_weight * kl / m if cfg.retain_weight else loss


def _selected_rows(model, space, sel):
    params = dict(model.named_parameters())
    return {n: (params[n], s) for n, s in space.owned_rows(torch.tensor(sel)).items()}


@pytest.mark.parametrize("objective,kw", [
    ("logit_diff", {}),
    ("hinge", {"margin": None}),  # margin set between the examples' logit differences
    ("logit_diff", {"retain_weight": 0.7}),
    ("hinge", {"margin": None, "retain_weight": 2.0}),
    ("gold_nll", {}),
])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_objective_loss_and_gradient_equal_the_literal_reference(objective, kw, share_prefix):
    torch.manual_seed(0)
    model = make_tiny("gpt2", seed=3, attn="sdpa")
    base = make_tiny("gpt2", seed=3, attn="sdpa")
    pivots, gold = _pivots(), _gold()
    kw = dict(kw)
    if "margin" in kw:  # a margin between the smallest and largest logit difference: some pull, some not
        with torch.no_grad():
            lds = sorted(float(_logits(model, e.prefix_ids)[-1, e.desired] - _logits(model, e.prefix_ids)[-1, e.undesired])
                         for e in pivots)
        kw["margin"] = (lds[1] + lds[2]) / 2
    cfg = UpdateConfig(objective=objective, batch_size=3, min_shared_prefix=4, share_prefix=share_prefix, **kw)
    obj = TrainingObjective(model, pivots, cfg, gold)
    if cfg.retain_weight:  # move away from the base so the KL and its gradient are not zero
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    space = ComponentSpace(model)
    sel = sorted(torch.randperm(space.total, generator=torch.Generator().manual_seed(1))[:7].tolist())
    rows = _selected_rows(model, space, sel)
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    measured = obj.pass_(backward=True)
    ref = _reference_loss(model, base, cfg, pivots, gold)
    assert abs(measured["loss"] - float(ref.detach())) <= 1e-10  # float64 summation order only
    # gradient . v on the selected rows vs the central difference of the literal loss
    g = torch.Generator().manual_seed(2)
    v = {n: torch.randn(p.index_select(s.dim, s.index).shape, generator=g, dtype=p.dtype) for n, (p, s) in rows.items()}
    analytic = sum(float((p.grad.index_select(s.dim, s.index) * v[n]).sum()) for n, (p, s) in rows.items())
    h = 1e-5

    def shifted(sign: float) -> float:
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, (p, s) in rows.items()}
            for n, (p, s) in rows.items():
                p.index_add_(s.dim, s.index, sign * h * v[n])
            value = float(_reference_loss(model, base, cfg, pivots, gold))
            for n, (p, s) in rows.items():
                p.copy_(saved[n])
        return value

    fd = (shifted(1.0) - shifted(-1.0)) / (2 * h)
    assert abs(analytic - fd) <= 1e-7 * abs(fd) + 1e-9, (analytic, fd)
    assert analytic != 0.0  # the selected rows are on the loss's path


def test_hinge_stops_pulling_above_the_margin():
    model = make_tiny("gpt2", seed=3, attn="sdpa")
    pivots = _pivots()
    cfg = UpdateConfig(objective="hinge", margin=1e-6)
    with torch.no_grad():
        lds = [float(_logits(model, e.prefix_ids)[-1, e.desired] - _logits(model, e.prefix_ids)[-1, e.undesired])
               for e in pivots]
    above = [e for e, ld in zip(pivots, lds) if ld > 1e-3]
    assert above, "the seed must give an example above the margin"
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    assert TrainingObjective(model, above, cfg).pass_(backward=True)["loss"] == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_retain_term_is_zero_at_the_base_weights():
    model = make_tiny("gpt2", seed=3, attn="sdpa")
    cfg = UpdateConfig(retain_weight=5.0, batch_size=2, min_shared_prefix=4)
    out = TrainingObjective(model, _pivots(), cfg).pass_(backward=False)
    assert out["retain_kl"] == pytest.approx(0.0, abs=1e-14)  # KL(p || p) up to float64 rounding
    assert out["loss"] == pytest.approx(-out["logit_diff"], abs=1e-12)


def test_gold_nll_run_update_changes_only_the_selected_rows_and_lowers_the_loss():
    model = make_tiny("gpt2", seed=3, attn="sdpa")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    space = ComponentSpace(model)
    cfg = UpdateConfig(objective="gold_nll", optimizer="adamw", lr=1e-2, max_steps=3, mode="reference")
    res = run_update(model, space, [0, 5, 9], [], cfg, gold=_gold())
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0]
    owned = space.owned_rows(torch.tensor([0, 5, 9]))
    for n, p in model.named_parameters():
        if n not in owned:
            assert torch.equal(p, before[n]), n  # untouched weights stay bit-identical


def test_objective_settings_are_checked():
    with pytest.raises(CCAError, match="objective"):
        UpdateConfig(objective="nope")
    with pytest.raises(CCAError, match="margin"):
        UpdateConfig(objective="hinge", margin=float("nan"))
    with pytest.raises(CCAError, match="retain"):
        UpdateConfig(objective="gold_nll", retain_weight=1.0)
    with pytest.raises(CCAError, match="gold"):
        TrainingObjective(make_tiny("gpt2"), _pivots(), UpdateConfig(objective="gold_nll"))
    bad = [PivotExample("x", (5, 6, 7), 3, 4)]  # no meta["t"]
    with pytest.raises(CCAError, match="meta"):
        TrainingObjective(make_tiny("gpt2"), bad, UpdateConfig(retain_weight=1.0))
