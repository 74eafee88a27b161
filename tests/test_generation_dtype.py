"""``compute_dtype="bfloat16"`` (``--generation-dtype``): the opt-in bf16 generation. It reaches the
decoder (the linear layers compute in bf16), its tokens are valid and stop where they should, the
float32 default stays the batch-1 reference's tokens (also after a bf16 call on the same prefix
cache), and bad values are refused with the allowed ones named. bf16 is not token-identical: its
speed and token agreement with float32 are measured by ``bench/generation/bench_bf16.py``."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cca_fast.errors import CCAError
from cca_fast.experiments.config import GenerationSettings
from cca_fast.generation import GenerationConfig, PrefixCache, generate
from helpers import tiny


def _prompts(V: int, seed: int = 4, n: int = 6, shared: int = 18) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(3, V, (shared,), generator=g).tolist()
    return [common + torch.randint(3, V, (int(k),), generator=g).tolist() for k in torch.randint(1, 8, (n,), generator=g)]


def _linear_dtypes(model) -> tuple[set, object]:
    seen: set = set()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return seen, hooks


@pytest.mark.parametrize("continuous", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_reaches_the_decoder_and_gives_valid_tokens(arch, continuous):
    model = tiny(arch, dtype=torch.float32).eval()  # autocast casts float32, never float64
    V = model.config.vocab_size
    prompts = _prompts(V)
    cfg = GenerationConfig(max_new_tokens=9, batch_size=3, continuous=continuous, stop_on_eos=False,
                           compute_dtype="bfloat16")
    seen, hooks = _linear_dtypes(model)
    out = generate(model, None, prompts, cfg)
    assert seen == {torch.bfloat16}  # every linear layer of every forward ran in bf16
    seen.clear()
    generate(model, None, prompts, dataclasses.replace(cfg, compute_dtype="float32"))
    assert seen == {torch.float32}
    for h in hooks:
        h.remove()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights are untouched
    for g in out:
        assert len(g.output_ids) == 9 and g.finish_reason == "length"
        assert all(0 <= t < V for t in g.output_ids)
    # stop handling: an EOS id ends each row at its first occurrence, with the EOS reason
    eos = out[0].output_ids[3]
    stopped = generate(model, None, prompts, dataclasses.replace(cfg, stop_on_eos=True, eos_token_ids=(eos,)))
    for g, full in zip(stopped, out):
        cut = full.output_ids.index(eos) + 1 if eos in full.output_ids else len(full.output_ids)
        assert g.output_ids == full.output_ids[:cut]
        assert g.finish_reason == ("eos" if eos in full.output_ids else "length")
    assert stopped[0].finish_reason == "eos" and len(stopped[0].output_ids) <= 4


def test_float32_default_is_the_batch1_reference_after_a_bf16_call():
    """The default takes no autocast, and a prefix cache filled by a bf16 call is not reused by a
    float32 one (it is keyed by the autocast state): both give the batch-1 reference's tokens
    (float64 model: no near-ties)."""
    model = tiny("llama").eval()
    model32 = tiny("llama", dtype=torch.float32).eval()
    prompts = _prompts(model.config.vocab_size, seed=7)
    base = GenerationConfig(max_new_tokens=8, batch_size=1, share_prefix=False, continuous=False, stop_on_eos=False)
    assert base.compute_dtype == "float32"
    ref = [g.output_ids for g in generate(model, None, prompts, base)]
    fast = dataclasses.replace(base, batch_size=4, share_prefix=True, continuous=True)
    assert [g.output_ids for g in generate(model, None, prompts, fast)] == ref
    ref32 = [g.output_ids for g in generate(model32, None, prompts, base)]
    cache = PrefixCache()
    cache.pin(prompts[0][:18])
    generate(model32, None, prompts, dataclasses.replace(fast, compute_dtype="bfloat16"), prefix_cache=cache)
    k_bf16 = cache.stats.computed_tokens
    assert [g.output_ids for g in generate(model32, None, prompts, fast, prefix_cache=cache)] == ref32
    assert cache.stats.computed_tokens == 2 * k_bf16  # recomputed for float32, not taken from the bf16 call


def test_compute_dtype_reaches_run_settings_and_cli():
    from cca_fast.cli.main import build_parser
    from cca_fast.cli.run import config_from_args

    assert GenerationSettings(compute_dtype="bfloat16").config().compute_dtype == "bfloat16"
    assert GenerationSettings().config().compute_dtype == "float32"
    args = build_parser().parse_args(["run", "--output", "x", "--generation-dtype", "bfloat16"])
    assert config_from_args(args).generation.compute_dtype == "bfloat16"
    args = build_parser().parse_args(["run", "--output", "x"])
    assert config_from_args(args).generation.compute_dtype == "float32"


@pytest.mark.parametrize("bad", ["fp16", "bf16", "float16", None])
def test_bad_compute_dtype_is_refused(bad):
    with pytest.raises(CCAError, match=r"GenerationConfig\.compute_dtype must be one of float32, bfloat16"):
        GenerationConfig(compute_dtype=bad)
    with pytest.raises(CCAError, match=r"GenerationSettings\.compute_dtype \(--generation-dtype\) must be one of "
                                       r"float32, bfloat16"):
        GenerationSettings(compute_dtype=bad)


def test_bf16_marks_frozen_weights_for_the_call_and_restores_their_flags():
    """Autocast reuses a weight's bf16 cast only while the weight requires grad: frozen weights (the
    update stage's validation runs on a frozen model) are marked as requiring grad for the call,
    under ``no_grad`` (no graph), and their flags restored exactly after; the tokens are those of
    the same model unfrozen (the same bf16 products, cast once or at every forward). The float32
    default leaves the flags alone."""
    model = tiny("llama", dtype=torch.float32).eval()
    prompts = _prompts(model.config.vocab_size, seed=11)
    cfg = GenerationConfig(max_new_tokens=6, batch_size=3, stop_on_eos=False, compute_dtype="bfloat16")
    ref = [g.output_ids for g in generate(model, None, prompts, cfg)]
    params = list(model.parameters())
    flags = [i % 3 != 0 for i in range(len(params))]  # mixed: some frozen, some not
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    seen: list[tuple[bool, bool]] = []
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    hook = layer.register_forward_pre_hook(
        lambda m, a: seen.append((torch.is_grad_enabled(), all(p.requires_grad for p in params))))
    assert [g.output_ids for g in generate(model, None, prompts, cfg)] == ref
    assert seen and set(seen) == {(False, True)}  # every forward: no graph, every weight marked
    assert [p.requires_grad for p in params] == flags
    seen.clear()
    generate(model, None, prompts, dataclasses.replace(cfg, compute_dtype="float32"))
    hook.remove()
    assert seen and set(seen) == {(False, False)}
    assert [p.requires_grad for p in params] == flags
