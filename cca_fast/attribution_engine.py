"""The one attribution engine: hooks that score components inside backward.

Both attribution APIs run on it: :func:`cca_fast.attribution.attribute` (and
:class:`~cca_fast.attribution.AttributionSession`, stage 2's AtP) and
:func:`cca_fast.attribution_dataset.attribute_dataset`
(:class:`~cca_fast.attribution_dataset.methods.Scorer`: gradient x activation, attribution
patching, mean ablation, integrated gradients). A component ``c`` (channels ``C_c`` of a
:class:`~cca_fast.models.adapters.Site`) scores

    score_c = sum over scored rows r of  weight_r * delta_c[r] . grad_c[r]

where ``grad`` is ``d(metric)/d(activation)`` and ``delta`` the activation itself (gradient x
activation), or the activation minus a baseline, or a fixed difference (integrated gradients).

How one forward + one backward scores every site without storing a full activation gradient
(:class:`Engine`, a context manager):

* every weight is frozen (``requires_grad=False``) and the model is in eval mode for the
  duration (both restored afterwards, :func:`cca_fast.models.runtime.frozen` /
  :func:`~cca_fast.models.runtime.eval_mode`); the graph comes from making the input
  embedding's output a leaf that requires grad (nothing is detached at the sites);
* sites sharing one hooked tensor (q, k, v of a fused projection) form a :class:`Group`; on each
  group's tensor ``x [B, T, C]`` an identity ``autograd.Function`` (:class:`_Tap`) keeps
  ``delta`` at the scored :class:`Rows` only and, the moment the gradient exists, reduces
  ``delta . grad`` per component (:func:`cca_fast.kernels.attribution.component_scores`: Triton
  on CUDA, PyTorch elsewhere) into an fp32 (fp64 for fp64 models) buffer on the input device;
* after backward every group must have received its gradient, else :class:`CCAError` naming
  the sites.

The same hooks also run gradient-free: ``capture`` keeps each group's activation at the scored
rows, ``sum`` adds it up over rows (the data-set mean of mean ablation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from cca_fast.errors import CCAError
from cca_fast.kernels.attribution import Segment, component_scores
from cca_fast.kernels.dispatch import Backend, accumulation_dtype
from cca_fast.models import runtime
from cca_fast.models.adapters import BLOCK_KINDS, KINDS, Site
from cca_fast.models.hooks import tap_module

#: the order in which missing sites are named
_KIND_ORDER = KINDS + BLOCK_KINDS


@dataclass
class Group:
    """Sites sharing one hooked tensor (e.g. q, k, v of a fused qkv projection): their keys
    ``(layer, kind)``, channel segments, offsets in the flat score buffer, and the channel range
    ``[lo, hi)`` covering the segments."""

    module_name: str
    io: str
    keys: list[tuple[int, str]]
    segments: list[Segment]
    offsets: list[int]
    lo: int = 0
    hi: int = 0


def build_groups(sites: Iterable[Site], offset: Callable[[int, str], int]) -> list[Group]:
    """:class:`Group` s of ``sites`` (in the order their tensors first appear); ``offset(layer,
    kind)`` is where a site's first component goes in the flat score buffer."""
    groups: dict[tuple[str, str], Group] = {}
    for s in sites:
        g = groups.setdefault((s.module_name, s.io), Group(s.module_name, s.io, [], [], []))
        g.keys.append((s.layer, s.kind))
        g.segments.append(Segment(s.start, s.n, s.width))
        g.offsets.append(offset(s.layer, s.kind))
    for g in groups.values():
        g.lo = min(seg.start for seg in g.segments)
        g.hi = max(seg.stop for seg in g.segments)
    return list(groups.values())


@dataclass
class Rows:
    """The scored rows of one ``[batch, seq]`` forward: ``(b, t)`` index tensors ``[N]`` in
    row-major order, or ``None`` for every row; optional per-row ``weights`` ``[N]`` (``[B*T]``
    for every row); ``counts``: scored rows per example (explicit rows only)."""

    batch: int
    seq: int
    b: torch.Tensor | None = None
    t: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    counts: list[int] | None = None
    _on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, weights: torch.Tensor | None = None) -> "Rows":
        """The rows of ``mask [B, T]`` (bool; or nonzero entries of float ``weights [B, T]``,
        kept as the row weights when ``weights`` is given)."""
        b, t = torch.nonzero(mask, as_tuple=True)
        counts = torch.bincount(b, minlength=mask.shape[0]).tolist()
        w = weights[b, t] if weights is not None else None
        return cls(mask.shape[0], mask.shape[1], b, t, w, counts)

    @property
    def n(self) -> int:
        """Number of scored rows."""
        return self.batch * self.seq if self.b is None else int(self.b.numel())

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b, t)`` on ``device`` (cached: layers may sit on several devices)."""
        if device not in self._on:
            self._on[device] = (self.b.to(device), self.t.to(device))
        return self._on[device]

    def take(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """``x [B, T, C]`` at the scored rows, channels ``[lo, hi)``: ``[N, hi - lo]`` (a view
        when every row is scored; a small copy otherwise)."""
        if self.b is None:
            return x.reshape(-1, x.shape[-1])[:, lo:hi]
        b, t = self.on(x.device)
        return x[b, t, lo:hi]


class _Tap(torch.autograd.Function):
    """Identity on ``x [B, T, C]``; keeps the engine's ``delta`` of group ``gi`` and, in backward,
    hands ``delta . grad`` to :meth:`Engine._reduce` before passing the gradient on unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, engine: "Engine", gi: int) -> torch.Tensor:  # type: ignore[override]
        ctx.engine, ctx.gi = engine, gi
        ctx.save_for_backward(engine._delta(gi, x))
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (delta,) = ctx.saved_tensors
        ctx.engine._reduce(ctx.gi, delta, grad)
        return grad, None, None


