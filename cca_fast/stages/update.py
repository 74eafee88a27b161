"""Stage 3: update only the rows of the selected components (docs/method.md section 3).

Paper default: full-batch gradient descent on the logit-difference loss
``L = -mean_i (logit_i[desired_i] - logit_i[undesired_i])`` at the last prefix position (gradients
accumulated over mini-batches), ``W <- W - 1e-4 dL/dW`` for up to 50 steps, changing only the
q/k/v output rows of selected heads and the up-projection rows of selected neurons
(:meth:`ComponentSpace.owned_rows`). Validation accuracy (a callable) is measured at step 0 (the
base), every 2 steps during the first 10 and every 5 after (and at the last step); the best step's
rows are kept in memory and the model is left at them.

Two execution modes give the same updated rows:

* ``"sparse"`` (default): weights frozen; each projection owning selected rows runs through
  :class:`cca_fast.kernels.row_grad.RowSelectiveProjection`, so only ``dW[R]`` is computed, and
  autograd accumulates it straight into the packed gradient buffer of a
  :class:`cca_fast.kernels.sparse_optim.RowSparseOptimizer` (state for the selected rows only, one
  launch per step).
* ``"reference"``: dense autograd gradients for every weight, then the selected rows are gathered
  and stepped by ``torch.optim.SGD`` / ``AdamW`` and copied back; dense gradients are freed as soon
  as they are gathered.

``scope="all"`` is the paper's no-mask baseline: the same update on every parameter (dense path).

Each mini-batch's common token prefix (the few-shot header) runs once and its suffixes on the
expanded key/value cache (``share_prefix``, :mod:`cca_fast.stages.batches`): the same loss and
gradients, far fewer token positions.
"""
from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torch import nn

from cca_fast.delta import SparseDelta
from cca_fast.errors import CCAError, KernelError
from cca_fast.kernels.dispatch import BACKENDS, Backend, accumulation_dtype
from cca_fast.kernels.row_grad import row_selective, zero_delta
from cca_fast.kernels.sparse_optim import (AdamWConfig, RowSparseOptimizer, RowSpec, SGDConfig, gather_rows,
                                           scatter_rows)
from cca_fast.models.components import ComponentSpace, RowSelection, restore_rows, snapshot_rows
from cca_fast.stages.objectives import LossFn, LossObjective, TrainingObjective, check_objective
from cca_fast.models import runtime

Progress = Callable[[dict], None]


