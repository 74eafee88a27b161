"""Row-selective weight gradient of a projection: ``dW[R] = dY[:, R]^T X``, never the dense ``dW``.

For a projection ``Y = X W^T + b`` (``nn.Linear``, ``W [out, in]``) or ``Y = X W + b`` (GPT-2
``Conv1D``, ``W [in, out]``) whose output channels ``R`` may change, the gradient of those rows is

    ``dW_R [R, in] = dY[:, R]^T X``  (the packed layout of :mod:`.sparse_optim`:
    row ``r`` is ``W[R[r], :]`` for ``Linear`` and the column ``W[:, R[r]]`` for ``Conv1D``),
    ``db_R [R] = sum_n dY[n, R]``,

with ``X [N, in]`` and ``dY [N, out]`` flattened over batch and sequence. Cost ``2 N |R| in``
instead of ``2 N out in``, and no ``[out, in]`` gradient is ever allocated.

:class:`RowSelectiveProjection` is the ``autograd.Function``: the weights stay frozen; zero
*delta* leaves ``[R, in]`` / ``[R]`` stand for ``W_eff = W + scatter(delta)`` (the forward never
reads them: they are zero) and receive ``dW_R`` / ``db_R`` as their gradients. The input gradient
is the ordinary dense one. :func:`row_selective` swaps a module's forward for it inside a context
manager.

Kernel: a gathered GEMM. Program ``(i, j)`` computes a ``[BLOCK_R, BLOCK_C]`` tile of ``dW_R``,
loading ``dY[n, R[i*BLOCK_R : ...]]`` transposed straight from ``dY`` through the row indices (no
gathered copy of ``dY``) and accumulating ``tl.dot`` over ``N`` in fp32 (fp64 for fp64 inputs);
the result is written in the accumulation dtype, so fp16/bf16 models get fp32 row gradients.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from . import checks
from .dispatch import Backend, accumulation_dtype, interpret_mode, jit_lazily, resolve_backend
from .errors import ShapeError, StateError

try:  # guarded: CPU users without triton get the PyTorch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------
def _row_grad_kernel_src(dy_ptr, x_ptr, rows_ptr, out_ptr, N, R, C,
                         s_dy_n, s_dy_o, s_x_n, s_x_c, s_out_r,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                         UPCAST: tl.constexpr, F64: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = r < R
    c_mask = c < C
    ch = tl.load(rows_ptr + r, mask=r_mask, other=0).to(tl.int64)  # output channel of each row
    if F64:
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_mask = n < N
        a = tl.load(dy_ptr + ch[:, None] * s_dy_o + n[None, :] * s_dy_n,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N] = dY[n, R]^T
        b = tl.load(x_ptr + n[:, None] * s_x_n + c[None, :].to(tl.int64) * s_x_c,
                    mask=n_mask[:, None] & c_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_C]
        if F64:
            acc += tl.dot(a, b, input_precision="ieee", out_dtype=tl.float64)
        elif UPCAST:  # fp32 inputs (exact products), or bf16 under the interpreter (no numpy bf16 dot)
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:  # fp16 / bf16 tensor cores, fp32 accumulation
            acc += tl.dot(a, b)
    out = out_ptr + r[:, None].to(tl.int64) * s_out_r + c[None, :]
    tl.store(out, acc, mask=r_mask[:, None] & c_mask[None, :])


_row_grad_kernel = jit_lazily(_row_grad_kernel_src) if triton is not None else None


# ---------------------------------------------------------------------------------------------
# tiles
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowGradTiles:
    """One launch configuration: a ``[block_r, block_c]`` output tile per program, the ``N`` loop
    in steps of ``block_n``, ``num_warps`` warps, ``num_stages`` software-pipelining stages."""

    block_r: int
    block_c: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_r", "block_c", "block_n", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ShapeError(f"RowGradTiles.{name} must be a power of two, got {v}")
        if self.num_stages < 1:
            raise ShapeError(f"RowGradTiles.num_stages must be >= 1, got {self.num_stages}")

    @property
    def name(self) -> str:
        return f"{self.block_r}x{self.block_c}x{self.block_n}/w{self.num_warps}/s{self.num_stages}"


# Why these sizes (Liger style: the reason beside the number).
# * DEFAULT_TILES 64x64x32, 4 warps, 3 stages: a 64x64 fp32 accumulator is 16 KiB (32 registers
#   per thread at 4 warps), a 64x32 tile of dY^T and of X is 4 KiB each in bf16, so 3 pipelined
#   stages use 24 KiB of shared memory; 32 is twice the minimum K (16) of an fp16/bf16 tensor-core
#   dot. Not yet measured on a GPU (no GPU was lent to the task that wrote it): it is the size
#   every shape gets until the sweep below pins a winner, and what the kernel launched before
#   tiles became selectable (Triton's defaults: 4 warps, 3 stages).
# * TILE_CANDIDATES: what ``bench/gpu/check.py`` sweeps on a GPU (wider C tiles reuse each dY^T
#   load for more columns; taller R tiles suit many selected rows; BLOCK_N 64 halves the loop
#   trips for long N; 8 warps / 4 stages for the big tiles). It writes the measured time of each
#   candidate per shape to ``row_grad_tiles.json``; a GPU session pins the winners in
#   MEASURED_TILES with the measured speed-up in a comment beside each entry.
# * INTERP_TILES 16x32x16: under the interpreter each program is numpy; small tiles keep its
#   temporaries small, and the tests' odd shapes still leave partly masked tiles.
DEFAULT_TILES = RowGradTiles(64, 64, 32, num_warps=4, num_stages=3)
INTERP_TILES = RowGradTiles(16, 32, 16, num_warps=4, num_stages=1)
TILE_CANDIDATES: tuple[RowGradTiles, ...] = (
    DEFAULT_TILES,
    RowGradTiles(64, 64, 32, num_warps=4, num_stages=4),
    RowGradTiles(64, 64, 64, num_warps=4, num_stages=3),
    RowGradTiles(64, 128, 32, num_warps=4, num_stages=3),
    RowGradTiles(128, 64, 32, num_warps=4, num_stages=3),
    RowGradTiles(128, 128, 32, num_warps=8, num_stages=3),
    RowGradTiles(64, 128, 64, num_warps=8, num_stages=3),
    RowGradTiles(32, 64, 32, num_warps=4, num_stages=4),
)
#: measured winners: ``(dtype name, tile_bucket(R), tile_bucket(C)) -> tiles``. Empty until a GPU
#: sweep (``bench/gpu/check.py``, ``row_grad_tiles.json``) measures one that beats DEFAULT_TILES;
#: write the measured time of both beside each entry.
MEASURED_TILES: dict[tuple[str, int, int], RowGradTiles] = {}


def tile_bucket(n: int) -> int:
    """The table's key for a size: the next power of two, at least 16 (the sweep's sizes fall in
    distinct buckets)."""
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def choose_tiles(R: int, C: int, dtype: torch.dtype, *, interpret: bool | None = None) -> RowGradTiles:
    """The tiles for ``R`` selected rows x ``C`` input features of ``dtype``: the interpreter's
    small tiles, else a measured winner from :data:`MEASURED_TILES`, else :data:`DEFAULT_TILES`."""
    if interpret_mode() if interpret is None else interpret:
        return INTERP_TILES
    key = (str(dtype).replace("torch.", ""), tile_bucket(R), tile_bucket(C))
    return MEASURED_TILES.get(key, DEFAULT_TILES)


def row_grad_reference(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """PyTorch reference: ``dY[:, rows]^T @ X`` in the accumulation dtype.

    Args:
        dy: ``[N, out]``; x: ``[N, in]``; rows: ``LongTensor [R]``.
    Returns:
        ``[R, in]`` in ``out_dtype`` (default: float32, float64 for float64 inputs).
    """
    return _reference(dy, x, _check_inputs(dy, x, rows), out_dtype)


def _reference(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor:
    acc = accumulation_dtype(dy.dtype)
    out = dy.index_select(1, rows).to(acc).t() @ x.to(acc)
    return out.to(out_dtype or acc)


def row_grad(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, out_dtype: torch.dtype | None = None,
             backend: Backend | None = "auto", out: torch.Tensor | None = None,
             tiles: RowGradTiles | None = None) -> torch.Tensor:
    """``dW_R = dY[:, rows]^T X`` (see module docstring).

    Args:
        dy: ``[N, out]`` output gradient; x: ``[N, in]`` input (same dtype and device).
        rows: ``LongTensor [R]`` output channels.
        out_dtype: result dtype (default: the accumulation dtype).
        backend: ``"auto"`` / ``"triton"`` / ``"torch"``.
        out: optional ``[R, in]`` tensor (accumulation dtype, row stride free, unit column
            stride) to write the result into.
        tiles: the launch configuration (default :func:`choose_tiles`; the GPU sweep passes
            each candidate).
    Returns:
        ``[R, in]`` (``out`` when given).
    """
    rows = _check_inputs(dy, x, rows)
    return _row_grad(dy, x, rows, out_dtype, backend, out, tiles)


def _check_inputs(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The checks of :func:`row_grad` and its reference (see :mod:`.checks`); returns ``rows``
    as int64 on ``dy``'s device."""
    checks.tensor("dy", dy, dims=2)
    checks.tensor("x", x, dims=2)
    if dy.shape[0] != x.shape[0]:
        raise ShapeError(f"row_grad expects dy [N, out] and x [N, in] with the same N (flatten batch and "
                         f"sequence first), got {tuple(dy.shape)} and {tuple(x.shape)}")
    if dy.dtype != x.dtype:
        raise ShapeError(f"dy and x must share a dtype, got {dy.dtype} and {x.dtype}; convert one of them")
    checks.same_device(dy=dy, x=x)
    checks.index("rows", rows, dy.shape[1], what="output channels of dy")
    return rows.to(device=dy.device, dtype=torch.long)


