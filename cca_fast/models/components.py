"""``ComponentSpace``: every component of a model, with a flat index.

Flat order is layer-major, then kind in ``("q", "k", "v", "mlp")``, then index. For
SmolLM2-135M that is ``30 x (9 + 3 + 3 + 1536) = 46530`` components.

A *score* or *mask* over all components is a float tensor of shape ``[space.total]``;
:meth:`ComponentSpace.split` views it per ``(layer, kind)`` and :meth:`ComponentSpace.join`
builds it back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator, overload

import torch
from torch import nn

from cca_fast.errors import CCAError
from cca_fast.models.adapters import KINDS, ModelAdapter, Site, WeightSlice, get_adapter

_NAME = re.compile(r"^L(\d+)\.(q|k|v|mlp)(\d+)$")


@dataclass(frozen=True, order=True)
class Component:
    """One component: ``layer``, ``kind`` in ``{"q", "k", "v", "mlp"}``, ``index`` (head or
    neuron number within the layer)."""

    layer: int
    kind: str
    index: int

    def __str__(self) -> str:
        return f"L{self.layer}.{self.kind}{self.index}"

    @classmethod
    def parse(cls, name: str) -> "Component":
        """The component named ``name`` (``str(component)``, e.g. ``"L3.q4"``, ``"L0.mlp17"``), as
        saved in deltas and selections. Not range-checked (:meth:`ComponentSpace.parse` is)."""
        m = _NAME.match(name.strip()) if isinstance(name, str) else None
        if m is None:
            raise CCAError(f"not a component name: {name!r}; names look like 'L3.q4' (layer 3, query head 4), "
                           f"'L0.k1', 'L2.v0' or 'L1.mlp17' (kinds: {', '.join(KINDS)})")
        return cls(int(m.group(1)), m.group(2), int(m.group(3)))


@dataclass(frozen=True)
class RowSelection:
    """The rows of one parameter that may change: ``index`` along dimension ``dim``
    (sorted, unique, ``int64``)."""

    param: str
    dim: int
    index: torch.Tensor


class ComponentSpace:
    """All components of ``model`` (through its adapter) and their flat indexing.

    Attributes:
        adapter: the :class:`ModelAdapter` of the model.
        n_layers: number of decoder layers.
        counts: components per layer of each kind, e.g. ``{"q": 9, "k": 3, "v": 3, "mlp": 1536}``.
        per_layer: ``sum(counts.values())``.
        total: ``n_layers * per_layer``.
    """

    def __init__(self, model_or_adapter: nn.Module | ModelAdapter):
        adapter = model_or_adapter if isinstance(model_or_adapter, ModelAdapter) else get_adapter(model_or_adapter)
        self.adapter = adapter
        self.n_layers = adapter.n_layers
        self.counts: dict[str, int] = {k: adapter.site(0, k).n for k in KINDS}
        self.per_layer = sum(self.counts.values())
        self.total = self.n_layers * self.per_layer
        self._kind_offset: dict[str, int] = {}
        off = 0
        for k in KINDS:
            self._kind_offset[k] = off
            off += self.counts[k]

    def __repr__(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.counts.items())
        return (f"ComponentSpace({self.adapter.config.model_type}: {self.n_layers} layers x ({kinds}) = "
                f"{self.total} components)")

    # ---- indexing ----------------------------------------------------------------------
    def _kind(self, kind: str) -> str:
        if kind not in self._kind_offset:
            self.adapter.check(0, kind)  # raises, naming the kinds
        return kind

    def offset(self, layer: int, kind: str) -> int:
        """Flat index of component ``(layer, kind, 0)``."""
        return layer * self.per_layer + self._kind_offset[self._kind(kind)]

    def flat_index(self, layer: int, kind: str, index: int) -> int:
        self._kind(kind)
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.n_layers})")
        if not 0 <= index < self.counts[kind]:
            raise IndexError(f"{kind} index {index} out of range [0, {self.counts[kind]})")
        return self.offset(layer, kind) + index

    def component(self, flat: int) -> Component:
        if not 0 <= flat < self.total:
            raise IndexError(f"flat index {flat} out of range [0, {self.total})")
        layer, rem = divmod(int(flat), self.per_layer)
        for k in reversed(KINDS):
            if rem >= self._kind_offset[k]:
                return Component(layer, k, rem - self._kind_offset[k])
        raise AssertionError("unreachable")

    @overload
    def parse(self, names: str) -> Component: ...
    @overload
    def parse(self, names: Iterable[str]) -> list[Component]: ...

    def parse(self, names):
        """Component names (``"L3.q4"``, as :class:`Component` prints and deltas save them) back
        into components of this space (range-checked): one name -> a :class:`Component`, a list
        of names -> a list. Flat indices: :meth:`index`."""
        if isinstance(names, str):
            c = Component.parse(names)
            try:
                self.flat_index(c.layer, c.kind, c.index)  # range check
            except IndexError as e:
                raise CCAError(f"component {names!r} is not in this model ({e}); it has {self!r}") from None
            return c
        return [self.parse(n) for n in names]

    def index(self, component: Component | str) -> int:
        """The flat index of a :class:`Component` or a component name (``"L3.q4"``)."""
        c = self.parse(component) if isinstance(component, str) else component
        if not isinstance(c, Component):
            raise CCAError(f"expected a Component or a name like 'L3.q4', got {type(component).__name__}")
        return self.flat_index(c.layer, c.kind, c.index)

    def components(self, flat: Iterable[int] | torch.Tensor) -> list[Component]:
        if isinstance(flat, torch.Tensor):
            flat = flat.flatten().tolist()
        return [self.component(int(i)) for i in flat]

    def __iter__(self) -> Iterator[Component]:
        for layer in range(self.n_layers):
            for k in KINDS:
                for i in range(self.counts[k]):
                    yield Component(layer, k, i)

    def __len__(self) -> int:
        return self.total

    def sites(self, kinds: Iterable[str] = KINDS) -> list[Site]:
        """Every :class:`Site`, layer-major then kind."""
        return [self.adapter.site(layer, k) for layer in range(self.n_layers) for k in kinds]

    # ---- per-(layer, kind) views -------------------------------------------------------
    def split(self, flat: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
        """Views of ``flat[..., total]`` per ``(layer, kind)``: each ``[..., counts[kind]]``."""
        if flat.shape[-1] != self.total:
            raise ValueError(f"expected last dim {self.total}, got {tuple(flat.shape)}")
        out = {}
        for layer in range(self.n_layers):
            for k in KINDS:
                o = self.offset(layer, k)
                out[(layer, k)] = flat[..., o : o + self.counts[k]]
        return out

    def join(self, parts: dict[tuple[int, str], torch.Tensor], fill: float = 0.0) -> torch.Tensor:
        """Inverse of :meth:`split`; missing ``(layer, kind)`` entries are ``fill``."""
        ref = next(iter(parts.values()))
        out = torch.full((*ref.shape[:-1], self.total), fill, dtype=ref.dtype, device=ref.device)
        for (layer, k), v in parts.items():
            o = self.offset(layer, k)
            out[..., o : o + self.counts[k]] = v
        return out

    def kind_counts(self, flat_indices: Iterable[int] | torch.Tensor) -> dict[str, int]:
        """How many of the given components are of each kind."""
        counts = {k: 0 for k in KINDS}
        for c in self.components(flat_indices):
            counts[c.kind] += 1
        return counts

    def layer_kind_counts(self, flat_indices: Iterable[int] | torch.Tensor) -> dict[str, list[int]]:
        """``{kind: [count per layer]}`` of the given components (for plots)."""
        out = {k: [0] * self.n_layers for k in KINDS}
        for c in self.components(flat_indices):
            out[c.kind][c.layer] += 1
        return out

    # ---- weights -----------------------------------------------------------------------
    def owned_slices(self, c: Component) -> list[WeightSlice]:
        return self.adapter.owned(c.layer, c.kind, c.index)

    def scale_slices(self, c: Component) -> list[WeightSlice]:
        return self.adapter.scale_equivalent(c.layer, c.kind, c.index)

    def owned_rows(self, flat_indices: Iterable[int] | torch.Tensor) -> dict[str, RowSelection]:
        """Rows each parameter may change when the given components are selected.

        Returns ``{param name: RowSelection}``; ``index`` is sorted and unique.
        """
        rows: dict[str, tuple[int, set[int]]] = {}
        for c in self.components(flat_indices):
            for ws in self.owned_slices(c):
                dim, s = rows.setdefault(ws.param, (ws.dim, set()))
                s.update(range(ws.start, ws.stop))
        return {
            p: RowSelection(p, dim, torch.tensor(sorted(s), dtype=torch.long))
            for p, (dim, s) in sorted(rows.items())
        }

    def all_owned_params(self) -> list[str]:
        """Names of every parameter that owns rows of some component."""
        names: set[str] = set()
        for layer in range(self.n_layers):
            for k in KINDS:
                for ws in self.adapter.owned(layer, k, 0):
                    names.add(ws.param)
        return sorted(names)

    def describe(self) -> dict:
        """Summary for reports: counts per kind and totals."""
        return {
            "model_type": self.adapter.config.model_type,
            "n_layers": self.n_layers,
            "per_layer": dict(self.counts),
            "components_per_layer": self.per_layer,
            "components_total": self.total,
        }