@dataclass
class UpdateConfig:
    """Stage-3 settings (defaults = paper).

    Attributes:
        lr: learning rate (paper 1e-4).
        max_steps: optimizer steps (paper 50).
        optimizer: ``"sgd"`` (paper: plain gradient descent) or ``"adamw"``.
        momentum, dampening, nesterov: SGD options (paper: none).
        betas, eps: AdamW options.
        weight_decay: SGD L2 / AdamW decoupled decay (paper: 0).
        batch_size: mini-batch size for accumulating the full-batch gradient (memory only: the
            gradient is the same for any value).
        mode: ``"sparse"`` (row-selective gradients, row-sparse optimizer) or ``"reference"``
            (dense gradients, rows gathered and stepped by ``torch.optim``).
        scope: ``"selected"`` (CCA) or ``"all"`` (the no-mask baseline: every parameter,
            always the dense path).
        master_weights: fp32 master rows for float16/bfloat16 weights (``False``: step the
            half-precision weights directly, like the paper's fp16 reference code).
        eval_every, eval_every_early, early_steps: validation schedule (5, 2, first 10 steps).
        backend: kernels backend, ``"auto"`` / ``"triton"`` / ``"torch"``.
        pad_id: padding token id (default: the model config's pad, else eos, else 0).
        store_base_rows: keep the base rows in the returned delta (revert without a handle).
        share_prefix: run each mini-batch's longest common token prefix once and its suffixes on
            the expanded key/value cache (:mod:`cca_fast.stages.batches`): the same loss and
            gradient up to summation order, far fewer token positions for few-shot prompts.
            ``False``: every full sequence runs (the reference path).
        min_shared_prefix: share only a common prefix of at least this many tokens.
        objective: what the rows are trained on (:mod:`cca_fast.stages.objectives`): the paper's
            ``"logit_diff"``, the capped margin ``"hinge"``, or ``"gold_nll"`` (the training
            problems' gold solutions: sparse SFT on the circuit).
        margin: the hinge's cap on the logit difference.
        retain_weight: weight of the KL to the base model on the pivots' other trace tokens
            (pivot objectives; 0 = none, the paper).
    """

    lr: float = 1e-4
    max_steps: int = 50
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    batch_size: int = 8
    mode: Literal["sparse", "reference"] = "sparse"
    scope: Literal["selected", "all"] = "selected"
    master_weights: bool = True
    eval_every: int = 5
    eval_every_early: int = 2
    early_steps: int = 10
    backend: Backend = "auto"
    pad_id: int | None = None
    store_base_rows: bool = True
    share_prefix: bool = True
    min_shared_prefix: int = 16
    objective: str = "logit_diff"
    margin: float = 3.0
    retain_weight: float = 0.0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`CCAError` naming the field (and the ``cca run`` flag) on an invalid
        setting; run on construction. Floats must be finite (a NaN would also make a saved
        ``config.json`` differ from itself)."""
        from cca_fast import checks

        if self.optimizer not in ("sgd", "adamw"):
            raise CCAError(f"update optimizer must be 'sgd' or 'adamw', got {self.optimizer!r} "
                           "(UpdateConfig.optimizer, --optimizer)")
        if self.mode not in ("sparse", "reference"):
            raise CCAError(f"update mode must be 'sparse' or 'reference', got {self.mode!r} "
                           "(UpdateConfig.mode, --update-mode)")
        if self.scope not in ("selected", "all"):
            raise CCAError(f"UpdateConfig.scope must be 'selected' or 'all', got {self.scope!r}")
        if self.backend not in BACKENDS:
            raise CCAError(f"UpdateConfig.backend must be one of {', '.join(map(repr, BACKENDS))}, got {self.backend!r}")
        checks.integer("UpdateConfig.max_steps", self.max_steps, flag="--update-steps", lo=0)
        checks.integer("UpdateConfig.batch_size", self.batch_size)
        checks.integer("UpdateConfig.min_shared_prefix", self.min_shared_prefix)
        checks.number("UpdateConfig.lr", self.lr, flag="--lr", lo=0, lo_open=True,
                      hint="pass a positive learning rate such as 1e-4 (the paper's)")
        for name in ("momentum", "dampening", "weight_decay"):
            checks.number(f"UpdateConfig.{name}", getattr(self, name), lo=0)
        checks.number("UpdateConfig.eps", self.eps, lo=0, lo_open=True)
        checks.integer("UpdateConfig.eval_every", self.eval_every)
        checks.integer("UpdateConfig.eval_every_early", self.eval_every_early)
        checks.integer("UpdateConfig.early_steps", self.early_steps, lo=0)
        check_objective(self)
        try:
            self.optim_config()
        except KernelError as e:
            raise CCAError(f"invalid optimizer settings: {e}") from None

    def optim_config(self) -> SGDConfig | AdamWConfig:
        if self.optimizer == "adamw":
            return AdamWConfig(self.lr, tuple(self.betas), self.eps, self.weight_decay)
        return SGDConfig(self.lr, self.momentum, self.dampening, self.weight_decay, self.nesterov)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class UpdateResult:
    """Outcome of :func:`run_update`.

    Attributes:
        best_step: step whose weights the model is left at (0 = base).
        best_val: its validation accuracy (``None`` without ``validate``).
        history: one record per step: ``step``, ``train_logit_diff`` (mean logit difference over
            the training pivots at that step's weights; pivot objectives), ``train_loss`` (the
            objective's loss, when it is not the paper's), ``retain_kl`` (with a retain term),
            ``val`` (when evaluated), ``seconds``.
        delta: the best step's rows as a :class:`SparseDelta` (base rows and hashes included);
            empty (no parameter) when step 0 is the best: the base weights are kept.
        seconds: wall time.
    """

    best_step: int
    best_val: float | None
    history: list[dict[str, Any]]
    delta: SparseDelta
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "best_val": self.best_val, "history": self.history,
                "seconds": self.seconds, "config": self.config, "delta": self.delta.summary()}

    def __repr__(self) -> str:
        val = "None" if self.best_val is None else f"{self.best_val:.4g}"
        last = self.history[-1] if self.history else {}
        loss = next((f", final {k}={last[k]:.4g}" for k in ("train_loss", "train_logit_diff") if k in last), "")
        return (f"UpdateResult(best_step={self.best_step}, best_val={val}, steps={max(len(self.history) - 1, 0)}"
                f"{loss}, delta={self.delta!r}, seconds={self.seconds:.1f})")


def eval_steps(max_steps: int, every: int = 5, early_every: int = 2, early_steps: int = 10) -> list[int]:
    """Steps at which validation runs: 0, every ``early_every`` up to ``early_steps``, every
    ``every`` after, and ``max_steps``. Paper: 0, 2, 4, 6, 8, 10, 15, ..., 50."""
    steps = {0, max_steps}
    steps.update(range(early_every, min(early_steps, max_steps) + 1, early_every))
    steps.update(s for s in range(every, max_steps + 1, every) if s > early_steps)
    return sorted(steps)


# ---------------------------------------------------------------------------------------------
# steppers: one optimizer step on the selected rows, in each mode
# ---------------------------------------------------------------------------------------------
class _SparseStepper:
    """Row-selective gradients accumulated into a :class:`RowSparseOptimizer`'s packed buffer."""

    def __init__(self, model: nn.Module, plan: dict[str, RowSelection], config: UpdateConfig):
        params = runtime.base_parameters(model)
        specs = [RowSpec(n, params[n], s.dim, s.index) for n, s in plan.items()]
        self.opt = RowSparseOptimizer(specs, config.optim_config(), master_weights=config.master_weights,
                                      backend=config.backend)
        self.model, self.backend = model, config.backend
        self.leaves: dict[str, torch.Tensor] = {}
        self.arrived: dict[str, int] = {}
        self.modules: dict[str, tuple[str, str | None]] = {}
        for name in plan:
            mod, attr = name.rsplit(".", 1)
            w, b = self.modules.get(mod, (None, None))
            if attr == "weight":
                w = name
            elif attr == "bias":
                b = name
            else:
                raise CCAError(f"cannot update rows of {name}: only projection weights and biases are supported")
            self.modules[mod] = (w, b)
        for mod, (w, b) in self.modules.items():
            if w is None:
                raise CCAError(f"{mod}: bias rows selected without weight rows (sparse mode needs both)")
            for name in (w, b):
                if name is None:
                    continue
                view = self.opt.grad_view(name)
                leaf = zero_delta(tuple(view.shape), view.dtype, view.device)
                leaf.grad = view  # autograd accumulates dW[R] in place here (grad mode is off in backward)
                leaf.register_hook(self._arrival(name))
                self.leaves[name] = leaf
        self.plan = plan

    def _arrival(self, name: str):
        def hook(grad):
            self.arrived[name] = self.arrived.get(name, 0) + 1
        return hook

    def context(self, stack: ExitStack) -> None:
        for mod, (w, b) in self.modules.items():
            module = runtime.submodule(self.model, mod, base=True)  # a peft layer's base layer
            sel_w = self.plan[w]
            transposed = sel_w.dim == 1
            if transposed == isinstance(module, nn.Linear):
                raise CCAError(f"{mod} is a {type(module).__name__} but its rows are along dim {sel_w.dim}")
            stack.enter_context(row_selective(
                module, sel_w.index, None if b is None else self.plan[b].index, self.leaves[w],
                None if b is None else self.leaves[b], transposed=transposed, backend=self.backend))

    def zero_grad(self) -> None:
        self.opt.zero_grad()
        self.arrived.clear()

    def step(self) -> None:
        for name, leaf in self.leaves.items():
            if not self.arrived.get(name):
                raise RuntimeError(f"no gradient reached the selected rows of {name} (is the module on the path "
                                   "from the inputs to the logits?)")
            if leaf.grad is None or leaf.grad.data_ptr() != self.opt.grad_view(name).data_ptr():
                raise RuntimeError(f"autograd did not accumulate the gradient of {name} into the packed buffer")
        self.opt.step()


