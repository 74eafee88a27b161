"""Stage-3 training objectives: what the update of the selected rows minimises.

==============  =====================================================================================
``logit_diff``  the paper's: ``L = -1/N sum_i ld_i`` with ``ld_i = logit_i[desired] - logit_i[undesired]``
                at each pivot's intervention position (:func:`~cca_fast.stages.examples.logit_diff`)
``hinge``       a capped margin: ``L = 1/N sum_i max(0, margin - ld_i)``; a pivot whose logit
                difference already exceeds ``margin`` stops pulling (its gradient is zero)
``gold_nll``    the gold solutions' next-token loss: ``L = sum nll / n_target_tokens`` over the
                training problems' gold solutions (:func:`cca_fast.stages.sft.sft_nll`);
                restricted to the selected rows this is sparse SFT on the circuit
==============  =====================================================================================

Your own objective: ``run_update(..., loss=fn)`` with ``fn(model, batch) -> scalar tensor``
(:class:`LossObjective`): the mean loss of the mini-batch ``batch`` (a
:class:`~cca_fast.stages.examples.PivotBatch` of pivot examples, or a list of your own training
items), computed by calling ``model`` (the transformers model, unwrapped, whose selected rows are
trained). The full-batch loss is the mean over all items (each mini-batch weighted by its size),
so the gradient does not depend on ``batch_size``.

A *retain* term can be added to the pivot objectives (``retain_weight > 0``):
``w * 1/M sum_{i, s} KL(p_base(. | x_i[:s]) || p(. | x_i[:s]))`` over the ``M`` trace positions
``s`` of every pivot example that are *not* the pivot (the positions predicting the trace tokens
before it: ``meta["t"]`` of them per example). The base model's distributions are computed once,
when the objective is built, before any step.

:class:`TrainingObjective` owns the mini-batches and one ``pass_`` over the whole training set:
it returns the mean loss and mean logit difference and, with ``backward``, accumulates the
gradient of the full-batch loss (mini-batch by mini-batch; the same gradient for any batch size up
to summation order).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from cca_fast.errors import CCAError
from cca_fast.models import runtime
from cca_fast.stages.batches import SharedPrefixBatch, collate_for_loss, group_by_prefix, tail_logits
from cca_fast.stages.examples import PivotBatch, PivotExample, collate, logit_diff

if TYPE_CHECKING:  # pragma: no cover
    from cca_fast.stages.sft import SFTExample
# Settings passed as ``config`` below are a stage-3 ``UpdateConfig`` (typed ``Any``: stages/update.py
# imports this module, so importing it back, even for type checking, would be a cycle).

OBJECTIVES = ("logit_diff", "hinge", "gold_nll")


def pivot_losses(ld: torch.Tensor, objective: str, margin: float) -> torch.Tensor:
    """Per-example loss ``[B]`` of the pivot objectives from logit differences ``ld [B]``."""
    if objective == "logit_diff":
        return -ld
    if objective == "hinge":
        return torch.relu(margin - ld)
    raise CCAError(f"{objective!r} is not a pivot objective (pivot objectives: logit_diff, hinge)")


def trace_positions(example: PivotExample) -> int:
    """How many trace tokens precede the pivot (``meta["t"]``): the retain term's positions."""
    t = example.meta.get("t")
    if not isinstance(t, int) or t < 0 or t >= len(example.prefix_ids):
        raise CCAError(f"pivot example of {example.problem_id!r} has no valid trace position meta['t'] ({t!r}): "
                       "the retain term needs it (pivots written by stage 1 carry it)")
    return t


