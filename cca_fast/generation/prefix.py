"""The one prefix key/value mechanism: a token prefix common to many sequences runs once.

Every prompt of a run starts with the same few-shot exemplars (~800 tokens for the paper's 8-shot
GSM8K prompt). Whoever runs many sequences that share a prefix uses the pieces here:

* :func:`common_prefix_len` / :func:`shared_len`: how many leading tokens a batch shares (each
  row keeps at least one token of its own, whose logits are the output);
* :func:`can_share`: whether sharing is exact and possible for the model: it must take a cache
  (:func:`cca_fast.models.runtime.cache_keyword`, which warns once when it does not) and every
  padded sequence must fit in its sliding window (mid-sequence pad slots count against a window
  counted in cache slots);
* :func:`run_prefix`: run the prefix into a fresh cache, once (with autograd when grad mode is
  on: gradients then flow back through the cache into the weights);
* :func:`expand`: the cache of batch 1 repeated to a batch (``repeat_interleave``,
  differentiable: its backward sums the rows' gradients), :func:`crop_copy` (the first ``n``
  positions, copied) and :func:`share` (a new cache object over the same tensors, for a cache
  that is reused read-only across steps);
* :class:`PrefixCache`: the decode state of the last prefix, kept across generation calls while
  the weights stay unchanged; :func:`start_unit` empties it before an independent unit of work.

Users: generation (:func:`~cca_fast.generation.decode.generate`), the teacher-forced pass and
completions of the branching pivot search, DCM's last-position mode (the frozen model's prefix
keys/values, :func:`share`-d across steps), the stage-3 shared-prefix loss
(:mod:`cca_fast.stages.batches`), the LoRA SFT loss and the side-effect log-likelihoods.

Numerics: a prefix computed in one forward and its continuation in another give the values of one
forward over everything up to floating-point reduction order; greedy outputs only differ at exact
ties.

:class:`PrefixCache` validity: the stored key/values depend on the weights. The cache is keyed by
:func:`weights_key` (every parameter's storage address and in-place version counter), so any
update, delta application or revert, ``load_state_dict`` or device move makes the next lookup a
miss (code that writes parameters through raw pointers, like the Triton optimizer kernels, bumps
the version counters with ``torch.autograd.graph.increment_version``). Forward hooks that change
activations are not visible in the key: do not share a cache between hooked and plain calls.
"""
from __future__ import annotations

import copy as _copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from cca_fast.generation.batching import Padded, run_suffixes
from cca_fast.generation.state import DecodeState, GenerationStats, expand, extend_state
from cca_fast.models import runtime


