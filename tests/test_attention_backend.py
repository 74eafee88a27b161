"""``attn_implementation="auto"``: flash-attn on CUDA with a half dtype when installed, else sdpa;
the chosen backend is what the model runs and what reports record. The CUDA and flash-attn
conditions are monkeypatched: no GPU or flash-attn is needed (``torch.device("cuda")`` is only a
name here, no tensor is made on it)."""
from __future__ import annotations

import pytest
import torch

import cca_fast.models.loading as loading
from cca_fast.errors import CCAError
from cca_fast.models.runtime import attention_backend

HALF = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("installed", [True, False])
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_auto_picks_flash_only_on_cuda_half_with_flash_attn(monkeypatch, installed, device, dtype):
    monkeypatch.setattr(loading, "flash_attn_available", lambda: installed)
    want = "flash_attention_2" if installed and device.startswith("cuda") and dtype in HALF else "sdpa"
    assert loading.resolve_attn_implementation("auto", device, dtype) == want


@pytest.mark.parametrize("name", ["sdpa", "eager"])
def test_explicit_choices_are_kept(monkeypatch, name):
    monkeypatch.setattr(loading, "flash_attn_available", lambda: True)
    assert loading.resolve_attn_implementation(name, "cuda", torch.bfloat16) == name
    assert loading.resolve_attn_implementation(name, "cpu", torch.float32) == name


def test_explicit_flash_is_checked(monkeypatch):
    monkeypatch.setattr(loading, "flash_attn_available", lambda: False)
    with pytest.raises(CCAError, match="flash-attn package"):
        loading.resolve_attn_implementation("flash_attention_2", "cuda", torch.bfloat16)
    monkeypatch.setattr(loading, "flash_attn_available", lambda: True)
    assert loading.resolve_attn_implementation("flash_attention_2", "cuda", torch.float16) == "flash_attention_2"
    with pytest.raises(CCAError, match="CUDA only"):
        loading.resolve_attn_implementation("flash_attention_2", "cpu", torch.bfloat16)
    with pytest.raises(CCAError, match="float16 / bfloat16"):
        loading.resolve_attn_implementation("flash_attention_2", "cuda", torch.float32)
    with pytest.raises(CCAError, match="unknown attention"):
        loading.resolve_attn_implementation("flash", "cpu", torch.float32)


def test_flash_attn_available_follows_the_import_system(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a))
    assert loading.flash_attn_available()
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "flash_attn" else real(n, *a))
    assert not loading.flash_attn_available()


def test_attention_backend_reads_what_the_model_runs():
    from helpers import make_tiny

    assert attention_backend(make_tiny("llama", dtype=torch.float32, attn="sdpa")) == "sdpa"
    assert attention_backend(make_tiny("llama", dtype=torch.float32, attn="eager")) == "eager"
    assert attention_backend(torch.nn.Linear(2, 2)) == "unknown"


def test_load_model_resolves_auto_before_transformers(monkeypatch, tmp_path):
    """``load_model(attn_implementation="auto")`` passes the resolved name to transformers (the
    local folder is a tiny saved model)."""
    from helpers import char_tokenizer, make_tiny

    model = make_tiny("llama", dtype=torch.float32, attn="sdpa")
    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    seen = []
    real = loading.resolve_attn_implementation

    def spy(attn, device, dtype):
        seen.append(attn)
        return real(attn, device, dtype)

    monkeypatch.setattr(loading, "resolve_attn_implementation", spy)
    loaded, _ = loading.load_model(str(tmp_path), device="cpu", dtype="float32")
    assert seen == ["auto"] and attention_backend(loaded) == "sdpa"
