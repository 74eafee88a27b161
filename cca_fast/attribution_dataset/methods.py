"""Scoring one batch: metrics, scored positions, the extended component layout, and the
methods (gradient x activation, attribution patching against a corrupted prompt or the data-set
mean, integrated gradients), all reduced inside backward.

Every method scores component ``c`` (channels ``C_c`` of a site) as

    score_c = sum over scored positions p of  delta_c[p] . grad_c[p]

where ``grad`` is ``d(metric)/d(activation)`` of one backward pass and ``delta`` is

* ``gradxact``: the activation itself (baseline 0);
* ``patch``: ``a_clean - a_corrupt``, the corrupted prompt's activation taken from one extra
  forward pass without gradients (no extra backward): first-order activation patching (AtP);
* ``mean``: ``a_clean - mean``, the mean activation over the data set's scored positions
  (mean ablation as the baseline; one gradient-free pass over the data set first);
* ``patch`` with ``ig_steps = N``: ``delta = a_clean - a_corrupt`` and ``grad`` the mean of the
  gradients at the ``N`` midpoints ``alpha = (k + 1/2) / N`` of the straight line from the
  corrupted to the clean input embeddings (EAP-IG, Hanna et al. 2024): ``N`` forward + backward
  passes and two gradient-free forwards.

``score_c`` is the first-order estimate of ``metric(clean) - metric(c patched to its baseline)``;
it equals that activation-patching effect exactly when the metric is linear in ``c``'s activation.

Beyond the q / k / v heads and MLP neurons of :class:`~cca_fast.models.ComponentSpace`, each
layer's attention output (``o_proj`` output) and MLP output (``down_proj`` output) are scored as
a whole (``BLOCK_KINDS``): :class:`Layout` puts them after the ``space.total`` components.

Nothing stores a full activation gradient: an identity ``autograd.Function`` (:class:`DeltaTap`)
on each hooked tensor keeps ``delta`` at the scored rows and reduces ``delta . grad`` per
component (Triton on CUDA, PyTorch elsewhere: ``cca_fast.kernels.attribution.component_scores``)
the moment the gradient exists. Hooks and buffers follow each layer's device (``device_map``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cca_fast.errors import CCAError
from cca_fast.kernels.attribution import Segment, component_scores
from cca_fast.kernels.dispatch import Backend, accumulation_dtype
from cca_fast.models import runtime
from cca_fast.models.hooks import tap_module
from cca_fast.models.adapters import KINDS, ModelAdapter, Site
from cca_fast.models.components import ComponentSpace

from .inputs import Batch

#: whole-block kinds scored once per layer
BLOCK_KINDS: tuple[str, ...] = ("attn_out", "mlp_out")
ALL_KINDS: tuple[str, ...] = KINDS + BLOCK_KINDS
_ATTN_OUT = ("self_attn.o_proj", "attn.c_proj", "self_attn.dense", "attn.out_proj", "self_attention.dense")


# ---- layout ---------------------------------------------------------------------------------------

def block_site(adapter: ModelAdapter, layer: int, kind: str) -> Site:
    """The :class:`Site` of a whole-block kind: ``attn_out`` = output of the attention output
    projection, ``mlp_out`` = output of the MLP down projection (``[B, T, hidden]``, one component)."""
    p = adapter._layer_prefix(layer)
    if kind == "mlp_out":
        name = adapter.site(layer, "mlp").module_name
    elif kind == "attn_out":
        name = next((f"{p}.{c}" for c in _ATTN_OUT if f"{p}.{c}" in adapter._modules), None)
        if name is None:
            raise CCAError(f"{adapter.config.model_type}: no attention output projection found under {p} "
                           f"(looked for {', '.join(_ATTN_OUT)})")
    else:
        raise CCAError(f"unknown block kind {kind!r}; expected one of {BLOCK_KINDS}")
    return Site(layer, kind, name, "output", 0, 1, adapter.hidden_size)


class Layout:
    """Flat index over components and blocks: ``[0, space.total)`` are the components of
    :class:`ComponentSpace` (layer-major, q, k, v, mlp), then ``attn_out``, ``mlp_out`` of layer 0,
    of layer 1, ... (``total = space.total + 2 * n_layers``)."""

    def __init__(self, space: ComponentSpace):
        self.space = space
        self.n_layers = space.n_layers
        self.total = space.total + len(BLOCK_KINDS) * space.n_layers

    def offset(self, layer: int, kind: str) -> int:
        if kind in KINDS:
            return self.space.offset(layer, kind)
        return self.space.total + len(BLOCK_KINDS) * layer + BLOCK_KINDS.index(kind)

    def count(self, kind: str) -> int:
        return self.space.counts[kind] if kind in KINDS else 1

    def site(self, layer: int, kind: str) -> Site:
        return self.space.adapter.site(layer, kind) if kind in KINDS else block_site(self.space.adapter, layer, kind)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``flat [..., total]`` as ``{kind: [..., n_layers, count]}`` (``count = 1`` for blocks)."""
        out = {}
        sp = self.space
        comps = flat[..., : sp.total].unflatten(-1, (sp.n_layers, sp.per_layer))
        for k in KINDS:
            o = sp.offset(0, k)
            out[k] = comps[..., o : o + sp.counts[k]]
        blocks = flat[..., sp.total :].unflatten(-1, (sp.n_layers, len(BLOCK_KINDS)))
        for i, k in enumerate(BLOCK_KINDS):
            out[k] = blocks[..., i : i + 1]
        return out

    def name(self, flat: int) -> tuple[int, str, int]:
        """``(layer, kind, index)`` of flat index ``flat``."""
        if flat < self.space.total:
            c = self.space.component(flat)
            return c.layer, c.kind, c.index
        layer, i = divmod(flat - self.space.total, len(BLOCK_KINDS))
        return layer, BLOCK_KINDS[i], 0


