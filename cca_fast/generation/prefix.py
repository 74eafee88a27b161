"""A key/value cache of one token prefix, kept across generation calls while the weights stay.

Every prompt of a run starts with the same few-shot exemplars (~800 tokens for the paper's
8-shot GSM8K prompt), and stage 1 works on one trace at a time: the teacher-forced pass over
``prompt + sample`` and then the greedy completions of prefixes of that very sequence. Without
reuse each of those calls prefills the whole prompt again (on 2 CPU cores, 850 tokens of
SmolLM2-135M cost as much as ~30 decode steps). A :class:`PrefixCache` keeps the decode state of
the last prefix it computed; the next call takes the longest common token prefix from it
(cropped copy) and only runs the tokens after it.

Validity: the stored key/values depend on the weights. The cache is keyed by
:func:`weights_key` (every parameter's storage address and in-place version counter), so any
update, delta application or revert, ``load_state_dict`` or device move makes the next lookup a
miss (code that writes parameters through raw pointers, like the Triton optimizer kernels, bumps
the version counters with ``torch.autograd.graph.increment_version``). Forward hooks that change
activations are not visible in the key: do not share a cache between hooked and plain calls.

Numerics: a prefix computed in one forward and its continuation in another give the same values
as one forward over everything up to floating-point reduction order (the same caveat as
:func:`~cca_fast.generation.decode.prefill` with ``prefix=``); greedy outputs only differ at exact ties.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from cca_fast.generation.decode import DecodeState, GenerationStats, common_prefix_len, extend_state, new_cache


def weights_key(model: torch.nn.Module) -> tuple:
    """A value that changes whenever a parameter of ``model`` is modified in place (autograd
    version counter), replaced or moved (storage address)."""
    return (id(model),) + tuple((p.data_ptr(), p._version) for p in model.parameters())


def _cropped_copy(model: torch.nn.Module, cache, length: int):
    """A new cache holding the first ``length`` positions of ``cache`` (``None`` when its layers
    cannot be read). Built with ``update``, the one cache API stable across transformers 5.x
    (``crop``'s argument changed meaning)."""
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        return None
    out = new_cache(model)
    with torch.no_grad():
        for i, layer in enumerate(layers):  # [B, H_kv, T, D] per layer; update concatenates (copies)
            out.update(layer.keys[:, :, :length], layer.values[:, :, :length], i)
    return out


@dataclass
class PrefixCacheStats:
    """Counters: ``hits`` (lookups that reused stored positions), ``misses``, ``reused_tokens``
    (positions taken from the cache instead of recomputed), ``computed_tokens`` (positions run)."""

    hits: int = 0
    misses: int = 0
    reused_tokens: int = 0
    computed_tokens: int = 0


class PrefixCache:
    """The decode state (batch 1) of the last token prefix computed through it.

    Args:
        min_reuse: reuse stored positions only when at least this many match (fewer are
            recomputed: copying a cache is not free).

    The states it returns are shared with the cache: treat them as read-only (``prefill`` with
    ``prefix=`` copies its prefix, so passing them there is fine).
    """

    def __init__(self, min_reuse: int = 16):
        self.min_reuse = max(1, int(min_reuse))
        self.stats = PrefixCacheStats()
        self._tokens: list[int] = []
        self._state: DecodeState | None = None
        self._key: tuple | None = None

    def clear(self) -> None:
        """Drop the stored state (frees its memory)."""
        self._tokens, self._state, self._key = [], None, None

    @property
    def tokens(self) -> list[int]:
        """The token ids whose key/values are stored (empty when nothing is)."""
        return list(self._tokens)

    def _base(self, model: torch.nn.Module, tokens: list[int], limit: int) -> tuple[DecodeState | None, int]:
        """A private copy of the stored state cropped to its common prefix with ``tokens`` (at
        most ``limit`` positions), and that length; ``(None, 0)`` on a miss."""
        if self._state is None:
            self.stats.misses += 1
            return None, 0
        if self._key != weights_key(model):
            self.clear()
            self.stats.misses += 1
            return None, 0
        c = min(common_prefix_len([self._tokens, tokens]), limit)
        if c < self.min_reuse:
            self.stats.misses += 1
            return None, 0
        cache = _cropped_copy(model, self._state.cache, c)
        if cache is None:
            self.stats.misses += 1
            return None, 0
        st = self._state
        base = DecodeState(cache, st.next_logits[:, :0], st.attention_mask[:, :c],
                           torch.full_like(st.next_position, c))
        self.stats.hits += 1
        self.stats.reused_tokens += c
        return base, c

    def _store(self, model: torch.nn.Module, tokens: list[int], state: DecodeState) -> None:
        self._tokens, self._state, self._key = tokens, state, weights_key(model)

    def state(self, model: torch.nn.Module, tokens: Sequence[int], *, pad_id: int = 0,
              stats: GenerationStats | None = None) -> DecodeState:
        """The decode state after ``tokens`` (batch 1; read-only), computed from the longest
        stored common prefix; it becomes the stored state."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("PrefixCache.state needs at least one token")
        base, c = self._base(model, tokens, len(tokens) - 1)  # >= 1 token runs: its logits are the output
        state, _ = extend_state(model, [tokens[c:]], base, pad_id=pad_id, stats=stats)
        self.stats.computed_tokens += len(tokens) - c
        self._store(model, tokens, state)
        return state

    def logits(self, model: torch.nn.Module, tokens: Sequence[int], first: int) -> torch.Tensor:
        """Next-token logits ``[len(tokens) - first, V]``: row ``j`` predicts the token after
        ``tokens[: first + j + 1]`` (a teacher-forced pass from position ``first`` on); the
        state after all of ``tokens`` becomes the stored state."""
        tokens = [int(t) for t in tokens]
        if not 0 <= first < len(tokens):
            raise ValueError(f"first={first} outside 0..{len(tokens) - 1}")
        base, c = self._base(model, tokens, first)
        state, logits = extend_state(model, [tokens[c:]], base, keep_logits=len(tokens) - first)
        self.stats.computed_tokens += len(tokens) - c
        self._store(model, tokens, state)
        return logits[0]
