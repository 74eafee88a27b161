"""Stage 2 DCM (``cca_fast.stages.localize.dcm``).

Tolerances:
* last-position vs full-prefix execution: both are exact float64 autograd of the same function;
  the only difference is that the prefix keys/values come from a separate (unmasked, no-grad)
  pass, i.e. a different operation order: 1e-12 absolute on losses ~1-10 and gradients ~0.1-10.
* Adam's first step moves each entry by ``lr * g / (|g| + 1e-8)``; the mask is fp32, so the
  expected ``1 - lr`` is compared with 2 fp32 ulps of 1 (2.4e-7).
"""
from __future__ import annotations

import pytest
import torch

import helpers
from cca_fast.errors import CCAError
from cca_fast.stages.examples import collate
from cca_fast.stages.localize import DCMConfig, PivotPrefixCache, dcm_loss, run_atp, run_dcm
from cca_fast.models.components import ComponentSpace
from helpers import examples, tiny

EXACT = 1e-12
ARCHS = ["llama", "gpt2", "phi3", "qwen3", "gemma2", "gemma3_text", "olmo2"]


def _loss_and_grad(model, space, batch, mask, lam, mode, prefix=None):
    m = mask.clone().requires_grad_(True)
    loss, ld, l1 = dcm_loss(model, space, batch, m, lam, mode, prefix)
    loss.backward()
    return loss.detach(), ld.detach(), m.grad


@pytest.mark.parametrize("arch", ARCHS)
def test_last_position_equals_full_prefix(arch):
    """Left-padded batch of different lengths (one of length 1: an empty prefix row)."""
    model = tiny(arch)
    space = ComponentSpace(model)
    ex = examples(arch, n=4, seed=1, min_len=1, max_len=9)
    batch = collate(ex, pad_id=0)
    mask = torch.rand(space.total, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full = _loss_and_grad(model, space, batch, mask, 0.01, "full")
    last = _loss_and_grad(model, space, batch, mask, 0.01, "last")
    for a, b in zip(full, last):
        torch.testing.assert_close(a, b, rtol=0, atol=EXACT)
    assert full[2].abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["mistral", "gemma3_text"])
