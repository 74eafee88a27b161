"""The model-runtime layer (``cca_fast.models.runtime``) and the fast paths it gates.

The first tests fail when, on the *installed* transformers, a prefix fast path is not taken
(stage-3 shared prefix, generation's shared prefix and ``PrefixCache``, DCM's cached prefix, the
LoRA SFT prefix) or when cca_fast's own calls raise a deprecation warning: a transformers release
that renames the cache keyword again must turn these red, not silently slow the package down.
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from cca_fast.generation import GenerationConfig, GenerationStats, PrefixCache, generate
from cca_fast.generation.prefix import can_share
from cca_fast.models import runtime
from cca_fast.stages.batches import SharedPrefixBatch, collate_for_loss
from cca_fast.stages.examples import PivotExample, collate
from cca_fast.stages.localize.dcm import PivotPrefixCache
from helpers import ARCHS, VOCAB, make_tiny


def _examples(n=4, prefix=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    common = tuple(torch.randint(3, VOCAB, (prefix,), generator=g).tolist())
    return [PivotExample(f"e{i}", common + tuple(torch.randint(3, VOCAB, (1 + i,), generator=g).tolist()), 5, 6)
            for i in range(n)]


@pytest.fixture
def strict_warnings():
    """Every FastPathWarning, FutureWarning and DeprecationWarning raised inside the test is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", runtime.FastPathWarning)
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        yield


@pytest.mark.parametrize("arch", ARCHS)
def test_installed_transformers_takes_every_prefix_fast_path(arch, strict_warnings):
    model = make_tiny(arch, dtype=torch.float32, attn="eager" if arch == "gemma2" else "sdpa")  # gemma2: no sdpa
    kw = runtime.cache_keyword(model)
    assert kw in runtime.CACHE_KEYWORDS
    assert runtime.accepts_logits_to_keep(model)
    ex = _examples()
    # stage 3: the mini-batch's common prefix runs once
    assert isinstance(collate_for_loss(model, ex, 0, "cpu", min_shared=8), SharedPrefixBatch)
    # DCM (last-position mode): the prefix key/values are cached
    assert PivotPrefixCache(model, collate(ex, 0)).cache is not None
    # generation: a shared prefix, then a PrefixCache hit on the next call
    prompts = [list(e.prefix_ids) for e in ex]
    cache, stats = PrefixCache(min_reuse=4), GenerationStats()
    cfg = GenerationConfig(max_new_tokens=3, min_shared_prefix=8)
    generate(model, None, prompts, cfg, prefix_cache=cache, stats=stats)
    generate(model, None, prompts[:2], cfg, prefix_cache=cache, stats=stats)
    assert cache.stats.hits >= 1 and cache.stats.reused_tokens >= 8


def test_no_deprecation_warning_from_cache_calls(strict_warnings, capfd):
    """The cache goes in under the model's own keyword and is read back from the output field of
    the same name: neither raises transformers' deprecation warnings (a warning or a log line)."""
    model = make_tiny("llama", attn="sdpa")
    ids = torch.tensor([[3, 4, 5, 6]])
    logits, cache = runtime.forward(model, input_ids=ids, cache=runtime.new_cache(model), keep=1)
    logits2, _ = runtime.forward(model, input_ids=ids[:, -1:], position_ids=torch.tensor([[4]]), cache=cache, keep=1)
    assert logits.shape == (1, 1, VOCAB) and logits2.shape == (1, 1, VOCAB)
    assert "deprecated" not in capfd.readouterr().err.lower()


class _WithKeyword(nn.Module):
    """A fake LM whose forward takes the cache under ``keyword`` and returns it under the same name."""

    def __init__(self, keyword: str):
        super().__init__()
        self.keyword = keyword
        self.emb = nn.Embedding(VOCAB, 4)

    def out(self, input_ids, cache):
        return type("Out", (), {"logits": self.emb(input_ids), self.keyword: cache})()


class _NewStyle(_WithKeyword):
    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0):
        return self.out(input_ids, ("new", cache))


class _OldStyle(_WithKeyword):
    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        return self.out(input_ids, ("old", past_key_values))


