"""Compiled kernels on CUDA against float64 references (``pytest -m cuda``; skipped without a GPU).

The interpreter tests (the other modules here) run the same kernels as numpy; these run what the
GPU compiles, where two paths exist only there:

* ``row_grad``'s fp16 / bf16 ``tl.dot`` on tensor cores (under the interpreter bf16 is upcast
  to fp32 first, ``UPCAST``), checked at every tile candidate the GPU sweep may pin;
* the sparse optimizer's native bf16 rounding (``w.to(bfloat16)``, one ``cvt.rn.bf16.f32``;
  the interpreter emulates round-to-nearest-even with integer ops, ``RTNE_BF16``).

Tolerances, per kernel:

* attribution and ``row_grad``: each output is a dot product of ``m`` terms of the *same
  rounded* inputs (fp16/bf16 products are exact in fp32, fp32/fp64 products round once),
  accumulated in fp32 (fp64 for fp64, unit roundoff ``u``): ``|err| <= m u sum|a b|`` (the classic
  ``gamma_m`` bound, times 1.01), with the float64 reference computed from the same inputs;
* optimizer: 20 steps of fp32 math (fp64 for fp64 weights) against the same steps in float64 on
  the same initial rows: ``5e-6`` relative + ``2e-6`` absolute for fp32 state (a handful of
  roundings per step, 20 steps: ~80 u of the weight), ``1e-13`` for fp64 (weights ~1, the same
  operations up to order); fp16/bf16 weights must equal their fp32
  master rows rounded to nearest even, bit for bit.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -24}


def _rand(shape, dtype, g):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def _within_dot_bound(got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, terms: int, dtype) -> None:
    bound = terms * UNIT[dtype] * mag * 1.01 + 1e-300
    err = (got.double().cpu() - ref).abs()
    assert torch.isfinite(got).all()
    assert (err <= bound).all(), f"max err {err.max():.3e}, bound there {bound.flatten()[err.argmax()]:.3e}"


@pytest.fixture(autouse=True)
def _compiled():
    """These tests are about compiled code: refuse to run them under the interpreter."""
    from cca_fast.kernels import dispatch

    assert not dispatch.interpret_mode(), "unset TRITON_INTERPRET to test the compiled kernels"
    assert dispatch.resolve_backend(DEVICE, None) == "triton"


# ---- attribution -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 300, 1), (13, 3, 96), (70, 2, 128), (301, 7, 64)])
@pytest.mark.parametrize("per_row", [False, True])
def test_attribution_compiled_matches_float64(dtype, shape, per_row):
    from cca_fast.kernels.attribution import component_scores, component_scores_reference

    N, n, w = shape
    g = torch.Generator().manual_seed(N * 7 + n)
    a, gr = _rand((N, n * w), dtype, g), _rand((N, n * w), dtype, g)
    wt = (torch.rand(N, generator=g, dtype=torch.float64) * 2 - 0.5).to(DEVICE)
    got = component_scores(a, gr, n, w, wt, per_row=per_row, backend="triton")
    a64, g64, w64 = a.double().cpu(), gr.double().cpu(), wt.double().cpu()
    ref = component_scores_reference(a64, g64, n, w, w64, per_row=per_row)
    mag = (a64 * g64).abs().view(N, n, w).sum(-1) * w64.abs()[:, None]
    _within_dot_bound(got, ref, mag if per_row else mag.sum(0), w if per_row else N * w, dtype)


# ---- row_grad ----------------------------------------------------------------------------------
def _row_grad_case(dtype, N, out, C, R, seed):
    g = torch.Generator().manual_seed(seed)
    dy, x = _rand((N, out), dtype, g), _rand((N, C), dtype, g)
    rows = torch.randperm(out, generator=g)[:R].to(DEVICE)
    a, b = dy.double().cpu()[:, rows.cpu()], x.double().cpu()
    return dy, x, rows, a.t() @ b, a.abs().t() @ b.abs()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 29, 45, 19), (5, 7, 3, 7), (70, 40, 33, 1), (1029, 300, 257, 129)])
def test_row_grad_compiled_matches_float64(dtype, shape):
    """Default tiles; fp16/bf16 take the tensor-core ``tl.dot`` path."""
    from cca_fast.kernels.row_grad import row_grad

    N, out, C, R = shape
    dy, x, rows, ref, mag = _row_grad_case(dtype, N, out, C, R, N + R)
    got = row_grad(dy, x, rows, backend="triton")
    _within_dot_bound(got, ref, mag, N, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_row_grad_every_tile_candidate_compiled(dtype):
    """Every candidate of the GPU sweep compiles and is exact to the bound (a shape that leaves a
    partly masked tile in R, C and N for each of them)."""
    from cca_fast.kernels.row_grad import TILE_CANDIDATES, row_grad

    dy, x, rows, ref, mag = _row_grad_case(dtype, 533, 411, 199, 141, 5)
    for tiles in TILE_CANDIDATES:
        _within_dot_bound(row_grad(dy, x, rows, backend="triton", tiles=tiles), ref, mag, 533, dtype)


# ---- sparse optimizer --------------------------------------------------------------------------
SEL = {"lin.weight": ((13, 37), 0, [0, 1, 2, 7, 12]), "lin.bias": ((13,), 0, [0, 1, 2, 7, 12]),
       "conv.weight": ((37, 11), 1, [0, 3, 4, 10]), "wide": ((9, 1031), 0, [1, 2, 3, 8])}


def _reference_adamw(w64: torch.Tensor, grads: list[torch.Tensor], cfg) -> torch.Tensor:
    w = w64.clone().requires_grad_()
    opt = torch.optim.AdamW([w], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)
    for gr in grads:
        w.grad = gr
        opt.step()
    return w.detach()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_adamw_compiled_matches_float64(dtype):
    from cca_fast.kernels.sparse_optim import AdamWConfig, RowSparseOptimizer, RowSpec, gather_rows

    cfg = AdamWConfig(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    g = torch.Generator().manual_seed(11)
    params = {n: _rand(shape, dtype, g) for n, (shape, _, _) in SEL.items()}
    base = {n: p.clone() for n, p in params.items()}
    idx = {n: torch.tensor(rows, device=DEVICE) for n, (_, _, rows) in SEL.items()}
    opt = RowSparseOptimizer([RowSpec(n, params[n], dim, idx[n]) for n, (_, dim, _) in SEL.items()], cfg,
                             backend="triton", block=256)
    grads = {n: [] for n in SEL}
    for _ in range(20):
        for n in SEL:
            gr = torch.randn(opt.grad_view(n).shape, generator=g, dtype=torch.float64)
            opt.grad_view(n).copy_(gr.to(DEVICE))
            grads[n].append(gr.to(opt.grad_view(n).dtype).double())
        opt.step()
    # fp32 state: ~4 roundings per step, 20 steps: 80 u ~ 5e-6 relative to |w| (up to ~4 here)
    tol = dict(rtol=0, atol=1e-13) if dtype == torch.float64 else dict(rtol=5e-6, atol=2e-6)
    for n, (shape, dim, rows) in SEL.items():
        ref = _reference_adamw(gather_rows(base[n], dim, idx[n]).double().cpu(), grads[n], cfg)
        got = gather_rows(params[n], dim, idx[n])
        if dtype in (torch.float16, torch.bfloat16):  # native rounding: the master rows, nearest even
            master = opt.state_view(n, "master")
            assert torch.equal(got, master.to(dtype)), n
            torch.testing.assert_close(master.double().cpu(), ref, **tol)
        else:
            torch.testing.assert_close(got.double().cpu(), ref, **tol)
        keep = torch.ones(shape[dim], dtype=torch.bool)
        keep[rows] = False
        other = keep.nonzero().flatten().to(DEVICE)
        assert torch.equal(params[n].index_select(dim, other), base[n].index_select(dim, other)), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_sgd_native_rounding_without_master(dtype):
    """``master_weights=False``: the half weights are read, stepped in fp32 and rounded back by
    the hardware conversion: equal, bit for bit, to PyTorch's round-to-nearest-even of the same
    fp32 value (``w - lr * g`` with ``lr`` a power of two, exact in fp32)."""
    from cca_fast.kernels.sparse_optim import RowSparseOptimizer, RowSpec, SGDConfig

    lr = 2.0 ** -5
    g = torch.Generator().manual_seed(3)
    w = _rand((37, 257), dtype, g)
    rows = torch.tensor([0, 5, 6, 7, 36], device=DEVICE)
    opt = RowSparseOptimizer([RowSpec("w", w, 0, rows)], SGDConfig(lr=lr), master_weights=False, backend="triton")
    for _ in range(5):
        before = w[rows].float()
        gr = torch.randn(opt.grad_view("w").shape, generator=g).to(DEVICE)
        opt.grad_view("w").copy_(gr)
        opt.step()
        assert torch.equal(w[rows], (before - lr * gr).to(dtype))
