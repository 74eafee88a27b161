"""A trained LoRA adapter: the result record, save / load in the ``peft`` layout, and merging
into a plain Hugging Face model in place with a bit-exact restore. Needs no ``peft``.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cca_fast.errors import CCAError
from cca_fast.io import atomic_write_bytes, atomic_write_json, atomic_write_text

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
RESULT_NAME = "lora_result.json"
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$")


@dataclass
class LoRAResult:
    """A trained adapter (the best epoch's) and how it was found.

    Attributes:
        weights: ``peft`` state-dict keys (``base_model.model.<module>.lora_A.weight`` ``[r, in]``,
            ``...lora_B.weight`` ``[out, r]``) -> CPU tensors.
        scaling: the merge factor (``alpha / r``).
        peft_config: the ``adapter_config.json`` content.
        best_epoch, best_val: the kept epoch (0 = base, an all-zero update) and its validation
            accuracy (``None`` without ``validate``: the last epoch is kept).
        history: per epoch: ``epoch``, ``train_loss`` (token-mean over the epoch), ``val``,
            ``seconds`` (training), ``val_seconds``.
        n_trainable_params: adapter parameters (``sum r * (in + out)`` over targeted layers).
        trainable_fraction: ``n_trainable_params / (base model parameters)``.
    """

    weights: dict[str, torch.Tensor]
    scaling: float
    peft_config: dict[str, Any]
    best_epoch: int = 0
    best_val: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    n_trainable_params: int = 0
    trainable_fraction: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready: everything but the weights."""
        return {"best_epoch": self.best_epoch, "best_val": self.best_val, "history": self.history,
                "n_trainable_params": self.n_trainable_params, "trainable_fraction": self.trainable_fraction,
                "scaling": self.scaling, "config": self.config, "seconds": self.seconds,
                "target_modules": self.peft_config.get("target_modules"),
                "n_target_modules": len(module_names(self.weights))}

    def save(self, directory: str | Path) -> Path:
        """Write ``adapter_model.safetensors``, ``adapter_config.json`` (the ``peft`` layout) and
        ``lora_result.json``, each atomically."""
        from safetensors.torch import save as st_save

        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise CCAError(f"cannot save a LoRA adapter to {d}: it exists and is not a directory")
        blob = st_save({k: v.contiguous() for k, v in self.weights.items()}, metadata={"format": "pt"})
        atomic_write_bytes(d / ADAPTER_WEIGHTS_NAME, blob)
        atomic_write_text(d / ADAPTER_CONFIG_NAME, json.dumps(self.peft_config, indent=2, sort_keys=True, default=str))
        atomic_write_json(d / RESULT_NAME, self.summary())
        return d


def module_names(weights: dict[str, torch.Tensor]) -> set[str]:
    """Module names (as in ``model.named_modules()``) that a LoRA state dict adapts."""
    out = set()
    for k in weights:
        m = _KEY_RE.match(k)
        if not m:
            raise CCAError(f"unexpected LoRA weight name {k!r} (expected '<module>.lora_A.weight' / 'lora_B')")
        out.add(m.group(1))
    return out


def load_lora(directory: str | Path) -> LoRAResult:
    """Read an adapter written by :meth:`LoRAResult.save` (or any ``peft`` LoRA adapter
    directory; its history is then empty). Needs no ``peft``."""
    from safetensors.torch import load_file

    d = Path(directory)
    cfg_p, w_p = d / ADAPTER_CONFIG_NAME, d / ADAPTER_WEIGHTS_NAME
    if not cfg_p.is_file() or not w_p.is_file():
        raise CCAError(f"{d} is not a LoRA adapter directory: it needs {ADAPTER_CONFIG_NAME} and "
                       f"{ADAPTER_WEIGHTS_NAME} (written by LoRAResult.save)")
    try:
        cfg = json.loads(cfg_p.read_text(encoding="utf-8"))
        weights = load_file(str(w_p))
    except Exception as e:  # JSON or safetensors errors
        raise CCAError(f"cannot read the LoRA adapter in {d}: {e}") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise CCAError(f"{cfg_p}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CCAError(f"{cfg_p}: per-module rank_pattern / alpha_pattern are not supported")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    info = json.loads((d / RESULT_NAME).read_text(encoding="utf-8")) if (d / RESULT_NAME).is_file() else {}
    return LoRAResult(weights, scaling, cfg, best_epoch=info.get("best_epoch", 0), best_val=info.get("best_val"),
                      history=info.get("history", []), n_trainable_params=info.get(
                          "n_trainable_params", sum(t.numel() for t in weights.values())),
                      trainable_fraction=info.get("trainable_fraction", 0.0), config=info.get("config", {}),
                      seconds=info.get("seconds", 0.0))


# ---- merge / restore ----------------------------------------------------------------------------
class MergedLoRA:
    """Handle of :func:`merge_lora`: :meth:`restore` writes the saved base weights back
    (bit-identical). Also a context manager (restores on exit)."""

    def __init__(self, model: nn.Module, originals: dict[str, torch.Tensor]):
        self.model, self.originals, self.active = model, originals, True

    def restore(self) -> None:
        if not self.active:
            return
        with torch.no_grad():
            for name, w in self.originals.items():
                self.model.get_parameter(name).copy_(w)
        self.active = False

    def __enter__(self) -> "MergedLoRA":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def _base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def merge_lora(model: nn.Module, lora: LoRAResult) -> MergedLoRA:
    """Add ``scaling * B @ A`` to the weight of every adapted module of ``model`` in place
    (computed in float32, or float64 for float64 weights, rounded once to the weight dtype),
    keeping a copy of only those weights. GPT-2 ``Conv1D`` weights (``[in, out]``) get the
    transpose.

    Raises:
        CCAError: a module is missing or its shape does not match the adapter.
    """
    from transformers.pytorch_utils import Conv1D

    mods = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in lora.weights.items():
        m = _KEY_RE.match(k)
        if not m:
            raise CCAError(f"unexpected LoRA weight name {k!r}")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    plan = []
    for name, ab in sorted(pairs.items()):
        if name not in mods or set(ab) != {"A", "B"}:
            raise CCAError(f"the LoRA adapter targets {name!r}, which this model lacks (or lora_A/lora_B is "
                           "missing): merge it into the model it was trained on")
        mod = _base_layer(mods[name])
        w = mod.weight
        A, B = ab["A"], ab["B"]
        conv = isinstance(mod, Conv1D)
        out_in = (w.shape[1], w.shape[0]) if conv else tuple(w.shape)
        if w.dim() != 2 or (B.shape[0], A.shape[1]) != out_in or A.shape[0] != B.shape[1]:
            raise CCAError(f"LoRA shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit {name}.weight "
                           f"{tuple(w.shape)}: merge it into the model it was trained on")
        plan.append((name, mod, A, B, conv))
    originals: dict[str, torch.Tensor] = {}
    params = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        for name, mod, A, B, conv in plan:
            w = mod.weight
            originals[params[id(w)]] = w.detach().clone()
            ct = torch.float64 if w.dtype == torch.float64 else torch.float32
            delta = (B.to(w.device, ct) @ A.to(w.device, ct)) * lora.scaling
            w.copy_((w.to(ct) + (delta.T if conv else delta)).to(w.dtype))
    return MergedLoRA(model, originals)