def _row_grad(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, out_dtype: torch.dtype | None,
              backend: Backend | None, out: torch.Tensor | None, tiles: RowGradTiles | None) -> torch.Tensor:
    """:func:`row_grad` on checked inputs (``rows`` int64 on ``dy``'s device, in range)."""
    N, C = x.shape
    R = rows.numel()
    acc = accumulation_dtype(dy.dtype)
    if out is not None:
        if (not isinstance(out, torch.Tensor) or tuple(out.shape) != (R, C) or out.dtype != acc
                or (C > 1 and out.stride(1) != 1) or out.device != dy.device):
            raise ShapeError(f"out must be [{R}, {C}] {acc} with unit column stride, got {tuple(out.shape)} "
                             f"{out.dtype} on {out.device}; allocate it like torch.empty(({R}, {C}), dtype={acc}, "
                             "device=dy.device)")
    if resolve_backend(dy.device, backend) == "torch":
        res = _reference(dy, x, rows, out_dtype)
        if out is None:
            return res
        out.copy_(res)
        return out
    if out is None:
        out = torch.empty((R, C), dtype=acc, device=dy.device)
    if R and C:
        if N == 0:
            out.zero_()
        else:
            t = tiles or choose_tiles(R, C, dy.dtype)
            grid = (triton.cdiv(R, t.block_r), triton.cdiv(C, t.block_c))
            upcast = dy.dtype == torch.float32 or (interpret_mode() and dy.dtype == torch.bfloat16)
            _row_grad_kernel()[grid](dy, x, rows, out, N, R, C, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
                                   out.stride(0), BLOCK_R=t.block_r, BLOCK_C=t.block_c, BLOCK_N=t.block_n,
                                   UPCAST=upcast, F64=acc == torch.float64, num_warps=t.num_warps,
                                   num_stages=t.num_stages)
    return out if out_dtype in (None, acc) else out.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------
