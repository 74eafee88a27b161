"""Pivot examples (the output of stage 1, the input of stages 2 and 3) and their batching.

An example is a token prefix whose *last* token is the intervention position, plus the desired
and undesired next tokens there (docs/method.md section 1, step 4). Every loss of stages 2 and 3 is the
logit difference ``logit[desired] - logit[undesired]`` of the next-token logits at that position.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from cca_fast.errors import CCAError
from cca_fast.generation.batching import pad


@dataclass(frozen=True)
class PivotExample:
    """One pivotal-token example.

    Attributes:
        problem_id: the :class:`~cca_fast.data.problem.Problem` it came from.
        prefix_ids: prompt + trace tokens up to (excluding) the pivotal token; the last one is
            the intervention position.
        desired: token id the correct trace takes at the pivot.
        undesired: token id the wrong trace takes there.
        direction: ``"greedy_correct"`` (the greedy trace was right, a sample went wrong) or
            ``"greedy_wrong"``.
        method: ``"prefix"`` or ``"branching"``.
        meta: free-form JSON-serialisable details (pivot index, texts, ...).
    """

    problem_id: str
    prefix_ids: tuple[int, ...]
    desired: int
    undesired: int
    direction: str = ""
    method: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prefix_ids"] = list(self.prefix_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PivotExample":
        return cls(
            problem_id=str(d["problem_id"]),
            prefix_ids=tuple(int(t) for t in d["prefix_ids"]),
            desired=int(d["desired"]),
            undesired=int(d["undesired"]),
            direction=d.get("direction", ""),
            method=d.get("method", ""),
            meta=dict(d.get("meta", {})),
        )


@dataclass
class PivotBatch:
    """Left-padded batch of examples; the intervention position is the last column (``-1``).

    Attributes:
        input_ids: ``LongTensor [B, T]``.
        attention_mask: ``LongTensor [B, T]``, 0 on left padding.
        position_ids: ``LongTensor [B, T]``, counting from 0 at each row's first real token.
        desired, undesired: ``LongTensor [B]``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    desired: torch.Tensor
    undesired: torch.Tensor

    def to(self, device: torch.device | str) -> "PivotBatch":
        return PivotBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                   self.desired, self.undesired)))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``model(**batch.model_inputs())``."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def collate(examples: Sequence[PivotExample], pad_id: int, device: torch.device | str = "cpu") -> PivotBatch:
    """Left-pad ``examples`` into a :class:`PivotBatch`.

    ``pad_id``: any valid token id (pad slots are masked, so its value never matters), e.g.
    ``tokenizer.pad_token_id`` (:func:`~cca_fast.models.loading.load_model` always sets one) or,
    for a tokenizer without a pad token, ``tokenizer.eos_token_id``."""
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_id is None or isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
        why = ("is None: the tokenizer has no pad token (tokenizer.pad_token_id is None)" if pad_id is None
               else f"must be a token id (an integer >= 0), got {pad_id!r}")
        raise CCAError(f"collate: pad_id {why}; pass pad_id=tokenizer.eos_token_id (or any valid token id: pad "
                       "slots are masked), or use the tokenizer load_model returns, which always has a pad token")
    b = pad([e.prefix_ids for e in examples], pad_id)
    desired = torch.tensor([e.desired for e in examples], dtype=torch.long)
    undesired = torch.tensor([e.undesired for e in examples], dtype=torch.long)
    return PivotBatch(b.input_ids, b.attention_mask, b.position_ids, desired, undesired).to(device)


def logit_diff(last_logits: torch.Tensor, desired: torch.Tensor, undesired: torch.Tensor) -> torch.Tensor:
    """Per-example ``logit[desired] - logit[undesired]``.

    Args:
        last_logits: ``[B, V]`` next-token logits at the intervention position.
        desired, undesired: ``LongTensor [B]``.
    Returns:
        ``[B]`` (same dtype as ``last_logits``). Each example uses its *own* pair (docs/method.md
        section 2: the reference code's batched indexing mixes pairs; this does not).
    """
    rows = torch.arange(last_logits.shape[0], device=last_logits.device)
    return last_logits[rows, desired] - last_logits[rows, undesired]

