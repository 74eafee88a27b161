"""Stage 2: desiderata-based component masking (DCM), METHOD section 2.

One real mask value ``m`` per component (fp32, ``[space.total]``), initialised to 1. At the last
prefix position only, each component's activation is multiplied by ``2 m`` (``m = 0.5`` leaves
the model unchanged). Loss per batch::

    loss = -mean_i (logit_i[desired_i] - logit_i[undesired_i]) + lambda * sum_c |m_c|

Adam (lr 5e-3), learning rate x0.9 every 5 epochs, up to 50 epochs, batches of 8, ``m`` clamped
to [0, 1] after each step, weights frozen. A component is selected iff ``m >= 0.5``.

Two execution modes, same losses and mask gradients (tests check it):

* ``"full"`` (reference): the whole left-padded prefix runs through the masked model each step;
* ``"last"`` (fast, default): the mask touches only the last position and the weights are
  frozen, so the key/value cache of every earlier position is constant. It is computed once per
  batch with the unmasked model (:class:`PivotPrefixCache`, no grad) and only the last token runs
  through the masked model at each step, attending to that cache. The cached tensors are never
  mutated: each step gets a fresh cache object that *shares* them (a cache update concatenates
  into new tensors), and their version counters are checked before every reuse.

Early stopping (paper): stop when the number of selected components has not changed for
``ceil(N / B) * 0.2`` batches. Read literally this fires within the first few batches of a run
initialised at ``m = 1`` (no mask can cross 0.5 before ~``0.5 / lr = 100`` Adam steps), so by
default the counter is armed only once the count has changed at least once
(``DCMConfig.arm_early_stop_after_change``; set it False for the literal rule).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from cca_fast.errors import CCAError
from cca_fast.stages.examples import PivotBatch, PivotExample, collate, logit_diff
from cca_fast.models.hooks import scale_components
from cca_fast.models.components import ComponentSpace
from cca_fast.stages.localize.atp import AtPConfig, Progress, check_examples, make_progress, run_atp
from cca_fast.generation.prefix import SharedCache, run_prefix
from cca_fast.models import runtime

MODES = ("last", "full")
INITS = ("ones", "atp")


@dataclass
class DCMConfig:
    """DCM hyper-parameters (defaults = paper defaults) and execution options.

    Attributes:
        lambda_l1: weight of ``sum |m|`` (paper 0.01; sweeps 1e-4 .. 0.5).
        lr: Adam learning rate.
        lr_decay, decay_every: learning rate x ``lr_decay`` every ``decay_every`` epochs.
        epochs: maximum number of epochs.
        batch_size: examples per step.
        threshold: selection threshold on ``m`` (kept iff ``m >= threshold``).
        early_stop: stop when the selected count has not changed for
            ``ceil(N / batch_size) * patience_fraction`` batches.
        patience_fraction: see ``early_stop``.
        arm_early_stop_after_change: count unchanged batches only after the selected count
            first changed (see the module docstring).
        mode: ``"last"`` (prefix K/V cached, only the last token recomputed) or ``"full"``.
        init: ``"ones"`` (paper) or ``"atp"``: warm start, ``m = 1`` for the top
            ``atp_fraction`` of components by AtP score and ``atp_low`` (just below the
            threshold: not selected, scale ``2 * atp_low`` close to 1) for the others.
        shuffle: reshuffle the examples every epoch (seeded by ``seed``).
        reuse_prefix_cache: form the batches once (from one seeded shuffle) and only reshuffle
            their order every epoch, so that with ``mode="last"`` each batch's prefix cache is
            computed once for the whole run instead of once per epoch. Costs memory: the K/V
            of every example stays on the model's device.
        pad_id: left-padding token (``None``: the model's pad, else EOS, else 0).
    """

    lambda_l1: float = 0.01
    lr: float = 5e-3
    lr_decay: float = 0.9
    decay_every: int = 5
    epochs: int = 50
    batch_size: int = 8
    threshold: float = 0.5
    early_stop: bool = True
    patience_fraction: float = 0.2
    arm_early_stop_after_change: bool = True
    mode: str = "last"
    init: str = "ones"
    atp_fraction: float = 0.05
    atp_low: float = 0.45
    shuffle: bool = True
    reuse_prefix_cache: bool = False
    seed: int = 0
    pad_id: int | None = None

    def __post_init__(self) -> None:
        from cca_fast import checks

        if self.mode not in MODES:
            raise CCAError(f"DCMConfig.mode (--dcm-mode) must be one of {MODES}, got {self.mode!r}")
        if self.init not in INITS:
            raise CCAError(f"DCMConfig.init must be one of {INITS}, got {self.init!r}")
        checks.integer("DCMConfig.epochs", self.epochs, flag="--dcm-epochs")
        checks.integer("DCMConfig.batch_size", self.batch_size)
        checks.integer("DCMConfig.decay_every", self.decay_every)
        checks.number("DCMConfig.lambda_l1", self.lambda_l1, flag="--dcm-lambda", lo=0,
                      hint="the L1 weight (paper 0.01; 0 = no sparsity pressure)")
        checks.number("DCMConfig.lr", self.lr, lo=0, lo_open=True, hint="Adam's learning rate (paper 5e-3)")
        checks.number("DCMConfig.lr_decay", self.lr_decay, lo=0, hi=1, lo_open=True)
        checks.number("DCMConfig.threshold", self.threshold, lo=0, hi=1)
        checks.number("DCMConfig.patience_fraction", self.patience_fraction, lo=0)
        checks.number("DCMConfig.atp_fraction", self.atp_fraction, lo=0, hi=1)
        checks.number("DCMConfig.atp_low", self.atp_low, lo=0, hi=1)


@dataclass
class DCMResult:
    """Outcome of :func:`run_dcm`.

    Attributes:
        mask: final ``m``, ``[total]`` fp32 on the CPU, in [0, 1].
        selected: flat indices with ``m >= threshold`` (sorted ``LongTensor``).
        history: one dict per batch: ``epoch``, ``batch``, ``loss``, ``logit_diff`` (mean),
            ``l1``, ``n_selected``, ``lr``.
        epochs: epochs run (the last one possibly partial).
        stopped_early: whether early stopping ended the run.
        config: the configuration used.
    """

    mask: torch.Tensor
    selected: torch.Tensor
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs: int = 0
    stopped_early: bool = False
    config: DCMConfig = field(default_factory=DCMConfig)

    def to_selection(self, space: ComponentSpace):
        """The :class:`~cca_fast.stages.localize.select.Selection` of ``m >= threshold``."""
        from cca_fast.stages.localize.select import select_dcm  # noqa: PLC0415 (select imports nothing from here)

        sel = select_dcm(self.mask, space, self.config.threshold)
        sel.params.update({"lambda_l1": self.config.lambda_l1, "epochs_run": self.epochs,
                           "init": self.config.init, "seed": self.config.seed})
        return sel

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {"n_selected": int(self.selected.numel()), "total": int(self.mask.numel()),
                "epochs": self.epochs, "steps": len(self.history), "stopped_early": self.stopped_early,
                "final_loss": last.get("loss"), "final_logit_diff": last.get("logit_diff"),
                "config": asdict(self.config)}


# ---- prefix cache -----------------------------------------------------------------------------

class PivotPrefixCache(SharedCache):
    """Key/value cache of positions ``[0, T-1)`` of a left-padded batch, computed once with the
    unmasked, frozen model (no grad) through :func:`cca_fast.generation.prefix.run_prefix`;
    :meth:`fresh` gives a cache object for one step over the same stored tensors (see
    :class:`~cca_fast.generation.prefix.SharedCache`). ``cache`` is ``None`` when there is
    nothing to cache (``T == 1``)."""

    def __init__(self, model: nn.Module, batch: PivotBatch):
        self.length = batch.input_ids.shape[1] - 1
        cache = None
        if self.length > 0:
            with torch.no_grad():
                _, cache = run_prefix(model, batch.input_ids[:, :-1], attention_mask=batch.attention_mask[:, :-1],
                                      position_ids=batch.position_ids[:, :-1])
        super().__init__(cache)

    def fresh(self) -> Any:
        """A cache for one step: same stored tensors, independent bookkeeping."""
        try:
            return super().fresh()
        except RuntimeError as e:
            raise CCAError(f"{e}; use DCMConfig(mode='full')") from None


# ---- loss --------------------------------------------------------------------------------------

def dcm_loss(model: nn.Module, space: ComponentSpace, batch: PivotBatch, mask: torch.Tensor,
             lambda_l1: float, mode: str = "full", prefix: PivotPrefixCache | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DCM loss of one batch, differentiable in ``mask``.

    Args:
        mask: ``[space.total]`` (fp32 in :func:`run_dcm`; any float dtype works).
        mode: ``"full"`` or ``"last"`` (``prefix`` is built if not given).
    Returns:
        ``(loss, mean logit difference, sum |m|)``, scalars.
    """
    if mode not in MODES:
        raise CCAError(f"mode must be one of {MODES}, got {mode!r}")
    scales = 2.0 * mask
    if mode == "last" and runtime.cache_keyword(model) is None:  # (warned once): same loss, full prefix
        mode = "full"
    if mode == "full":
        with scale_components(model, space, scales, positions=-1):
            logits = runtime.forward(model, **batch.model_inputs(), keep=1)[0][:, -1]
    else:
        prefix = prefix if prefix is not None else PivotPrefixCache(model, batch)
        with scale_components(model, space, scales, positions=-1):
            logits = runtime.forward(model, input_ids=batch.input_ids[:, -1:], attention_mask=batch.attention_mask,
                                     position_ids=batch.position_ids[:, -1:], cache=prefix.fresh(), use_cache=True,
                                     keep=1)[0][:, -1]
    ld = logit_diff(logits, batch.desired, batch.undesired).mean()
    l1 = mask.abs().sum()
    return -ld + lambda_l1 * l1, ld, l1


# ---- training loop -----------------------------------------------------------------------------

def _initial_mask(model: nn.Module, examples: Sequence[PivotExample], space: ComponentSpace,
                  config: DCMConfig, init_scores: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if config.init == "ones":
        return torch.ones(space.total, dtype=torch.float32, device=device)
    if init_scores is None:
        init_scores = run_atp(model, examples, AtPConfig(batch_size=config.batch_size, pad_id=config.pad_id),
                              space=space).scores
    if tuple(init_scores.shape) != (space.total,):
        raise CCAError(f"init_scores must be [{space.total}], got {tuple(init_scores.shape)}")
    k = int(round(config.atp_fraction * space.total))
    order = torch.sort(init_scores.detach().to(torch.float64).cpu(), descending=True, stable=True).indices
    m = torch.full((space.total,), float(config.atp_low), dtype=torch.float32)
    m[order[:k]] = 1.0
    return m.to(device)


def _batches(n: int, bs: int, gen: torch.Generator, shuffle: bool) -> list[list[int]]:
    """Example indices of each batch (one seeded permutation, or in order)."""
    order = (torch.randperm(n, generator=gen) if shuffle else torch.arange(n)).tolist()
    return [order[i : i + bs] for i in range(0, n, bs)]


def max_mask_travel(config: DCMConfig, n_examples: int) -> float:
    """About the most any mask value can move over a whole run: Adam moves a parameter by about
    ``lr`` per step at most (more only when the gradient's magnitude jumps between steps), so the
    bound is the sum of the scheduled learning rates over
    ``epochs * ceil(n_examples / batch_size)`` steps. When it is below ``1 - threshold`` (0.5),
    no component can be deselected from the all-ones start: DCM keeps every component."""
    per_epoch = math.ceil(max(n_examples, 1) / config.batch_size)
    return sum(config.lr * config.lr_decay ** (e // config.decay_every) * per_epoch for e in range(config.epochs))


def run_dcm(model: nn.Module, examples: Sequence[PivotExample], config: DCMConfig | None = None,
            progress: Progress = False, *, space: ComponentSpace | None = None,
            init_scores: torch.Tensor | None = None) -> DCMResult:
    """Learn the DCM mask over ``examples`` (see the module docstring).

    Args:
        model: a causal LM of a supported family; its weights are frozen during the run (and
            restored), it runs in eval mode.
        examples: pivot examples from stage 1.
        config: :class:`DCMConfig` (paper defaults if omitted).
        progress: ``True`` for a tqdm bar, or a callback receiving each history entry.
        space: the model's :class:`ComponentSpace` (built if omitted).
        init_scores: AtP scores ``[total]`` for ``init="atp"`` (computed if omitted).
    Returns:
        :class:`DCMResult`.
    """
    config = config or DCMConfig()
    space = space if space is not None else ComponentSpace(model)
    model = runtime.unwrap(model)  # peft / torch.compile / a user's wrapper: the model inside
    check_examples(examples, getattr(model.config, "vocab_size", None))
    travel = max_mask_travel(config, len(examples))
    if config.init == "ones" and travel < 1.0 - config.threshold:
        import warnings

        warnings.warn(f"DCM: with {len(examples)} examples, batch {config.batch_size}, {config.epochs} epochs and lr "
                      f"{config.lr}, a mask can move by at most {travel:.2f} < {1 - config.threshold:.2f}: every "
                      "component will stay selected. Raise epochs (--dcm-epochs) or lr, use more examples, or a "
                      "smaller batch", stacklevel=2)
    device = runtime.input_device(model)
    pad = runtime.pad_id(model, explicit=config.pad_id)
    n, bs = len(examples), int(config.batch_size)
    n_batches = math.ceil(n / bs)
    patience = n_batches * config.patience_fraction
    gen = torch.Generator().manual_seed(int(config.seed))
    update, close = make_progress(progress, config.epochs * n_batches, "DCM")

    history: list[dict[str, Any]] = []
    stopped, epochs_run = False, 0
    caches: dict[int, PivotPrefixCache] = {}
    try:
        with runtime.frozen(model), runtime.eval_mode(model):
            mask = _initial_mask(model, examples, space, config, init_scores, device).requires_grad_(True)
            opt = torch.optim.Adam([mask], lr=config.lr)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=config.decay_every, gamma=config.lr_decay)
            prev = int((mask.detach() >= config.threshold).sum())
            unchanged, armed = 0, not config.arm_early_stop_after_change
            fixed = _batches(n, bs, gen, config.shuffle) if config.reuse_prefix_cache else None
            for epoch in range(config.epochs):
                epochs_run = epoch + 1
                if fixed is not None:  # same batches, new order
                    order = torch.randperm(n_batches, generator=gen) if config.shuffle else torch.arange(n_batches)
                    plan = [(int(k), fixed[int(k)]) for k in order]
                else:
                    plan = list(enumerate(_batches(n, bs, gen, config.shuffle)))
                for b, (key, idx) in enumerate(plan):
                    batch = collate([examples[i] for i in idx], pad, device)
                    prefix = None
                    if config.mode == "last":
                        prefix = caches.get(key) if fixed is not None else None
                        if prefix is None:
                            prefix = PivotPrefixCache(model, batch)
                            if fixed is not None:
                                caches[key] = prefix
                    opt.zero_grad(set_to_none=True)
                    loss, ld, l1 = dcm_loss(model, space, batch, mask, config.lambda_l1, config.mode, prefix)
                    loss.backward()
                    if mask.grad is None or not torch.isfinite(mask.grad).all():
                        raise CCAError("DCM mask gradient is missing or not finite (NaN/inf in the model's "
                                       "logits? check the examples and the model dtype)")
                    opt.step()
                    with torch.no_grad():
                        mask.clamp_(0.0, 1.0)
                    n_sel = int((mask.detach() >= config.threshold).sum())
                    entry = {"epoch": epoch, "batch": b, "loss": loss.item(), "logit_diff": ld.item(),
                             "l1": l1.item(), "n_selected": n_sel, "lr": float(opt.param_groups[0]["lr"])}
                    history.append(entry)
                    update(entry)
                    if n_sel != prev:
                        armed, unchanged = True, 0
                    elif armed:
                        unchanged += 1
                    prev = n_sel
                    if config.early_stop and armed and unchanged >= patience:
                        stopped = True
                        break
                sched.step()
                if stopped:
                    break
    finally:
        close()
    final = mask.detach().float().cpu()
    selected = torch.nonzero(final >= config.threshold).flatten()
    return DCMResult(final, selected, history, epochs_run, stopped, config)
