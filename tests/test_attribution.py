"""Public attribution API (``cca_fast.attribute``): identities on tiny float64 models.

* The score of a component is the derivative of the metric in that component's scale at the
  scored positions, at scale 1: checked by central finite differences with Richardson
  extrapolation (steps ``h = 1e-4`` and ``h/2``; truncation ``O(h^4) ~ 1e-13`` even where the
  third derivative is ~1e3, as with Gemma-2's soft-capping). Transformers computes RMSNorm (and
  eager softmax) in float32 even for float64 models, which puts ~1e-7 relative noise on the
  metric and would swamp any finite difference; :class:`ExactFloat64` keeps those ops in
  float64 for both sides. Rounding then contributes ``~ 1e-16 * |f| / h ~ 1e-11``: tolerance
  1e-8 absolute on scores of size 0.1 to 10.
* The fused pipeline equals the caching reference (every activation and gradient stored, einsum):
  both are exact float64 autograd with a different summation order: 1e-12 absolute.
The default backend follows ``tests/conftest.py`` (Triton interpreter on CPU), so these tests
run the Triton kernel inside backward; some also force ``backend="torch"``.
"""
from __future__ import annotations

import pytest
import torch

from cca_fast.attribution import Attribution, AttributionSession, attribute, attribute_by_caching
from cca_fast.errors import CCAError
from cca_fast.kernels import dispatch
from cca_fast.stages.examples import PivotExample, collate, logit_diff
from cca_fast.models.hooks import scale_components
from cca_fast.models.components import ComponentSpace
from helpers import VOCAB, make_tiny
from torch.overrides import TorchFunctionMode

FD_TOL = 1e-8
EXACT_TOL = 1e-12
# gemma2 has no SDPA path, and eager attention in float64 turns the fully masked rows of left
# padding into NaN (transformers casts the float64 mask to float32 -inf): no padding for it.
ARCHS = ["llama", "gpt2", "phi3", "qwen3", "gemma2"]