# ---- metrics and positions ------------------------------------------------------------------------

def metric_values(metric: str, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-example metric ``[B]`` from ``logits [B, T', V]`` (``T' = 1`` for ``logit_diff``).

    * ``logit_diff``: ``logit[desired] - logit[undesired]`` at the last prompt position;
    * ``logprob``: ``sum_j log p(target_j | prompt, target_<j)``;
    * ``loss``: the mean next-token cross-entropy over the example's real tokens.
    """
    dev = logits.device
    if metric == "logit_diff":
        last = logits[:, -1]
        return (last.gather(1, batch.desired.to(dev)[:, None]) - last.gather(1, batch.undesired.to(dev)[:, None]))[:, 0]
    ids = batch.input_ids.to(dev)
    B, T = ids.shape
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(B, T - 1)
    cols = torch.arange(T - 1, device=dev)[None, :]
    if metric == "logprob":
        m = cols >= batch.prompt_end.to(dev)[:, None]
        return -(nll * m).sum(1)
    if metric == "loss":
        mask = batch.attention_mask.to(dev).bool()
        m = (mask[:, :-1] & mask[:, 1:]).to(nll.dtype)
        return (nll * m).sum(1) / m.sum(1).clamp(min=1)
    raise CCAError(f"unknown metric {metric!r}")


def position_mask(positions: str, metric: str, batch: Batch) -> torch.Tensor:
    """``BoolTensor [B, T]`` of the scored positions.

    * ``last``: the last prompt token;
    * ``all``: every real token;
    * ``target``: the positions whose next-token prediction is a target token (the last
      prompt token up to the second-to-last target token); ``last`` for ``logit_diff``.
    """
    B, T = batch.input_ids.shape
    dev = batch.input_ids.device
    cols = torch.arange(T, device=dev)[None, :]
    end = batch.prompt_end.to(dev)[:, None]
    if positions == "last" or (positions == "target" and metric == "logit_diff"):
        return cols == end
    if positions == "all":
        return batch.attention_mask.bool()
    if positions == "target":
        return (cols >= end) & (cols < T - 1)
    raise CCAError(f"unknown positions {positions!r}")


# ---- the tap --------------------------------------------------------------------------------------

@dataclass
class _Group:
    """Sites sharing one hooked tensor; channels ``[lo, hi)`` cover their segments."""

    module_name: str
    io: str
    keys: list[tuple[int, str]]
    segments: list[Segment]
    lo: int = 0
    hi: int = 0


@dataclass
class _Rows:
    """Scored rows ``(b, t)`` (row-major order), per device, and per-example row ranges."""

    b: torch.Tensor
    t: torch.Tensor
    batch: int
    seq: int
    counts: list[int]
    _on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = (self.b.to(device), self.t.to(device))
        return self._on[device]


class DeltaTap(torch.autograd.Function):
    """Identity on ``x [B, T, C]``; keeps ``delta`` at the scored rows (``x_rows - base``, or a
    fixed ``delta``) and, in backward, hands ``delta . grad`` per component to the scorer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scorer: "Scorer", gi: int) -> torch.Tensor:  # type: ignore[override]
        ctx.scorer, ctx.gi = scorer, gi
        ctx.save_for_backward(scorer._delta(gi, x))
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (delta,) = ctx.saved_tensors
        ctx.scorer._reduce(ctx.gi, delta, grad)
        return grad, None, None


