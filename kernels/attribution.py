"""Gradient x activation attribution: one op, ``component_scores``.

Given an activation ``a`` and its gradient ``g``, both ``[N, n * w]`` (``N`` scored rows =
tokens, ``n`` components of ``w`` channels each: a head has ``w = head_dim``, an MLP neuron
``w = 1``), the score of component ``k`` at row ``r`` is

    s[r, k] = sum_{c < w} a[r, k*w + c] * g[r, k*w + c]          (optionally |s[r, k]|)

and the op returns either ``s * weights[:, None]`` (``[N, n]``, ``per_row=True``) or
``sum_r weights[r] * s[r, k]`` (``[n]``). Accumulation is fp32 for bf16 / fp16 / fp32 inputs
and fp64 for fp64 inputs (``dispatch.accumulation_dtype``); the result has that dtype.

Pieces (Liger-Kernel style):

* ``_component_scores_kernel``: the Triton kernel (decorated lazily, see ``dispatch.jit_lazily``);
* :func:`launch_component_scores`: its launcher, writing every element of a caller-given output;
* :func:`component_scores_reference`: the PyTorch reference (and the CPU path for users);
* :func:`component_scores`: the thin layer callers use (dispatch + validation);
* :class:`AttributionTap`: an identity ``autograd.Function`` placed on an activation in forward;
  in backward it scores the saved rows against the incoming gradient the moment it exists and
  hands the scores to a sink, so no activation gradient is ever stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import checks
from .dispatch import (Backend, accumulation_dtype, jit_lazily, num_programs_hint,  # pins TRITON_INTERPRET first
                       resolve_backend)
from .errors import ShapeError

try:  # guarded: CPU users without triton still get the PyTorch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

SUPPORTED_DTYPES = checks.FLOAT_DTYPES

# Block sizes (why each):
# * BLOCK_W = next_power_of_2(w): one component's channels lie in one tile row, so the reduction
#   over channels happens in registers (head_dim 64/128/256 need no mask; 1 for neurons).
# * BLOCK_K = TILE_CHANNELS // BLOCK_W components per program: every row of a tile then reads
#   256 contiguous channels (512 B in bf16), whole 128-byte segments, coalesced.
# * BLOCK_R = TILE_ELEMS // (BLOCK_K * BLOCK_W) rows: a 4096-element tile per operand keeps two
#   operands in registers (4 warps x 32 threads x 32 values each) without spilling.
TILE_CHANNELS = 256
TILE_ELEMS = 4096
# PyTorch reference: rows per chunk so that one chunk holds <= 2**20 elements (4 MiB in fp32)
REF_CHUNK_ELEMS = 1 << 20


def _component_scores_kernel_src(
    A, G, W, OUT,
    n_rows, n_comp, width,
    stride_a, stride_g,
    rows_per_program,
    HAS_WEIGHTS: tl.constexpr, ABSOLUTE: tl.constexpr, PER_ROW: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Program ``(pk, pr)`` scores components ``[pk*BLOCK_K, (pk+1)*BLOCK_K)`` over rows
    ``[pr*rows_per_program, (pr+1)*rows_per_program)``. ``PER_ROW``: writes ``OUT[r, k]``;
    otherwise writes one partial sum per program, ``OUT[pr, k]``."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_W)
    col = offs_k[:, None] * width + offs_w[None, :]  # [K, W] channel of each element
    col_ok = (offs_k[:, None] < n_comp) & (offs_w[None, :] < width)
    k_ok = offs_k < n_comp
    if ACC_FP64:
        acc = tl.zeros([BLOCK_K], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    r_lo = pid_r * rows_per_program
    r_hi = tl.minimum(r_lo + rows_per_program, n_rows)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        row_ok = offs_r < r_hi
        rows64 = offs_r.to(tl.int64)  # row * stride can pass 2**31 for long sequences
        m3 = row_ok[:, None, None] & col_ok[None, :, :]
        a = tl.load(A + rows64[:, None, None] * stride_a + col[None, :, :], mask=m3, other=0.0)
        g = tl.load(G + rows64[:, None, None] * stride_g + col[None, :, :], mask=m3, other=0.0)
        if ACC_FP64:
            s = tl.sum(a.to(tl.float64) * g.to(tl.float64), axis=2)  # [R, K]
        else:
            s = tl.sum(a.to(tl.float32) * g.to(tl.float32), axis=2)
        if ABSOLUTE:
            s = tl.abs(s)
        if HAS_WEIGHTS:
            w = tl.load(W + offs_r, mask=row_ok, other=0.0)
            s = s * w[:, None]
        if PER_ROW:
            tl.store(OUT + rows64[:, None] * n_comp + offs_k[None, :], s, mask=row_ok[:, None] & k_ok[None, :])
        else:
            acc += tl.sum(s, axis=0)
    if not PER_ROW:
        tl.store(OUT + pid_r * n_comp + offs_k, acc, mask=k_ok)


_kernel = jit_lazily(_component_scores_kernel_src) if triton is not None else None


@dataclass(frozen=True)
class LaunchPlan:
    """Grid and block sizes for one launch (see the block-size notes above)."""

    block_r: int
    block_k: int
    block_w: int
    grid_k: int
    grid_r: int
    rows_per_program: int


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def plan_launch(n_rows: int, n_comp: int, width: int, per_row: bool, device: torch.device,
                programs: int | None = None) -> LaunchPlan:
    """Block sizes and grid. ``per_row``: one program per ``BLOCK_R`` rows. Otherwise rows
    are split across enough programs to fill the device (``programs``, default
    :func:`num_programs_hint`), each writing a partial sum reduced afterwards."""
    block_w = _next_pow2(width)
    block_k = max(1, min(_next_pow2(n_comp), TILE_CHANNELS // block_w))
    block_r = max(1, min(_next_pow2(max(n_rows, 1)), TILE_ELEMS // (block_k * block_w)))
    grid_k = -(-n_comp // block_k)
    row_blocks = max(1, -(-n_rows // block_r))
    if per_row:
        return LaunchPlan(block_r, block_k, block_w, grid_k, row_blocks, block_r)
    want = programs if programs is not None else num_programs_hint(device)
    grid_r = max(1, min(row_blocks, -(-want // grid_k)))
    rows_per_program = -(-row_blocks // grid_r) * block_r
    grid_r = max(1, -(-n_rows // rows_per_program))
    return LaunchPlan(block_r, block_k, block_w, grid_k, grid_r, rows_per_program)


def launch_component_scores(act: torch.Tensor, grad: torch.Tensor, weights: torch.Tensor | None,
                            out: torch.Tensor, n_comp: int, width: int, plan: LaunchPlan, *,
                            absolute: bool = False, per_row: bool = False) -> torch.Tensor:
    """Run the Triton kernel; writes every element of ``out``.

    Args:
        act, grad: ``[N, n_comp * width]`` with unit channel stride (any row stride).
        weights: ``[N]`` in the accumulation dtype, or ``None``.
        out: ``[N, n_comp]`` (``per_row``) or ``[plan.grid_r, n_comp]`` partial sums, contiguous,
            accumulation dtype.
    """
    _check(act, grad, n_comp, width, weights)
    n_rows = act.shape[0]
    acc = accumulation_dtype(act.dtype)
    checks.tensor("out", out, dims=2)
    checks.same_device(act=act, out=out)
    if out.dtype != acc:
        raise ShapeError(f"out must be in the accumulation dtype {acc} for {act.dtype} inputs, got {out.dtype}")
    want = (n_rows if per_row else plan.grid_r, n_comp)
    if tuple(out.shape) != want or not out.is_contiguous():
        raise ShapeError(f"out must be a contiguous {list(want)} tensor ({'rows' if per_row else 'plan.grid_r'} x "
                         f"components), got {tuple(out.shape)}{'' if out.is_contiguous() else ' (not contiguous)'}")
    if act.stride(1) != 1 or grad.stride(1) != 1:
        raise ShapeError("act and grad need unit channel stride for the kernel; pass .contiguous() copies")
    if weights is not None and not weights.is_contiguous():
        raise ShapeError("weights must be contiguous for the kernel (it reads them with unit stride); pass "
                         "weights.contiguous()")
    _kernel()[(plan.grid_k, plan.grid_r)](
        act, grad, weights if weights is not None else out, out,
        n_rows, n_comp, width,
        act.stride(0), grad.stride(0),
        plan.rows_per_program,
        HAS_WEIGHTS=weights is not None, ABSOLUTE=absolute, PER_ROW=per_row, ACC_FP64=acc == torch.float64,
        BLOCK_R=plan.block_r, BLOCK_K=plan.block_k, BLOCK_W=plan.block_w,
    )
    return out


def component_scores_reference(act: torch.Tensor, grad: torch.Tensor, n_comp: int, width: int,
                               weights: torch.Tensor | None = None, *, absolute: bool = False,
                               per_row: bool = False) -> torch.Tensor:
    """PyTorch reference: ``[N, n]`` (``per_row``) or ``[n]``, in the accumulation dtype.

    Rows are processed in chunks of at most ``REF_CHUNK_ELEMS`` elements, so the fp32
    temporaries stay bounded (a few MiB) however many rows are scored."""
    _check(act, grad, n_comp, width, weights)
    acc = accumulation_dtype(act.dtype)
    n_rows = act.shape[0]
    step = max(1, REF_CHUNK_ELEMS // max(1, n_comp * width))
    out = torch.empty((n_rows, n_comp) if per_row else (n_comp,), dtype=acc, device=act.device)
    if not per_row:
        out.zero_()
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        s = (act[r0:r1].to(acc) * grad[r0:r1].to(acc)).view(r1 - r0, n_comp, width).sum(-1)
        if absolute:
            s = s.abs()
        if weights is not None:
            s = s * weights[r0:r1].to(acc)[:, None]
        if per_row:
            out[r0:r1] = s
        else:
            out += s.sum(0)
    return out


def _check(act: torch.Tensor, grad: torch.Tensor, n_comp: int, width: int, weights: torch.Tensor | None) -> None:
    """What every entry point of this op checks before it computes (see :mod:`.checks`)."""
    checks.tensor("act", act, dims=2)
    checks.tensor("grad", grad)
    checks.positive("n_comp", n_comp)
    checks.positive("width", width)
    if grad.shape != act.shape:
        raise ShapeError(f"component_scores needs act and grad of the same shape [N, n*w]; got "
                         f"{tuple(act.shape)} and {tuple(grad.shape)}")
    if act.shape[1] != n_comp * width:
        raise ShapeError(f"act has {act.shape[1]} channels but n_comp * width = {n_comp} * {width}; "
                         "pass the component count and width of the tapped channels")
    if weights is not None:
        checks.tensor("weights", weights)
        if tuple(weights.shape) != (act.shape[0],):
            raise ShapeError(f"weights must be [N] = [{act.shape[0]}] (one per row), got {tuple(weights.shape)}")
    checks.same_device(act=act, grad=grad, weights=weights)


def component_scores(act: torch.Tensor, grad: torch.Tensor, n_comp: int, width: int,
                     weights: torch.Tensor | None = None, *, absolute: bool = False,
                     per_row: bool = False, backend: Backend | None = None) -> torch.Tensor:
    """Per-component ``activation x gradient`` scores (see the module docstring).

    Args:
        act, grad: ``[N, n_comp * width]`` (bf16, fp16, fp32 or fp64; channel stride 1 is
            used as is, other layouts are copied).
        weights: optional ``[N]`` row weights (a 0/1 position mask or real weights).
        absolute: take ``|s[r, k]|`` before weighting and summing over rows.
        per_row: return ``[N, n_comp]`` instead of the sum over rows ``[n_comp]``.
        backend: ``None``/``"auto"``, ``"torch"`` or ``"triton"`` (see ``dispatch``).
    Returns:
        fp32 (fp64 for fp64 inputs) ``[N, n_comp]`` or ``[n_comp]``.
    """
    _check(act, grad, n_comp, width, weights)
    acc = accumulation_dtype(act.dtype)
    if resolve_backend(act.device, backend) == "torch":
        return component_scores_reference(act, grad, n_comp, width, weights, absolute=absolute, per_row=per_row)
    n_rows = act.shape[0]
    if act.stride(1) != 1:
        act = act.contiguous()
    if grad.stride(1) != 1:
        grad = grad.contiguous()
    w = weights.to(device=act.device, dtype=acc).contiguous() if weights is not None else None
    if n_rows == 0:
        return torch.zeros((0, n_comp) if per_row else (n_comp,), dtype=acc, device=act.device)
    plan = plan_launch(n_rows, n_comp, width, per_row, act.device)
    if per_row:
        out = torch.empty((n_rows, n_comp), dtype=acc, device=act.device)
        return launch_component_scores(act, grad, w, out, n_comp, width, plan, absolute=absolute, per_row=True)
    partial = torch.empty((plan.grid_r, n_comp), dtype=acc, device=act.device)
    launch_component_scores(act, grad, w, partial, n_comp, width, plan, absolute=absolute, per_row=False)
    return partial[0] if plan.grid_r == 1 else partial.sum(0)


# ---- in backward ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """Components ``[start, start + n*width)`` of the tapped tensor's last dimension."""

    start: int
    n: int
    width: int

    @property
    def stop(self) -> int:
        return self.start + self.n * self.width