class _ReferenceStepper:
    """Dense gradients for every weight; selected rows gathered, stepped by torch.optim, copied back."""

    def __init__(self, model: nn.Module, plan: dict[str, RowSelection], config: UpdateConfig):
        self.model, self.plan = model, plan
        self.params = runtime.base_parameters(model)  # under peft: the base weights, the adapters stay frozen
        self.rows: dict[str, torch.Tensor] = {}  # leaves the torch optimizer steps
        for name, sel in plan.items():
            p = self.params[name]
            full = sel.dim == 0 and sel.index.numel() == p.shape[0]
            master = config.master_weights and p.dtype in (torch.float16, torch.bfloat16)
            if full and not master:
                self.rows[name] = p  # the whole parameter: step it in place
            else:
                dt = accumulation_dtype(p.dtype) if master else p.dtype
                self.rows[name] = gather_rows(p, sel.dim, sel.index.to(p.device)).to(dt).requires_grad_()
        oc = config.optim_config()
        leaves = list(self.rows.values())
        if isinstance(oc, AdamWConfig):
            self.opt = torch.optim.AdamW(leaves, lr=oc.lr, betas=oc.betas, eps=oc.eps, weight_decay=oc.weight_decay,
                                         foreach=False)
        else:
            self.opt = torch.optim.SGD(leaves, lr=oc.lr, momentum=oc.momentum, dampening=oc.dampening,
                                       weight_decay=oc.weight_decay, nesterov=oc.nesterov, foreach=False)

    def context(self, stack: ExitStack) -> None:
        for p in self.params.values():
            p.requires_grad_(True)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def step(self) -> None:
        in_place = {id(leaf) for leaf in self.rows.values()}
        for name, sel in self.plan.items():
            p, leaf = self.params[name], self.rows[name]
            if p.grad is None:
                raise RuntimeError(f"no gradient reached {name}")
            if leaf is not p:
                leaf.grad = gather_rows(p.grad, sel.dim, sel.index.to(p.device)).to(leaf.dtype)
        for p in self.params.values():  # dense gradients are not needed any longer
            if id(p) not in in_place:
                p.grad = None
        self.opt.step()
        with torch.no_grad():
            for name, sel in self.plan.items():
                p, leaf = self.params[name], self.rows[name]
                if leaf is not p:
                    scatter_rows(p, sel.dim, sel.index.to(p.device), leaf.detach())
                    leaf.grad = None


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def _full_plan(model: nn.Module) -> dict[str, RowSelection]:
    """Every row of every base parameter (the no-mask baseline; a peft model's adapters are left
    as they are); 0-d parameters (scalars) have no rows and are left out."""
    return {n: RowSelection(n, 0, torch.arange(p.shape[0])) for n, p in runtime.base_parameters(model).items()
            if p.dim() > 0}


