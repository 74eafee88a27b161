"""Decode state: a batch's key/value cache, next-token logits, attention mask and positions.

:func:`prefill` / :func:`extend_state` run token sequences into a :class:`DecodeState` (optionally
continuing another state: a prompt prefix shared by many rows is computed once and copied);
:func:`~cca_fast.generation.decode.decode` continues it token by token. Rows are left padded;
position ids count each row's real tokens, the 2-D attention mask hides pad slots.
"""
from __future__ import annotations

import copy as _copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from cca_fast.errors import CCAError
from cca_fast.generation.batching import pad, run_suffixes
from cca_fast.models import runtime


@dataclass
class GenerationStats:
    """Token counters, accumulated over calls (pass the same object to several calls).

    Attributes:
        prefill_tokens: token positions run through the model in prefills (pads included).
        generated_tokens: tokens generated (sum of ``n_generated``).
        decode_steps: batched one-token forward passes.
        sequences: sequences finished.
        discarded_tokens: tokens decoded after a row's stop and thrown away
            (``early_stop=False`` only).
    """

    prefill_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    sequences: int = 0
    discarded_tokens: int = 0



@dataclass
class DecodeState:
    """A batch ready to generate.

    Attributes:
        cache: the model's KV cache (``transformers`` ``DynamicCache``) holding every position of
            ``attention_mask``.
        next_logits: ``[B, V]`` logits for each row's next token.
        attention_mask: ``LongTensor [B, L]``, 1 on real tokens, 0 on pad slots.
        next_position: ``LongTensor [B]``, the position id of each row's next token (its number
            of real tokens so far).
    """

    cache: Any
    next_logits: torch.Tensor
    attention_mask: torch.Tensor
    next_position: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.next_logits.shape[0]

    def select(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Keep only ``rows`` (in that order), in place."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.next_logits.device)
        _cache_select(self.cache, idx)
        self.next_logits = self.next_logits[idx]
        self.attention_mask = self.attention_mask[idx]
        self.next_position = self.next_position[idx]

    def repeat(self, n: int) -> "DecodeState":
        """A new state with each row repeated ``n`` times (``repeat_interleave``); the cache is
        copied, this state is left untouched."""
        return DecodeState(expand(self.cache, n, copy=True), self.next_logits.repeat_interleave(n, 0),
                           self.attention_mask.repeat_interleave(n, 0), self.next_position.repeat_interleave(n, 0))


def expand(cache: Any, n: int, *, copy: bool = False) -> Any:
    """Each batch row of ``cache`` repeated ``n`` times (``repeat_interleave``). In place on the
    cache object (its tensors are rebound to new, differentiable ``[B*n, H, P, D]`` tensors);
    ``copy=True`` leaves ``cache`` untouched and returns a new cache."""
    if copy:
        with torch.no_grad():
            cache = _copy.deepcopy(cache)
    if n != 1:
        cache.batch_repeat_interleave(n)
    return cache


def _cache_select(cache: Any, idx: torch.Tensor) -> None:
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(idx)
    elif hasattr(cache, "reorder_cache"):
        cache.reorder_cache(idx)
    else:  # pragma: no cover - every transformers >= 4.56 cache has one of them
        raise CCAError(f"cannot select batch rows of a {type(cache).__name__}")


def prefill(model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, pad_id: int = 0,
            prefix: DecodeState | None = None, stats: GenerationStats | None = None) -> DecodeState:
    """Run ``sequences`` through ``model`` into a fresh :class:`DecodeState`.

    Args:
        sequences: ``B`` non-empty token id lists, left padded with ``pad_id`` (its value never
            matters: pad slots are masked).
        prefix: a state of batch 1 or ``B`` to continue from (it is copied, not modified): each
            sequence is appended to its row (to the single row, repeated, when batch 1).
    Returns:
        The state after the last token of each sequence.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise CCAError("prefill needs at least one sequence and no empty sequence")
    B = len(sequences)
    if prefix is not None and prefix.batch_size not in (1, B):
        raise CCAError(f"prefix state has batch {prefix.batch_size}; need 1 or {B}")
    base = None if prefix is None else prefix.repeat(B if prefix.batch_size == 1 else 1)
    return extend_state(model, sequences, base, pad_id=pad_id, stats=stats)[0]


def extend_state(model: torch.nn.Module, sequences: Sequence[Sequence[int]], base: DecodeState | None, *,
                 pad_id: int = 0, stats: GenerationStats | None = None,
                 keep_logits: int = 0) -> tuple[DecodeState, torch.Tensor | None]:
    """:func:`prefill` on a state the caller gives away: ``base`` (batch ``B``, or ``None`` for
    an empty cache) is grown in place, not copied.

    Returns:
        ``(state, logits)``: ``logits`` is ``[B, keep_logits, V]``, the logits of the last
        ``keep_logits`` positions of the new tokens (``None`` when 0; only the next-token
        logits, in ``state``, are computed then).
    """
    B = len(sequences)
    if base is not None and base.batch_size != B:
        raise CCAError(f"base state has batch {base.batch_size}; need {B}")
    batch = pad(sequences, pad_id, offset=0 if base is None else base.next_position,
                device=runtime.input_device(model))
    S, pos = batch.input_ids.shape[1], batch.position_ids
    cache = runtime.new_cache(model) if base is None else base.cache
    prefix_mask = None if base is None else base.attention_mask
    with torch.no_grad():
        out, cache = run_suffixes(model, batch, cache=cache, prefix_mask=prefix_mask, keep=max(1, keep_logits))
    full_mask = batch.attention_mask if base is None else torch.cat([base.attention_mask, batch.attention_mask], dim=1)
    logits = out[:, -1, :]
    if torch.isnan(logits).any():
        attn = getattr(getattr(model, "config", None), "_attn_implementation", "?")
        raise CCAError(
            f"the model produced NaN logits (dtype {logits.dtype}, attention {attn!r}); with padding this is a "
            "known transformers problem of float64 + eager attention (fully masked pad rows): use sdpa "
            "attention, another dtype, or batch_size=1")
    if stats is not None:
        stats.prefill_tokens += B * S
    next_position = pos[:, -1] + 1
    return DecodeState(cache, logits, full_mask, next_position), (out if keep_logits else None)
