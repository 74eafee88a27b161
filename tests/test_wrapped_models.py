"""Wrapped models: peft (LoRA), ``torch.compile`` and a user's own module holding the model are
looked through in one place (``models.runtime.unwrap``), and the whole path works on them.

Identities used (all float64, tiny llama of ``helpers``):

* attribution of a LoRA model == attribution of a plain copy with the LoRA merged into its weights
  (the activations are the same function of the inputs: ``W x + B A x = (W + B A) x``); the two
  differ only in summation order, so ``atol=1e-10`` on O(1) scores (float64 rounding ~1e-15 per
  operation, a few hundred operations) leaves margin yet catches a missed adapter (an O(0.1) change);
* ``torch.compile`` d model and a user wrapper: bitwise the scores of the model inside (the same
  eager modules run);
* a LoRA whose ``B`` is zero adds exact zeros, so its update equals the plain model's bitwise;
  with a non-zero LoRA the sparse and the reference update agree to 1e-12 (float64, same math,
  other summation order); the adapters' weights and every row outside the selection stay
  bit-identical;
* merging the delta of a LoRA model writes the *base* model with the delta: loaded back as a
  plain model its logits equal the LoRA model's with the adapter disabled (bitwise: same weights,
  same modules).
"""
from __future__ import annotations

import pytest
import torch

import cca_fast as cca
from cca_fast.delta import bitwise_equal
from cca_fast.errors import CCAError, WrappedModelError
from cca_fast.models import runtime
from helpers import assert_only_owned_rows_may_differ, examples, tiny

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj"]


def lora_model(seed: int = 0, zero_b: bool = False):
    """A tiny float64 llama with LoRA (r=2) on q, v and up projections, every weight from
    ``seed`` (peft draws ``A`` from the global generator: overwritten here); ``B`` random (so the
    adapter changes the outputs) unless ``zero_b``."""
    model = peft.get_peft_model(tiny("llama", seed=seed), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or ("lora_B" in n and not zero_b):
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def merged_copy(model):
    """A plain model whose weights are the LoRA model's with the adapter merged in."""
    import copy

    return copy.deepcopy(model).merge_and_unload().eval()


class Holder(torch.nn.Module):
    """A user's wrapper: the HF model one attribute down, its own forward unrelated."""

    def __init__(self, lm):
        super().__init__()
        self.head = torch.nn.Linear(3, 3)
        self.inner = torch.nn.ModuleDict({"lm": lm})

    def forward(self, x):  # pragma: no cover - never called by cca_fast
        return self.head(x)


# ---- unwrap: one place ---------------------------------------------------------------------------

def test_unwrap_sees_through_every_wrapper():
    plain = tiny("llama")
    assert runtime.unwrap(plain) is plain
    assert runtime.unwrap(torch.compile(plain)) is plain
    assert runtime.unwrap(Holder(plain)) is plain
    assert runtime.unwrap(Holder(torch.compile(plain))) is plain
    pm = lora_model()
    inner = runtime.unwrap(pm)
    assert inner is pm.get_base_model() and runtime.has_adapters(pm)
    assert cca.unwrap_model(pm) is inner


def test_base_parameters_use_the_plain_names():
    pm, plain = lora_model(), tiny("llama")
    base = runtime.base_parameters(pm)
    assert sorted(base) == sorted(n for n, _ in plain.named_parameters())  # adapters left out, base_layer dropped
    assert base["model.layers.0.self_attn.q_proj.weight"] is pm.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert sorted(runtime.base_state_dict(pm)) == sorted(plain.state_dict())


def test_unknown_layout_names_the_module_tree():
    class NoLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(4)])

    with pytest.raises(WrappedModelError) as e:
        cca.ComponentSpace(NoLM())
    msg = str(e.value)
    assert "cannot find the causal LM in this NoLM" in msg and "Module tree found:" in msg
    assert "encoder: Sequential" in msg and "0: Linear" in msg and "1: ReLU" in msg
    assert "blocks: ModuleList" in msg and "0..3: Linear x 4" in msg
    assert isinstance(e.value, CCAError)

    two = torch.nn.ModuleDict({"a": tiny("llama"), "b": tiny("llama", seed=1)})
    with pytest.raises(WrappedModelError, match=r"several transformers models \(a, b\): pass the one to use"):
        cca.ComponentSpace(two)


