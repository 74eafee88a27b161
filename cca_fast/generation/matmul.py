"""The matrix-product path of the decode step's linear layers on a CPU.

A decode step multiplies every weight matrix ``W [N, K]`` by a few rows ``x [M, K]`` (``M`` = the
slots decoding, often 1-8 in the tail of a run). The default BLAS (MKL, through ``F.linear``, i.e.
``x @ W.T``) is slow for such ``M`` on this kind of CPU: it reads the weights at ~10 GB/s where the
machine streams ~30 GB/s. The same product written as ``(W @ x.T).T`` (``M`` as the small output
dimension) reaches the memory rate; at ``M = 1`` MKL falls back to a slow matrix-vector product
either way, so one row is computed as two (the row repeated) and the first kept.

Measured on the 2-core CI CPU (AMD Zen 4, MKL 2024.2, fp32), best of 8:

* the default model's lm head ``[49152, 576]`` alone: ``F.linear`` 11.2 / 25.5 / 18.2 / 17.1 /
  38.1 ms at M = 1 / 2 / 4 / 8 / 64, the transposed form 3.7 (M = 1 as 2) / 3.7 / 4.8 / 7.1 / 29.1 ms;
* a whole slot-decoder step of the default model (937 exemplar positions, 100 own positions a
  slot), every linear layer switched: 78.7 / 108.3 / 103.1 / 173.6 / 264.1 ms with ``F.linear`` at
  1 / 2 / 8 / 32 / 64 slots, 56.8 / 55.8 / 83.6 / 158.8 / 247.8 ms with the transposed form;
* the default model's 210 layer weights (425 MB, distinct tensors, so read from memory as in a
  step), time over the fp32 GEMM floor at 191.7 GFLOP/s: ``F.linear`` 2.87 / 1.99 / 1.43 / 1.21 /
  1.09 / 1.02x at M = 16 / 32 / 64 / 128 / 256 / 512, the transposed form 2.55 / 1.68 / 1.29 / 1.10
  / 1.04 / 1.07x. Hence :data:`SMALL_M` = 256: a step of up to 256 rows (many slots, or decoding
  rows with a few entering prompts) takes the transposed form; larger products keep ``F.linear``,
  which runs them at the GEMM rate.

:class:`small_batch_linears` switches a model's plain ``nn.Linear`` layers (exactly that type:
quantised or adapter layers keep their own forward; an adapter's base layer is switched) to this
path for the duration of a block, on CPU weights only. The result differs from ``F.linear`` by
floating-point reduction order only (~1e-6 relative); the batch-1 reference takes the same path.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

#: at most this many rows take the transposed product (measured above; 0 turns the path off)
SMALL_M = 256


def small_m_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (``x [..., K]``, ``weight [N, K]`` -> ``[..., N]``), computed
    as ``(weight @ x.T).T`` when ``x`` has at most :data:`SMALL_M` rows."""
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    if m > SMALL_M or m == 0:
        return F.linear(x, weight, bias)
    if m == 1:
        x2 = torch.cat([x2, x2])
    y = torch.mm(weight, x2.t()).t()[:m]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return small_m_linear(x, self.weight, self.bias)


class small_batch_linears:
    """Context manager: inside the block, ``model``'s ``nn.Linear`` layers with CPU weights use
    :func:`small_m_linear`; restored on exit. A no-op for weights on other devices."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"
                       and "forward" not in m.__dict__]

    def __enter__(self):
        for m in self.layers:
            m.forward = types.MethodType(_forward, m)
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m.__dict__.pop("forward", None)
        return False
