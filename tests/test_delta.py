"""Sparse deltas: apply / revert / save / load / merge, refusal on the wrong model, ``cca apply``.

Everything here is about bit-exactness (``bitwise_equal``: same dtype, shape and bits), so there
are no tolerances.
"""
from __future__ import annotations

import json

import pytest
import torch

from cca_fast import ComponentSpace
from cca_fast.delta import (CONFIG_NAME, WEIGHTS_NAME, SparseDelta, apply_delta, bitwise_equal, merge_delta,
                            revert_delta)
from cca_fast.errors import CCAError
from cca_fast.cli import apply as apply_command
from helpers import make_tiny, run_cli


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _perturb_owned(model, flat, seed=0):
    """Change the owned rows of the components ``flat`` (what stage 3 does) and return them."""
    space = ComponentSpace(model)
    plan = space.owned_rows(flat)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, sel in plan.items():
            p = model.get_parameter(name)
            rows = p.index_select(sel.dim, sel.index)
            p.index_copy_(sel.dim, sel.index, rows + 0.01 * torch.randn(rows.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return plan


def _made(arch="llama", dtype=torch.float32, flat=(0, 7, 20), store_base=True):
    base = make_tiny(arch, dtype=dtype)
    new = make_tiny(arch, dtype=dtype)
    plan = _perturb_owned(new, list(flat))
    return base, new, plan, SparseDelta.from_models(base, new, store_base=store_base,
                                                    meta={"components": [str(c) for c in ComponentSpace(new).components(list(flat))]})


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "qwen2"])
def test_apply_changes_only_allowed_rows_and_revert_is_bit_exact(arch):
    space = ComponentSpace(make_tiny(arch))
    flat = [0, space.offset(0, "v") + 1, space.offset(1, "mlp") + 5]
    base, new, plan, delta = _made(arch, flat=flat)
    assert set(delta.params) == set(plan)
    if arch == "gpt2":  # Conv1D output channels are columns: the delta found dim 1 by itself
        assert delta.params["transformer.h.0.attn.c_attn.weight"].dim == 1
    for name, pd in delta.params.items():
        assert pd.dim == plan[name].dim and torch.equal(pd.index, plan[name].index)
    model = make_tiny(arch, dtype=torch.float32)
    before = _state(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    handle = apply_delta(model, delta)
    for n, p in model.named_parameters():
        assert bitwise_equal(p, new.get_parameter(n)), n  # allowed rows = the new model's, all else = base
        if n not in plan:
            assert bitwise_equal(p, before[n]), n
    for n, b in model.named_buffers():
        assert bitwise_equal(b, buffers[n]), n
    revert_delta(model, handle)
    for n, p in model.named_parameters():
        assert bitwise_equal(p, before[n]), n
    with pytest.raises(CCAError, match="already reverted"):
        revert_delta(model, handle)
    apply_delta(model, delta)
    revert_delta(model, delta)  # from the stored base rows, without a handle
    for n, p in model.named_parameters():
        assert bitwise_equal(p, before[n]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_load_round_trip(tmp_path, dtype):
    _, new, _, delta = _made(dtype=dtype)
    out = delta.save(tmp_path / "d")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temporary leftovers
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["format_version"] == 2 and cfg["model_type"] == "llama" and cfg["dtype"] == str(dtype)[6:]
    assert cfg["components"] == delta.meta["components"] and set(cfg["params"]) == set(delta.params)
    loaded = SparseDelta.load(out)
    assert loaded.meta["components"] == delta.meta["components"]
    for name, pd in delta.params.items():
        q = loaded.params[name]
        assert (q.dim, q.shape, q.dtype, q.base_sha256) == (pd.dim, pd.shape, pd.dtype, pd.base_sha256)
        assert bitwise_equal(q.new, pd.new) and bitwise_equal(q.base, pd.base) and torch.equal(q.index, pd.index)
    model = make_tiny("llama", dtype=dtype)
    apply_delta(model, loaded)
    for n, p in model.named_parameters():
        assert bitwise_equal(p, new.get_parameter(n)), n


def test_load_rejects_bad_directories(tmp_path):
    with pytest.raises(CCAError, match="not a sparse delta directory"):
        SparseDelta.load(tmp_path)
    _, _, _, delta = _made()
    d = delta.save(tmp_path / "d")
    w = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(w[:-1] + bytes([w[-1] ^ 1]))
    with pytest.raises(CCAError, match="does not match"):
        SparseDelta.load(d)
    (d / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CCAError, match="not valid JSON"):
        SparseDelta.load(d)


def test_refuses_a_model_it_was_not_made_for():
    _, _, _, delta = _made()
    before_other = make_tiny("llama", dtype=torch.float32, seed=1)
    snapshot = _state(before_other)
    with pytest.raises(CCAError, match="not made for this model"):
        apply_delta(before_other, delta)  # same architecture, other weights: base rows hash mismatch
    for n, p in before_other.named_parameters():  # a refused delta writes nothing
        assert bitwise_equal(p, snapshot[n])
    with pytest.raises(CCAError, match="lacks"):
        apply_delta(make_tiny("gpt2", dtype=torch.float32), delta)  # missing parameters
    with pytest.raises(CCAError, match="float32"):
        apply_delta(make_tiny("llama", dtype=torch.float64), delta)  # dtype
    wider = make_tiny("llama", dtype=torch.float32)
    with torch.no_grad():  # same names, other shape
        wider.model.layers[0].self_attn.q_proj.weight = torch.nn.Parameter(torch.zeros(40, 36))
    with pytest.raises(CCAError, match="shape"):
        apply_delta(wider, delta)
    model = make_tiny("llama", dtype=torch.float32)
    apply_delta(model, delta)
    with pytest.raises(CCAError, match="already applied"):
        apply_delta(model, delta)


def test_revert_without_base_rows_needs_the_handle(tmp_path):
    _, _, _, delta = _made(store_base=False)
    delta = SparseDelta.load(delta.save(tmp_path / "d"))
    model = make_tiny("llama", dtype=torch.float32)
    before = _state(model)
    handle = apply_delta(model, delta)
    with pytest.raises(CCAError, match="without base rows"):
        revert_delta(model, delta)
    revert_delta(model, handle)
    for n, p in model.named_parameters():
        assert bitwise_equal(p, before[n])
    with pytest.raises(CCAError, match="not the delta's new rows"):
        revert_delta(model, _made()[3])  # not applied


def test_merge_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    _, new, _, delta = _made()
    model = make_tiny("llama", dtype=torch.float32)
    out = merge_delta(model, delta, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for n, p in reloaded.named_parameters():
        assert bitwise_equal(p, new.get_parameter(n)), n
    assert json.loads((out / "cca_delta.json").read_text())["components"] == delta.meta["components"]
    with pytest.raises(CCAError, match="not empty"):
        merge_delta(make_tiny("llama", dtype=torch.float32), delta, out)


def _tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 97)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_cca_apply_subcommand(tmp_path, capsys):
    base_dir = tmp_path / "base"
    base = make_tiny("llama", dtype=torch.float32)
    base.save_pretrained(base_dir)
    _tiny_tokenizer().save_pretrained(base_dir)
    new = make_tiny("llama", dtype=torch.float32)
    _perturb_owned(new, [0, 30])
    delta_dir = SparseDelta.from_models(base, new).save(tmp_path / "delta")

    assert run_cli(apply_command, ["apply", str(delta_dir), "--model", str(base_dir), "--revert-check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["revert_check"]["ok"] and report["applied"] and report["params"] == 2

    assert run_cli(apply_command,
                   ["apply", str(delta_dir), "--model", str(base_dir), "--merge", str(tmp_path / "m")]) == 0
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    for n, p in merged.named_parameters():
        assert bitwise_equal(p, new.get_parameter(n)), n
    assert (tmp_path / "m" / "tokenizer.json").exists()

    other_dir = tmp_path / "other"
    make_tiny("llama", dtype=torch.float32, seed=3).save_pretrained(other_dir)
    _tiny_tokenizer().save_pretrained(other_dir)
    from cca_fast.cli.apply import main
    assert main(["apply", str(delta_dir), "--model", str(other_dir)]) == 2
    assert "not made for this model" in capsys.readouterr().err
