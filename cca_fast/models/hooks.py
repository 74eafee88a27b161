"""Reading and scaling components at chosen positions, through the adapters.

Hook points (the activation tensor of each site, see :class:`cca_fast.models.adapters.Site`):

=========  ===============================================  =======================================
kind       hooked tensor                                    shape, slice of the last dimension
=========  ===============================================  =======================================
q, k, v    output of the q/k/v (or fused qkv) projection    ``[B, T, C]``, heads at
                                                            ``[start + i*D, start + (i+1)*D)``
mlp        input of the down projection                     ``[B, T, d_ff]``, neuron ``j`` = channel ``j``
=========  ===============================================  =======================================

``positions`` everywhere means one of:

* ``None``: every position;
* an ``int`` (negative allowed, e.g. ``-1`` for the last position of a left-padded batch);
* a ``LongTensor [B]``: one position per row;
* a ``BoolTensor [B, T]``: a mask of positions.

Scales are per component: ``Tensor [n]`` (shared by the batch) or ``[B, n]`` (per row). They may
require grad: the derivative of a metric with respect to a scale at 1 is the
gradient x activation attribution of that component (METHOD section 2).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Union

import torch
from torch import nn

from cca_fast.models import runtime
from cca_fast.models.adapters import KINDS, Site
from cca_fast.models.components import ComponentSpace

Positions = Union[None, int, torch.Tensor]


def position_mask(positions: Positions, batch: int, seq: int, device: torch.device | str) -> torch.Tensor | None:
    """``BoolTensor [B, T]`` for ``positions`` (``None`` stays ``None`` = all positions)."""
    if positions is None:
        return None
    if isinstance(positions, int):
        if not -seq <= positions < seq:
            raise IndexError(f"position {positions} out of range for sequence length {seq}")
        m = torch.zeros(batch, seq, dtype=torch.bool, device=device)
        m[:, positions] = True
        return m
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if tuple(positions.shape) != (batch, seq):
            raise ValueError(f"position mask has shape {tuple(positions.shape)}, expected {(batch, seq)}")
        return positions.to(device)
    if isinstance(positions, torch.Tensor) and positions.dim() == 1 and positions.shape[0] == batch:
        pos = positions.to(device).long() % seq
        m = torch.zeros(batch, seq, dtype=torch.bool, device=device)
        m[torch.arange(batch, device=device), pos] = True
        return m
    raise TypeError(
        "positions must be None, an int, a LongTensor [B] or a BoolTensor [B, T]; "
        f"got {type(positions).__name__} {getattr(positions, 'shape', '')}"
    )


def scale_activation(x: torch.Tensor, site: Site, scale: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x [B, T, C]`` with the site's components multiplied by ``scale`` (``[n]`` or
    ``[B, n]``) at the positions of ``mask`` (``[B, T]``, or ``None`` for all). Out of place,
    differentiable in ``x`` and ``scale``."""
    B, T, _ = x.shape
    seg = x[..., site.start : site.stop].unflatten(-1, (site.n, site.width))  # [B, T, n, w]
    factor = scale.to(x.dtype)
    factor = factor.view(1, 1, site.n, 1) if factor.dim() == 1 else factor.view(B, 1, site.n, 1)
    scaled = seg * factor
    if mask is not None:
        scaled = torch.where(mask.view(B, T, 1, 1), scaled, seg)
    parts = [x[..., : site.start], scaled.flatten(-2), x[..., site.stop :]]
    return torch.cat([p for p in parts if p.shape[-1] > 0], dim=-1)


def _register(model: nn.Module, site: Site, fn) -> torch.utils.hooks.RemovableHandle:
    """Register ``fn(x) -> x'`` on the site's activation tensor."""
    return tap_module(model, site.module_name, site.io, fn)


