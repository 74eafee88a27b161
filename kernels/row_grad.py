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
from typing import Iterator

import torch
from torch import nn

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


# Tiles: 64x64 outputs per program keep a tile of dY^T and of X (64x32 each) in registers/shared
# memory on GPU with room to pipeline; the N loop runs in steps of 32 (the minimum K for fp16
# tensor-core dot is 16). Under the interpreter smaller tiles keep numpy temporaries small.
_GPU_BLOCKS = (64, 64, 32)
_INTERP_BLOCKS = (16, 32, 16)


def row_grad_reference(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """PyTorch reference: ``dY[:, rows]^T @ X`` in the accumulation dtype.

    Args:
        dy: ``[N, out]``; x: ``[N, in]``; rows: ``LongTensor [R]``.
    Returns:
        ``[R, in]`` in ``out_dtype`` (default: float32, float64 for float64 inputs).
    """
    acc = accumulation_dtype(dy.dtype)
    out = dy.index_select(1, rows).to(acc).t() @ x.to(acc)
    return out.to(out_dtype or acc)


def row_grad(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, out_dtype: torch.dtype | None = None,
             backend: Backend | None = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """``dW_R = dY[:, rows]^T X`` (see module docstring).

    Args:
        dy: ``[N, out]`` output gradient; x: ``[N, in]`` input (same dtype and device).
        rows: ``LongTensor [R]`` output channels.
        out_dtype: result dtype (default: the accumulation dtype).
        backend: ``"auto"`` / ``"triton"`` / ``"torch"``.
        out: optional ``[R, in]`` tensor (accumulation dtype, row stride free, unit column
            stride) to write the result into.
    Returns:
        ``[R, in]`` (``out`` when given).
    """
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ShapeError(f"row_grad expects dy [N, out] and x [N, in] with the same N (flatten batch and "
                         f"sequence first), got {tuple(dy.shape)} and {tuple(x.shape)}")
    if dy.dtype != x.dtype:
        raise ShapeError(f"dy and x must share a dtype, got {dy.dtype} and {x.dtype}; convert one of them")
    rows = rows.to(device=dy.device, dtype=torch.long)
    N, C = x.shape
    R = rows.numel()
    acc = accumulation_dtype(dy.dtype)
    if out is not None:
        if tuple(out.shape) != (R, C) or out.dtype != acc or (C > 1 and out.stride(1) != 1):
            raise ShapeError(f"out must be [{R}, {C}] {acc} with unit column stride, got {tuple(out.shape)} "
                             f"{out.dtype}; allocate it like torch.empty(({R}, {C}), dtype={acc})")
    if resolve_backend(dy.device, backend) == "torch":
        res = row_grad_reference(dy, x, rows, out_dtype)
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
            br, bc, bn = _INTERP_BLOCKS if interpret_mode() else _GPU_BLOCKS
            grid = (triton.cdiv(R, br), triton.cdiv(C, bc))
            upcast = dy.dtype == torch.float32 or (interpret_mode() and dy.dtype == torch.bfloat16)
            _row_grad_kernel()[grid](dy, x, rows, out, N, R, C, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
                                   out.stride(0), BLOCK_R=br, BLOCK_C=bc, BLOCK_N=bn,
                                   UPCAST=upcast, F64=acc == torch.float64)
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
            gdw = row_grad(dy, x2, w_rows, backend=ctx.backend)
        if need[6] and b_rows is not None:
            gdb = dy.index_select(1, b_rows).sum(0, dtype=accumulation_dtype(dy.dtype))
        return gx, gw, gb, None, None, gdw, gdb, None, None


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
    if tuple(delta_w.shape) != (w_rows.numel(), in_features):
        raise ShapeError(f"delta_w must be [{w_rows.numel()}, {in_features}] (rows x input features), got "
                         f"{tuple(delta_w.shape)}; make it with zero_delta")
    w_rows = w_rows.to(weight.device)
    b_rows = None if b_rows is None else b_rows.to(weight.device)
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
