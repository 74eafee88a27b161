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
* one forward per **step**: the next token of every slot that decodes and the whole of every
  prompt that enters a free slot, packed in one sequence ``[1, N]`` (no padding), so the linear
  layers read the weights once for all of them; logits only at the positions that pick a token.
  Attention (:meth:`SlotKV.attend`) runs the decoding tokens over every slot (a fixed shape,
  masking what a slot does not own) and each new prompt over ``[prefix ; its own tokens]``.

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

from cca_fast.generation.matmul import small_batch_linears
from cca_fast.generation.state import DecodeState, GenerationStats
from cca_fast.models import runtime

#: ``config.model_type`` values whose attention modules call ``ALL_ATTENTION_FUNCTIONS`` with
#: ``(module, query, key, value, mask, scaling=...)`` and forward ``**kwargs`` to it, without
#: soft-capping or sinks (checked on transformers 5.17 and 5.24)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2")
ATTN_NAME = "cca_slots"
KWARG = "cca_slots"
#: prompt tokens a step takes in at most (beyond the first prompt): bounds a step's activations
PREFILL_TOKENS = 4096
#: the slots' own key/values take at most this many bytes: fewer slots are used beyond it (the
#: tokens do not depend on the number of slots)
SLOT_CACHE_BYTES = 2 << 30


