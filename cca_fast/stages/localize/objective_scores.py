"""Stage 2 scored on the training objective: component scores from the gold-solution loss.

AtP and DCM score the pivots' logit difference; stage 3's ``gold_nll`` objective trains the
training problems' gold solutions (:mod:`cca_fast.stages.sft`). The scores here rank components
by that training loss ``L = sum_e nll_e / T`` (``nll_e``: the summed next-token NLL of example
``e``'s target tokens, ``T``: the target tokens of all examples, the normalisation of
:class:`~cca_fast.stages.objectives.TrainingObjective`), over the rows a component owns
(:meth:`ComponentSpace.owned_rows`: a head's q/k/v output rows, a neuron's up-projection row,
their bias entries):

* ``fisher`` (the empirical Fisher diagonal, FISH masks): ``sum_e sum_{rows} g_e ** 2`` with
  ``g_e = dL_e / dW`` the per-example gradient, ``L_e = nll_e / T``;
* ``grad-weight`` (first-order Taylor importance): ``sum_{rows} |g * W|`` elementwise, with
  ``g = dL / dW = sum_e g_e`` the full training-set gradient;
* ``movement`` (LT-SFT): ``sum_{rows} |W_T - W_0|`` after a short dense fine-tune of every
  component row on the same loss (:func:`movement_scores`; the model is reset to ``W_0``).

Each is a float64 tensor ``[space.total]``; ranking within each kind and the budgets are
:func:`~cca_fast.stages.localize.select.select_per_kind`'s. The sums cover every element of the
owned rows (a head sums 64 rows of ``hidden`` weights, a neuron one row), which is why they are
ranked within a kind, never across kinds.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from cca_fast.errors import CCAError
from cca_fast.models import runtime
from cca_fast.models.adapters import KINDS
from cca_fast.models.components import ComponentSpace, restore_rows, snapshot_rows

#: the selectors scored here
OBJECTIVE_SELECTORS = ("fisher", "grad-weight", "movement")

Owners = dict[str, tuple[int, torch.Tensor, torch.Tensor]]


def row_owners(space: ComponentSpace) -> Owners:
    """``{param: (dim, rows LongTensor [m], components LongTensor [m])}``: every row along ``dim``
    of ``param`` that a component owns, and that component's flat index."""
    acc: dict[str, tuple[int, list[int], list[int]]] = {}
    for layer in range(space.n_layers):
        for kind in KINDS:
            base = space.offset(layer, kind)
            for i in range(space.counts[kind]):
                for ws in space.adapter.owned(layer, kind, i):
                    dim, rows, comps = acc.setdefault(ws.param, (ws.dim, [], []))
                    rows.extend(range(ws.start, ws.stop))
                    comps.extend([base + i] * (ws.stop - ws.start))
    return {p: (d, torch.tensor(r, dtype=torch.long), torch.tensor(c, dtype=torch.long))
            for p, (d, r, c) in sorted(acc.items())}


