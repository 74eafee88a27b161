"""Kernel micro-benchmarks under pytest-benchmark (not part of the test suite: ``pytest tests``
never collects ``bench/``):

    pytest bench/kernels --benchmark-json out.json                 # every micro-benchmark
    pytest bench/kernels -k row_grad --benchmark-columns=median,iqr

Each kernel is timed beside the PyTorch computation it replaces, on Llama-3-8B layer shapes at
2048 tokens on CUDA (Triton kernels) and on small shapes elsewhere (where the ``auto`` backend is
the PyTorch reference: the CPU numbers only show that the benchmarks run). Every benchmarked call
synchronises the device, so the time is the kernel's, not its launch's. The whole-pipeline and
model-level benchmarks are scripts in ``bench/`` (``bench/harness.py``), not these.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOKENS = 2048 if CUDA else 128
# projection: (out, in, rows per component): Llama-3-8B (head_dim 128) on CUDA, 1/16 of it elsewhere
SHAPES = ({"q": (4096, 4096, 128), "k": (1024, 4096, 128), "up": (14336, 4096, 1)} if CUDA
          else {"q": (256, 256, 16), "k": (64, 256, 16), "up": (896, 256, 1)})
FRACTION = 0.016  # the paper's smallest selection


def _synced(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call():
        out = fn()
        if CUDA:
            torch.cuda.synchronize(DEVICE)
        return out
    return call


def _rows(out: int, unit: int, fraction: float, g: torch.Generator) -> torch.Tensor:
    units = out // unit
    chosen = torch.randperm(units, generator=g)[: max(1, round(fraction * units))].sort().values
    return (chosen[:, None] * unit + torch.arange(unit)).flatten().to(DEVICE)


@pytest.mark.parametrize("impl", ["kernel", "torch_reference"])
@pytest.mark.parametrize("site", ["heads", "neurons"])
def test_component_scores(benchmark, site, impl):
    """Attribution scores of every head (``q``: 32 x 128 channels) or neuron (14336 x 1) of one
    layer at every token: the kernel (``auto``) vs the PyTorch reference."""
    from cca_fast.kernels.attribution import component_scores, component_scores_reference

    out, _, unit = SHAPES["q" if site == "heads" else "up"]
    n = out // unit
    g = torch.Generator().manual_seed(0)
    a = torch.randn(TOKENS, out, generator=g).to(DEVICE, DTYPE)
    gr = torch.randn(TOKENS, out, generator=g).to(DEVICE, DTYPE)
    fn = ((lambda: component_scores(a, gr, n, unit, backend="auto")) if impl == "kernel"
          else (lambda: component_scores_reference(a, gr, n, unit)))
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), tokens=TOKENS, components=n, width=unit)
    benchmark(_synced(fn))


@pytest.mark.parametrize("impl", ["row_grad", "dense_dW"])
@pytest.mark.parametrize("proj", sorted(SHAPES))
def test_row_grad(benchmark, proj, impl):
    """The weight gradient of 1.6 % of a projection's rows (``row_grad``) vs the dense ``dW``."""
    from cca_fast.kernels.row_grad import row_grad

    n_out, n_in, unit = SHAPES[proj]
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(TOKENS, n_out, generator=g).to(DEVICE, DTYPE)
    x = torch.randn(TOKENS, n_in, generator=g).to(DEVICE, DTYPE)
    rows = _rows(n_out, unit, FRACTION, g)
    fn = (lambda: row_grad(dy, x, rows, backend="auto")) if impl == "row_grad" else (lambda: dy.t() @ x)
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), tokens=TOKENS, rows=int(rows.numel()))
    benchmark(_synced(fn))


@pytest.mark.parametrize("impl", ["row_sparse", "dense_fused"])
def test_adamw_step(benchmark, impl):
    """One AdamW step of the ``up`` projection with 1.6 % of its rows selected: the row-sparse
    optimizer vs ``torch.optim.AdamW`` (fused where supported) on the whole weight."""
    from cca_fast.kernels.sparse_optim import AdamWConfig, RowSparseOptimizer, RowSpec

    n_out, n_in, unit = SHAPES["up"]
    g = torch.Generator().manual_seed(2)
    w = torch.nn.Parameter(torch.randn(n_out, n_in, generator=g).to(DEVICE, DTYPE))
    rows = _rows(n_out, unit, FRACTION, g)
    if impl == "row_sparse":
        opt = RowSparseOptimizer([RowSpec("w", w, 0, rows)], AdamWConfig(lr=1e-4))
        opt.grad_view("w").normal_()
    else:
        w.grad = torch.randn_like(w)
        try:
            opt = torch.optim.AdamW([w], lr=1e-4, fused=True)
            opt.step()
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW([w], lr=1e-4, foreach=True)
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE), rows=int(rows.numel()), columns=n_in)
    benchmark(_synced(opt.step))