class _NoCacheNoKeep(_WithKeyword):
    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        assert not kwargs, f"unexpected keywords {sorted(kwargs)}"
        return self.out(input_ids, None)


def test_cache_keyword_follows_the_forward_signature():
    ids = torch.tensor([[1, 2, 3]])
    new, old = _NewStyle("cache"), _OldStyle("past_key_values")
    assert runtime.cache_keyword(new) == "cache" and runtime.cache_keyword(old) == "past_key_values"
    assert runtime.forward(new, input_ids=ids, cache="C")[1] == ("new", "C")
    assert runtime.forward(old, input_ids=ids, cache="C")[1] == ("old", "C")
    logits, none = runtime.forward(new, input_ids=ids, keep=2)
    assert logits.shape == (1, 2, 4) and none is None  # sliced to keep even if the model ignores it


def test_a_fast_path_that_cannot_be_taken_warns_once_naming_the_cause():
    runtime._warn_once_cached.cache_clear()
    model = _NoCacheNoKeep("cache")
    with pytest.warns(runtime.FastPathWarning, match="no key/value cache argument"):
        assert runtime.cache_keyword(model) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runtime.cache_keyword(model) is None  # once per class: no second warning
        assert not can_share(model, 10)
    with pytest.warns(runtime.FastPathWarning, match="logits_to_keep"):
        assert runtime.keep_kwargs(model, 1) == {}
    logits, cache = runtime.forward(model, input_ids=torch.tensor([[1, 2]]), keep=1)
    assert logits.shape == (1, 1, 4) and cache is None
    with pytest.raises(TypeError, match="no key/value cache"):
        runtime.forward(model, input_ids=torch.tensor([[1, 2]]), cache="C")


def test_pad_id_precedence():
    class Tok:
        def __init__(self, pad=None, eos=None):
            self.pad_token_id, self.eos_token_id = pad, eos

    model = make_tiny("llama")  # config pad 0, eos 2
    assert runtime.pad_id(model, Tok(7, 8), explicit=5) == 5
    assert runtime.pad_id(model, Tok(7, 8)) == 7
    assert runtime.pad_id(model, Tok(None, 8)) == 0  # the config's pad before any EOS
    model.config.pad_token_id = None
    assert runtime.pad_id(model, Tok(None, 8)) == 8  # then the tokenizer's EOS
    assert runtime.pad_id(model) == 2  # then the config's EOS
    model.config.eos_token_id = [9, 10]
    assert runtime.pad_id(model) == 9
    model.config.eos_token_id = None
    assert runtime.pad_id(model) == 0


def test_eos_ids_union_of_tokenizer_and_generation_config():
    model = make_tiny("llama")
    model.generation_config.eos_token_id = [2, 11]
    tok = type("Tok", (), {"eos_token_id": 13})()
    assert runtime.eos_ids(model, tok, (40,)) == {2, 11, 13, 40}
    assert runtime.eos_ids(None, tok) == {13}
    assert runtime.eos_ids(model, None) == {2, 11}


def test_input_device_frozen_and_eval_mode_restore():
    model = make_tiny("gpt2")
    assert runtime.input_device(model) == model.get_input_embeddings().weight.device
    model.train()
    first = next(model.parameters())
    first.requires_grad_(False)
    with runtime.frozen(model), runtime.eval_mode(model):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.training and not first.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if p is not first)


@pytest.mark.slow
def test_cca_eval_limit_4_prints_no_deprecation_warning(tmp_path):
    """``cca eval --limit 4`` on the embedded default model, in a fresh process where every
    FutureWarning / DeprecationWarning is shown: none comes from cca_fast's calls."""
    proc = subprocess.run([sys.executable, "-W", "always::FutureWarning", "-W", "always::DeprecationWarning",
                           "-m", "cca_fast.cli", "eval", "--limit", "4", "--max-new-tokens", "24",
                           "--output", str(tmp_path), "--quiet"],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                           "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = proc.stderr.lower()
    assert "deprecated" not in err and "futurewarning" not in err, proc.stderr[-2000:]
    assert "fastpathwarning" not in err, proc.stderr[-2000:]