def row_sums(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[t.shape[dim]]`` float64: the sum of ``t`` over every dimension but ``dim``."""
    t = t.detach().to(torch.float64)
    return t.movedim(dim, 0).reshape(t.shape[dim], -1).sum(1) if t.dim() > 1 else t


def reduce_rows(space: ComponentSpace, per_row: Mapping[str, torch.Tensor], owners: Owners | None = None) -> torch.Tensor:
    """``[space.total]`` float64: for each component, the sum of ``per_row[param][row]`` over the
    rows it owns. ``per_row``: ``{param: [rows along the owned dim]}`` (a parameter left out
    contributes nothing)."""
    owners = owners if owners is not None else row_owners(space)
    out = torch.zeros(space.total, dtype=torch.float64)
    for name, (_, rows, comps) in owners.items():
        if name in per_row:
            out.index_add_(0, comps, per_row[name].detach().to("cpu", torch.float64)[rows])
    return out


def _owned_params(model: nn.Module, owners: Owners) -> dict[str, torch.Tensor]:
    params = runtime.base_parameters(model)
    missing = [n for n in owners if n not in params]
    if missing:
        raise CCAError(f"the model has no parameter {missing[0]} that its adapter says components own")
    return {n: params[n] for n in owners}


def _check_gold(gold: Sequence) -> None:
    if not gold:
        raise CCAError("objective scores need the training problems' gold solutions (SFTExample list), got none")


def gold_gradient_scores(model: nn.Module, gold: Sequence, space: ComponentSpace | None = None, *,
                         pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """``{"fisher": [total], "grad-weight": [total]}`` (float64) of the gold-solution loss of
    ``gold`` (:class:`~cca_fast.stages.sft.SFTExample`), from one forward and backward pass per
    example (per-example gradients; see the module docstring). Weights are left unchanged,
    their ``.grad`` cleared."""
    from cca_fast.stages.sft import sft_nll

    _check_gold(gold)
    model = runtime.unwrap(model)
    space = space if space is not None else ComponentSpace(model)
    owners = row_owners(space)
    params = _owned_params(model, owners)
    pad = runtime.pad_id(model, explicit=pad_id)
    T = sum(len(e.target_ids) for e in gold)
    fisher = {n: torch.zeros(p.shape[d], dtype=torch.float64, device=p.device)
              for n, p in params.items() for d in [owners[n][0]]}
    gsum = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in params.items()}
    with runtime.eval_mode(model), runtime.frozen(model):
        for p in params.values():
            p.requires_grad_(True)
        try:
            for e in gold:
                for p in params.values():
                    p.grad = None
                nll, _ = sft_nll(model, [e], pad_id=pad)
                (nll / T).backward()
                for n, p in params.items():
                    g = p.grad.detach().to(torch.float64)
                    fisher[n] += row_sums(g * g, owners[n][0])
                    gsum[n] += g
        finally:
            for p in params.values():
                p.grad = None
    gw = {n: row_sums((gsum[n] * params[n].detach().to(torch.float64)).abs(), owners[n][0]) for n in params}
    return {"fisher": reduce_rows(space, fisher, owners), "grad-weight": reduce_rows(space, gw, owners)}


def movement_scores(model: nn.Module, gold: Sequence, space: ComponentSpace | None = None,
                    config=None) -> torch.Tensor:
    """``[total]`` float64: ``sum_{rows} |W_T - W_0|`` after ``config.max_steps`` steps of stage 3
    (:func:`~cca_fast.stages.update.run_update`, objective ``gold_nll``) on every component's
    rows at once (the dense fine-tune of LT-SFT), no validation. The model is put back to
    ``W_0`` bit for bit afterwards.

    Args:
        config: an :class:`~cca_fast.stages.update.UpdateConfig` (its ``objective`` is set to
            ``gold_nll``; default: AdamW, lr 1e-4, 3 steps).
    """
    import dataclasses

    from cca_fast.stages.update import UpdateConfig, run_update

    _check_gold(gold)
    model = runtime.unwrap(model)
    space = space if space is not None else ComponentSpace(model)
    config = config or UpdateConfig(optimizer="adamw", lr=1e-4, max_steps=3)
    config = dataclasses.replace(config, objective="gold_nll", store_base_rows=False, scope="selected")
    owners = row_owners(space)
    base = runtime.base_parameters(model)
    plan = space.owned_rows(range(space.total))
    rows0 = snapshot_rows(base, plan)
    try:
        run_update(model, space, list(range(space.total)), [], config, validate=None, gold=gold)
        per_row = {}
        for n, (dim, _, _) in owners.items():
            s = plan[n]
            moved = base[n].detach().index_select(s.dim, s.index.to(base[n].device)) - rows0[n]
            full = torch.zeros(base[n].shape[dim], dtype=torch.float64)
            full[s.index] = row_sums(moved.abs(), dim).cpu()
            per_row[n] = full
    finally:
        restore_rows(base, plan, rows0)
    return reduce_rows(space, per_row, owners)
