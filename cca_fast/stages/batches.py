"""Stage-3 loss batches: the common token prefix of a mini-batch runs once.

Every stage-3 example is ``few-shot header + question + partial trace`` (hundreds of tokens, most
of them identical across examples). For a mini-batch of ``B`` examples whose longest common token
prefix has ``P`` tokens, :func:`last_logits` runs

1. the prefix once, batch 1 (with autograd when enabled, ``use_cache=True``) into a
   ``DynamicCache``;
2. the cache expanded to the batch (``Cache.batch_repeat_interleave``, an out-of-place,
   differentiable ``repeat_interleave`` whose backward sums the ``B`` rows' gradients);
3. the left-padded suffixes ``[B, S]`` on top: attention mask ``[B, P + S]`` (ones over the
   prefix, zeros on each row's padding *between* the prefix and its suffix), explicit position
   ids ``P + 0, P + 1, ...`` counting each row's real suffix tokens, logits at the last slot.

Each row thus attends to exactly the keys/values it would see alone, at the same positions, so
the logits (and, by the chain rule through the shared cache, the weight gradients summed over the
batch) equal those of running every full sequence - up to floating-point summation order. This
costs ``P + B * S`` token positions instead of ``B * (P + S)``.

Examples whose whole sequence is the common prefix keep one token as their suffix (``P`` is cut to
``min length - 1``). Below ``min_shared`` shared tokens, for a batch of one, for a model whose
forward takes no ``past_key_values``, or when a sequence exceeds the model's sliding window
(mid-sequence pad slots would shift it), :func:`collate_for_loss` returns a plain
:class:`~cca_fast.stages.examples.PivotBatch`. The prefix mechanism itself (when sharing is
possible, running the prefix once, expanding its cache) is :mod:`cca_fast.generation.prefix`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from cca_fast.stages.examples import PivotBatch, PivotExample, collate
from cca_fast.generation.batching import Padded, pad
from cca_fast.generation.prefix import can_share, on_shared_prefix, shared_len
from cca_fast.models import runtime


@dataclass
class SharedPrefixBatch:
    """A mini-batch split into one shared prefix and left-padded suffixes.

    Attributes:
        prefix_ids: ``LongTensor [1, P]``, the common prefix.
        input_ids: ``LongTensor [B, S]``, each row's suffix, left padded.
        attention_mask: ``LongTensor [B, P + S]``: ones over the prefix, then each row's suffix
            mask (0 on padding).
        position_ids: ``LongTensor [B, S]``: ``P + k`` for the row's ``k``-th real suffix token
            (padding slots: ``P``, masked anyway).
        desired, undesired: ``LongTensor [B]``.
    """

    prefix_ids: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    desired: torch.Tensor
    undesired: torch.Tensor

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_ids.shape[1])

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def group_by_prefix(examples: Sequence[PivotExample], batch_size: int) -> list[list[PivotExample]]:
    """Mini-batches of consecutive examples in lexicographic token order: neighbours in that order
    share the longest prefixes (same problem, then same few-shot header), so each mini-batch's
    common prefix is long."""
    order = sorted(examples, key=lambda e: e.prefix_ids)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate_for_loss(model: nn.Module, examples: Sequence[PivotExample], pad_id: int,
                     device: torch.device | str, min_shared: int = 16,
                     max_shared: int | None = None) -> PivotBatch | SharedPrefixBatch:
    """A :class:`SharedPrefixBatch` when sharing pays and is exact, else a plain
    :class:`PivotBatch` (see the module docstring for when). ``max_shared``: share at most this
    many tokens (keeps later positions, e.g. a whole trace, in every row's suffix)."""
    seqs = [e.prefix_ids for e in examples]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("collate_for_loss needs at least one example and no empty prefix")
    P = shared_len(seqs, min_shared)  # every row keeps >= 1 suffix token
    if max_shared is not None and P > max_shared:
        P = max_shared if max_shared >= min_shared else 0
    S = max(len(s) for s in seqs) - P
    if len(seqs) < 2 or not P or not can_share(model, P + S):
        return collate(examples, pad_id, device)
    b = pad([s[P:] for s in seqs], pad_id, offset=P)
    ids, pos = b.input_ids, b.position_ids
    mask = torch.cat([torch.ones((len(seqs), P), dtype=torch.long), b.attention_mask], dim=1)
    prefix = torch.tensor(seqs[0][:P], dtype=torch.long).unsqueeze(0)
    desired = torch.tensor([e.desired for e in examples], dtype=torch.long)
    undesired = torch.tensor([e.undesired for e in examples], dtype=torch.long)
    return SharedPrefixBatch(*(t.to(device) for t in (prefix, ids, mask, pos, desired, undesired)))


def tail_logits(model: nn.Module, batch: PivotBatch | SharedPrefixBatch, n: int = 1) -> torch.Tensor:
    """Next-token logits at each row's last ``n`` positions, ``[B, n, V]`` (float16/bfloat16
    upcast to float32), with autograd when grad mode is on. Slot ``-1`` is the intervention
    position; a row shorter than ``n`` (or than ``n`` suffix tokens of a shared batch) has padding
    logits in its leading slots, which callers mask.

    A :class:`SharedPrefixBatch` runs its prefix once and the suffixes on the expanded cache (see
    the module docstring); a :class:`PivotBatch` runs as is (``use_cache=False``).
    """
    if isinstance(batch, PivotBatch):
        logits = runtime.forward(model, **batch.model_inputs(), keep=n)[0]
    else:
        if n > batch.input_ids.shape[1]:
            raise ValueError(f"{n} tail positions asked of a shared-prefix batch with {batch.input_ids.shape[1]} "
                             "suffix slots (collate it with a shorter max_shared)")
        P = batch.prefix_len
        rows = Padded(batch.input_ids, batch.attention_mask[:, P:], batch.position_ids, [])
        logits = on_shared_prefix(model, batch.prefix_ids, rows, keep=n)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits


def last_logits(model: nn.Module, batch: PivotBatch | SharedPrefixBatch) -> torch.Tensor:
    """Next-token logits at each row's last position, ``[B, V]`` (:func:`tail_logits` with ``n=1``)."""
    return tail_logits(model, batch, 1)[:, -1]
