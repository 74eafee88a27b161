"""Continuous batching over a preallocated key/value cache, with one shared copy of a common prefix.

The decoder of :func:`~cca_fast.generation.decode.generate` for the model families whose
attention goes through transformers' attention interface (:data:`FAMILIES`):

* a fixed number of **slots** (``GenerationConfig.batch_size``); each slot holds one running
  sequence. When a sequence stops, its slot takes the next prompt at once (no batch waits for its
  longest row);
* each layer's key/values live in two preallocated tensors ``[slots, H_kv, L_max, D]``; a new
  token's key/value is **written in place** at its slot's length (no per-step concatenation, no
  copy when a row finishes);
* the **shared prefix** (the few-shot exemplars, from a
  :class:`~cca_fast.generation.prefix.PrefixCache` or one prefill) is stored **once**,
  ``[H_kv, P, D]`` per layer: attention is computed over ``[shared prefix ; the slot's own
  keys]`` (:func:`slot_attention`, registered with ``transformers.AttentionInterface`` as
  ``"cca_slots"``), the prefix is never copied per row and is read once per step for all slots;
* a prompt entering a slot is prefilled alone (batch 1, no padding), with logits at its last
  position only; the decode step runs every slot (a fixed shape), masks what a slot does not own,
  and keeps the outputs of the slots that decode.

Every row computes what it would compute alone: its own tokens, the shared prefix, its own
per-row generator (sampling); a sequence's tokens do not depend on its slot, its neighbours or the
number of slots, up to the floating-point reduction order of the matrix products (a near-tie of
two logits can then flip a greedy token; ``bench/generation`` lists every such case).

Not taken (:func:`supported` is ``False``; :func:`~cca_fast.generation.decode.generate` keeps
its padded-batch path, same results): families outside :data:`FAMILIES` (Gemma 2 / 3: attention
soft-capping and sliding-window layers), sequences longer than the model's sliding window,
models whose forward takes no keyword arguments through to attention.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from cca_fast.generation.state import DecodeState, GenerationStats
from cca_fast.models import runtime

#: ``config.model_type`` values whose attention modules call ``ALL_ATTENTION_FUNCTIONS`` with
#: ``(module, query, key, value, mask, scaling=...)`` and forward ``**kwargs`` to it, without
#: soft-capping or sinks (checked on transformers 5.17 and 5.24)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2")
ATTN_NAME = "cca_slots"
KWARG = "cca_slots"
#: held while a model runs with the ``"cca_slots"`` attention (the switch is on the model's config,
#: shared by threads): :func:`~cca_fast.generation.decode.generate` holds it for its whole call
LOCK = threading.RLock()


def supported(model: torch.nn.Module, total_len: int) -> bool:
    """Whether the slot decoder runs ``model`` exactly for sequences of up to ``total_len``
    positions: a family of :data:`FAMILIES` and no sliding window that would bite."""
    cfg = getattr(runtime.unwrap(model), "config", None)
    if getattr(cfg, "model_type", None) not in FAMILIES:
        return False
    w = runtime.sliding_window(model)
    if w is not None and total_len > w and getattr(cfg, "use_sliding_window", True):
        return False
    return _register()


_REGISTERED: list[bool] = []


def _register() -> bool:
    if not _REGISTERED:
        try:
            from transformers import AttentionInterface

            AttentionInterface.register(ATTN_NAME, slot_attention)
            _REGISTERED.append(True)
        except (ImportError, AttributeError):  # pragma: no cover - transformers without the interface
            _REGISTERED.append(False)
    return _REGISTERED[0]


class SlotKV:
    """The key/values of a slot batch: the shared prefix once, each slot's own positions.

    Attributes:
        prefix_k, prefix_v: per layer ``[H_kv, P, D]`` (empty lists when there is no prefix).
        k, v: per layer ``[S, H_kv, L_max, D]``, allocated at the first forward.
        lens: ``LongTensor [S]``, positions each slot owns (before the current step's token).
        mode: ``"prefill"`` (one slot, ``slot``, its first tokens) or ``"decode"`` (every slot, one
            token each, written at ``lens``; ``width`` = own positions attended, ``max(lens) + 1``).
    """

    def __init__(self, slots: int, max_len: int, prefix: Any = None):
        self.slots, self.max_len = slots, max_len
        self.prefix_k: list[torch.Tensor] = []
        self.prefix_v: list[torch.Tensor] = []
        if prefix is not None:
            for layer in prefix.layers:
                self.prefix_k.append(layer.keys[0].detach())
                self.prefix_v.append(layer.values[0].detach())
        self.P = self.prefix_k[0].shape[1] if self.prefix_k else 0
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.lens = torch.zeros(slots, dtype=torch.long)
        self.mode, self.slot, self.width = "decode", 0, 1
        self._own_mask: torch.Tensor | None = None
        self._arange = torch.arange(slots)

    def _buffers(self, layer: int, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k:
            shape = (self.slots, key.shape[1], self.max_len, key.shape[3])
            self.k[layer] = key.new_zeros(shape)
            self.v[layer] = key.new_zeros(shape)
            if self.lens.device != key.device:
                self.lens, self._arange = self.lens.to(key.device), self._arange.to(key.device)
        return self.k[layer], self.v[layer]

    def begin_decode(self) -> None:
        """Set up a decode step: the own-position mask ``[S, 1, 1, width]`` shared by all layers."""
        self.mode = "decode"
        self.width = int(self.lens.max()) + 1
        pos = torch.arange(self.width, device=self.lens.device)
        self._own_mask = (pos.unsqueeze(0) <= self.lens.unsqueeze(1))[:, None, None, :]

    def compact(self, keep: Sequence[int]) -> None:
        """Keep only slots ``keep`` (renumbered ``0..len(keep)-1``): one copy, for the tail of a
        run when few rows are left."""
        idx = torch.as_tensor(list(keep), dtype=torch.long, device=self.lens.device)
        for layer in self.k:
            self.k[layer] = self.k[layer].index_select(0, idx)
            self.v[layer] = self.v[layer].index_select(0, idx)
        self.lens = self.lens.index_select(0, idx)
        self.slots = len(keep)
        self._arange = torch.arange(self.slots, device=self.lens.device)

    # ---- attention ---------------------------------------------------------------------------
    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Store this forward's ``key``/``value`` ``[B, H_kv, T, D]`` and attend ``query``
        ``[B, H, T, D]`` over the shared prefix and the slot's own positions; returns
        ``[B, T, H, D]`` (what transformers' attention functions return)."""
        K, V = self._buffers(layer, key)
        pk = self.prefix_k[layer] if self.P else None
        pv = self.prefix_v[layer] if self.P else None
        if self.mode == "prefill":
            T = key.shape[2]
            K[self.slot, :, :T] = key[0]
            V[self.slot, :, :T] = value[0]
            keys, vals = key, value
            if pk is not None:
                keys = torch.cat([pk.unsqueeze(0), key], dim=2)
                vals = torch.cat([pv.unsqueeze(0), value], dim=2)
            mask = torch.ones(T, self.P + T, dtype=torch.bool, device=key.device).tril_(self.P)
            g = query.shape[1] // key.shape[1]
            if g > 1:
                keys, vals = keys.repeat_interleave(g, 1), vals.repeat_interleave(g, 1)
            out = F.scaled_dot_product_attention(query, keys, vals, attn_mask=mask, scale=scaling)
            return out.transpose(1, 2)
        # decode: every slot, one token
        S, Hkv, _, D = key.shape
        H = query.shape[1]
        g = H // Hkv
        K[self._arange, :, self.lens] = key[:, :, 0]
        V[self._arange, :, self.lens] = value[:, :, 0]
        W = self.width
        q = query.reshape(S, Hkv, g, D)
        own = torch.matmul(q, K[:, :, :W].transpose(-1, -2))  # [S, Hkv, g, W]
        own = own.mul_(scaling).masked_fill_(~self._own_mask, float("-inf"))
        if pk is None:
            probs = torch.softmax(_wide(own), dim=-1).to(value.dtype)
            out = torch.matmul(probs, V[:, :, :W])
        else:
            qp = q.permute(1, 0, 2, 3).reshape(Hkv, S * g, D)
            pre = torch.matmul(qp, pk.transpose(-1, -2)).mul_(scaling)  # [Hkv, S*g, P]
            pre = pre.reshape(Hkv, S, g, self.P).permute(1, 0, 2, 3)
            probs = torch.softmax(_wide(torch.cat([pre, own], dim=-1)), dim=-1).to(value.dtype)
            p_pre = probs[..., :self.P].permute(1, 0, 2, 3).reshape(Hkv, S * g, self.P)
            out = torch.matmul(p_pre, pv).reshape(Hkv, S, g, D).permute(1, 0, 2, 3)
            out = out + torch.matmul(probs[..., self.P:], V[:, :, :W])
        return out.reshape(S, H, 1, D).transpose(1, 2)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision scores in float32 for the softmax (as SDPA does); others unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def slot_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The ``"cca_slots"`` attention function (transformers' attention interface): the layer's
    new keys/values go into the :class:`SlotKV` passed as the ``cca_slots`` keyword; no dropout
    (generation only)."""
    kv: SlotKV = kwargs[KWARG]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return kv.attend(module.layer_idx, query, key, value, scale), None


class attention_as:
    """Context manager: ``model`` runs the ``"cca_slots"`` attention inside the block."""

    def __init__(self, model: torch.nn.Module):
        self.cfg = runtime.unwrap(model).config

    def __enter__(self):
        LOCK.acquire()
        self.old = self.cfg._attn_implementation
        self.cfg._attn_implementation = ATTN_NAME
        return self

    def __exit__(self, *exc):
        self.cfg._attn_implementation = self.old
        LOCK.release()
        return False


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
@dataclass
class _Row:
    index: int  # position in the prompt list
    tokens: list[int] = field(default_factory=list)
    done: bool = False  # a result is recorded (it may still decode: early_stop=False)


def run_slots(model: torch.nn.Module, seqs: Sequence[Sequence[int]], *, slots: int, max_new_tokens: int,
              prefix: DecodeState | None, choose: Callable[[torch.Tensor, list[int]], list[int]],
              push: Callable[[int, int], bool], early_stop: bool = True,
              stats: GenerationStats | None = None) -> None:
    """Decode every sequence of ``seqs`` through ``slots`` slots (continuous batching).

    Args:
        seqs: the prompts' token ids *after* the shared prefix (each non-empty).
        prefix: the shared prefix's state (batch 1; its cache's layers hold ``[1, H_kv, P, D]``)
            or ``None``.
        choose: ``(logits [n, V], prompt indices) -> n token ids`` (greedy or sampled; one
            call per step for the rows that pick a token).
        push: ``(prompt index, token) -> stopped``: records a token, says whether the row stops.
        early_stop: ``False`` keeps a stopped row decoding (discarded) to ``max_new_tokens``.
    """
    device = runtime.input_device(model)
    n = len(seqs)
    slots = max(1, min(slots, n))
    P = prefix.next_position[0].item() if prefix is not None else 0
    kv = SlotKV(slots, max(len(s) for s in seqs) + max_new_tokens, prefix.cache if prefix is not None else None)
    queue = list(range(n))[::-1]  # pop() takes the next prompt in input order
    rows: list[_Row | None] = [None] * slots
    logits: torch.Tensor | None = None  # [S, V] next-token logits of each slot
    ready = [False] * slots  # the slot's logits are fresh (a token is to be chosen)
    with torch.no_grad(), attention_as(model):
        while True:
            for s in range(kv.slots):  # fill free slots
                if rows[s] is None and queue:
                    i = queue.pop()
                    ids = torch.tensor([list(seqs[i])], dtype=torch.long, device=device)
                    T = ids.shape[1]
                    kv.mode, kv.slot = "prefill", s
                    out, _ = runtime.forward(model, input_ids=ids, position_ids=P + torch.arange(T, device=device)[None],
                                             use_cache=False, keep=1, **{KWARG: kv})
                    if logits is None:
                        logits = out.new_zeros(slots, out.shape[-1])
                    logits[s] = out[0, -1]
                    kv.lens[s] = T
                    rows[s], ready[s] = _Row(i), True
                    if stats is not None:
                        stats.prefill_tokens += T
            live = [s for s in range(kv.slots) if rows[s] is not None]
            if not live:
                break
            if not queue and len(live) <= kv.slots // 2 and kv.slots > 1:  # the tail: fewer, smaller steps
                kv.compact(live)
                logits = logits[live]
                rows, ready = [rows[s] for s in live], [ready[s] for s in live]
                live = list(range(len(live)))
            picks = [s for s in live if ready[s]]
            toks = choose(logits[picks], [rows[s].index for s in picks])
            step_tokens = torch.zeros(kv.slots, dtype=torch.long)
            decoding = []
            for s, t in zip(picks, toks):
                row = rows[s]
                row.tokens.append(t)
                if not row.done:
                    row.done = push(row.index, t)
                    if stats is not None:
                        stats.generated_tokens += 1
                        stats.sequences += int(row.done)
                elif stats is not None:
                    stats.discarded_tokens += 1
                more = len(row.tokens) < max_new_tokens and (not row.done or not early_stop)
                if more:
                    step_tokens[s] = t
                    decoding.append(s)
                else:
                    rows[s], ready[s] = None, False
            if not decoding:
                continue
            kv.begin_decode()
            pos = (P + kv.lens).unsqueeze(1).to(device)
            out, _ = runtime.forward(model, input_ids=step_tokens.unsqueeze(1).to(device), position_ids=pos,
                                     use_cache=False, keep=1, **{KWARG: kv})
            idx = torch.tensor(decoding, dtype=torch.long, device=logits.device)
            logits[idx] = out[idx, -1]
            kv.lens[idx.to(kv.lens.device)] += 1
            if stats is not None:
                stats.decode_steps += 1
