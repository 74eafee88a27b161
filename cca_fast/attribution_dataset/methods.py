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

The hooks, scored rows and the reduction inside backward are the one attribution engine
(:mod:`cca_fast.attribution_engine`, shared with :func:`cca_fast.attribution.attribute`): an
identity ``autograd.Function`` on each hooked tensor keeps ``delta`` at the scored rows and
reduces ``delta . grad`` per component the moment the gradient exists; nothing stores a full
activation gradient. Hooks follow each layer's device (``device_map``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cca_fast.attribution_engine import Engine, Rows, build_groups
from cca_fast.errors import CCAError
from cca_fast.kernels.dispatch import Backend
from cca_fast.models import runtime
from cca_fast.models.adapters import BLOCK_KINDS, KINDS, ModelAdapter, Site
from cca_fast.models.components import ComponentSpace

from .inputs import Batch

ALL_KINDS: tuple[str, ...] = KINDS + BLOCK_KINDS


# ---- layout ---------------------------------------------------------------------------------------

def block_site(adapter: ModelAdapter, layer: int, kind: str) -> Site:
    """The :class:`Site` of a whole-block kind (:meth:`ModelAdapter.block_site`)."""
    try:
        return adapter.block_site(layer, kind)
    except ValueError as e:
        raise CCAError(str(e)) from None


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


# ---- scoring ---------------------------------------------------------------------------------------

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
    """The :class:`~cca_fast.attribution_engine.Engine` on every site of ``model`` (components
    and blocks), scoring one batch at a time by one method (a context manager).

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
        sites = [self.layout.site(layer, kind) for layer in range(self.space.n_layers) for kind in ALL_KINDS]
        self.engine = Engine(model, build_groups(sites, self.layout.offset), self.layout.total,
                             per_example=per_example, backend=backend)
        self.groups = self.engine.groups
        self.acc, self.home = self.engine.acc, self.engine.home

    def __enter__(self) -> "Scorer":
        self.engine.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.engine.__exit__(*exc)

    # ---- running --------------------------------------------------------------------------------
    def _set_rows(self, batch: Batch) -> None:
        self.engine.rows = Rows.from_mask(position_mask(self.positions, self.metric, batch))

    def _run(self, mode: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        keep = runtime.keep_kwargs(self.model, 1 if self.metric == "logit_diff" else None)
        return self.engine.forward(mode, inputs, use_cache=False, **keep).logits

    def capture(self, inputs: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Gradient-free forward: each group's activation at the scored rows, and the logits."""
        logits = self._run("capture", inputs)
        return self.engine.stored(), logits

    def mean_pass(self, batch: Batch) -> tuple[list[torch.Tensor], int]:
        """Gradient-free forward: per group the sum of activations over the scored rows
        (``[hi - lo]``, accumulation dtype, on the group's device) and the number of rows."""
        self._set_rows(batch)
        self._run("sum", _on(batch.inputs(), self.home))
        return self.engine.stored(), self.engine.rows.n

    def score(self, batch: Batch) -> BatchScores:
        """Scores of ``batch`` by this scorer's method (see the module docstring)."""
        e = self.engine
        self._set_rows(batch)
        e.reset()
        clean_inputs = _on(batch.inputs(), self.home)
        e.base, e.fixed = None, None
        try:
            if self.method == "mean":
                if self.mean is None:
                    raise CCAError("method 'mean' needs the data-set mean activations (Scorer.mean_pass first)")
                e.base = self.mean
            elif self.method == "patch":
                e.base, _ = self.capture(_on(batch.inputs(corrupt=True), self.home))
            if self.ig_steps:
                clean, logits = self.capture(clean_inputs)
                metric = metric_values(self.metric, logits, batch).detach()
                e.fixed = [c.to(self.acc) - b.to(device=c.device, dtype=self.acc) for c, b in zip(clean, e.base)]
                emb = self.model.get_input_embeddings()
                with torch.no_grad():
                    e_clean = emb(clean_inputs["input_ids"])
                    e_base = emb(_on(batch.inputs(corrupt=True), self.home)["input_ids"])
                rest = {k: v for k, v in clean_inputs.items() if k != "input_ids"}
                for k in range(self.ig_steps):
                    alpha = (k + 0.5) / self.ig_steps
                    x = (e_base + alpha * (e_clean - e_base)).detach().requires_grad_(True)
                    logits = self._run("tap", {"inputs_embeds": x, **rest})
                    e.backward(metric_values(self.metric, logits, batch), [x])
                e.sums /= self.ig_steps
                if e.per_example_scores is not None:
                    e.per_example_scores /= self.ig_steps
            else:
                e.take_leaves()
                logits = self._run("tap", clean_inputs)
                values = metric_values(self.metric, logits, batch)
                e.backward(values, e.take_leaves())
                metric = values.detach()
        finally:
            e.base, e.fixed = None, None
        per = e.per_example_scores if self.per_example else None
        sums = per.sum(0) if per is not None else e.sums
        return BatchScores(sums, per, metric.to(self.home), e.rows.n)


def _on(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def iter_batches(examples: list, batch_size: int) -> Iterable[list]:
    """``examples`` sorted by length (less padding), in batches of ``batch_size``."""
    order = sorted(examples, key=lambda e: (max(e.n_tokens, len(e.corrupt_ids or ()) + len(e.target_ids)), e.index))
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


MetricFn = Callable[[torch.Tensor, Batch], torch.Tensor]