def retain_kl(logits: torch.Tensor, base_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed ``KL(p_base || p)`` over the masked positions.

    Args:
        logits: ``[B, n, V]`` current next-token logits at the retained slots.
        base_logp: ``[B, n, V]`` the base model's log-probabilities at the same slots.
        mask: ``[B, n]`` bool, the slots that count.
    Returns:
        a scalar (float32, or float64 for float64 logits).
    """
    logp = torch.log_softmax(logits, dim=-1)
    kl = (base_logp.exp() * (base_logp - logp)).sum(-1)  # [B, n]
    return (kl * mask).sum()


class TrainingObjective:
    """The full-batch stage-3 loss of :class:`~cca_fast.stages.update.UpdateConfig` ``objective``.

    Args:
        model: the causal LM (its current weights are the base the retain term keeps close to).
        examples: pivot examples (the pivot objectives; may be empty for ``gold_nll``).
        config: the update configuration (``objective``, ``margin``, ``retain_weight``,
            ``batch_size``, ``share_prefix``, ``min_shared_prefix``, ``pad_id``).
        gold: gold-solution examples (:class:`~cca_fast.stages.sft.SFTExample`), needed
            by ``gold_nll``.
    """

    def __init__(self, model: nn.Module, examples: Sequence[PivotExample], config: Any,
                 gold: Sequence["SFTExample"] | None = None):
        self.model, self.config = model, config
        self.objective = config.objective
        self.device = runtime.input_device(model)
        self.pad = runtime.pad_id(model, explicit=config.pad_id)
        self.n = len(examples)
        self.batches: list[PivotBatch | SharedPrefixBatch] = []
        self.tails: list[int] = []  # slots per batch: 1, or 1 + the longest retained trace
        self.retain: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.m = 0  # retained positions in all
        if self.objective == "gold_nll":
            if not gold:
                raise CCAError("objective gold_nll needs the training problems' gold solutions (none given)")
            self._gold_setup(gold)
            return
        if not examples:
            raise CCAError("stage 3 needs at least one training example (stage 1 found no pivotal tokens?)")
        if config.retain_weight > 0:
            self._retain_setup(examples)
            return
        if config.share_prefix:
            self.batches = [collate_for_loss(model, group, self.pad, self.device, config.min_shared_prefix)
                            for group in group_by_prefix(examples, config.batch_size)]
        if not any(isinstance(b, SharedPrefixBatch) for b in self.batches):  # nothing shared: least padding
            order = sorted(examples, key=lambda e: len(e.prefix_ids))
            self.batches = [collate(order[i : i + config.batch_size], self.pad, self.device)
                            for i in range(0, self.n, config.batch_size)]
        self.tails = [1] * len(self.batches)
        self.retain = [None] * len(self.batches)

    # ---- setup ------------------------------------------------------------------------------------
    def _gold_setup(self, gold: Sequence["SFTExample"]) -> None:
        from cca_fast.stages.sft import shared_prefix_len

        order = sorted(gold, key=lambda e: e.prompt_ids)
        size = self.config.batch_size
        self.gold = [order[i : i + size] for i in range(0, len(order), size)]
        self.gold_prefix = [tuple(g[0].prompt_ids[: shared_prefix_len(g)]) if self.config.share_prefix and len(g) > 1
                            else () for g in self.gold]
        self.gold_tokens = sum(len(e.target_ids) for e in gold)

    @torch.no_grad()
    def _retain_setup(self, examples: Sequence[PivotExample]) -> None:
        cfg = self.config
        for group in group_by_prefix(examples, cfg.batch_size):
            ts = [trace_positions(e) for e in group]
            # the prompt's last token predicts trace token 0: keep it (and the trace) in each suffix
            max_shared = min(len(e.prefix_ids) - t for e, t in zip(group, ts)) - 1
            batch = (collate_for_loss(self.model, group, self.pad, self.device, cfg.min_shared_prefix,
                                      max_shared=max_shared) if cfg.share_prefix
                     else collate(group, self.pad, self.device))
            n = 1 + max(ts)
            with runtime.eval_mode(self.model):
                base = torch.log_softmax(tail_logits(self.model, batch, n)[:, :-1], dim=-1)  # [B, n-1, V]
            slots = torch.arange(n - 1, device=base.device)
            mask = slots.unsqueeze(0) >= (n - 1 - torch.tensor(ts, device=base.device)).unsqueeze(1)  # [B, n-1]
            self.batches.append(batch)
            self.tails.append(n)
            self.retain.append((base, mask))
            self.m += int(mask.sum())

    # ---- one pass ---------------------------------------------------------------------------------
    def pass_(self, backward: bool) -> dict[str, float]:
        """One pass over the training set at the current weights: ``{"loss": mean loss}`` plus
        ``"logit_diff"`` (mean over the pivots) for the pivot objectives (and ``"retain_kl"``,
        the mean KL per retained position, with a retain term). With ``backward`` the full-batch
        loss's gradients accumulate."""
        if self.objective == "gold_nll":
            return self._gold_pass(backward)
        cfg = self.config
        total_ld = total_loss = total_kl = 0.0
        for batch, n, retain in zip(self.batches, self.tails, self.retain):
            with torch.set_grad_enabled(backward):
                logits = tail_logits(self.model, batch, n)
                ld = logit_diff(logits[:, -1], batch.desired, batch.undesired)
                loss = pivot_losses(ld, cfg.objective, cfg.margin).sum() / self.n
                if retain is not None and self.m:
                    kl = retain_kl(logits[:, :-1], *retain)
                    loss = loss + cfg.retain_weight * kl / self.m
                    total_kl += float(kl.detach())
                if backward:
                    loss.backward()
            total_ld += float(ld.detach().sum())
            total_loss += float(loss.detach())
        out = {"loss": total_loss, "logit_diff": total_ld / self.n}
        if self.m:
            out["retain_kl"] = total_kl / self.m
        return out

    def _gold_pass(self, backward: bool) -> dict[str, float]:
        from cca_fast.stages.sft import sft_nll

        total = 0.0
        for group, prefix in zip(self.gold, self.gold_prefix):
            with torch.set_grad_enabled(backward):
                nll, _ = sft_nll(self.model, group, pad_id=self.pad, prefix=prefix)
                loss = nll / self.gold_tokens
                if backward:
                    loss.backward()
            total += float(loss.detach())
        return {"loss": total}


#: a user objective: ``loss(model, batch) -> scalar tensor`` (the mean over the mini-batch)
LossFn = Callable[[nn.Module, Any], torch.Tensor]


class LossObjective:
    """A user loss as the stage-3 objective (see the module docstring).

    Args:
        model: the (unwrapped) transformers model the loss calls.
        items: training items: :class:`PivotExample` s (mini-batches are left-padded
            :class:`PivotBatch` es on the model's input device) or anything else (mini-batches
            are lists of the items, in order).
        loss: ``loss(model, batch) -> scalar tensor``.
        config: the update configuration (``batch_size``, ``pad_id``).
    """

    def __init__(self, model: nn.Module, items: Sequence[Any], loss: LossFn, config: Any):
        if not callable(loss):
            raise CCAError(f"loss must be a callable loss(model, batch) -> scalar tensor, got {type(loss).__name__}")
        if not items:
            raise CCAError("a user loss needs at least one training item (train_examples is empty)")
        self.model, self.loss, self.n = model, loss, len(items)
        size = config.batch_size
        groups = [list(items[i : i + size]) for i in range(0, len(items), size)]
        if all(isinstance(e, PivotExample) for e in items):
            pad = runtime.pad_id(model, explicit=config.pad_id)
            device = runtime.input_device(model)
            self.batches: list[Any] = [collate(g, pad, device) for g in groups]
        else:
            self.batches = groups
        self.sizes = [len(g) for g in groups]

    def pass_(self, backward: bool) -> dict[str, float]:
        """One pass: ``{"loss": the mean over every item}``; with ``backward`` its gradient accumulates."""
        total = 0.0
        for batch, size in zip(self.batches, self.sizes):
            with torch.set_grad_enabled(backward):
                value = self.loss(self.model, batch)
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    raise CCAError(f"loss(model, batch) must return a scalar tensor (the batch mean), got "
                                   f"{type(value).__name__}{list(value.shape) if isinstance(value, torch.Tensor) else ''}")
                value = value.reshape(()) * (size / self.n)
                if backward:
                    if not value.requires_grad:
                        raise CCAError("loss(model, batch) returned a tensor without a gradient: compute it from "
                                       "model(...)'s outputs, not under torch.no_grad() or from detached values")
                    value.backward()
            total += float(value.detach())
        return {"loss": total}


def check_objective(config: Any) -> None:
    """Raise :class:`CCAError` on invalid objective settings of an update configuration."""
    from cca_fast import checks

    if config.objective not in OBJECTIVES:
        raise CCAError(f"unknown update objective {config.objective!r} (UpdateConfig.objective, --objective); "
                       f"choose one of {', '.join(OBJECTIVES)}")
    checks.number("UpdateConfig.margin", config.margin, flag="--margin",
                  hint="the logit difference above which a pivot stops pulling (hinge), e.g. 3.0")
    checks.number("UpdateConfig.retain_weight", config.retain_weight, flag="--retain-weight", lo=0,
                  hint="0 (no retain term) or a positive weight of the KL to the base model, e.g. 1.0")
    if config.retain_weight > 0 and config.objective == "gold_nll":
        raise CCAError("the retain term (--retain-weight) applies to the pivot objectives (logit_diff, hinge), "
                       "not to gold_nll: set it to 0 or pick a pivot objective")
