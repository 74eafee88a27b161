"""Architecture adapters: where each layer's components live and which weight rows they own.

A *component* (METHOD section 2) is a query head, a key head, a value head (one per KV group
under GQA) or an MLP neuron (one channel of the input of the down projection). An adapter maps
each ``(layer, kind)`` of a model to a :class:`Site`, the module and channel slice holding the
activations of that kind, and maps each component to the weight slices it owns.

Two weight views per component:

* ``owned``: the rows stage 3 updates: the ``head_dim`` output rows (and bias entries) of the
  q/k/v projection of a head; the up-projection row (and bias entry) of a neuron.
* ``scale_equivalent``: weight slices whose multiplication by ``s`` is *exactly* the same as
  multiplying the component's activation by ``s``. For heads and gated MLPs these are the owned
  rows (the activation is linear in them); for GPT-2's ungated MLP (``gelu(c_fc(x))``) it is the
  neuron's input row of ``c_proj``. The identity tests use this view.

Supported families and their module layout (``L`` = decoder layer):

======================================================  =====================================
model_type                                              layout
======================================================  =====================================
llama, mistral, qwen2, qwen3, gemma2, gemma3_text,      ``L.self_attn.{q,k,v}_proj`` (Linear),
olmo2                                                   ``L.mlp.{gate,up,down}_proj``
phi3                                                    ``L.self_attn.qkv_proj`` (fused q|k|v),
                                                        ``L.mlp.gate_up_proj`` (gate|up),
                                                        ``L.mlp.down_proj``
gpt2                                                    ``L.attn.c_attn`` (Conv1D, fused
                                                        q|k|v, weight ``[in, out]``),
                                                        ``L.mlp.c_fc``, ``L.mlp.c_proj``
======================================================  =====================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cca_fast.errors import CCAError, UnsupportedArchitectureError
from cca_fast.models import runtime

KINDS: tuple[str, ...] = ("q", "k", "v", "mlp")
Kind = Literal["q", "k", "v", "mlp"]


@dataclass(frozen=True)
class Site:
    """Where the activations of one ``(layer, kind)`` live.

    The activation tensor is the *output* of ``module`` (q/k/v: ``[B, T, out_features]``) or
    its *input* (mlp: ``[B, T, d_ff]``). Components of this site occupy channels
    ``[start, start + n * width)`` of the last dimension; component ``i`` owns channels
    ``[start + i * width, start + (i + 1) * width)``.
    """

    layer: int
    kind: str
    module_name: str
    io: Literal["output", "input"]
    start: int
    n: int
    width: int

    @property
    def stop(self) -> int:
        return self.start + self.n * self.width


@dataclass(frozen=True)
class WeightSlice:
    """A contiguous range ``[start, stop)`` along dimension ``dim`` of parameter ``param``.

    ``dim`` is 0 for ``nn.Linear`` weights (rows = output channels) and for biases; GPT-2's
    ``Conv1D`` stores ``[in, out]`` so its output channels are along ``dim=1``.
    """

    param: str
    dim: int
    start: int
    stop: int


class ModelAdapter:
    """Base adapter: subclasses describe one family's module layout.

    Args:
        model: a Hugging Face causal LM of a supported family (already unwrapped: build
            adapters with :func:`get_adapter`, which looks through peft, ``torch.compile`` and
            user wrappers).

    Parameter names are the plain model's (:func:`~cca_fast.models.runtime.base_parameters`:
    under peft, ``q_proj.weight`` names the base layer's weight); module names are the model's
    own (a peft tuner layer keeps its name, so a hook on it sees the adapter's contribution).
    """

    model_types: tuple[str, ...] = ()
    layers_path: str = "model.layers"

    def __init__(self, model: nn.Module):
        self.model = model
        cfg = model.config
        self.config = cfg
        self.n_layers: int = int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)
        self.n_heads: int = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
        n_kv = getattr(cfg, "num_key_value_heads", None)
        self.n_kv_heads: int = int(n_kv) if n_kv else self.n_heads
        hidden = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
        self.hidden_size = hidden
        head_dim = getattr(cfg, "head_dim", None)
        self.head_dim: int = int(head_dim) if head_dim else hidden // self.n_heads
        self.d_ff: int = self._d_ff()
        self._params = runtime.base_parameters(model)
        self._modules = dict(model.named_modules())

    # ---- family specifics (overridden) -------------------------------------------------
    def _d_ff(self) -> int:
        return int(self.config.intermediate_size)

    def _layer_prefix(self, layer: int) -> str:
        return f"{self.layers_path}.{layer}"

    def check(self, layer: int, kind: str) -> None:
        """:class:`CCAError` unless ``kind`` is one of :data:`KINDS` and ``layer`` a layer of the
        model (every :meth:`site` starts with it)."""
        if kind not in KINDS:
            raise CCAError(f"unknown component kind {kind!r}; the kinds are {', '.join(map(repr, KINDS))} "
                           "(query, key and value heads, MLP neurons)")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise CCAError(f"layer {layer!r} out of range: the model has layers 0..{self.n_layers - 1}")

    def site(self, layer: int, kind: str) -> Site:
        """The :class:`Site` of ``kind`` components in ``layer``."""
        self.check(layer, kind)
        p = self._layer_prefix(layer)
        D = self.head_dim
        if kind in ("q", "k", "v"):
            n = self.n_heads if kind == "q" else self.n_kv_heads
            return Site(layer, kind, f"{p}.self_attn.{kind}_proj", "output", 0, n, D)
        return Site(layer, kind, f"{p}.mlp.down_proj", "input", 0, self.d_ff, 1)

    def _projection(self, layer: int, kind: str) -> tuple[str, int, int]:
        """(module name, first output channel, output dim of the weight) of the projection
        whose outputs a component of ``kind`` owns (q/k/v projection, or up projection)."""
        p = self._layer_prefix(layer)
        if kind == "mlp":
            return f"{p}.mlp.up_proj", 0, 0
        return f"{p}.self_attn.{kind}_proj", 0, 0

    def _mlp_scale_module(self, layer: int) -> tuple[str, int, int] | None:
        """For ungated MLPs: (module, offset, dim) of the weight whose rows scale a neuron's
        activation exactly. ``None`` means the owned up-projection row does."""
        return None

    # ---- derived -----------------------------------------------------------------------
    def module(self, name: str) -> nn.Module:
        return self._modules[name]

    def _slices_of(self, module_name: str, offset: int, dim: int, lo: int, hi: int) -> list[WeightSlice]:
        out = [WeightSlice(f"{module_name}.weight", dim, offset + lo, offset + hi)]
        if f"{module_name}.bias" in self._params and self._params[f"{module_name}.bias"] is not None:
            out.append(WeightSlice(f"{module_name}.bias", 0, offset + lo, offset + hi))
        return out

    def owned(self, layer: int, kind: str, index: int) -> list[WeightSlice]:
        """Weight slices stage 3 may change for component ``(layer, kind, index)``."""
        site = self.site(layer, kind)
        if not 0 <= index < site.n:
            raise IndexError(f"{kind} index {index} out of range [0, {site.n}) in layer {layer}")
        mod, off, dim = self._projection(layer, kind)
        w = site.width
        return self._slices_of(mod, off, dim, index * w, (index + 1) * w)

    def scale_equivalent(self, layer: int, kind: str, index: int) -> list[WeightSlice]:
        """Weight slices whose scaling by ``s`` equals scaling the activation by ``s``."""
        if kind == "mlp":
            alt = self._mlp_scale_module(layer)
            if alt is not None:
                mod, off, dim = alt
                # the neuron is an *input* channel of this module: no bias entry scales with it
                return [WeightSlice(f"{mod}.weight", dim, off + index, off + index + 1)]
        return self.owned(layer, kind, index)


class LlamaLikeAdapter(ModelAdapter):
    """Separate q/k/v projections and a gated MLP (gate, up, down)."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "olmo2")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if self.config.model_type == "gemma3":
            # Gemma3ForConditionalGeneration: the text decoder sits under language_model
            self.layers_path = _find_layers_path(model)


class Phi3Adapter(ModelAdapter):
    """Fused ``qkv_proj`` (q rows, then k rows, then v rows) and fused ``gate_up_proj``
    (gate rows ``[0, d_ff)``, then up rows ``[d_ff, 2 d_ff)``)."""

    model_types = ("phi3",)

    def site(self, layer: int, kind: str) -> Site:
        self.check(layer, kind)
        if kind == "mlp":
            return super().site(layer, kind)
        p = self._layer_prefix(layer)
        D, Hq, Hkv = self.head_dim, self.n_heads, self.n_kv_heads
        start = {"q": 0, "k": Hq * D, "v": (Hq + Hkv) * D}[kind]
        n = Hq if kind == "q" else Hkv
        return Site(layer, kind, f"{p}.self_attn.qkv_proj", "output", start, n, D)

    def _projection(self, layer: int, kind: str) -> tuple[str, int, int]:
        p = self._layer_prefix(layer)
        if kind == "mlp":
            return f"{p}.mlp.gate_up_proj", self.d_ff, 0
        return f"{p}.self_attn.qkv_proj", self.site(layer, kind).start, 0


class GPT2Adapter(ModelAdapter):
    """GPT-2: fused ``c_attn`` Conv1D (weight ``[in, out]``: output channels along dim 1),
    ungated MLP ``c_proj(gelu(c_fc(x)))``."""

    model_types = ("gpt2",)
    layers_path = "transformer.h"

    def _d_ff(self) -> int:
        n_inner = getattr(self.config, "n_inner", None)
        return int(n_inner) if n_inner else 4 * int(self.config.n_embd)

    def site(self, layer: int, kind: str) -> Site:
        self.check(layer, kind)
        p = self._layer_prefix(layer)
        if kind == "mlp":
            return Site(layer, kind, f"{p}.mlp.c_proj", "input", 0, self.d_ff, 1)
        H, D = self.n_heads, self.head_dim
        start = {"q": 0, "k": H * D, "v": 2 * H * D}[kind]
        return Site(layer, kind, f"{p}.attn.c_attn", "output", start, H, D)

    def _projection(self, layer: int, kind: str) -> tuple[str, int, int]:
        p = self._layer_prefix(layer)
        if kind == "mlp":
            return f"{p}.mlp.c_fc", 0, 1
        return f"{p}.attn.c_attn", self.site(layer, kind).start, 1

    def _mlp_scale_module(self, layer: int) -> tuple[str, int, int] | None:
        return f"{self._layer_prefix(layer)}.mlp.c_proj", 0, 0


def _find_layers_path(model: nn.Module) -> str:
    for name, mod in model.named_modules():
        if name.endswith("layers") and isinstance(mod, nn.ModuleList):
            return name
    raise UnsupportedArchitectureError("could not find the decoder layers of this model")


ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaLikeAdapter, Phi3Adapter, GPT2Adapter)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` that has an adapter."""
    return sorted(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model`` (a transformers causal LM, or a peft / ``torch.compile`` / user
    wrapper of one: :func:`~cca_fast.models.runtime.unwrap`), or
    :class:`UnsupportedArchitectureError` naming the supported families (or, for a layout it
    does not know, the module tree it found)."""
    model = runtime.unwrap(model, strict=True)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            adapter = cls(model)
            _check_layout(adapter)
            return adapter
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported by cca_fast; supported model types: "
        f"{', '.join(supported_model_types())}. A new family needs one adapter class in "
        "cca_fast/models/adapters.py plus its identity test."
    )


def _check_layout(adapter: ModelAdapter) -> None:
    """Fail early, with a clear message, if the modules are not where the adapter expects."""
    for kind in KINDS:
        site = adapter.site(0, kind)
        if site.module_name not in adapter._modules:
            raise UnsupportedArchitectureError(
                f"{adapter.config.model_type}: expected module {site.module_name!r} for {kind} "
                f"components but {type(adapter.model).__name__} has none (a transformers version with a "
                f"different module layout?). Module tree found:\n{runtime.module_tree(adapter.model, depth=5)}"
            )
        for ws in adapter.owned(0, kind, 0):
            if ws.param not in adapter._params:
                raise UnsupportedArchitectureError(
                    f"{adapter.config.model_type}: expected parameter {ws.param!r} is missing. Module tree "
                    f"found:\n{runtime.module_tree(adapter.model, depth=5)}"
                )


def param_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The base parameter called ``name`` (:func:`~cca_fast.models.runtime.base_parameters`)."""
    return runtime.base_parameters(model)[name]