def _snapshot(model: nn.Module, plan: dict[str, RowSelection]) -> dict[str, torch.Tensor]:
    """The selected rows (parameter layout, ``index_select(dim, index)``), copied."""
    return snapshot_rows(runtime.base_parameters(model), plan)


def _restore(model: nn.Module, plan: dict[str, RowSelection], rows: dict[str, torch.Tensor]) -> None:
    restore_rows(runtime.base_parameters(model), plan, rows)


def _selected(selection: Any, space: ComponentSpace) -> torch.Tensor:
    """Flat indices ``LongTensor [n]`` (sorted, unique) of a :class:`Selection` (checked against
    ``space``), a tensor, or a sequence of flat indices / components / names (``"L3.q4"``)."""
    if hasattr(selection, "indices") and not isinstance(selection, torch.Tensor):  # a Selection
        check = getattr(selection, "check_space", None)
        if callable(check):
            check(space)
        selection = selection.indices
    if isinstance(selection, torch.Tensor):
        if selection.is_floating_point() or selection.is_complex() or selection.dtype == torch.bool:
            raise CCAError(f"selected components must be integer flat indices, got a {selection.dtype} tensor "
                           "(a boolean mask? pass mask.nonzero().flatten())")
        return selection.detach().to("cpu", torch.long).flatten().unique()
    if isinstance(selection, (str, bytes)) or not isinstance(selection, Iterable):
        raise CCAError(f"selection must be a Selection (from select()), a tensor or a list of flat indices or "
                       f"component names such as 'L3.q4', got {type(selection).__name__}")
    flat = [space.index(c) if not isinstance(c, int) or isinstance(c, bool) else c for c in selection]
    return torch.tensor(flat, dtype=torch.long).unique()