def slot_bytes(model: torch.nn.Module, max_len: int) -> int:
    """Bytes of one slot's key/values for ``max_len`` own positions (every layer, K and V)."""
    cfg = runtime.unwrap(model).config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    elem = next(runtime.unwrap(model).parameters()).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * max_len * elem
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

    One forward of the model is one *step*: a packed sequence ``[1, N]`` of the tokens of the
    slots that decode (one token each, first, in slot order) followed by the prompts that enter
    free slots (all their tokens; see :meth:`plan`). The linear layers then run every token of
    the step in one matrix product; only attention knows which slot a token belongs to.

    Attributes:
        prefix_k, prefix_v: per layer ``[H_kv, P, D]`` (empty lists when there is no prefix).
        k, v: per layer ``[S, H_kv, L_max, D]``, allocated at the first forward.
        lens: ``LongTensor [S]``, positions each slot owns (before the current step's tokens).
        dec: ``LongTensor [n_dec]`` the slots that decode this step (ascending).
        segs: ``(slot, offset, length)`` of each prompt entering a slot this step (``offset`` into
            the packed sequence).
    """

    def __init__(self, slots: int, max_len: int, prefix: Any = None, device: torch.device | str = "cpu"):
        self.slots, self.max_len, self.device = slots, max_len, torch.device(device)
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
        self.dec = torch.zeros(0, dtype=torch.long)
        self.segs: list[tuple[int, int, int]] = []
        self.width = 1
        self._dec_lens = self.lens
        self._all = False  # every slot decodes (no scatter of queries needed)
        self._own_mask: torch.Tensor | None = None
        self._masks: dict[tuple, torch.Tensor] = {}  # this step's prompt masks (:meth:`_prompt_mask`)
        self._ext: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer [prefix ; a prompt's own] keys, values

    def _buffers(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k:  # each in its own dtype: under bf16 autocast, keys (after RoPE) are float32
            shape = (self.slots, key.shape[1], self.max_len, key.shape[3])
            self.k[layer] = key.new_zeros(shape)
            self.v[layer] = value.new_zeros(shape)
        return self.k[layer], self.v[layer]

    def plan(self, dec: Sequence[int], segs: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Set up a step: slots ``dec`` decode one token each, prompts of ``(slot, length)``
        ``segs`` enter their slots. Returns ``(position offsets into the slots' own positions of
        each packed token, index of the token whose logits each decoding slot / new prompt
        needs)``; ``lens`` is advanced by :meth:`advance` after the forward."""
        dec = sorted(dec)
        self.dec = torch.tensor(dec, dtype=torch.long)
        self._dec_lens = self.lens[self.dec]
        self._all = len(dec) == self.slots
        pos = self._dec_lens.tolist()
        keep = list(range(len(dec)))
        self.segs, o = [], len(dec)
        self._masks = {}
        for s, T in segs:
            self.segs.append((s, o, T))
            pos += range(T)
            o += T
            keep.append(o - 1)
        if dec:
            self.width = int(self._dec_lens.max()) + 1
            own = torch.arange(self.width).unsqueeze(0) <= self.lens.unsqueeze(1)  # [S, W]
            self._own_mask = own[:, None, None, :].to(self.device)
        return pos, keep

    def advance(self) -> None:
        """After the step's forward: each decoding slot owns one more position, each new prompt
        its tokens."""
        if len(self.dec):
            self.lens[self.dec] += 1
        for s, _, T in self.segs:
            self.lens[s] = T

    def compact(self, keep: Sequence[int]) -> None:
        """Keep only slots ``keep`` (renumbered ``0..len(keep)-1``): one copy, for the tail of a
        run when few rows are left."""
        idx = torch.as_tensor(list(keep), dtype=torch.long)
        for layer in self.k:
            i = idx.to(self.k[layer].device)
            self.k[layer] = self.k[layer].index_select(0, i)
            self.v[layer] = self.v[layer].index_select(0, i)
        self.lens = self.lens.index_select(0, idx)
        self.slots = len(keep)

    # ---- attention ---------------------------------------------------------------------------
    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Store this step's ``key``/``value`` ``[1, H_kv, N, D]`` in the slots and attend
        ``query`` ``[1, H, N, D]``: each token over the shared prefix and its slot's positions up
        to its own; returns ``[1, N, H, D]`` (what transformers' attention functions return)."""
        K, V = self._buffers(layer, key, value)
        q, k, v = query[0], key[0], value[0]  # [H, N, D], [H_kv, N, D]
        H, N, D = q.shape
        out = q.new_empty(N, H, D)
        nd = len(self.dec)
        if nd:
            out[:nd] = self._decode(layer, K, V, q[:, :nd], k[:, :nd], v[:, :nd], scaling)
        Hkv = k.shape[0]
        g = H // Hkv
        for s, o, T in self.segs:
            K[s, :, :T] = k[:, o:o + T]
            V[s, :, :T] = v[:, o:o + T]
            keys, vals = self._with_prefix(layer, k[:, o:o + T], v[:, o:o + T])  # [H_kv, P + T, D]
            # the g query heads of each key/value head as g*T rows of one head: no copy of the keys per head
            qf = q[:, o:o + T].reshape(Hkv, g * T, D)
            o_seg = F.scaled_dot_product_attention(qf[None], keys[None], vals[None], attn_mask=self._prompt_mask(T, g, q),
                                                   scale=scaling)
            out[o:o + T] = o_seg[0].reshape(H, T, D).transpose(0, 1)
        return out.unsqueeze(0)

    def _prompt_mask(self, T: int, g: int, q: torch.Tensor) -> torch.Tensor:
        """The additive mask ``[g*T, P + T]`` of a ``T``-token prompt's ``g`` folded query heads
        (0 where a token sees a position: the prefix and its own tokens up to itself, ``-inf``
        elsewhere), built once per step for every layer (SDPA turns a boolean mask into this one at
        every call)."""
        key = (T, g, q.dtype)
        m = self._masks.get(key)
        if m is None:
            see = torch.ones(T, self.P + T, dtype=torch.bool, device=q.device).tril_(self.P).repeat(g, 1)
            m = torch.zeros(see.shape, dtype=q.dtype, device=q.device).masked_fill_(~see, float("-inf"))
            self._masks[key] = m
        return m

    def _with_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[shared prefix ; k]`` and ``[shared prefix ; v]`` (``k``/``v [H_kv, T, D]`` -> ``[H_kv,
        P + T, D]``), written after a copy of the prefix kept per layer for the step's prompts
        (the prefix is not copied again per prompt). Views: valid until the next call."""
        if not self.P:
            return k, v
        need = self.P + k.shape[1]
        pk, pv = self.prefix_k[layer], self.prefix_v[layer]
        dk, dv = torch.promote_types(pk.dtype, k.dtype), torch.promote_types(pv.dtype, v.dtype)  # as torch.cat
        ext = self._ext.get(layer)
        if ext is None or ext[0].shape[1] < need or ext[0].dtype != dk or ext[1].dtype != dv:
            n = max(need, self.P + 256)  # most prompts' own tokens fit: one allocation per layer
            ext = (torch.cat([pk.to(dk), pk.new_empty(pk.shape[0], n - self.P, pk.shape[2], dtype=dk)], 1),
                   torch.cat([pv.to(dv), pv.new_empty(pv.shape[0], n - self.P, pv.shape[2], dtype=dv)], 1))
            self._ext[layer] = ext
        ext[0][:, self.P:need] = k
        ext[1][:, self.P:need] = v
        return ext[0][:, :need], ext[1][:, :need]

    def _decode(self, layer: int, K: torch.Tensor, V: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, scaling: float) -> torch.Tensor:
        """One token per decoding slot: ``q [H, n_dec, D]``, ``k``/``v [H_kv, n_dec, D]``;
        returns ``[n_dec, H, D]``. Attention runs over every slot (a fixed shape; the slots that
        do not decode get a zero query and their output is dropped)."""
        dev = K.device
        dec, lens = self.dec.to(dev), self._dec_lens.to(dev)
        K[dec, :, lens] = k.transpose(0, 1)
        V[dec, :, lens] = v.transpose(0, 1)
        S, Hkv, _, D = K.shape
        H = q.shape[0]
        g = H // Hkv
        qd = q.transpose(0, 1)  # [n_dec, H, D]
        if not self._all:
            qd = qd.new_zeros(S, H, D).index_copy_(0, dec, qd)
        W = self.width
        qs = qd.reshape(S, Hkv, g, D)
        own = torch.matmul(qs, K[:, :, :W].transpose(-1, -2))  # [S, Hkv, g, W]
        own = own.mul_(scaling).masked_fill_(~self._own_mask, float("-inf"))
        if not self.P:
            probs = torch.softmax(_wide(own), dim=-1).to(v.dtype)
            o = torch.matmul(probs, V[:, :, :W])
        else:
            pk, pv = self.prefix_k[layer], self.prefix_v[layer]
            qp = qs.permute(1, 0, 2, 3).reshape(Hkv, S * g, D)
            pre = torch.matmul(qp, pk.transpose(-1, -2)).mul_(scaling)  # [Hkv, S*g, P]
            pre = pre.reshape(Hkv, S, g, self.P).permute(1, 0, 2, 3)
            probs = torch.softmax(_wide(torch.cat([pre, own], dim=-1)), dim=-1).to(v.dtype)
            p_pre = probs[..., :self.P].permute(1, 0, 2, 3).reshape(Hkv, S * g, self.P)
            o = torch.matmul(p_pre, pv).reshape(Hkv, S, g, D).permute(1, 0, 2, 3)
            o = o + torch.matmul(probs[..., self.P:], V[:, :, :W])
        o = o.reshape(S, H, D)
        return o if self._all else o.index_select(0, dec)


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
              push: Callable[[int, int], bool], early_stop: bool = True, prefill_tokens: int | None = None,
              stats: GenerationStats | None = None) -> None:
    """Decode every sequence of ``seqs`` through ``slots`` slots (continuous batching).

    Each step is one forward: a token for every slot that decodes, and the prompts that enter
    the free slots (in input order, at most ``prefill_tokens`` prompt tokens a step, at least one
    prompt; ``None``: :data:`PREFILL_TOKENS`), packed in one sequence.

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
    max_len = max(len(s) for s in seqs) + max_new_tokens
    slots = max(1, min(slots, n, SLOT_CACHE_BYTES // max(1, slot_bytes(model, max_len))))
    P = prefix.next_position[0].item() if prefix is not None else 0
    kv = SlotKV(slots, max_len, prefix.cache if prefix is not None else None,
                device)
    queue = list(range(n))[::-1]  # pop() takes the next prompt in input order
    rows: list[_Row | None] = [None] * slots
    pending: list[int | None] = [None] * slots  # the token a slot feeds at the next step
    keep_kw = runtime.accepts_logits_to_keep(model)
    with torch.no_grad(), attention_as(model), small_batch_linears(runtime.unwrap(model)):
        while True:
            segs: list[tuple[int, int]] = []
            budget = PREFILL_TOKENS if prefill_tokens is None else prefill_tokens
            for s in range(kv.slots):  # fill free slots
                if rows[s] is None and queue and (not segs or len(seqs[queue[-1]]) <= budget):
                    i = queue.pop()
                    rows[s] = _Row(i)
                    segs.append((s, len(seqs[i])))
                    budget -= len(seqs[i])
                    if stats is not None:
                        stats.prefill_tokens += len(seqs[i])
            dec = [s for s in range(kv.slots) if pending[s] is not None]
            if not dec and not segs:
                break
            offsets, keep = kv.plan(dec, segs)
            ids = [pending[s] for s in sorted(dec)] + [t for s, _ in segs for t in seqs[rows[s].index]]
            ids_t = torch.tensor([ids], dtype=torch.long, device=device)
            pos = torch.tensor([offsets], dtype=torch.long, device=device) + P
            idx = torch.tensor(keep, dtype=torch.long, device=device)
            kw = runtime.keep_kwargs(model, idx) if keep_kw else {}
            out = runtime.unwrap(model)(input_ids=ids_t, position_ids=pos, use_cache=False, **kw, **{KWARG: kv})
            logits = out.logits[0] if keep_kw else out.logits[0, idx]
            kv.advance()
            if stats is not None and dec:
                stats.decode_steps += 1
            picks = sorted(dec) + [s for s, _ in segs]
            toks = choose(logits, [rows[s].index for s in picks])
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
                if len(row.tokens) < max_new_tokens and (not row.done or not early_stop):
                    pending[s] = t
                else:
                    rows[s], pending[s] = None, None
            live = [s for s in range(kv.slots) if rows[s] is not None]
            if not queue and kv.slots > 1 and len(live) <= kv.slots // 2:  # the tail: fewer, smaller steps
                kv.compact(live)
                rows, pending = [rows[s] for s in live], [pending[s] for s in live]