class Engine:
    """Hooks on every group of ``model`` that score components inside backward (see the module
    docstring). A context manager: hooks, frozen weights and eval mode hold inside the block.

    Args:
        model: a causal LM (any device and dtype, or a ``device_map``).
        groups: :func:`build_groups` of the sites to score.
        total: length of the flat score buffer.
        absolute: ``|score|`` per row before summing.
        per_row: also keep ``[B, T, total]`` scores (:attr:`per_row_scores`).
        per_example: also keep ``[B, total]`` scores (:attr:`per_example_scores`).
        backend: kernel backend for the reduction.

    Attributes:
        sums: ``[total]`` scores summed over rows (and over batches until :meth:`reset`).
        rows: the :class:`Rows` of the forward being scored (set by the caller).
        base: per group, a baseline ``[N, hi - lo]`` subtracted from the activation, or ``None``.
        fixed: per group, a fixed ``delta`` ``[N, hi - lo]`` (integrated gradients), or ``None``.
    """

    def __init__(self, model: nn.Module, groups: list[Group], total: int, *, absolute: bool = False,
                 per_row: bool = False, per_example: bool = False, backend: Backend | None = None):
        if per_row and per_example:
            raise CCAError("per_row and per_example are exclusive")
        self.model, self.groups, self.total = runtime.unwrap(model), groups, int(total)  # the model inside a wrapper
        self.absolute, self.per_row, self.per_example, self.backend = absolute, per_row, per_example, backend
        self.acc = accumulation_dtype(next(self.model.parameters()).dtype)
        self.home = runtime.input_device(model)
        self.rows: Rows | None = None
        self.base: list[torch.Tensor] | None = None
        self.fixed: list[torch.Tensor] | None = None
        self.sums: torch.Tensor | None = None
        self.per_row_scores: torch.Tensor | None = None
        self.per_example_scores: torch.Tensor | None = None
        self._mode = "off"
        self._store: list[Any] = []
        self._leaves: list[torch.Tensor] = []
        self._pending: dict[int, int] = {}
        self._handles: list[Any] = []
        self._ctx: list[Any] = []

    # ---- hooks ----------------------------------------------------------------------------------
    def __enter__(self) -> "Engine":
        try:
            for cm in (runtime.frozen(self.model), runtime.eval_mode(self.model)):
                cm.__enter__()
                self._ctx.append(cm)
            emb = self.model.get_input_embeddings()
            self._handles.append(emb.register_forward_hook(self._embedding_hook))
            for gi, g in enumerate(self.groups):
                self._handles.append(tap_module(self.model, g.module_name, g.io, lambda x, gi=gi: self._hook(gi, x)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._leaves.clear()
        while self._ctx:
            self._ctx.pop().__exit__(None, None, None)
        self._mode = "off"

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _embedding_hook(self, _m, _i, out):
        if self._mode == "tap" and isinstance(out, torch.Tensor) and out.is_floating_point() and not out.requires_grad:
            out = out.detach().requires_grad_(True)
            self._leaves.append(out)
        return out

    def _hook(self, gi: int, x: torch.Tensor) -> torch.Tensor:
        if self._mode == "off":
            return x
        rows, g = self.rows, self.groups[gi]
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or tuple(x.shape[:2]) != (rows.batch, rows.seq):
            raise CCAError(f"{g.module_name}: activation of shape {tuple(getattr(x, 'shape', ()))} does not match "
                           f"the batch [{rows.batch}, {rows.seq}] (attribution needs [B, T, C] activations)")
        if self._mode == "capture":
            self._store[gi] = rows.take(x.detach(), g.lo, g.hi)
            return x
        if self._mode == "sum":
            s = rows.take(x.detach(), g.lo, g.hi).to(self.acc).sum(0)
            self._store[gi] = s if self._store[gi] is None else self._store[gi] + s
            return x
        self._pending[gi] = self._pending.get(gi, 0) + 1
        return _Tap.apply(x, self, gi)

    def _delta(self, gi: int, x: torch.Tensor) -> torch.Tensor:
        """``delta [N, hi - lo]`` of group ``gi`` for activation ``x``."""
        if self.fixed is not None:
            return self.fixed[gi]
        g = self.groups[gi]
        a = self.rows.take(x.detach(), g.lo, g.hi)
        if self.base is None:
            return a
        return a.to(self.acc) - self.base[gi].to(device=x.device, dtype=self.acc)

    def _reduce(self, gi: int, delta: torch.Tensor, grad: torch.Tensor) -> None:
        g, rows = self.groups[gi], self.rows
        g_rows = rows.take(grad, g.lo, g.hi)
        if g_rows.dtype != delta.dtype:
            g_rows = g_rows.to(delta.dtype)
        for seg, off in zip(g.segments, g.offsets):
            a = delta[:, seg.start - g.lo : seg.stop - g.lo]
            gg = g_rows[:, seg.start - g.lo : seg.stop - g.lo]
            n = seg.n
            if self.per_row:
                s = component_scores(a, gg, n, seg.width, rows.weights, absolute=self.absolute, per_row=True,
                                     backend=self.backend).to(self.home)
                pp = self.per_row_scores
                if rows.b is None:
                    pp.view(rows.batch * rows.seq, -1)[:, off : off + n] += s
                else:
                    b, t = rows.on(pp.device)
                    pp[b, t, off : off + n] += s
            elif self.per_example:
                counts = rows.counts if rows.counts is not None else [rows.seq] * rows.batch
                if len(counts) == a.shape[0] and all(c == 1 for c in counts) and rows.weights is None:
                    per = component_scores(a, gg, n, seg.width, absolute=self.absolute, per_row=True,
                                           backend=self.backend)  # [B, n]
                else:
                    parts, r0 = [], 0
                    for c in counts:
                        w = rows.weights[r0 : r0 + c] if rows.weights is not None else None
                        parts.append(component_scores(a[r0 : r0 + c], gg[r0 : r0 + c], n, seg.width, w,
                                                      absolute=self.absolute, backend=self.backend))
                        r0 += c
                    per = torch.stack(parts)
                self.per_example_scores[:, off : off + n] += per.to(self.home)
            else:
                s = component_scores(a, gg, n, seg.width, rows.weights, absolute=self.absolute, backend=self.backend)
                self.sums[off : off + n] += s.to(self.home)
        self._pending[gi] -= 1

    # ---- running --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Zero score buffers for the batch of :attr:`rows` (``sums`` ``[total]``, and
        ``[B, T, total]`` / ``[B, total]`` with ``per_row`` / ``per_example``)."""
        rows = self.rows
        self.sums = torch.zeros(self.total, dtype=self.acc, device=self.home)
        if self.per_row:
            self.per_row_scores = torch.zeros(rows.batch, rows.seq, self.total, dtype=self.acc, device=self.home)
        if self.per_example:
            self.per_example_scores = torch.zeros(rows.batch, self.total, dtype=self.acc, device=self.home)

    def forward(self, mode: str, inputs: Mapping[str, Any], **kwargs) -> Any:
        """``model(**inputs, **kwargs)`` with the hooks in ``mode``: ``"tap"`` (with gradients;
        the embedding output becomes a leaf), ``"capture"`` or ``"sum"`` (without)."""
        if mode not in ("tap", "capture", "sum"):
            raise CCAError(f"unknown engine mode {mode!r}")
        if self.rows is None:
            raise CCAError("set the scored rows (Engine.rows) before a forward pass")
        if mode != "tap":
            self._store = [None] * len(self.groups)
        self._mode = mode
        try:
            with torch.enable_grad() if mode == "tap" else torch.no_grad():
                return self.model(**inputs, **kwargs)
        finally:
            self._mode = "off"

    def stored(self) -> list[Any]:
        """Per group, what the last ``capture`` / ``sum`` forward kept."""
        out, self._store = self._store, []
        return out

    def take_leaves(self) -> list[torch.Tensor]:
        """The embedding outputs made leaves since the last call."""
        out, self._leaves = self._leaves, []
        return out

    def backward(self, value: torch.Tensor, leaves: list[torch.Tensor]) -> None:
        """Backpropagate ``value.sum()`` to ``leaves``; every group tapped must get its gradient.

        Raises:
            CCAError: the value does not depend on the activations, or some sites got no gradient.
        """
        total = value.sum()
        if not total.requires_grad or not leaves:
            self._pending.clear()
            raise CCAError("the metric does not depend on the model's activations (computed under "
                           "torch.no_grad, detached, or not from this forward pass)")
        torch.autograd.grad(total, leaves, allow_unused=True)
        missing = sorted((k for gi, g in enumerate(self.groups) if self._pending.get(gi, 1) != 0 for k in g.keys),
                         key=lambda k: (k[0], _KIND_ORDER.index(k[1])))
        self._pending.clear()
        if missing:
            names = ", ".join(f"L{layer}.{kind}" for layer, kind in missing[:8])
            raise CCAError(
                f"no gradient reached {len(missing)} component site(s) ({names}{', ...' if len(missing) > 8 else ''}): "
                "the metric does not depend on them at the scored positions (or their module did not run). "
                "Attribution would silently be zero there; use a metric that depends on every layer or restrict `kinds`."
            )
