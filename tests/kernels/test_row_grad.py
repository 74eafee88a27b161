"""Row-selective weight gradient: the Triton kernel (interpreted on CPU) and the autograd Function.

Tolerances. The kernel computes ``sum_n dY[n, R[r]] * X[n, c]`` with products exact (float64
inputs in float64; float32 inputs with IEEE fp32 products; fp16/bf16 products are exact in fp32)
and an accumulation of ``N`` terms in the accumulation dtype (unit roundoff ``u``). The classic
bound for a dot product is ``|err| <= gamma_N * sum_n |a_n b_n|`` with ``gamma_N ~ N u``; the tests
check every element against that bound computed from the float64 product of the *same* (already
rounded) inputs, so no tolerance is a guess.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cca_fast.kernels.row_grad as rg
from cca_fast.kernels.row_grad import (DEFAULT_TILES, INTERP_TILES, TILE_CANDIDATES, RowGradTiles,
                                       RowSelectiveProjection, choose_tiles, row_grad, row_grad_reference,
                                       row_selective, zero_delta)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton compiled on CUDA, interpreted on CPU
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -24,
                 torch.bfloat16: 2.0 ** -24}  # half inputs accumulate in fp32


def _check_bound(got: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> None:
    a, b = dy.double()[:, rows.to(dy.device)], x.double()
    ref = a.t() @ b
    bound = dy.shape[0] * UNIT_ROUNDOFF[dy.dtype] * (a.abs().t() @ b.abs()) * 1.01 + 1e-300
    err = (got.double() - ref).abs()
    assert torch.isfinite(got).all()
    assert (err <= bound).all(), f"max err {err.max().item():.3e}, bound there {bound[err.argmax() // err.shape[1]].max():.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 29, 45, 19), (5, 7, 3, 7), (70, 40, 33, 1)])
def test_row_grad_kernel_matches_float64(dtype, shape):
    """Odd shapes: R, C and N all leave a partly masked last tile (tiles 16 x 32 x 16)."""
    N, out, C, R = shape
    g = torch.Generator().manual_seed(N * 1000 + out)
    dy = torch.randn(N, out, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    x = torch.randn(N, C, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    rows = torch.randperm(out, generator=g)[:R].sort().values
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    poisoned = torch.full((R, C), float("nan"), dtype=acc, device=DEVICE)
    got = row_grad(dy, x, rows, backend="triton", out=poisoned)
    assert got.data_ptr() == poisoned.data_ptr() and got.dtype == acc
    _check_bound(got, dy, x, rows)
    _check_bound(row_grad_reference(dy, x, rows), dy, x, rows)


@pytest.mark.parametrize("tiles", TILE_CANDIDATES, ids=lambda t: t.name)
def test_every_tile_candidate_gives_the_same_bound(tiles):
    """Each launch configuration the GPU sweep may pin computes the same gradient (fp32 and bf16:
    the interpreter runs the same masked tile loop at each size)."""
    N, out, C, R = 41, 23, 37, 11
    g = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.bfloat16):
        dy = torch.randn(N, out, generator=g).to(dtype).to(DEVICE)
        x = torch.randn(N, C, generator=g).to(dtype).to(DEVICE)
        rows = torch.randperm(out, generator=g)[:R]
        _check_bound(row_grad(dy, x, rows, backend="triton", tiles=tiles), dy, x, rows)


def test_tile_choice(monkeypatch):
    """Interpreter: its small tiles; compiled: a measured winner for the shape's bucket, else the
    default 64x64x32 (what the kernel always launched before tiles became selectable)."""
    assert choose_tiles(300, 4096, torch.bfloat16, interpret=True) == INTERP_TILES
    assert choose_tiles(300, 4096, torch.bfloat16, interpret=False) == DEFAULT_TILES
    assert DEFAULT_TILES == RowGradTiles(64, 64, 32, num_warps=4, num_stages=3) == TILE_CANDIDATES[0]
    winner = RowGradTiles(128, 64, 32, num_warps=8)
    monkeypatch.setitem(rg.MEASURED_TILES, ("bfloat16", 512, 4096), winner)
    assert choose_tiles(300, 4096, torch.bfloat16, interpret=False) == winner
    assert choose_tiles(300, 4096, torch.float16, interpret=False) == DEFAULT_TILES
    assert choose_tiles(600, 4096, torch.bfloat16, interpret=False) == DEFAULT_TILES
    assert [rg.tile_bucket(n) for n in (1, 16, 17, 300, 4096)] == [16, 16, 32, 512, 4096]
    with pytest.raises(ValueError, match="power of two"):
        RowGradTiles(48, 64, 32)


def test_row_grad_strided_inputs_and_unsorted_rows():
    """Non-contiguous ``dy`` / ``x`` (views into larger tensors) and rows in any order."""
    g = torch.Generator().manual_seed(3)
    big_dy = torch.randn(40, 50, generator=g, dtype=torch.float64).to(DEVICE)
    big_x = torch.randn(23, 40, generator=g, dtype=torch.float64).to(DEVICE)
    dy = big_dy[:, 3:34]  # row stride 50
    x = big_x.t()  # [40, 23], column stride 40
    rows = torch.tensor([30, 2, 17, 0, 5])
    _check_bound(row_grad(dy, x, rows, backend="triton"), dy, x, rows)


def test_row_grad_empty_cases():
    kw = dict(dtype=torch.float64, device=DEVICE)
    dy, x = torch.randn(0, 6, **kw), torch.randn(0, 4, **kw)
    got = row_grad(dy, x, torch.tensor([1, 2]), backend="triton", out=torch.full((2, 4), float("nan"), **kw))
    assert torch.equal(got, torch.zeros(2, 4, **kw))
    empty = torch.tensor([], dtype=torch.long)
    assert row_grad(torch.randn(3, 6, device=DEVICE), torch.randn(3, 4, device=DEVICE), empty, backend="triton").shape == (0, 4)


def test_row_grad_rejects_bad_input():
    with pytest.raises(ValueError, match="dy"):
        row_grad(torch.randn(3, 6), torch.randn(4, 5), torch.tensor([0]))
    with pytest.raises(ValueError, match="dtype"):
        row_grad(torch.randn(3, 6), torch.randn(3, 5, dtype=torch.float64), torch.tensor([0]))
    with pytest.raises(ValueError, match="out"):
        row_grad(torch.randn(3, 6), torch.randn(3, 5), torch.tensor([0]), out=torch.empty(2, 5))


def _conv1d(n_in: int, n_out: int):
    from transformers.pytorch_utils import Conv1D

    m = Conv1D(n_out, n_in)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    return m


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_row_selective_projection_equals_full_autograd(kind, backend):
    """dX, dW[R] and db[R] of the row-selective Function equal autograd on the full layer
    (float64; both sides sum the same N products, so 1e-12 absolute covers op-order rounding
    on values of magnitude ~10)."""
    torch.manual_seed(0)
    n_in, n_out = 13, 21
    mod = (nn.Linear(n_in, n_out, dtype=torch.float64) if kind == "linear" else _conv1d(n_in, n_out).double()).to(DEVICE)
    transposed = kind == "conv1d"
    x = torch.randn(2, 7, n_in, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w_rows = torch.tensor([0, 4, 5, 6, 20], device=DEVICE)
    b_rows = torch.tensor([4, 5, 19], device=DEVICE)
    up = torch.randn(2, 7, n_out, dtype=torch.float64, device=DEVICE)

    # dense reference
    y_ref = mod(x)
    gx_ref, gw_ref, gb_ref = torch.autograd.grad((y_ref * up).sum(), (x, mod.weight, mod.bias))
    dw_ref = gw_ref.t()[w_rows] if transposed else gw_ref[w_rows]

    for p in mod.parameters():
        p.requires_grad_(False)
    dw = zero_delta((5, n_in), torch.float64, DEVICE)
    db = zero_delta((3,), torch.float64, DEVICE)
    with row_selective(mod, w_rows, b_rows, dw, db, transposed=transposed, backend=backend):
        y = mod(x)
    assert "forward" not in mod.__dict__  # restored
    assert torch.equal(y, y_ref)  # the forward is the module's own computation: bit-identical
    gx, gdw, gdb = torch.autograd.grad((y * up).sum(), (x, dw, db))
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gdw, dw_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gdb, gb_ref[b_rows], rtol=0, atol=1e-12)


def test_function_gives_dense_weight_grad_when_weight_requires_grad():
    torch.manual_seed(1)
    lin = nn.Linear(6, 9, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    dw = zero_delta((2, 6), torch.float64, "cpu")
    y = RowSelectiveProjection.apply(x, lin.weight, lin.bias, torch.tensor([1, 3]), None, dw, None, False, "torch")
    gw, gb, gdw = torch.autograd.grad(y.square().sum(), (lin.weight, lin.bias, dw))
    gw_ref, gb_ref = torch.autograd.grad(lin(x).square().sum(), (lin.weight, lin.bias))
    torch.testing.assert_close(gw, gw_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gb, gb_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gdw, gw_ref[[1, 3]], rtol=0, atol=1e-12)


def test_gradient_accumulates_in_place_into_a_preset_buffer_view():
    """The mechanism stage 3 relies on: a delta leaf whose ``.grad`` is preset to a view of a
    packed buffer accumulates every backward pass in place there, and the leaf itself costs one
    element of memory."""
    torch.manual_seed(2)
    lin = nn.Linear(5, 8, dtype=torch.float64, device=DEVICE).requires_grad_(False)
    buf = torch.zeros(20, dtype=torch.float64, device=DEVICE)
    dw = zero_delta((3, 5), torch.float64, DEVICE)
    assert dw.untyped_storage().nbytes() == 8 and dw.is_leaf and dw.requires_grad
    dw.grad = buf[2:17].view(3, 5)
    rows = torch.tensor([0, 2, 7])
    xs = [torch.randn(4, 5, dtype=torch.float64, device=DEVICE) for _ in range(2)]
    with row_selective(lin, rows, None, dw, None, transposed=False, backend="triton"):
        for x in xs:
            lin(x).sum().backward()
    expect = sum(torch.ones(4, 3, dtype=torch.float64, device=DEVICE).t() @ x for x in xs)
    assert dw.grad.data_ptr() == buf[2:].data_ptr()
    torch.testing.assert_close(buf[2:17].view(3, 5), expect, rtol=0, atol=1e-12)
    assert not buf[:2].any() and not buf[17:].any()


def test_row_selective_checks_shapes_and_restores_on_error():
    lin = nn.Linear(5, 8)
    with pytest.raises(ValueError, match="delta_w"):
        with row_selective(lin, torch.tensor([0, 1]), None, zero_delta((3, 5), torch.float32, "cpu"), None,
                           transposed=False):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with row_selective(lin, torch.tensor([0, 1]), None, zero_delta((2, 5), torch.float32, "cpu"), None,
                           transposed=False):
            raise RuntimeError("boom")
    assert "forward" not in lin.__dict__


_COMPILE_SCRIPT = r'''
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import cca_fast.kernels.row_grad as rg

kernel = rg._row_grad_kernel()
names = list(kernel.arg_names)
out = {}
for dt, upcast, f64 in (("bf16", False, False), ("fp16", False, False), ("fp32", True, False), ("fp64", False, True)):
    consts = {"BLOCK_R": 64, "BLOCK_C": 64, "BLOCK_N": 32, "UPCAST": upcast, "F64": f64}
    sig = {"dy_ptr": "*" + dt, "x_ptr": "*" + dt, "rows_ptr": "*i64", "out_ptr": "*fp64" if f64 else "*fp32",
           **{k: "i32" for k in ("N", "R", "C", "s_dy_n", "s_dy_o", "s_x_n", "s_x_c", "s_out_r")},
           **{k: "constexpr" for k in consts}}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(4)})
    out[dt] = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"].count("mma")
print(json.dumps(out))
'''


def test_kernel_compiles_for_cuda_with_tensor_cores():
    """Compiled (not interpreted) for sm_90 PTX without a GPU, for every dtype; fp16/bf16 use
    tensor-core MMA. In a subprocess with ``TRITON_INTERPRET`` unset."""
    from helpers import compile_counts

    counts = compile_counts(_COMPILE_SCRIPT)
    assert set(counts) == {"bf16", "fp16", "fp32", "fp64"}
    assert counts["bf16"] > 0 and counts["fp16"] > 0, counts