def test_moved_module_layout_names_the_tree():
    model = tiny("llama")
    layer = model.model.layers[0].self_attn
    layer.query = layer.q_proj
    del layer.q_proj
    with pytest.raises(cca.CCAError) as e:
        cca.ComponentSpace(model)
    msg = str(e.value)
    assert "expected module 'model.layers.0.self_attn.q_proj'" in msg and "Module tree found:" in msg
    assert "query: Linear" in msg


def test_prompt_learning_peft_is_refused():
    base = tiny("llama")
    pm = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(WrappedModelError, match="prompt-learning adapter .* pass the base model"):
        cca.ComponentSpace(pm)


# ---- attribution and selection ---------------------------------------------------------------------

def test_attribution_of_lora_model_equals_merged_weights():
    pm = lora_model()
    batch = cca.collate(examples("llama", 5), pad_id=0)
    got = cca.attribute(pm, batch)
    ref = cca.attribute(merged_copy(pm), batch)
    plain = cca.attribute(tiny("llama"), batch)
    torch.testing.assert_close(got.scores, ref.scores, rtol=0, atol=1e-10)  # see the module docstring
    assert (got.scores - plain.scores).abs().max() > 1e-3  # the adapter really is part of what is scored
    sel = cca.select("atp-topk", cca.ComponentSpace(pm), scores=got, k=7)
    assert sel.indices == cca.select("atp-topk", cca.ComponentSpace(tiny("llama")), scores=ref, k=7).indices


def test_compiled_and_user_wrapped_models_attribute_like_the_model_inside():
    model = tiny("llama")
    batch = cca.collate(examples("llama", 4), pad_id=0)
    ref = cca.attribute(model, batch).scores
    for wrapped in (torch.compile(model), Holder(model)):
        space = cca.ComponentSpace(wrapped)
        assert space.total == 2 * (6 + 2 + 2 + 22)
        assert torch.equal(cca.attribute(wrapped, batch).scores, ref)
    with cca.scale_components(Holder(model), cca.ComponentSpace(model), {(0, "q"): torch.zeros(6)}):
        zeroed = cca.attribute(model, batch).scores
    assert not torch.equal(zeroed, ref)


# ---- the update -------------------------------------------------------------------------------------

def _cfg(mode: str = "sparse") -> cca.UpdateConfig:
    return cca.UpdateConfig(max_steps=3, lr=5e-2, mode=mode, share_prefix=False)


def test_update_of_zero_lora_equals_plain_model():
    ex = examples("llama", 5)
    plain, pm = tiny("llama"), lora_model(zero_b=True)
    space = cca.ComponentSpace(plain)
    sel = cca.select("random", space, like=9, seed=3)
    a = cca.run_update(plain, space, sel, ex, _cfg())
    b = cca.run_update(pm, cca.ComponentSpace(pm), sel, ex, _cfg())
    assert list(a.delta.params) == list(b.delta.params)  # the plain model's names
    for name, pd in a.delta.params.items():
        assert bitwise_equal(pd.new, b.delta.params[name].new), name


