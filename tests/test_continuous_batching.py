"""The slot decoder (continuous batching over a preallocated cache, one shared prefix) gives the
batch-1 reference's tokens: greedy and seeded sampling, every slot count, prompt order, prefix
sharing on / off, and a pinned prefix (float64 tiny models: exact ties are practically
impossible, so ids must be identical)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cca_fast.generation import GenerationConfig, PrefixCache, generate, slots
from helpers import tiny


def _prompts(model, seed: int = 1, n: int = 7, shared: int = 20) -> list[list[int]]:
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(3, V, (shared,), generator=g).tolist()
    return [common + torch.randint(3, V, (int(k),), generator=g).tolist()
            for k in torch.randint(1, 9, (n,), generator=g)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt2"])
@pytest.mark.parametrize("sample", [False, True])
def test_slots_equal_batch1_reference(arch, sample):
    model = tiny(arch).eval()
    assert slots.supported(model, 64)
    prompts = _prompts(model)
    base = GenerationConfig(max_new_tokens=11, batch_size=1, share_prefix=False, continuous=False,
                            stop_on_eos=False, do_sample=sample, temperature=1.5, seed=3)
    seeds = [101 + i for i in range(len(prompts))]
    ref = [g.output_ids for g in generate(model, None, prompts, base, row_seeds=seeds)]
    order = [3, 0, 6, 1, 5, 2, 4]
    for bs in (1, 3, 8):
        for share in (False, True):
            cfg = dataclasses.replace(base, batch_size=bs, share_prefix=share, continuous=True)
            out = [g.output_ids for g in generate(model, None, prompts, cfg, row_seeds=seeds)]
            assert out == ref, (arch, sample, bs, share)
            perm = generate(model, None, [prompts[i] for i in order], cfg, row_seeds=[seeds[i] for i in order])
            assert [g.output_ids for g in perm] == [ref[i] for i in order], (arch, sample, bs, share, "order")


def test_slots_pinned_prefix_and_early_stop_off():
    model = tiny("llama").eval()
    prompts = _prompts(model, seed=2)
    base = GenerationConfig(max_new_tokens=9, batch_size=1, share_prefix=False, continuous=False, stop_on_eos=False)
    ref = [g.output_ids for g in generate(model, None, prompts, base)]
    cache = PrefixCache()
    cache.pin(prompts[0][:20])
    for bs in (2, 5):
        cfg = dataclasses.replace(base, batch_size=bs, share_prefix=True, continuous=True)
        assert [g.output_ids for g in generate(model, None, prompts, cfg, prefix_cache=cache)] == ref
    assert cache.stats.computed_tokens == 20  # the pinned prefix ran once for both calls
    # early_stop=False (the reference procedure): same outputs, the stopped rows decode on
    eos = (ref[0][2],)
    cfg = dataclasses.replace(base, batch_size=3, continuous=True, stop_on_eos=True, eos_token_ids=eos)
    a = [g.output_ids for g in generate(model, None, prompts, cfg)]
    b = [g.output_ids for g in generate(model, None, prompts, dataclasses.replace(cfg, early_stop=False))]
    assert a == b and a[0] == ref[0][:3]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_slots_packed_steps_budget_and_memory_cap(arch, monkeypatch):
    """A step packs the decoding slots' tokens with the prompts entering free slots; whatever
    the packing (every prompt at once, one prompt a step, a memory cap leaving one slot), and
    whether the slot count comes from ``slots`` or ``batch_size``, the tokens are the batch-1
    reference's (float64: no near-ties)."""
    model = tiny(arch).eval()
    prompts = _prompts(model, seed=5, n=9, shared=17)
    base = GenerationConfig(max_new_tokens=10, batch_size=1, share_prefix=False, continuous=False, stop_on_eos=False)
    ref = [g.output_ids for g in generate(model, None, prompts, base)]
    cases = [dict(slots=64), dict(batch_size=4), dict(slots=4, batch_size=2), dict(slots=2, share_prefix=True)]
    for case in cases:
        cfg = dataclasses.replace(base, continuous=True, **case)
        assert [g.output_ids for g in generate(model, None, prompts, cfg)] == ref, case
    monkeypatch.setattr(slots, "PREFILL_TOKENS", 1)  # one prompt enters per step
    cfg = dataclasses.replace(base, continuous=True, slots=5, share_prefix=True)
    assert [g.output_ids for g in generate(model, None, prompts, cfg)] == ref
    monkeypatch.setattr(slots, "SLOT_CACHE_BYTES", 1)  # room for one slot only
    assert [g.output_ids for g in generate(model, None, prompts, cfg)] == ref


def test_generation_config_rows():
    assert GenerationConfig(batch_size=3).rows == 3
    assert GenerationConfig(batch_size=3, slots=40).rows == 40
    assert GenerationConfig(batch_size=3, slots=40, continuous=False).rows == 3
    with pytest.raises(Exception, match="slots must be >= 0"):
        GenerationConfig(slots=-1)
