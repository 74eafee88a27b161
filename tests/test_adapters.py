"""Adapters and the component space: the identity test for every supported family.

Scaling a component's activation through the hooks must give the same logits as scaling the
weight slices that produce it (``ComponentSpace.scale_slices``). Both sides run in float64, so
the only difference is the order of floating-point operations: tolerance 1e-10 (absolute, on
logits of magnitude ~1; float64 rounding is ~1e-16 per op, the two paths differ in a handful of ops).
"""
from __future__ import annotations

import pytest
import torch

from cca_fast import ComponentSpace
from cca_fast.errors import UnsupportedArchitectureError
from cca_fast.models.hooks import read_components, scale_components
from cca_fast.models.adapters import get_adapter
from helpers import ARCHS, VOCAB, make_tiny

TOL = 1e-10
PER_HEAD_QK_NORM = {"qwen3", "gemma3_text"}


def _scaled_weights_logits(model, space, comp, s, ids):
    saved = []
    with torch.no_grad():
        for ws in space.scale_slices(comp):
            p = model.get_parameter(ws.param)
            sl = p.narrow(ws.dim, ws.start, ws.stop - ws.start)
            saved.append((sl, sl.clone()))
            sl.mul_(s)
        try:
            return model(ids).logits
        finally:
            for sl, orig in saved:
                sl.copy_(orig)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_scale_hooks_equal_weight_rows(arch):
    model = make_tiny(arch)
    space = ComponentSpace(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    with torch.no_grad():
        base = model(ids).logits
    checked = 0
    for layer in range(space.n_layers):
        for kind, n in space.counts.items():
            for index in sorted({0, n - 1, n // 2}):
                comp = space.component(space.flat_index(layer, kind, index))
                s = 0.3 + 1.7 * torch.rand((), generator=g).item()
                scale = torch.ones(n, dtype=torch.float64)
                scale[index] = s
                with torch.no_grad(), scale_components(model, space, {(layer, kind): scale}):
                    via_hook = model(ids).logits
                via_weights = _scaled_weights_logits(model, space, comp, s, ids)
                # the intervention must change something (else the test proves nothing), except
                # where a per-head RMSNorm on q/k (Qwen3, Gemma3) makes a head scale-invariant
                if not (arch in PER_HEAD_QK_NORM and kind in ("q", "k")):
                    assert (via_hook - base).abs().max() > 1e-6, (arch, comp)
                torch.testing.assert_close(via_hook, via_weights, rtol=0, atol=TOL, msg=f"{arch} {comp}")
                checked += 1
    assert checked >= space.n_layers * 4


@pytest.mark.parametrize("arch", ARCHS)
def test_scaling_at_one_position_changes_only_later_positions(arch):
    model = make_tiny(arch)
    space = ComponentSpace(model)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    scale = torch.full((space.counts["mlp"],), 0.0, dtype=torch.float64)
    with torch.no_grad():
        base = model(ids).logits
        with scale_components(model, space, {(0, "mlp"): scale}, positions=3):
            out = model(ids).logits
    torch.testing.assert_close(out[:, :3], base[:, :3], rtol=0, atol=0)  # causal: exact
    assert (out[:, 3] - base[:, 3]).abs().max() > 1e-6


def test_read_components_shapes_and_values():
    model = make_tiny("llama")
    space = ComponentSpace(model)
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    q_proj = model.get_submodule("model.layers.1.self_attn.q_proj")
    with torch.no_grad(), read_components(model, space, positions=-1) as acts:
        model(ids)
        hidden = {}
        h = q_proj.register_forward_hook(lambda m, i, o: hidden.setdefault("x", i[0]))
        model(ids)
        h.remove()
    assert acts[(1, "q")].shape == (3, 6, 6)
    assert acts[(1, "mlp")].shape == (3, 22, 1)
    expect = q_proj(hidden["x"])[:, -1].view(3, 6, 6)
    torch.testing.assert_close(acts[(1, "q")], expect, rtol=0, atol=1e-12)


def test_component_space_indexing_roundtrip():
    model = make_tiny("phi3")
    space = ComponentSpace(model)
    assert space.total == 2 * (6 + 2 + 2 + 22)
    for flat in range(space.total):
        c = space.component(flat)
        assert space.flat_index(c.layer, c.kind, c.index) == flat
    v = torch.arange(space.total, dtype=torch.float32)
    torch.testing.assert_close(space.join(space.split(v)), v)


def test_owned_rows_phi3_and_gpt2():
    phi = ComponentSpace(make_tiny("phi3"))
    rows = phi.owned_rows([phi.flat_index(1, "k", 0), phi.flat_index(1, "mlp", 4)])
    qkv = rows["model.layers.1.self_attn.qkv_proj.weight"]
    assert qkv.dim == 0 and qkv.index.tolist() == list(range(36, 42))  # k head 0 rows follow the 6*6 q rows
    assert rows["model.layers.1.mlp.gate_up_proj.weight"].index.tolist() == [22 + 4]  # up half
    gpt = ComponentSpace(make_tiny("gpt2"))
    rows = gpt.owned_rows([gpt.flat_index(0, "v", 2)])
    w = rows["transformer.h.0.attn.c_attn.weight"]
    assert w.dim == 1 and w.index.tolist() == list(range(72 + 12, 72 + 18))
    assert rows["transformer.h.0.attn.c_attn.bias"].index.tolist() == list(range(84, 90))


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("gpt_neox", vocab_size=50, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=20)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedArchitectureError, match="supported model types: .*llama"):
        get_adapter(model)