class RowSelectiveProjection(torch.autograd.Function):
    """``Y = X W^T + b`` (or ``X W + b`` when ``transposed``) whose backward gives the selected
    rows' gradient to zero delta leaves instead of a dense ``dW``.

    ``forward(x [..., in], weight, bias | None, w_rows [R], b_rows [Rb] | None, delta_w [R, in],
    delta_b [Rb] | None, transposed: bool, backend: str) -> y [..., out]``

    ``delta_w`` / ``delta_b`` must be zero (they are not read); their gradients are ``dW_R``
    and ``db_R`` in their own dtype. ``x`` gets the dense input gradient; if ``weight`` or
    ``bias`` themselves require grad they get their dense gradients too (drop-in correctness).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, w_rows, b_rows, delta_w, delta_b, transposed, backend):
        w_rows, b_rows = _check_projection(x, weight, bias, w_rows, b_rows, delta_w, delta_b, transposed)
        # the same computation as the module's own forward (Linear / Conv1D), so outputs are unchanged
        if transposed:
            x2 = x.reshape(-1, x.shape[-1])
            y = (x2 @ weight if bias is None else torch.addmm(bias, x2, weight)).view(*x.shape[:-1], weight.shape[1])
        else:
            y = nn.functional.linear(x, weight, bias)
        ctx.save_for_backward(x, weight, w_rows, b_rows)
        ctx.transposed, ctx.backend = transposed, backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, w_rows, b_rows = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        need = ctx.needs_input_grad
        gx = gw = gb = gdw = gdb = None
        if need[0]:
            gx = (dy @ weight.t() if ctx.transposed else dy @ weight).view(x.shape)
        if need[1]:
            gw = x2.t() @ dy if ctx.transposed else dy.t() @ x2
        if need[2] and ctx.has_bias:
            gb = dy.sum(0)
        if need[5]:
            gdw = _row_grad(dy, x2, w_rows, None, ctx.backend, None, None)  # w_rows checked in forward
        if need[6] and b_rows is not None:
            gdb = dy.index_select(1, b_rows).sum(0, dtype=accumulation_dtype(dy.dtype))
        return gx, gw, gb, None, None, gdw, gdb, None, None


def _check_projection(x, weight, bias, w_rows, b_rows, delta_w, delta_b, transposed: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shapes, dtypes, devices and row ranges of :class:`RowSelectiveProjection`'s inputs;
    returns the row indices as int64 on the weight's device."""
    checks.tensor("weight", weight, dims=2)
    checks.tensor("x", x)
    in_f, out_f = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ShapeError(f"x has {x.shape[-1] if x.dim() else 0} features but the weight takes {in_f} "
                         f"(weight {tuple(weight.shape)}, transposed={transposed})")
    if x.dtype != weight.dtype:
        raise ShapeError(f"x is {x.dtype} but the weight is {weight.dtype}; run the module in its own dtype")
    checks.index("w_rows", w_rows, out_f, what="output channels of the weight")
    checks.tensor("delta_w", delta_w, dims=2)
    if tuple(delta_w.shape) != (w_rows.numel(), in_f):
        raise ShapeError(f"delta_w must be [{w_rows.numel()}, {in_f}] (rows x input features), got "
                         f"{tuple(delta_w.shape)}; make it with zero_delta")
    if bias is not None:
        checks.tensor("bias", bias, dims=1)
        if bias.shape[0] != out_f:
            raise ShapeError(f"bias has {bias.shape[0]} entries but the weight has {out_f} output channels")
    if b_rows is not None:
        if bias is None:
            raise ShapeError("b_rows given for a module without a bias; pass b_rows=None")
        checks.index("b_rows", b_rows, out_f, what="bias entries")
        checks.tensor("delta_b", delta_b, dims=1)
        if tuple(delta_b.shape) != (b_rows.numel(),):
            raise ShapeError(f"delta_b must be [{b_rows.numel()}] (one per bias row), got {tuple(delta_b.shape)}")
    elif delta_b is not None:
        raise ShapeError("delta_b given without b_rows; pass both or neither")
    checks.same_device(x=x, weight=weight, bias=bias, delta_w=delta_w, delta_b=delta_b)
    return (w_rows.to(weight.device, torch.long),
            None if b_rows is None else b_rows.to(weight.device, torch.long))