class ExactFloat64(TorchFunctionMode):
    """Inside the block, float64 tensors are never rounded through float32: ``x.to(float32)``,
    ``x.float()`` and ``softmax(..., dtype=float32)`` on float64 inputs stay float64 (the
    norms and eager softmax of Hugging Face models upcast "to float32", which for a float64
    model is a downcast)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
            if func is torch.Tensor.float:
                return x
            if func is torch.Tensor.to and ((len(args) > 1 and args[1] is torch.float32)
                                            or kwargs.get("dtype") is torch.float32):
                return x
            if func is torch.nn.functional.softmax and kwargs.get("dtype") is torch.float32:
                kwargs = dict(kwargs, dtype=None)
        return func(*args, **kwargs)


def tiny(arch, dtype=torch.float64):
    return make_tiny(arch, dtype=dtype, attn="eager" if arch == "gemma2" else "sdpa")


def pivot_batch(arch, seed=0, lengths=(5, 8, 3)):
    g = torch.Generator().manual_seed(seed)
    if arch == "gemma2":
        lengths = (6,) * len(lengths)
    ex = [PivotExample(f"p{i}", tuple(torch.randint(3, VOCAB, (n,), generator=g).tolist()),
                       int(torch.randint(3, VOCAB, (1,), generator=g)), int(torch.randint(3, VOCAB, (1,), generator=g)))
          for i, n in enumerate(lengths)]
    return collate(ex, pad_id=0)


def scaled_metrics(model, space, batch, layer: int, kind: str, perturb: list[tuple[int, float]]) -> list[float]:
    """Summed logit difference with component ``(layer, kind, i)`` scaled by ``s`` at the last
    position, for every ``(i, s)`` in ``perturb``, in one forward: the batch is replicated once
    per perturbation and each replica gets its own per-row scale (``[rows, n]``)."""
    B, R = len(batch), len(perturb)
    scale = torch.ones(R * B, space.counts[kind], dtype=torch.float64)
    for r, (i, s) in enumerate(perturb):
        scale[r * B : (r + 1) * B, i] = s
    inputs = {k: v.repeat(R, 1) for k, v in batch.model_inputs().items()}
    with torch.no_grad(), scale_components(model, space, {(layer, kind): scale}, positions=-1):
        logits = model(**inputs).logits[:, -1]
    ld = logit_diff(logits, batch.desired.repeat(R), batch.undesired.repeat(R))
    return ld.view(R, B).sum(1).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_score_equals_finite_difference_of_the_scale(arch):
    model = tiny(arch)
    space = ComponentSpace(model)
    batch = pivot_batch(arch)
    with ExactFloat64():
        _check_fd(model, space, batch, arch)


def _check_fd(model, space, batch, arch):
    att = attribute(model, batch)  # default: logit difference at the last position
    h = 1e-4
    steps = (h, -h, h / 2, -h / 2)
    checked = 0
    for layer in range(space.n_layers):
        for kind, n in space.counts.items():
            indices = sorted({0, n // 2, n - 1})
            vals = scaled_metrics(model, space, batch, layer, kind, [(i, 1 + d) for i in indices for d in steps])
            for j, index in enumerate(indices):
                f = dict(zip(steps, vals[4 * j : 4 * j + 4]))
                fd_h, fd_h2 = (f[h] - f[-h]) / (2 * h), (f[h / 2] - f[-h / 2]) / h
                fd = (4 * fd_h2 - fd_h) / 3  # Richardson: cancels the h^2 term
                got = float(att.site(layer, kind)[index])
                assert abs(got - fd) <= FD_TOL, (arch, f"L{layer}.{kind}{index}", got, fd)
                checked += 1
    assert checked >= 4 * space.n_layers
    assert att.scores.abs().max() > 1e-3  # the identity is not 0 == 0


def _metric_all_positions(logits, batch):
    """A metric reading every position: log-prob of a fixed token, summed (non-pad tokens)."""
    lp = torch.log_softmax(logits, -1)[..., 7]
    return (lp * batch["attention_mask"]).sum()


TRITON_OK = dispatch.triton_available() and (torch.cuda.is_available() or dispatch.interpret_mode())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1 before Python starts"))])
def test_fused_equals_caching_reference_every_position(arch, backend):
    model = tiny(arch)
    pb = pivot_batch(arch, seed=1)
    batch = {"input_ids": pb.input_ids, "attention_mask": pb.attention_mask, "position_ids": pb.position_ids}
    for absolute in (False, True):
        fused = attribute(model, batch, _metric_all_positions, positions=None, per_position=True,
                          absolute=absolute, backend=backend)
        ref = attribute_by_caching(model, batch, _metric_all_positions, positions=None, per_position=True,
                                   absolute=absolute)
        torch.testing.assert_close(fused.per_position, ref.per_position, rtol=0, atol=EXACT_TOL)
        torch.testing.assert_close(fused.scores, ref.scores, rtol=0, atol=EXACT_TOL)
        # padding positions are not scored; real ones are
        pad = pb.attention_mask == 0
        assert fused.per_position[pad].abs().max() == 0
        assert fused.per_position[~pad].abs().max() > 1e-3
        assert fused.metric_value == pytest.approx(ref.metric_value, abs=1e-12)


def test_position_selections_match_weighted_reference():
    """int, LongTensor [B], BoolTensor [B, T] and float weights [B, T] all equal the weighted
    sum of the reference per-position scores."""
    model = tiny("qwen3")
    pb = pivot_batch("qwen3", seed=2)
    ids = {"input_ids": pb.input_ids, "attention_mask": pb.attention_mask, "position_ids": pb.position_ids}
    ref = attribute_by_caching(model, ids, _metric_all_positions, positions=None, per_position=True).per_position
    B, T = pb.input_ids.shape
    g = torch.Generator().manual_seed(0)
    bool_mask = torch.rand(B, T, generator=g) < 0.5
    weights = torch.randn(B, T, generator=g, dtype=torch.float64) * pb.attention_mask
    cases = {
        -2: torch.zeros(B, T, dtype=torch.float64).index_fill_(1, torch.tensor([T - 2]), 1.0),
        "long": None, "bool": bool_mask.double(), "float": weights,
    }
    long_pos = torch.tensor([T - 1, 3, T - 2])
    cases["long"] = torch.zeros(B, T, dtype=torch.float64)
    cases["long"][torch.arange(B), long_pos] = 1.0
    args = {-2: -2, "long": long_pos, "bool": bool_mask, "float": weights}
    for name, w in cases.items():
        got = attribute(model, ids, _metric_all_positions, positions=args[name])
        want = (ref * w[..., None]).sum((0, 1))
        torch.testing.assert_close(got.scores, want, rtol=0, atol=EXACT_TOL, msg=str(name))


def test_weights_frozen_during_and_restored_after():
    model = tiny("llama")
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 2 == 0)
    seen = []
    h = model.model.layers[0].mlp.register_forward_hook(
        lambda *_: seen.append(any(p.requires_grad for p in model.parameters())))
    attribute(model, pivot_batch("llama"))
    h.remove()
    assert seen == [False]
    assert [p.requires_grad for p in params] == [i % 2 == 0 for i in range(len(params))]
    assert all(p.grad is None for p in params)  # no weight gradient was ever allocated


def test_missing_gradient_fails_loudly():
    """A metric that only reads layer 0 leaves layer 1's sites without gradient: CCAError,
    never silent zeros."""
    model = tiny("llama")
    pb = pivot_batch("llama")
    captured = {}
    h = model.model.layers[0].register_forward_hook(lambda _m, _i, out: captured.__setitem__("h", out))
    try:
        with AttributionSession(model) as s:
            s.forward(pb.model_inputs(), -1)
            h0 = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]
            with pytest.raises(CCAError, match=r"no gradient reached 4 component site\(s\) \(L1.q, L1.k, L1.v, L1.mlp\)"):
                s.backward(h0[:, -1].sum())
    finally:
        h.remove()
    with pytest.raises(CCAError, match="does not depend"):
        attribute(model, pb, lambda logits, b: torch.zeros(()))


def test_bad_inputs_raise_cca_error():
    model = tiny("gpt2")
    pb = pivot_batch("gpt2")
    with pytest.raises(CCAError, match="bad positions"):
        attribute(model, pb, positions=40)
    with pytest.raises(CCAError, match="needs a PivotBatch"):
        attribute(model, pb.input_ids)
    with pytest.raises(CCAError, match="batch must be"):
        attribute(model, [1, 2, 3], lambda logits, b: logits.sum())
    with pytest.raises(CCAError, match="kinds"):
        attribute(model, pb, kinds=("attn",))
    with pytest.raises(CCAError, match="one batch"):
        with AttributionSession(model, per_position=True) as s:
            for _ in range(2):
                out = s.forward(pb.model_inputs(), -1)
                s.backward(out.logits[:, -1, 3].sum())


def test_kinds_subset_views_and_ranking():
    model = tiny("phi3")
    space = ComponentSpace(model)
    pb = pivot_batch("phi3")
    full = attribute(model, pb, backend="torch")
    heads = attribute(model, pb, kinds=("q", "k", "v"), backend="torch")
    for (layer, kind), v in heads.by_site().items():
        want = torch.zeros_like(v) if kind == "mlp" else full.site(layer, kind)
        torch.testing.assert_close(v, want, rtol=0, atol=EXACT_TOL)
    assert all(c.kind != "mlp" for c, _ in heads.top(1000))
    assert len(heads.top(1000)) == space.n_layers * sum(space.counts[k] for k in "qkv")
    top = full.top(5)
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True) and values[0] == float(full.scores.max())
    assert [abs(v) for _, v in full.top(3, by="abs")][0] == float(full.scores.abs().max())
    comp = full.by_component()
    assert len(comp) == space.total and comp[top[0][0]] == top[0][1]


def test_bfloat16_model_scores_are_fp32_and_close_to_float32():
    """bf16 activations and gradients (u = 2^-9) through 2 tiny layers: scores within 10% of
    the largest fp32-model score (observed ~2%); the reduction itself accumulates in fp32."""
    pb = pivot_batch("llama", seed=4)
    ref = attribute(tiny("llama", torch.float32), pb).scores
    got = attribute(tiny("llama", torch.bfloat16), pb)
    assert got.scores.dtype == torch.float32 and isinstance(got, Attribution)
    assert (got.scores - ref).abs().max() <= 0.1 * ref.abs().max()


# ---- mode and grad handling ---------------------------------------------------------------------------
def _dropout_gpt2():
    """A tiny GPT-2 left in train() with every dropout at p=0.5 (scores would differ per call in train mode)."""
    model = make_tiny("gpt2")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    return model.train()


def test_attribute_runs_in_eval_mode_and_restores_every_training_flag():
    model = _dropout_gpt2()
    model.transformer.h[0].eval()  # a mixed state: must come back exactly as it was
    before = [m.training for m in model.modules()]
    pb = pivot_batch("gpt2")
    torch.manual_seed(0)
    a = attribute(model, pb).scores
    torch.manual_seed(1)  # another dropout draw would change train-mode scores
    b = attribute(model, pb).scores
    assert torch.equal(a, b)  # eval mode: no dropout, so bit-identical
    assert [m.training for m in model.modules()] == before
    ref = attribute(make_tiny("gpt2"), pb).scores  # the same weights in eval mode
    torch.testing.assert_close(a, ref, rtol=0, atol=0)  # float64, same ops: exactly the eval scores


def test_attribute_works_under_no_grad_and_leaves_grad_mode_alone():
    model = tiny("llama")
    pb = pivot_batch("llama")
    ref = attribute(model, pb).scores
    assert torch.isfinite(ref).all() and ref.abs().sum() > 0
    with torch.no_grad():
        got = attribute(model, pb).scores
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)  # the same computation
    assert all(p.requires_grad for p in model.parameters())  # weights unfrozen again