def tap_module(model: nn.Module, module_name: str, io: str, fn) -> torch.utils.hooks.RemovableHandle:
    """Register ``fn(x) -> x'`` on a module's output (``io="output"``) or on its first input
    (a forward pre-hook, the other inputs passed through); the one place cca_fast hooks an
    activation tensor."""
    module = runtime.submodule(model, module_name)  # through peft / compile / user wrappers
    if io == "output":
        def out_hook(_m, _inp, out):
            return fn(out)
        return module.register_forward_hook(out_hook)

    def pre_hook(_m, args):
        return (fn(args[0]),) + tuple(args[1:])
    return module.register_forward_pre_hook(pre_hook)


@contextmanager
def scale_components(
    model: nn.Module,
    space: ComponentSpace,
    scales: dict[tuple[int, str], torch.Tensor] | torch.Tensor,
    positions: Positions = None,
) -> Iterator[None]:
    """Within the block, every forward pass multiplies components by ``scales``.

    Args:
        scales: ``{(layer, kind): Tensor [n] or [B, n]}``, or one flat ``Tensor [total]`` /
            ``[B, total]`` over the whole :class:`ComponentSpace` (split per site).
        positions: where to scale (see module docstring); ``None`` = every position.
    """
    if isinstance(scales, torch.Tensor):
        scales = space.split(scales)
    handles = []
    try:
        for (layer, kind), s in scales.items():
            site = space.adapter.site(layer, kind)
            if s.shape[-1] != site.n:
                raise ValueError(f"scale for {(layer, kind)} has {s.shape[-1]} entries, expected {site.n}")

            def fn(x, site=site, s=s):
                return scale_activation(x, site, s, position_mask(positions, x.shape[0], x.shape[1], x.device))

            handles.append(_register(model, site, fn))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def read_components(
    model: nn.Module,
    space: ComponentSpace,
    positions: Positions = None,
    kinds: tuple[str, ...] = KINDS,
    layers: list[int] | None = None,
) -> Iterator[dict[tuple[int, str], torch.Tensor]]:
    """Collect component activations during forward passes in the block.

    Yields a dict filled on each forward: ``(layer, kind) ->`` activation ``[B, T, n, w]``
    (``positions=None``), ``[B, n, w]`` (an ``int`` or ``LongTensor [B]``), or ``[B, T, n, w]``
    with zeros outside a ``BoolTensor [B, T]`` mask. Tensors stay attached to the graph.
    """
    store: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    try:
        for layer in range(space.n_layers) if layers is None else layers:
            for kind in kinds:
                site = space.adapter.site(layer, kind)

                def fn(x, site=site, key=(layer, kind)):
                    seg = x[..., site.start : site.stop].unflatten(-1, (site.n, site.width))
                    store[key] = _select(seg, positions)
                    return x

                handles.append(_register(model, site, fn))
        yield store
    finally:
        for h in handles:
            h.remove()


def _select(seg: torch.Tensor, positions: Positions) -> torch.Tensor:
    """``seg [B, T, n, w]`` at ``positions`` (see :func:`read_components`)."""
    B, T = seg.shape[:2]
    if positions is None:
        return seg
    if isinstance(positions, int):
        return seg[:, positions]
    if positions.dtype == torch.bool:
        return seg * positions.to(seg.device).view(B, T, 1, 1).to(seg.dtype)
    idx = positions.to(seg.device).long() % T
    return seg[torch.arange(B, device=seg.device), idx]


def ones_scales(space: ComponentSpace, kinds: tuple[str, ...] = KINDS, *, dtype=torch.float32,
                device: torch.device | str = "cpu", requires_grad: bool = False) -> dict[tuple[int, str], torch.Tensor]:
    """A scale of 1 for every component of ``kinds`` (leaf tensors; set ``requires_grad`` to
    read gradient x activation attributions from ``.grad``)."""
    return {
        (layer, k): torch.ones(space.adapter.site(layer, k).n, dtype=dtype, device=device, requires_grad=requires_grad)
        for layer in range(space.n_layers)
        for k in kinds
    }
