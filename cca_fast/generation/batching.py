"""The one batching primitive: token sequences padded into a batch, and suffixes run on a prefix.

* :func:`pad` puts ``B`` token lists of different lengths into ``[B, S]`` tensors: ids (pad slots
  hold ``pad_id``, whose value never matters), the attention mask (1 on real tokens) and position
  ids that count each row's real tokens from ``offset`` (pad slots repeat a neighbour's position;
  they are masked). Left padding (every row ends at the last column: the next-token logits of
  every row are at ``-1``) or right padding.
* :func:`run_suffixes` runs such a batch on top of a key/value cache of a prefix the rows share
  (its attention mask prepended: ones over a common prefix, or a state's own mask), so each row
  attends to exactly the keys it would see alone, at the same positions.
* :func:`cca_fast.generation.prefix.on_shared_prefix` runs a common prefix once and the suffixes
  on its cache expanded to the batch (through :func:`run_suffixes`).

Every caller that pads token sequences or runs suffixes on a prefix goes through these: the decode
state (:mod:`~cca_fast.generation.state`), stage-3 loss batches, DCM's and AtP's pivot batches,
the log-likelihood suites, SFT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from cca_fast.models import runtime


@dataclass
class Padded:
    """Token sequences padded into a batch.

    Attributes:
        input_ids: ``LongTensor [B, S]``.
        attention_mask: ``LongTensor [B, S]``, 1 on real tokens, 0 on pad slots.
        position_ids: ``LongTensor [B, S]``: ``offset + k`` at a row's ``k``-th real token.
        starts: column of each row's first real token (0 with right padding).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    starts: list[int]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pad(seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "left", offset: int | torch.Tensor = 0,
        width: int | None = None, device: torch.device | str | None = None) -> Padded:
    """Pad ``seqs`` (``B`` token lists) into a :class:`Padded` batch of ``width`` columns (default
    the longest sequence).

    Args:
        pad_id: the id written into pad slots (any valid token id: they are masked).
        side: ``"left"`` (rows end at the last column) or ``"right"``.
        offset: position of each row's first real token: an int, or ``LongTensor [B]`` (e.g. a
            decode state's next positions).
        device: where the tensors go (built on the CPU, then moved).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    B = len(seqs)
    S = max(len(s) for s in seqs) if width is None else int(width)
    ids = torch.full((B, S), int(pad_id), dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    starts = []
    for i, s in enumerate(seqs):
        o = S - len(s) if side == "left" else 0
        ids[i, o:o + len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, o:o + len(s)] = 1
        starts.append(o)
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if isinstance(offset, torch.Tensor):
        pos = pos + offset.to(pos.device).unsqueeze(1)
    elif offset:
        pos = pos + int(offset)
    return Padded(ids, mask, pos, starts)


def run_suffixes(model: nn.Module, batch: Padded, *, cache: Any = None, prefix_mask: torch.Tensor | None = None,
                 keep: int | None = 1, use_cache: bool | None = None) -> tuple[torch.Tensor, Any]:
    """Run ``batch`` (its positions already counted from the prefix's length, ``pad(offset=...)``)
    on ``cache``, a prefix's key/values of batch ``B``; ``prefix_mask`` ``[B or 1, P]`` is the
    prefix's attention mask (``None``: no prefix). Returns ``(logits of the last keep positions
    [B, keep, V], cache)`` (:func:`cca_fast.models.runtime.forward`)."""
    mask = batch.attention_mask
    if prefix_mask is not None:
        mask = torch.cat([prefix_mask.to(mask.device).expand(len(batch), -1), mask], dim=1)
    return runtime.forward(model, input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                           cache=cache, keep=keep, use_cache=use_cache)