def test_update_of_lora_model_changes_base_rows_only():
    ex = examples("llama", 5)
    results, models = {}, {}
    for mode in ("sparse", "reference"):
        pm = lora_model()
        before = {n: p.detach().clone() for n, p in pm.named_parameters()}
        space = cca.ComponentSpace(pm)
        sel = cca.select("random", space, like=11, seed=5)
        results[mode] = cca.run_update(pm, space, sel, ex, _cfg(mode))
        models[mode] = pm
        after = dict(pm.named_parameters())
        for n, p in after.items():
            if "lora_" in n:
                assert bitwise_equal(p, before[n]), f"adapter weight {n} changed"
        base_before = runtime.base_parameters(lora_model())  # the same seed: the weights before the update
        assert_only_owned_rows_may_differ(runtime.base_parameters(pm), base_before, space.owned_rows(sel.indices))
        assert results[mode].history[-1]["train_logit_diff"] > results[mode].history[0]["train_logit_diff"]
    s, r = results["sparse"].delta, results["reference"].delta
    assert sorted(s.params) == sorted(r.params)
    for name in s.params:
        torch.testing.assert_close(s.params[name].new, r.params[name].new, rtol=0, atol=1e-12)


def test_lora_delta_apply_revert_and_merge_as_base(tmp_path):
    from transformers import AutoModelForCausalLM

    ex = examples("llama", 4)
    pm = lora_model()
    space = cca.ComponentSpace(pm)
    res = cca.run_update(pm, space, cca.select("random", space, like=6, seed=1), ex, _cfg())
    delta = res.delta
    cca.revert_delta(pm, delta)  # back to the base rows
    fresh = lora_model()
    for (n, p), (_, q) in zip(pm.named_parameters(), fresh.named_parameters()):
        assert bitwise_equal(p, q), n
    handle = cca.apply_delta(pm, delta)
    cca.revert_delta(pm, handle)
    # the delta's names are the plain model's: it applies to a plain base model as well
    plain = tiny("llama")
    cca.revert_delta(plain, cca.apply_delta(plain, delta))
    out = cca.merge_delta(pm, delta, tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    base = runtime.base_state_dict(pm)  # the base weights, the delta applied (merge_delta keeps it applied)
    assert sorted(loaded.state_dict()) == sorted(base)
    for name, t in loaded.state_dict().items():
        assert bitwise_equal(t, base[name]), name
    ids = torch.tensor([[5, 9, 11, 40, 3]])
    with torch.no_grad(), pm.disable_adapter():
        want = pm(input_ids=ids).logits
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    # same weights; the loaded model may pick another attention kernel: float64 rounding only
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_sparse_update_through_compiled_and_user_wrapper_equals_plain():
    ex = examples("llama", 4)
    ref_model = tiny("llama")
    space = cca.ComponentSpace(ref_model)
    sel = cca.select("random", space, like=8, seed=2)
    ref = cca.run_update(ref_model, space, sel, ex, _cfg())
    for wrap in (torch.compile, Holder):
        model = tiny("llama")
        res = cca.run_update(wrap(model), cca.ComponentSpace(wrap(model)), sel, ex, _cfg())
        for name, pd in ref.delta.params.items():
            assert bitwise_equal(res.delta.params[name].new, pd.new), name


def test_dcm_and_atp_run_on_wrapped_models():
    """DCM and AtP forward through ``runtime.forward`` (which unwraps): a compiled or user-wrapped
    model gives the mask / scores of the model inside, bitwise; a LoRA model those of its merged
    copy (float64, other summation order: 1e-10 as above)."""
    from cca_fast.stages.localize.dcm import DCMConfig

    model = tiny("llama")
    ex = examples("llama", 4)
    cfg = DCMConfig(epochs=2, batch_size=2, lr=0.05)
    ref, ref_atp = cca.run_dcm(model, ex, cfg).mask, cca.run_atp(model, ex).scores
    for wrapped in (torch.compile(model), Holder(model)):
        assert torch.equal(cca.run_dcm(wrapped, ex, cfg).mask, ref)
        assert torch.equal(cca.run_atp(wrapped, ex).scores, ref_atp)
    pm = lora_model()
    torch.testing.assert_close(cca.run_dcm(pm, ex, cfg).mask, cca.run_dcm(merged_copy(pm), ex, cfg).mask,
                               rtol=0, atol=1e-10)