@dataclass
class TapSpec:
    """What one :class:`AttributionTap` scores.

    Attributes:
        rows: ``(b_index, t_index)`` LongTensors ``[N_sel]`` of the scored positions of the
            ``[B, T, C]`` activation, or ``None`` for every position.
        weights: ``[N_sel]`` (or ``[B*T]`` when ``rows`` is ``None``) row weights, or ``None``.
        segments: the component groups to score.
        sink: ``sink(i, scores)`` receives segment ``i``'s scores (``[n]``, or ``[N_sel, n]``
            with ``per_row``) once per backward.
    """

    rows: tuple[torch.Tensor, torch.Tensor] | None
    weights: torch.Tensor | None
    segments: Sequence[Segment]
    sink: Callable[[int, torch.Tensor], None]
    absolute: bool = False
    per_row: bool = False
    backend: Backend | None = None


def _rows_of(x: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor] | None, lo: int, hi: int) -> torch.Tensor:
    """``x [B, T, C]`` at the scored rows, channels ``[lo, hi)``: ``[N_sel, hi - lo]`` (a view
    when every row is scored and the layout allows it; a small copy otherwise)."""
    if rows is None:
        return x.reshape(-1, x.shape[-1])[:, lo:hi]
    return x[rows[0], rows[1], lo:hi]