def zero_delta(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero leaf of ``shape`` that requires grad and occupies one element of memory (all
    strides 0): only its gradient matters."""
    return torch.zeros(1, dtype=dtype, device=device).as_strided(shape, (0,) * len(shape)).detach().requires_grad_()


@contextmanager
def row_selective(module: nn.Module, w_rows: torch.Tensor, b_rows: torch.Tensor | None,
                  delta_w: torch.Tensor, delta_b: torch.Tensor | None, *, transposed: bool,
                  backend: Backend | None = "auto") -> Iterator[None]:
    """Within the block, ``module`` (an ``nn.Linear``, or a ``Conv1D`` with ``transposed=True``)
    computes its output through :class:`RowSelectiveProjection`; forward hooks still run.

    Args:
        w_rows: ``LongTensor [R]`` output channels whose weight gradient ``delta_w`` receives.
        b_rows: ``LongTensor [Rb]`` bias entries for ``delta_b`` (``None``: no bias gradient).
        delta_w, delta_b: zero leaves (see :func:`zero_delta`), ``[R, in]`` and ``[Rb]``.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ShapeError(f"row_selective needs a module with a 2-D weight (nn.Linear, or Conv1D with "
                         f"transposed=True), got {type(module).__name__}")
    in_features = weight.shape[0] if transposed else weight.shape[1]
    probe = torch.empty((0, in_features), dtype=weight.dtype, device=weight.device)
    bias = getattr(module, "bias", None)
    w_rows, b_rows = _check_projection(probe, weight, bias, w_rows, b_rows, delta_w, delta_b, transposed)
    if "forward" in module.__dict__:
        raise StateError(f"{type(module).__name__} already has a patched forward; leave the enclosing "
                         "row_selective block (or remove the other patch) first")

    def forward(x):
        return RowSelectiveProjection.apply(x, module.weight, module.bias, w_rows, b_rows, delta_w, delta_b,
                                            transposed, backend)

    module.forward = forward
    try:
        yield
    finally:
        del module.forward