def test_last_position_with_sliding_window_shorter_than_prefix(arch, monkeypatch):
    """Sliding-window layers (window 3 < prefix 8) keep only part of the prefix cache."""
    cfg = dict(helpers.CONFIGS[arch], sliding_window=3)
    monkeypatch.setitem(helpers.CONFIGS, arch, cfg)
    model = tiny(arch)
    space = ComponentSpace(model)
    batch = collate(examples(arch, n=3, seed=4, min_len=6, max_len=9), pad_id=0)
    mask = torch.rand(space.total, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    full = _loss_and_grad(model, space, batch, mask, 0.0, "full")
    last = _loss_and_grad(model, space, batch, mask, 0.0, "last")
    for a, b in zip(full, last):
        torch.testing.assert_close(a, b, rtol=0, atol=EXACT)


def test_last_position_single_token_batch():
    model = tiny("llama")
    space = ComponentSpace(model)
    batch = collate(examples("llama", n=2, min_len=1, max_len=1), pad_id=0)
    mask = torch.full((space.total,), 0.7, dtype=torch.float64)
    for a, b in zip(_loss_and_grad(model, space, batch, mask, 0.0, "full"), _loss_and_grad(model, space, batch, mask, 0.0, "last")):
        torch.testing.assert_close(a, b, rtol=0, atol=EXACT)


def test_prefix_cache_is_never_mutated_across_steps():
    model = tiny("llama")
    space = ComponentSpace(model)
    batch = collate(examples("llama", n=3, seed=2), pad_id=0)
    prefix = PivotPrefixCache(model, batch)
    before = [t.clone() for t in prefix._tensors]
    assert before and all(t.shape[-2] == batch.input_ids.shape[1] - 1 for t in before if t.dim() == 4)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        mask = torch.rand(space.total, generator=g, dtype=torch.float64)
        full = _loss_and_grad(model, space, batch, mask, 0.0, "full")
        last = _loss_and_grad(model, space, batch, mask, 0.0, "last", prefix)
        torch.testing.assert_close(full[2], last[2], rtol=0, atol=EXACT)
    for t, b in zip(prefix._tensors, before):
        assert torch.equal(t, b)
    prefix._tensors[0].add_(1.0)  # an in-place change is detected, never silently used
    with pytest.raises(CCAError, match="modified in place"):
        prefix.fresh()


def test_l1_term_is_a_plain_sum_of_abs():
    model = tiny("gpt2")
    space = ComponentSpace(model)
    batch = collate(examples("gpt2", n=3), pad_id=0)
    mask = torch.rand(space.total, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask[:5] = 0.0  # entries at 0: |m| has subgradient 0 there (torch's sign(0) = 0)
    l0, ld0, g0 = _loss_and_grad(model, space, batch, mask, 0.0, "full")
    lam = 0.3
    l1, ld1, g1 = _loss_and_grad(model, space, batch, mask, lam, "full")
    assert float(l1 - l0) == pytest.approx(lam * float(mask.sum()), abs=1e-12)
    torch.testing.assert_close(g1 - g0, lam * torch.sign(mask), rtol=0, atol=1e-14)
    assert float(ld0) == pytest.approx(-float(l0), abs=1e-12)  # loss = -mean logit diff


def test_first_adam_step_and_clamp():
    """From m = 1, Adam's first step is lr * sign(g) (|g| >> 1e-8); entries pushed above 1 are
    clamped back to exactly 1."""
    model = tiny("llama", dtype=torch.float32)
    space = ComponentSpace(model)
    ex = examples("llama", n=4, seed=7)
    cfg = DCMConfig(epochs=1, batch_size=8, early_stop=False, shuffle=False)
    batch = collate(ex, pad_id=0)
    g = _loss_and_grad(model, space, batch, torch.ones(space.total), cfg.lambda_l1, "full")[2]
    assert (g.abs() > 1e-4).all()
    res = run_dcm(model, ex, cfg)
    want = torch.where(g > 0, torch.tensor(1.0 - cfg.lr), torch.tensor(1.0))
    torch.testing.assert_close(res.mask, want, rtol=0, atol=2.4e-7)
    assert (g < 0).any() and (g > 0).any()
    assert len(res.history) == 1 and res.history[0]["n_selected"] == space.total


def test_clamp_threshold_and_selection_over_a_run():
    model = tiny("qwen2", dtype=torch.float32)
    space = ComponentSpace(model)
    ex = examples("qwen2", n=6, seed=3)
    cfg = DCMConfig(lr=0.2, epochs=4, batch_size=3, lambda_l1=0.05, early_stop=False, threshold=0.6)
    res = run_dcm(model, ex, cfg)
    assert res.mask.dtype == torch.float32
    assert res.mask.min() >= 0 and res.mask.max() <= 1
    assert (res.mask == 0).any() and (res.mask == 1).any()  # the clamp was active both ways
    assert torch.equal(res.selected, torch.nonzero(res.mask >= 0.6).flatten())
    assert 0 < res.selected.numel() < space.total
    sel = res.to_selection(space)
    assert sel.indices == res.selected.tolist() and sel.params["threshold"] == 0.6
    assert [h["n_selected"] for h in res.history][-1] == res.selected.numel()
    assert len(res.history) == 4 * 2 and res.epochs == 4


def test_early_stopping_patience():
    """N = 10, B = 2: patience = ceil(10/2) * 0.2 = 1 unchanged batch. With a negligible lr
    nothing ever changes: the literal rule stops after the first batch; the default (armed only
    after a change) never stops."""
    model = tiny("llama", dtype=torch.float32)
    ex = examples("llama", n=10, seed=5)
    base = dict(lr=1e-9, lambda_l1=0.0, epochs=2, batch_size=2)
    literal = run_dcm(model, ex, DCMConfig(arm_early_stop_after_change=False, **base))
    assert literal.stopped_early and len(literal.history) == 1
    armed = run_dcm(model, ex, DCMConfig(**base))
    assert not armed.stopped_early and len(armed.history) == 10 and armed.epochs == 2
    # a run whose selection changes then settles stops once it has been stable for 1 batch
    moving = run_dcm(model, ex, DCMConfig(lr=0.3, lambda_l1=0.5, epochs=20, batch_size=2))
    counts = [h["n_selected"] for h in moving.history]
    assert moving.stopped_early and counts[-1] == counts[-2] and len(set(counts)) > 1
    assert len(counts) < 20 * 5


def test_learning_rate_decays_every_five_epochs():
    model = tiny("gpt2", dtype=torch.float32)
    res = run_dcm(model, examples("gpt2", n=3), DCMConfig(epochs=11, early_stop=False, lr=0.01))
    lrs = [h["lr"] for h in res.history]
    assert lrs[:5] == pytest.approx([0.01] * 5)
    assert lrs[5:10] == pytest.approx([0.009] * 5) and lrs[10] == pytest.approx(0.0081)


def test_weights_untouched_flags_and_mode_restored():
    model = tiny("phi3", dtype=torch.float32)
    model.train()
    params = list(model.parameters())
    params[0].requires_grad_(False)
    before = [p.detach().clone() for p in params]
    seen = []
    progress = seen.append
    res = run_dcm(model, examples("phi3", n=4), DCMConfig(epochs=2, batch_size=2, early_stop=False), progress)
    assert model.training and [p.requires_grad for p in params] == [False] + [True] * (len(params) - 1)
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and all(p.grad is None for p in params)
    assert seen == res.history and len(seen) == 4


def test_seeded_shuffle_and_reused_prefix_cache_are_deterministic():
    model = tiny("llama", dtype=torch.float32)
    ex = examples("llama", n=6, seed=9)
    cfg = dict(epochs=3, batch_size=4, early_stop=False, lr=0.05)
    a = run_dcm(model, ex, DCMConfig(seed=1, **cfg))
    b = run_dcm(model, ex, DCMConfig(seed=1, **cfg))
    assert torch.equal(a.mask, b.mask)
    c = run_dcm(model, ex, DCMConfig(shuffle=False, **cfg))
    d = run_dcm(model, ex, DCMConfig(shuffle=False, reuse_prefix_cache=True, **cfg))
    assert torch.equal(c.mask, d.mask)  # same batches in the same order: cached prefix == recomputed
    # fixed batches in shuffled order, prefix caches reused across epochs vs full recompute
    # (fp32 model: the two modes round differently; masks move by lr-sized Adam steps)
    e = run_dcm(model, ex, DCMConfig(seed=2, reuse_prefix_cache=True, **cfg))
    f = run_dcm(model, ex, DCMConfig(seed=2, reuse_prefix_cache=True, mode="full", **cfg))
    torch.testing.assert_close(e.mask, f.mask, rtol=0, atol=1e-4)
    assert not torch.equal(e.mask, a.mask)


def test_atp_warm_start():
    """init='atp': m = 1 for the top 25% by AtP score, 0.45 elsewhere (lr ~0: the mask stays
    where it started)."""
    model = tiny("llama", dtype=torch.float32)
    space = ComponentSpace(model)
    ex = examples("llama", n=4)
    scores = run_atp(model, ex).scores
    res = run_dcm(model, ex, DCMConfig(init="atp", atp_fraction=0.25, lr=1e-9, epochs=1))
    k = round(0.25 * space.total)
    top = torch.sort(scores.double(), descending=True, stable=True).indices[:k]
    want = torch.full((space.total,), 0.45)
    want[top] = 1.0
    torch.testing.assert_close(res.mask, want, rtol=0, atol=1e-6)
    assert torch.equal(res.selected, top.sort().values)
    given = run_dcm(model, ex, DCMConfig(init="atp", atp_fraction=0.25, lr=1e-9, epochs=1), init_scores=-scores)
    assert not torch.equal(given.selected, res.selected)


def test_config_and_input_errors():
    for bad in (dict(mode="fast"), dict(init="zeros"), dict(epochs=0), dict(lr=0), dict(lr_decay=1.5)):
        with pytest.raises(CCAError):
            DCMConfig(**bad)
    model = tiny("llama")
    with pytest.raises(CCAError, match="no pivot examples"):
        run_dcm(model, [])
    with pytest.raises(CCAError, match="init_scores"):
        run_dcm(model, examples("llama", n=2), DCMConfig(init="atp"), init_scores=torch.zeros(3))


def test_max_mask_travel_bounds_the_movement_and_warns():
    from cca_fast.stages.localize.dcm import max_mask_travel

    # paper schedule: 5e-3 x ceil(N/8) steps per epoch, x0.9 every 5 epochs, 50 epochs
    per_epoch_sum = sum(5e-3 * 0.9 ** (e // 5) for e in range(50))
    assert max_mask_travel(DCMConfig(), 25) == pytest.approx(4 * per_epoch_sum, rel=1e-12)
    assert max_mask_travel(DCMConfig(), 6) == pytest.approx(per_epoch_sum, rel=1e-12)
    assert max_mask_travel(DCMConfig(), 6) < 0.5 < max_mask_travel(DCMConfig(), 25)
    # the bound holds approximately: Adam's step lr * m_hat / sqrt(v_hat) exceeds lr only when the
    # gradient's magnitude jumps between steps (here the L1 term dominates: measured +0.3%; 10% allowed)
    model, ex = tiny("llama"), examples("llama", n=5)
    cfg = DCMConfig(epochs=3, batch_size=2, lr=0.05, lambda_l1=0.5, early_stop=False)
    with pytest.warns(UserWarning, match="every component will stay selected"):
        res = run_dcm(model, ex, cfg)
    assert float((1.0 - res.mask).max()) <= 1.1 * max_mask_travel(cfg, 5)
    assert float((1.0 - res.mask).max()) > 0.5 * max_mask_travel(cfg, 5)  # and it is not loose by much
