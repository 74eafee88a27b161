"""Gradient x activation attribution of every component, fused into one backward pass.

The score of a component is ``sum over its channels and the scored positions of
activation * d(metric)/d(activation)``: the derivative of the metric with respect to a scale on
the component at those positions, at scale 1 (docs/method.md section 2, attribution patching).

The hooks, the scored rows and the reduction inside backward are the one attribution engine,
:mod:`cca_fast.attribution_engine` (shared with :func:`cca_fast.attribution_dataset.attribute_dataset`):
weights frozen, eval mode, an identity tap per hooked tensor that reduces ``activation x
gradient`` per component as soon as the gradient exists, and every site checked to have received
its gradient (:class:`CCAError` otherwise).

Public entry point: :func:`attribute`. ``positions`` follows :mod:`cca_fast.models.hooks` (``None``,
an ``int``, ``LongTensor [B]``, ``BoolTensor [B, T]``) plus float weights ``[B, T]``; ``None``
means every real (non-padding) token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import torch
from torch import nn

from cca_fast.attribution_engine import Engine, Rows, build_groups
from cca_fast.errors import CCAError
from cca_fast.stages.examples import PivotBatch, logit_diff
from cca_fast.models.hooks import position_mask
from cca_fast.kernels.dispatch import Backend, accumulation_dtype
from cca_fast.models.adapters import KINDS
from cca_fast.models.components import Component, ComponentSpace
from cca_fast.models import runtime

Metric = Callable[[torch.Tensor, Any], torch.Tensor]
Positions = Union[None, int, torch.Tensor]
BatchLike = Union[PivotBatch, Mapping[str, torch.Tensor], torch.Tensor]


@dataclass
class Attribution:
    """Scores of every component.

    Attributes:
        space: the :class:`ComponentSpace` indexing the scores.
        scores: ``[space.total]`` fp32 (fp64 for fp64 models), summed over scored positions and
            over every batch; 0 for kinds not scored.
        per_position: ``[B, T, space.total]`` per-position scores (``per_position=True``, one
            batch), 0 at unscored positions; else ``None``.
        kinds: the kinds scored.
        absolute: whether ``|score|`` was taken per position before summing.
        metric_value: sum of the metric over the batches.
        n_batches: number of forward/backward passes accumulated.
    """

    space: ComponentSpace
    scores: torch.Tensor
    per_position: torch.Tensor | None = None
    kinds: tuple[str, ...] = KINDS
    absolute: bool = False
    metric_value: float = 0.0
    n_batches: int = 0

    def site(self, layer: int, kind: str) -> torch.Tensor:
        """Scores of the ``kind`` components of ``layer``: ``[counts[kind]]`` (a view)."""
        off = self.space.offset(layer, kind)
        return self.scores[off : off + self.space.counts[kind]]

    def by_site(self) -> dict[tuple[int, str], torch.Tensor]:
        """``{(layer, kind): [n]}`` views of :attr:`scores`."""
        return self.space.split(self.scores)

    def by_component(self) -> dict[Component, float]:
        """``{Component: score}`` for every component of the scored kinds."""
        values = self.scores.tolist()
        return {c: values[i] for i, c in enumerate(self.space) if c.kind in self.kinds}

    def top(self, k: int, by: str = "signed") -> list[tuple[Component, float]]:
        """The ``k`` highest components: ``by="signed"`` (largest scores: components whose
        amplification raises the metric most) or ``"abs"`` (largest ``|score|``)."""
        order = self.order(by)[: max(0, int(k))]
        return [(self.space.component(i), float(self.scores[i])) for i in order.tolist()]

    def order(self, by: str = "signed") -> torch.Tensor:
        """Flat indices of the scored kinds, best first (``LongTensor``); ties by index."""
        if by not in ("signed", "abs"):
            raise CCAError(f"by must be 'signed' or 'abs', got {by!r}")
        key = self.scores.abs() if by == "abs" else self.scores
        eligible = self.eligible()
        idx = torch.nonzero(eligible).flatten()
        vals = key[idx].to(torch.float64).cpu()
        perm = torch.sort(vals, descending=True, stable=True).indices
        return idx.cpu()[perm]

    def eligible(self) -> torch.Tensor:
        """``BoolTensor [total]``: components of the scored kinds."""
        out = torch.zeros(self.space.total, dtype=torch.bool, device=self.scores.device)
        for (layer, kind), view in self.space.split(out).items():
            if kind in self.kinds:
                view.fill_(True)
        return out


def resolve_positions(positions: Positions, batch: int, seq: int, device: torch.device,
                      attention_mask: torch.Tensor | None = None) -> Rows:
    """Turn ``positions`` into scored :class:`~cca_fast.attribution_engine.Rows` (see the
    module docstring)."""
    try:
        if positions is None:
            if attention_mask is None or bool(attention_mask.bool().all()):
                return Rows(batch, seq)
            mask = attention_mask.to(device).bool()
        elif isinstance(positions, torch.Tensor) and positions.is_floating_point():
            if tuple(positions.shape) != (batch, seq):
                raise CCAError(f"position weights have shape {tuple(positions.shape)}, expected {(batch, seq)}")
            w = positions.to(device)
            return Rows.from_mask(w != 0, w)
        else:
            mask = position_mask(positions, batch, seq, device)
    except (IndexError, ValueError, TypeError) as e:
        raise CCAError(f"bad positions: {e}") from None
    return Rows.from_mask(mask)


class AttributionSession:
    """Hooks that score components during backward; accumulate over any number of batches
    (the :class:`~cca_fast.attribution_engine.Engine` over the component sites).

    Usage::

        with AttributionSession(model, positions=-1) as s:
            for batch in batches:
                logits = s.forward(batch.model_inputs()).logits
                s.backward(metric(logits))
        result = s.result()

    Inside the block the weights are frozen and the model is in eval mode (no dropout); both are
    restored on exit.

    Args:
        model: a causal LM of a supported family (any device and dtype).
        space: its :class:`ComponentSpace` (built if omitted).
        kinds: which kinds to score.
        absolute: ``|score|`` per position before summing.
        per_position: also keep ``[B, T, total]`` scores (one batch only).
        backend: kernel backend (``None``/``"auto"``, ``"torch"``, ``"triton"``).
    """

    def __init__(self, model: nn.Module, space: ComponentSpace | None = None, *,
                 kinds: tuple[str, ...] = KINDS, absolute: bool = False, per_position: bool = False,
                 backend: Backend | None = None):
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise CCAError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
        self.model = runtime.unwrap(model)  # peft / torch.compile / a user's wrapper: the model inside
        self.space = space if space is not None else ComponentSpace(self.model)
        self.kinds = tuple(kinds)
        self.absolute = absolute
        self.per_position = per_position
        self.backend = backend
        sites = [self.space.adapter.site(layer, kind) for layer in range(self.space.n_layers) for kind in self.kinds]
        self.engine = Engine(self.model, build_groups(sites, self.space.offset), self.space.total, absolute=absolute,
                             per_row=per_position, backend=backend)
        self.groups = self.engine.groups
        self.metric_value = 0.0
        self.n_batches = 0
        self._leaves: list[torch.Tensor] = []

    def __enter__(self) -> "AttributionSession":
        self.engine.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._leaves.clear()
        self.engine.__exit__(*exc)

    # ---- running -------------------------------------------------------------------------
    def forward(self, inputs: Mapping[str, torch.Tensor], positions: Positions = -1, **kwargs) -> Any:
        """``model(**inputs, use_cache=False, **kwargs)`` with gradients on, scoring
        ``positions`` (resolved against ``inputs["attention_mask"]``)."""
        if not self.engine.active:
            raise CCAError("AttributionSession.forward must be called inside `with AttributionSession(...)`")
        if self.per_position and self.n_batches > 0:
            raise CCAError("per_position=True keeps scores of one batch only; start a new session per batch")
        inputs = dict(inputs)
        ids = inputs.get("input_ids")
        ref = ids if ids is not None else inputs.get("inputs_embeds")
        if ref is None:
            raise CCAError("inputs need 'input_ids' (or 'inputs_embeds')")
        if ids is None and not ref.requires_grad:
            inputs["inputs_embeds"] = ref.detach().requires_grad_(True)
            self._leaves.append(inputs["inputs_embeds"])
        B, T = ref.shape[:2]
        self.engine.rows = resolve_positions(positions, B, T, ref.device, inputs.get("attention_mask"))
        if self.engine.sums is None or self.per_position:
            self.engine.reset()
        out = self.engine.forward("tap", inputs, use_cache=False, **kwargs)
        self._leaves += self.engine.take_leaves()
        return out

    def backward(self, metric_value: torch.Tensor) -> None:
        """Backpropagate ``metric_value.sum()``; every site must get its gradient."""
        if not isinstance(metric_value, torch.Tensor):
            raise CCAError(f"the metric must return a tensor, got {type(metric_value).__name__}")
        leaves, self._leaves = self._leaves, []
        self.engine.backward(metric_value, leaves)
        self.metric_value += float(metric_value.sum().detach())
        self.n_batches += 1

    def result(self) -> Attribution:
        """Scores accumulated so far."""
        e = self.engine
        if self.per_position:
            pp = e.per_row_scores
            scores = pp.sum((0, 1)) if pp is not None else None
        else:
            pp, scores = None, e.sums
        if scores is None:
            scores = torch.zeros(self.space.total, dtype=e.acc, device=e.home)
        return Attribution(self.space, scores, pp, self.kinds, self.absolute, self.metric_value, self.n_batches)


def default_pivot_metric(logits: torch.Tensor, batch: PivotBatch) -> torch.Tensor:
    """Sum over examples of ``logit[desired] - logit[undesired]`` at the last position."""
    return logit_diff(logits[:, -1], batch.desired.to(logits.device), batch.undesired.to(logits.device)).sum()


def _model_inputs(batch: BatchLike, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(batch, PivotBatch):
        inputs = batch.model_inputs()
    elif isinstance(batch, torch.Tensor):
        if batch.dtype not in (torch.long, torch.int, torch.int32):
            raise CCAError(f"a tensor batch must hold token ids (integer dtype), got {batch.dtype}")
        inputs = {"input_ids": batch if batch.dim() == 2 else batch.view(1, -1)}
    elif isinstance(batch, Mapping):
        inputs = dict(batch)
    else:
        raise CCAError(f"batch must be a PivotBatch, a dict of model inputs or a LongTensor of ids; "
                       f"got {type(batch).__name__}")
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def attribute(
    model: nn.Module,
    batch: BatchLike,
    metric: Metric | None = None,
    positions: Positions = -1,
    *,
    kinds: tuple[str, ...] = KINDS,
    absolute: bool = False,
    per_position: bool = False,
    backend: Backend | None = None,
    space: ComponentSpace | None = None,
    logits_to_keep: int | None = None,
) -> Attribution:
    """Gradient x activation score of every component from one forward and one backward pass.

    The call runs the model in eval mode (no dropout: two identical calls give identical
    scores) with every weight frozen, and restores the caller's training flags and
    ``requires_grad`` afterwards. It computes its own gradients, so it also works inside
    ``torch.no_grad()`` (gradients are enabled for the call only).

    Args:
        model: a causal LM of a supported family (any device, any dtype).
        batch: a :class:`PivotBatch`, a dict of model inputs (``input_ids``, optional
            ``attention_mask`` / ``position_ids``) or a ``LongTensor [B, T]`` of ids.
        metric: ``metric(logits [B, T', V], batch) -> Tensor`` (summed if not a scalar).
            ``None`` for a :class:`PivotBatch`: the summed logit difference at the last position.
        positions: positions scored (``-1`` = last; ``None`` = every non-padding token; see the
            module docstring).
        kinds: kinds to score (others stay 0).
        absolute: ``|score|`` per position before summing.
        per_position: also return ``[B, T, total]`` per-position scores.
        backend: kernel backend (``None`` = Triton on CUDA, PyTorch elsewhere).
        logits_to_keep: passed to the model (``1`` = last position only, cheaper for large
            vocabularies); default 1 for the built-in metric, all positions otherwise.
    Returns:
        :class:`Attribution` with ``scores [total]``.
    """
    if metric is None and isinstance(batch, PivotBatch):  # the one desired/undesired check (as cca attribute)
        from cca_fast import checks

        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        for i, (d, u) in enumerate(zip(batch.desired.tolist(), batch.undesired.tolist())):
            checks.token_contrast(d, u, f"example {i} of the batch", vocab)
    metric, inputs, kwargs = _prepare(model, batch, metric, logits_to_keep)
    with torch.enable_grad(), AttributionSession(model, space, kinds=kinds, absolute=absolute,
                                                 per_position=per_position, backend=backend) as session:
        out = session.forward(inputs, positions, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        session.backward(metric(logits, batch))
        return session.result()


def _prepare(model: nn.Module, batch: BatchLike, metric: Metric | None, logits_to_keep: int | None
             ) -> tuple[Metric, dict[str, torch.Tensor], dict[str, Any]]:
    """(metric, model inputs on the model's device, extra forward kwargs)."""
    if metric is None:
        if not isinstance(batch, PivotBatch):
            raise CCAError("metric=None means the pivot logit difference and needs a PivotBatch; pass "
                           "metric=lambda logits, batch: ... for other inputs")
        metric = default_pivot_metric
        if logits_to_keep is None:
            logits_to_keep = 1
    inputs = _model_inputs(batch, runtime.input_device(model))
    return metric, inputs, runtime.keep_kwargs(model, logits_to_keep)


def attribute_by_caching(model: nn.Module, batch: BatchLike, metric: Metric | None = None, positions: Positions = -1,
                         *, kinds: tuple[str, ...] = KINDS, absolute: bool = False, per_position: bool = False,
                         space: ComponentSpace | None = None, logits_to_keep: int | None = None) -> Attribution:
    """The reference pipeline (and the benchmark's baseline): cache every site activation
    ``[B, T, C]`` and, with ``retain_grad``, its full gradient, then reduce with ``einsum``.

    Same arguments and result as :func:`attribute` (weights are frozen and the model is in
    eval mode the same way); it shares none of the engine and kernel code, and stores ``2 x``
    every activation of every site.
    """
    model = runtime.unwrap(model)
    space = space if space is not None else ComponentSpace(model)
    metric, inputs, kwargs = _prepare(model, batch, metric, logits_to_keep)
    store: dict[tuple[str, str], torch.Tensor] = {}
    leaves: list[torch.Tensor] = []

    def keep(key: tuple[str, str], x: torch.Tensor) -> torch.Tensor:
        x.retain_grad()
        store[key] = x
        return x

    def leaf(_m, _i, out):
        out = out.detach().requires_grad_(True)
        leaves.append(out)
        return out

    sites = [space.adapter.site(layer, k) for layer in range(space.n_layers) for k in kinds]
    handles = [model.get_input_embeddings().register_forward_hook(leaf)]
    for key in {(s.module_name, s.io) for s in sites}:
        mod = model.get_submodule(key[0])
        if key[1] == "output":
            handles.append(mod.register_forward_hook(lambda _m, _i, out, key=key: keep(key, out)))
        else:
            handles.append(mod.register_forward_pre_hook(lambda _m, args, key=key: (keep(key, args[0]),) + tuple(args[1:])))
    try:
        with runtime.frozen(model), runtime.eval_mode(model), torch.enable_grad():
            out = model(**inputs, use_cache=False, **kwargs)
            value = metric(out.logits, batch).sum()
            torch.autograd.backward(value, inputs=leaves + list(store.values()))
    finally:
        for h in handles:
            h.remove()
    any_act = next(iter(store.values()))
    B, T = any_act.shape[:2]
    rows = resolve_positions(positions, B, T, any_act.device, inputs.get("attention_mask"))
    acc = accumulation_dtype(any_act.dtype)
    weight = torch.zeros(B, T, dtype=acc, device=any_act.device)
    if rows.b is None:
        weight.fill_(1.0)
    else:
        weight[rows.b, rows.t] = rows.weights.to(acc) if rows.weights is not None else 1.0
    parts: dict[tuple[int, str], torch.Tensor] = {}
    with torch.no_grad():
        for s in sites:
            x = store[(s.module_name, s.io)]
            if x.grad is None:
                raise CCAError(f"no gradient reached {s.module_name}")
            a = x.detach()[..., s.start : s.stop].unflatten(-1, (s.n, s.width)).to(acc)
            g = x.grad[..., s.start : s.stop].unflatten(-1, (s.n, s.width)).to(acc)
            per = torch.einsum("btnw,btnw->btn", a, g)
            parts[(s.layer, s.kind)] = (per.abs() if absolute else per) * weight[..., None]
        pp = space.join(parts)  # [B, T, total]
    return Attribution(space, pp.sum((0, 1)), pp if per_position else None, tuple(kinds), absolute,
                       float(value.detach()), 1)