def run_update(
    model: nn.Module,
    space: ComponentSpace,
    selection: Any,
    train_examples: Sequence[Any],
    config: UpdateConfig | None = None,
    validate: Callable[[nn.Module], float] | None = None,
    progress: Progress | bool | None = None,
    gold: Sequence[Any] | None = None,
    *,
    loss: LossFn | None = None,
) -> UpdateResult:
    """Stage 3 (see module docstring).

    Args:
        model: the causal LM (any device, any dtype; a peft / ``torch.compile`` / user wrapper of
            one is looked through, :func:`~cca_fast.models.runtime.unwrap`); modified in place.
            Under peft the base rows are updated and the adapters are left as they are.
        space: its :class:`ComponentSpace`.
        selection: the selected components: the :class:`~cca_fast.stages.localize.select.Selection`
            that :func:`~cca_fast.stages.localize.select.select` returns, a ``LongTensor`` or a
            list of flat indices, or component names (``"L3.q4"``, as saved in a delta).
        train_examples: pivot examples; the loss uses all of them at every step (with ``loss``:
            your training items, see below).
        config: :class:`UpdateConfig` (default: paper).
        validate: ``validate(model) -> accuracy``, or ``(accuracy, tie-break)`` (e.g. the
            validation gold log-likelihood): the step with the highest accuracy is kept, among
            equal accuracies the one with the highest tie-break (recorded as ``val_tiebreak``);
            without it the last step is kept.
        progress: ``True`` for a progress bar, or a callable receiving each history record.
        gold: the training problems' gold solutions
            (:class:`~cca_fast.stages.sft.SFTExample`), for ``objective="gold_nll"``.
        loss: your own objective instead of ``config.objective``: ``loss(model, batch) -> scalar``,
            the mean loss of a mini-batch of ``config.batch_size`` training items (a
            :class:`~cca_fast.stages.examples.PivotBatch` when they are pivot examples, else the
            list of items); ``model`` is the unwrapped transformers model. The history records its
            full-batch mean as ``train_loss`` (:class:`~cca_fast.stages.objectives.LossObjective`).
    Returns:
        :class:`UpdateResult`; the model is left at the best step's weights.
    """
    t0 = time.perf_counter()
    config = config or UpdateConfig()
    config.check()
    if loss is not None and (config.objective != "logit_diff" or config.retain_weight > 0):
        raise CCAError(f"pass either loss=... or UpdateConfig.objective={config.objective!r} / retain_weight, not both "
                       "(a user loss replaces the built-in objective)")
    model = runtime.unwrap(model)
    if not train_examples and config.objective != "gold_nll":
        raise CCAError("stage 3 needs at least one training example (stage 1 found no pivotal tokens?)")
    sel = _selected(selection, space)
    if config.scope == "selected":
        if sel.numel() == 0:
            raise CCAError("no components selected: stage 3 would change nothing (lower the DCM lambda or use "
                           "an attribution top-k selection)")
        if int(sel.min()) < 0 or int(sel.max()) >= space.total:
            raise CCAError(f"selected component indices must be in [0, {space.total})")
        plan = space.owned_rows(sel)
    else:
        plan = _full_plan(model)
    components = [str(c) for c in space.components(sel)] if config.scope == "selected" else ["all"]

    objective = (LossObjective(model, train_examples, loss, config) if loss is not None
                 else TrainingObjective(model, train_examples, config, gold))
    schedule = set(eval_steps(config.max_steps, config.eval_every, config.eval_every_early, config.early_steps))
    dense = config.mode == "reference" or config.scope == "all"
    base_rows = _snapshot(model, plan)
    history: list[dict[str, Any]] = []
    best_step, best_val, best_rows = config.max_steps, None, None
    best_key: tuple[float, ...] | None = None
    bar = _bar(config.max_steps) if progress is True else None
    try:
        with ExitStack() as stack:
            stack.enter_context(runtime.eval_mode(model))
            stack.enter_context(runtime.frozen(model))
            stepper = (_ReferenceStepper if dense else _SparseStepper)(model, plan, config)
            stepper.context(stack)
            for step in range(config.max_steps + 1):
                record: dict[str, Any] = {"step": step}
                if step in schedule and validate is not None:
                    with torch.no_grad(), runtime.eval_mode(model):
                        got = validate(model)
                    key = tuple(float(v) for v in got) if isinstance(got, tuple) else (float(got),)
                    record["val"] = key[0]
                    if len(key) > 1:
                        record["val_tiebreak"] = key[1]
                    if best_key is None or key > best_key:  # lexicographic: the tie-break decides ties
                        best_step, best_key, best_rows = step, key, _snapshot(model, plan)
                        best_val = key[0]
                last = step == config.max_steps
                if not last:
                    stepper.zero_grad()
                measured = objective.pass_(backward=not last)
                if "logit_diff" in measured:
                    record["train_logit_diff"] = measured["logit_diff"]
                if loss is not None or config.objective != "logit_diff" or "retain_kl" in measured:
                    record["train_loss"] = measured["loss"]
                    if "retain_kl" in measured:
                        record["retain_kl"] = measured["retain_kl"]
                if not last:
                    stepper.step()
                record["seconds"] = time.perf_counter() - t0
                history.append(record)
                if callable(progress):
                    progress(record)
                if bar is not None and not last:
                    bar.update(1)
                    shown = ("train_logit_diff", "train_loss", "val")
                    bar.set_postfix(**{k: f"{record[k]:.3f}" for k in shown if k in record})
        if best_rows is not None and best_step != config.max_steps:
            _restore(model, plan, best_rows)
    finally:
        if bar is not None:
            bar.close()
        for p in model.parameters():
            p.grad = None
    meta = {
        "components": components,
        "n_components": len(components) if config.scope == "selected" else space.total,
        "components_total": space.total,
        "fraction": (sel.numel() / space.total) if config.scope == "selected" else 1.0,
        "hyperparameters": config.to_dict() if loss is None else {
            **config.to_dict(), "objective": f"custom:{getattr(loss, '__qualname__', type(loss).__name__)}"},
        "metrics": {"best_step": best_step, "best_val": best_val,
                    "base_val": history[0].get("val") if history else None,
                    "train_logit_diff": {str(h["step"]): h["train_logit_diff"] for h in history
                                         if "train_logit_diff" in h},
                    **({"train_loss": {str(h["step"]): h["train_loss"] for h in history}}
                       if any("train_loss" in h for h in history) else {})},
        "stage": "update",
    }
    kept_base = best_step == 0 and best_rows is not None
    if kept_base:
        # no step beat the base weights: the model is back at the base, so the delta is empty (not a
        # copy of every selected row, which for the no-mask baseline is the whole model)
        meta["kept_base"] = True
        meta["note"] = "no update step beat the base on validation: the base weights are kept, the delta is empty"
    delta = SparseDelta.from_rows(model, {} if kept_base else plan, {} if kept_base else base_rows, meta=meta,
                                  store_base=config.store_base_rows)
    return UpdateResult(best_step, best_val, history, delta, time.perf_counter() - t0, config.to_dict())


def _bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="update", unit="step")
