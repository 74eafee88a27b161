"""How long a generation a model can hold: its context (``max_position_embeddings``) and the
memory one generation batch needs, checked before any generation of a command (the run's
evaluations, ``cca eval``), so a prompt longer than the model's context or a
``--max-new-tokens 1000000000`` is refused with the numbers instead of running without a word or
failing on a 40 GB allocation.

The memory estimate counts what a batch surely needs: the key/value cache of every layer for the
prompt plus the new tokens, and one attention mask of the prefill (``batch x prompt^2``); it is
compared with the memory free on the model's device (``MemAvailable`` on the CPU,
``torch.cuda.mem_get_info`` on a GPU), so it refuses only what cannot fit.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from cca_fast.errors import CCAError
from cca_fast.models import runtime

_GIB = 1 << 30


def _text_config(model: torch.nn.Module) -> Any:
    cfg = getattr(runtime.unwrap(model), "config", None)
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        try:
            return get_text()
        except Exception:  # noqa: BLE001 - an unusual config: use it as it is
            return cfg
    return cfg


def context_length(model: torch.nn.Module) -> int | None:
    """The model's context in tokens (``max_position_embeddings``, GPT-2's ``n_positions``);
    ``None`` when its config names none (a stand-in module)."""
    cfg = _text_config(model)
    for name in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def generation_bytes(model: torch.nn.Module, prompt_len: int, max_new_tokens: int, batch: int) -> int | None:
    """Bytes one generation batch surely needs: the key/value cache of ``batch`` sequences of
    ``prompt_len + max_new_tokens`` tokens in every layer, plus the prefill's attention mask
    (``batch x prompt_len^2``), in the model's dtype; ``None`` when the config lacks the sizes."""
    cfg = _text_config(model)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not all(isinstance(v, int) and v > 0 for v in (layers, heads, hidden)):
        return None
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    try:
        element = next(runtime.unwrap(model).parameters()).element_size()
    except StopIteration:
        return None
    tokens = prompt_len + max_new_tokens
    return batch * (tokens * layers * 2 * kv * head_dim + prompt_len * prompt_len) * element


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a generation on ``device``: ``torch.cuda.mem_get_info`` on a GPU,
    ``MemAvailable`` (``/proc/meminfo``) or the physical memory on the CPU; ``None`` if unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_generation_fits(model: torch.nn.Module, prompt_lengths: Sequence[int], max_new_tokens: int,
                          batch_size: int, *, names: Sequence[str] | None = None, where: str = "") -> None:
    """Refuse (:class:`~cca_fast.errors.CCAError`, with the numbers and the fix) a generation
    whose longest prompt plus ``max_new_tokens`` exceeds the model's context, or whose batch
    (``min(batch_size, len(prompt_lengths))`` sequences of the longest length) needs more memory
    than the model's device has free. ``names`` (one per prompt, e.g. problem ids) names the
    longest prompt; ``where`` prefixes the message. Cheap: no model call."""
    if not prompt_lengths:
        return
    i = max(range(len(prompt_lengths)), key=lambda j: prompt_lengths[j])
    longest = int(prompt_lengths[i])
    what = f" ({names[i]})" if names is not None else ""
    head = f"{where}: " if where else ""
    context = context_length(model)
    if context is not None and longest + max_new_tokens > context:
        fix = (f"lower --max-new-tokens to at most {context - longest}" if longest < context else
               "the prompt alone is longer than the context: shorten that question, or use fewer exemplars "
               "(--n-shots)")
        raise CCAError(f"{head}the longest prompt{what} has {longest} tokens and --max-new-tokens is "
                       f"{max_new_tokens}: {longest + max_new_tokens} tokens, but the model's context "
                       f"(max_position_embeddings) is {context} tokens; {fix}, or use a model with a longer context")
    batch = max(1, min(int(batch_size), len(prompt_lengths)))
    need = generation_bytes(model, longest, max_new_tokens, batch)
    free = available_bytes(runtime.input_device(model))
    if need is not None and free is not None and need > free:
        raise CCAError(f"{head}a generation batch of {batch} sequence(s) of {longest} + {max_new_tokens} tokens needs "
                       f"about {need / _GIB:.1f} GiB (key/value cache and attention mask), but only "
                       f"{free / _GIB:.1f} GiB are free on {runtime.input_device(model)}: lower --batch-size (now "
                       f"{batch_size}) or --max-new-tokens, shorten the prompts, or use a device with more memory")