class AttributionTap(torch.autograd.Function):
    """Identity on ``x [B, T, C]``; in backward, scores ``spec.segments`` of ``x`` against the
    incoming gradient at ``spec.rows`` and passes the gradient through unchanged.

    Only ``x`` at the scored rows is kept (a copy of ``N_sel`` rows; all rows are a view of
    ``x`` itself, saved with ``save_for_backward`` so in-place changes are detected).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: TapSpec) -> torch.Tensor:  # type: ignore[override]
        _check_spec(x, spec)
        lo = min(s.start for s in spec.segments)
        hi = max(s.stop for s in spec.segments)
        ctx.spec, ctx.lo, ctx.hi = spec, lo, hi
        ctx.save_for_backward(_rows_of(x, spec.rows, lo, hi))
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        spec: TapSpec = ctx.spec
        g_rows = _rows_of(grad, spec.rows, ctx.lo, ctx.hi)
        for i, seg in enumerate(spec.segments):
            a = saved[:, seg.start - ctx.lo : seg.stop - ctx.lo]
            g = g_rows[:, seg.start - ctx.lo : seg.stop - ctx.lo]
            spec.sink(i, component_scores(a, g, seg.n, seg.width, spec.weights, absolute=spec.absolute,
                                          per_row=spec.per_row, backend=spec.backend))
        return grad, None


def _check_spec(x: torch.Tensor, spec: TapSpec) -> None:
    """The tap's inputs fit ``x [B, T, C]``: segments inside ``C``, scored rows inside ``[B, T]``,
    one weight per scored row (checked in forward, before anything is saved)."""
    checks.tensor("x", x, dims=3)
    B, T, C = x.shape
    if not spec.segments:
        raise ShapeError("TapSpec.segments is empty: give at least one Segment to score")
    for i, seg in enumerate(spec.segments):
        checks.positive(f"segments[{i}].n", seg.n)
        checks.positive(f"segments[{i}].width", seg.width)
        if seg.start < 0 or seg.stop > C:
            raise ShapeError(f"segments[{i}] covers channels [{seg.start}, {seg.stop}) but the tapped tensor has "
                             f"{C}; pass segments inside [0, {C})")
    n_sel = B * T
    if spec.rows is not None:
        b_idx, t_idx = spec.rows
        checks.index("rows[0] (batch index)", b_idx, B, what="batch")
        checks.index("rows[1] (position index)", t_idx, T, what="sequence")
        if b_idx.shape != t_idx.shape:
            raise ShapeError(f"rows[0] and rows[1] must have one length, got {tuple(b_idx.shape)} and "
                             f"{tuple(t_idx.shape)}")
        checks.same_device(x=x, rows_b=b_idx, rows_t=t_idx)
        n_sel = b_idx.numel()
    if spec.weights is not None:
        checks.tensor("weights", spec.weights)
        if tuple(spec.weights.shape) != (n_sel,):
            raise ShapeError(f"weights must be [{n_sel}] (one per scored row), got {tuple(spec.weights.shape)}")
        checks.same_device(x=x, weights=spec.weights)


def tap(x: torch.Tensor, spec: TapSpec) -> torch.Tensor:
    """Apply :class:`AttributionTap` (returns ``x`` unchanged, attached to the graph)."""
    return AttributionTap.apply(x, spec)