@dataclass
class BatchScores:
    """Scores of one batch.

    Attributes:
        sums: ``[layout.total]`` summed over the batch's examples (accumulation dtype).
        per_example: ``[B, layout.total]`` or ``None``.
        metric: ``[B]`` the metric of each (clean) example.
        n_rows: number of scored positions.
    """

    sums: torch.Tensor
    per_example: torch.Tensor | None
    metric: torch.Tensor
    n_rows: int


class Scorer:
    """Hooks on every site of ``model`` that score one batch at a time (a context manager).

    Args:
        model: a causal LM of a supported family (any device, dtype, or a ``device_map``).
        method: ``"gradxact"``, ``"patch"`` or ``"mean"``.
        metric, positions: see :func:`metric_values`, :func:`position_mask`.
        ig_steps: integrated-gradient steps (``method="patch"`` only; 0 = plain AtP).
        per_example: also keep ``[B, total]`` scores.
        mean: ``method="mean"``: the baseline per hooked tensor (:meth:`mean_pass`).
        backend: kernel backend for the reduction.
    """

    def __init__(self, model: nn.Module, space: ComponentSpace | None = None, *, method: str = "gradxact",
                 metric: str = "logit_diff", positions: str = "last", ig_steps: int = 0, per_example: bool = False,
                 mean: list[torch.Tensor] | None = None, backend: Backend | None = None):
        self.model = model
        self.space = space if space is not None else ComponentSpace(model)
        self.layout = Layout(self.space)
        self.method, self.metric, self.positions = method, metric, positions
        self.ig_steps, self.per_example, self.backend = int(ig_steps), per_example, backend
        self.mean = mean
        self.dtype = next(model.parameters()).dtype
        self.acc = accumulation_dtype(self.dtype)
        self.home = runtime.input_device(model)
        self.groups = self._groups()
        self._mode = "off"
        self._rows: _Rows | None = None
        self._base: list[torch.Tensor] | None = None
        self._fixed: list[torch.Tensor] | None = None
        self._store: list[Any] = []
        self._leaves: list[torch.Tensor] = []
        self._pending: dict[int, int] = {}
        self._sums: torch.Tensor | None = None
        self._per_ex: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._ctx: list[Any] = []

    def _groups(self) -> list[_Group]:
        groups: dict[tuple[str, str], _Group] = {}
        for layer in range(self.space.n_layers):
            for kind in ALL_KINDS:
                s = self.layout.site(layer, kind)
                g = groups.setdefault((s.module_name, s.io), _Group(s.module_name, s.io, [], []))
                g.keys.append((layer, kind))
                g.segments.append(Segment(s.start, s.n, s.width))
        for g in groups.values():
            g.lo = min(s.start for s in g.segments)
            g.hi = max(s.stop for s in g.segments)
        return list(groups.values())

    # ---- hooks ----------------------------------------------------------------------------------
    def __enter__(self) -> "Scorer":
        for cm in (runtime.frozen(self.model), runtime.eval_mode(self.model)):
            cm.__enter__()
            self._ctx.append(cm)
        try:
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
        while self._ctx:
            self._ctx.pop().__exit__(None, None, None)
        self._mode = "off"

    def _embedding_hook(self, _m, _i, out):
        if self._mode == "tap" and isinstance(out, torch.Tensor) and out.is_floating_point() and not out.requires_grad:
            out = out.detach().requires_grad_(True)
            self._leaves.append(out)
        return out

    def _hook(self, gi: int, x: torch.Tensor) -> torch.Tensor:
        if self._mode == "off":
            return x
        rows = self._rows
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or tuple(x.shape[:2]) != (rows.batch, rows.seq):
            raise CCAError(f"{self.groups[gi].module_name}: activation of shape {tuple(getattr(x, 'shape', ()))} "
                           f"does not match the batch [{rows.batch}, {rows.seq}] (attribution needs [B, T, C])")
        g = self.groups[gi]
        if self._mode == "capture":
            b, t = rows.on(x.device)
            self._store[gi] = x.detach()[b, t, g.lo : g.hi]
            return x
        if self._mode == "sum":
            b, t = rows.on(x.device)
            s = x.detach()[b, t, g.lo : g.hi].to(self.acc).sum(0)
            self._store[gi] = s if self._store[gi] is None else self._store[gi] + s
            return x
        self._pending[gi] = self._pending.get(gi, 0) + 1
        return DeltaTap.apply(x, self, gi)

    def _delta(self, gi: int, x: torch.Tensor) -> torch.Tensor:
        """``delta [N_sel, hi - lo]`` of group ``gi`` for activation ``x``."""
        if self._fixed is not None:
            return self._fixed[gi]
        g = self.groups[gi]
        b, t = self._rows.on(x.device)
        a = x.detach()[b, t, g.lo : g.hi]
        if self._base is None:
            return a
        return a.to(self.acc) - self._base[gi].to(device=x.device, dtype=self.acc)

    def _reduce(self, gi: int, delta: torch.Tensor, grad: torch.Tensor) -> None:
        g = self.groups[gi]
        b, t = self._rows.on(grad.device)
        g_rows = grad[b, t, g.lo : g.hi]
        if g_rows.dtype != delta.dtype:
            g_rows = g_rows.to(delta.dtype)
        counts = self._rows.counts
        for (layer, kind), seg in zip(g.keys, g.segments):
            off = self.layout.offset(layer, kind)
            a = delta[:, seg.start - g.lo : seg.stop - g.lo]
            gg = g_rows[:, seg.start - g.lo : seg.stop - g.lo]
            if not self.per_example:
                s = component_scores(a, gg, seg.n, seg.width, backend=self.backend)
                self._sums[off : off + seg.n] += s.to(self._sums.device)
                continue
            if len(counts) == a.shape[0] and all(c == 1 for c in counts):
                per = component_scores(a, gg, seg.n, seg.width, per_row=True, backend=self.backend)  # [B, n]
            else:
                parts, r0 = [], 0
                for c in counts:
                    parts.append(component_scores(a[r0 : r0 + c], gg[r0 : r0 + c], seg.n, seg.width, backend=self.backend))
                    r0 += c
                per = torch.stack(parts)
            self._per_ex[:, off : off + seg.n] += per.to(self._per_ex.device)
        self._pending[gi] -= 1

    # ---- running --------------------------------------------------------------------------------
    def _set_rows(self, batch: Batch) -> torch.Tensor:
        mask = position_mask(self.positions, self.metric, batch)
        b, t = torch.nonzero(mask, as_tuple=True)
        counts = torch.bincount(b, minlength=mask.shape[0]).tolist()
        self._rows = _Rows(b, t, mask.shape[0], mask.shape[1], counts)
        return mask

    def _keep(self) -> dict[str, int]:
        return runtime.keep_kwargs(self.model, 1 if self.metric == "logit_diff" else None)

    def _run(self, mode: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self._mode = mode
        try:
            if mode == "tap":
                with torch.enable_grad():
                    return self.model(**inputs, use_cache=False, **self._keep()).logits
            with torch.no_grad():
                return self.model(**inputs, use_cache=False, **self._keep()).logits
        finally:
            self._mode = "off"

    def capture(self, inputs: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Gradient-free forward: each group's activation at the scored rows, and the logits."""
        self._store = [None] * len(self.groups)
        logits = self._run("capture", inputs)
        return list(self._store), logits

    def mean_pass(self, batch: Batch) -> tuple[list[torch.Tensor], int]:
        """Gradient-free forward: per group the sum of activations over the scored rows
        (``[hi - lo]``, accumulation dtype, on the group's device) and the number of rows."""
        self._set_rows(batch)
        self._store = [None] * len(self.groups)
        self._run("sum", _on(batch.inputs(), self.home))
        return list(self._store), int(self._rows.b.numel())

    def _backward(self, values: torch.Tensor, leaves: list[torch.Tensor]) -> None:
        total = values.sum()
        if not total.requires_grad or not leaves:
            raise CCAError("the metric does not depend on the model's activations")
        torch.autograd.grad(total, leaves, allow_unused=True)
        missing = [gi for gi in range(len(self.groups)) if self._pending.get(gi, 1) != 0]
        self._pending.clear()
        if missing:
            names = ", ".join(self.groups[gi].module_name for gi in missing[:6])
            raise CCAError(f"no gradient reached {len(missing)} hooked module(s) ({names}): the metric does not "
                           "depend on them at the scored positions (or they did not run)")

    def score(self, batch: Batch) -> BatchScores:
        """Scores of ``batch`` by this scorer's method (see the module docstring)."""
        self._set_rows(batch)
        B = len(batch)
        self._sums = torch.zeros(self.layout.total, dtype=self.acc, device=self.home)
        self._per_ex = torch.zeros(B, self.layout.total, dtype=self.acc, device=self.home) if self.per_example else None
        clean_inputs = _on(batch.inputs(), self.home)
        self._base, self._fixed = None, None
        try:
            if self.method == "mean":
                if self.mean is None:
                    raise CCAError("method 'mean' needs the data-set mean activations (Scorer.mean_pass first)")
                self._base = self.mean
            elif self.method == "patch":
                self._base, _ = self.capture(_on(batch.inputs(corrupt=True), self.home))
            if self.ig_steps:
                clean, logits = self.capture(clean_inputs)
                metric = metric_values(self.metric, logits, batch).detach()
                self._fixed = [c.to(self.acc) - b.to(device=c.device, dtype=self.acc) for c, b in zip(clean, self._base)]
                emb = self.model.get_input_embeddings()
                with torch.no_grad():
                    e_clean = emb(clean_inputs["input_ids"])
                    e_base = emb(_on(batch.inputs(corrupt=True), self.home)["input_ids"])
                rest = {k: v for k, v in clean_inputs.items() if k != "input_ids"}
                for k in range(self.ig_steps):
                    alpha = (k + 0.5) / self.ig_steps
                    x = (e_base + alpha * (e_clean - e_base)).detach().requires_grad_(True)
                    logits = self._run("tap", {"inputs_embeds": x, **rest})
                    self._backward(metric_values(self.metric, logits, batch), [x])
                self._sums /= self.ig_steps
                if self._per_ex is not None:
                    self._per_ex /= self.ig_steps
            else:
                self._leaves = []
                logits = self._run("tap", clean_inputs)
                values = metric_values(self.metric, logits, batch)
                leaves, self._leaves = self._leaves, []
                self._backward(values, leaves)
                metric = values.detach()
        finally:
            self._base, self._fixed, self._store = None, None, []
        sums = self._per_ex.sum(0) if self._per_ex is not None else self._sums
        return BatchScores(sums, self._per_ex, metric.to(self.home), int(self._rows.b.numel()))


def _on(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def iter_batches(examples: list, batch_size: int) -> Iterable[list]:
    """``examples`` sorted by length (less padding), in batches of ``batch_size``."""
    order = sorted(examples, key=lambda e: (max(e.n_tokens, len(e.corrupt_ids or ()) + len(e.target_ids)), e.index))
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


MetricFn = Callable[[torch.Tensor, Batch], torch.Tensor]