def common_prefix_len(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of ``sequences``."""
    if not sequences:
        return 0
    first, n = sequences[0], min(len(s) for s in sequences)
    for s in sequences[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def shared_len(sequences: Sequence[Sequence[int]], min_shared: int = 1, *, keep: int = 1) -> int:
    """Tokens of the common prefix worth sharing: at most ``min(len) - keep`` (each row keeps
    ``keep`` tokens of its own), 0 when that is below ``min_shared`` (or below 1)."""
    if not sequences:
        return 0
    P = min(common_prefix_len(sequences), min(len(s) for s in sequences) - keep)
    return P if P >= max(1, min_shared) else 0


def window_fits(model: nn.Module, total_len: int) -> bool:
    """Whether ``total_len`` cache slots fit in the model's sliding window (or it has none)."""
    w = runtime.sliding_window(model)
    return w is None or total_len <= w


def can_share(model: nn.Module, total_len: int) -> bool:
    """Whether a prefix can be shared exactly by sequences of up to ``total_len`` slots (prefix,
    padding and suffix): the model takes a cache (else a one-time warning names the cause) and
    the sequences fit its sliding window."""
    return window_fits(model, total_len) and runtime.cache_keyword(model) is not None


def run_prefix(model: nn.Module, ids: Sequence[int] | torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, keep: int = 1) -> tuple[torch.Tensor, Any]:
    """Run a prefix into a fresh cache: ``(logits of its last keep positions [B, keep, V], cache)``.

    Args:
        ids: a token list (batch 1) or ``LongTensor [B, P]``.
        attention_mask, position_ids: ``[B, P]``; default all ones / ``0 .. P-1``.
    The forward runs under the caller's grad mode: with autograd on, the cache carries the graph.
    """
    if not isinstance(ids, torch.Tensor):
        ids = torch.tensor([[int(t) for t in ids]], dtype=torch.long, device=runtime.input_device(model))
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    if position_ids is None:
        position_ids = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    return runtime.forward(model, input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                           cache=runtime.new_cache(model), keep=keep)



def on_shared_prefix(model: nn.Module, prefix: Sequence[int] | torch.Tensor, batch: Padded, *,
                     keep: int | None = 1) -> torch.Tensor:
    """Logits of the last ``keep`` positions ``[B, keep, V]`` of ``prefix + row`` for every row of
    ``batch`` (:func:`~cca_fast.generation.batching.pad` with ``offset=len(prefix)``): the prefix
    runs once (:func:`run_prefix`, batch 1, under the caller's grad mode), its cache is expanded
    to the batch (:func:`expand`: differentiable, the rows' gradients summed) and the rows run on
    it with the prefix's mask (ones) prepended (:func:`~cca_fast.generation.batching.run_suffixes`)."""
    _, cache = run_prefix(model, prefix)
    P = prefix.shape[1] if isinstance(prefix, torch.Tensor) else len(prefix)
    expand(cache, len(batch))
    ones = torch.ones((1, P), dtype=torch.long, device=batch.attention_mask.device)
    return run_suffixes(model, batch, cache=cache, prefix_mask=ones, keep=keep)[0]

def crop_copy(model: nn.Module, cache: Any, length: int) -> Any:
    """A new cache holding the first ``length`` positions of ``cache`` (``None`` when its layers
    cannot be read). Built with ``update``, the one cache API stable across transformers 5.x
    (``crop``'s argument changed meaning)."""
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        return None
    out = runtime.new_cache(model)
    with torch.no_grad():
        for i, layer in enumerate(layers):  # [B, H_kv, T, D] per layer; update concatenates (copies)
            out.update(layer.keys[:, :, :length], layer.values[:, :, :length], i)
    return out


def _tensors_in(obj: Any, seen: set[int] | None = None):
    """Every tensor reachable from ``obj`` through attributes, lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        for v in vars(obj).values():
            yield from _tensors_in(v, seen)


class SharedCache:
    """A cache computed once and reused read-only: :meth:`fresh` gives a new cache object for one
    forward (which may append to it) over the very same stored tensors, without copying them.

    Raises ``RuntimeError`` from :meth:`fresh` when a stored tensor was modified in place (a
    static cache written by the model), since the stored positions would then be wrong."""

    def __init__(self, cache: Any):
        self.cache = cache
        self._tensors = list(_tensors_in(cache)) if cache is not None else []
        self._versions = [t._version for t in self._tensors]

    def fresh(self) -> Any:
        if self.cache is None:
            return None
        if any(t._version != v for t, v in zip(self._tensors, self._versions)):
            raise RuntimeError("the stored key/value cache was modified in place by the model (a static cache?)")
        return _copy.deepcopy(self.cache, {id(t): t for t in self._tensors})


def weights_key(model: nn.Module) -> tuple:
    """A value that changes whenever a parameter of ``model`` is modified in place (autograd
    version counter), replaced or moved (storage address), or run under another autocast state."""
    return (id(model), _autocast_state(model)) + tuple((p.data_ptr(), p._version) for p in model.parameters())


def _autocast_state(model: nn.Module) -> tuple:
    """Whether (and to which dtype) autocast is on for the model's device: key/values computed
    under autocast (``GenerationConfig.compute_dtype="bfloat16"``) differ from the plain ones."""
    kind = runtime.input_device(model).type
    return (torch.get_autocast_dtype(kind),) if torch.is_autocast_enabled(kind) else ()


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
        self._pinned: list[int] = []
        self._pinned_state: DecodeState | None = None
        self._pinned_key: tuple | None = None

    def clear(self) -> None:
        """Drop the stored state (frees its memory); a pinned prefix (:meth:`pin`) stays."""
        self._tokens, self._state, self._key = [], None, None

    # ---- the pinned prefix -------------------------------------------------------------------
    def pin(self, tokens: Sequence[int]) -> None:
        """Share exactly ``tokens`` (e.g. the few-shot exemplars of every prompt of a run):
        their state is computed from scratch once per weights version (:func:`weights_key`) and
        kept across :meth:`clear` / :func:`start_unit`, so every unit that starts from it gets the
        same numbers whatever ran before. ``[]`` unpins."""
        tokens = [int(t) for t in tokens]
        if tokens != self._pinned:
            self._pinned, self._pinned_state, self._pinned_key = tokens, None, None

    @property
    def pinned(self) -> list[int]:
        """The pinned prefix's token ids (empty when none)."""
        return list(self._pinned)

    def pinned_state(self, model: torch.nn.Module, *, pad_id: int = 0,
                     stats: GenerationStats | None = None) -> DecodeState:
        """The state after the pinned tokens (batch 1; read-only), computed on the first call
        for the current weights."""
        if not self._pinned:
            raise ValueError("no pinned prefix: call pin(tokens) first")
        key = weights_key(model)
        if self._pinned_state is None or self._pinned_key != key:
            self._pinned_state, _ = extend_state(model, [self._pinned], None, pad_id=pad_id, stats=stats)
            self._pinned_key = key
            self.stats.misses += 1
            self.stats.computed_tokens += len(self._pinned)
        else:
            self.stats.hits += 1
            self.stats.reused_tokens += len(self._pinned)
        return self._pinned_state

    def pinned_len(self, sequences: Sequence[Sequence[int]]) -> int:
        """``len(pinned)`` when every sequence starts with the pinned tokens and keeps at least
        one token of its own, else 0."""
        n = len(self._pinned)
        if not n or any(len(s) <= n or list(s[:n]) != self._pinned for s in sequences):
            return 0
        return n

    @property
    def tokens(self) -> list[int]:
        """The token ids whose key/values are stored (empty when nothing is)."""
        return list(self._tokens)

    def _base(self, model: torch.nn.Module, tokens: list[int], limit: int) -> tuple[DecodeState | None, int]:
        """A private copy of the stored state cropped to its common prefix with ``tokens`` (at
        most ``limit`` positions), and that length; ``(None, 0)`` on a miss."""
        if self._state is not None and self._key != weights_key(model):
            self.clear()
        c = min(common_prefix_len([self._tokens, tokens]), limit) if self._state is not None else 0
        n = len(self._pinned) if self._pinned and self.pinned_len([tokens[:limit + 1]]) else 0
        if n and n >= c:  # start from the pinned prefix (computed once per weights)
            st = self.pinned_state(model)
            cache = crop_copy(model, st.cache, n)
            if cache is not None:
                return DecodeState(cache, st.next_logits[:, :0], st.attention_mask[:, :n],
                                   torch.full_like(st.next_position, n)), n
        if self._state is None or c < self.min_reuse:
            self.stats.misses += 1
            return None, 0
        cache = crop_copy(model, self._state.cache, c)
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


def start_unit(cache: PrefixCache | None) -> None:
    """Empty ``cache`` (if any) before an independent unit of work (a generation batch, a problem).

    Positions taken from the cache were computed in an earlier forward, which equals one forward
    over everything only up to floating-point reduction order; starting every unit from an empty
    cache makes the unit's numbers independent of which unit ran before it in this process, so a
    run sharded across ranks (:func:`cca_fast.distributed.sharded`) or resumed gives bit for bit
    what one uninterrupted process gives. It costs one recomputation of the shared prefix per
    unit (the exemplars, once per batch or problem)."""
    if cache is not None:
        cache.clear()
