"""Row-sparse SGD and AdamW: optimizer state only for the selected rows, one launch per step.

Stage 3 of CCA (METHOD section 3) changes a few rows of a few projection weights. This optimizer
keeps every piece of state (gradient accumulator, fp32 master rows for fp16/bf16 weights, AdamW
moments, SGD momentum) *packed*: the selected rows of every parameter laid end to end in one flat
buffer per state, so its memory is exactly ``selected rows x row length`` elements per state.

Packed layout. A :class:`RowSpec` selects rows ``index [R]`` of a parameter along ``dim``:

* ``dim == 0`` of a 2-D weight ``[out, in]`` (``nn.Linear``): packed row ``r`` is ``W[index[r], :]``
  (``C = in`` elements);
* ``dim == 1`` of a 2-D weight ``[in, out]`` (GPT-2 ``Conv1D``): packed row ``r`` is the column
  ``W[:, index[r]]`` (``C = in`` elements, strided in memory);
* a 1-D parameter (bias): packed element ``r`` is ``b[index[r]]`` (``C = 1``).

The packed block of a parameter is ``[R, C]`` (``[R]`` for 1-D) at an offset of the flat buffer;
:meth:`RowSparseOptimizer.grad_view` returns that view, so a gradient can be written (or
accumulated by autograd) straight into the packed buffer.

One launch per step. The work is cut into *chunks*: at most ``BLOCK`` elements of one parameter
that are evenly strided in memory and contiguous in the packed buffer (a run of adjacent rows of a
contiguous weight is one long segment; a ``Conv1D`` column or an isolated row is its own segment).
A table ``int64 [n_chunks, 4] = (param offset, param stride, length, packed offset)`` drives one
program per chunk, for every selected row of every parameter of a (device, dtype) group at once.
Triton's interpreter cannot turn integers into pointers, so the parameter address is expressed as
an element offset from one *anchor* parameter of the group (``(p.data_ptr() - anchor.data_ptr()) /
itemsize``, checked to be exact); all tensors of a group share device and dtype, so this is plain
64-bit pointer arithmetic in both the compiled and the interpreted kernel.

Rows outside the selection are never addressed: they stay bit-identical.

Math (per element, in the compute dtype ``dispatch.accumulation_dtype``: float32, or float64 for
float64 parameters), matching
``torch.optim`` (single-tensor implementation):

* SGD: ``d = g + wd * w``; with momentum ``buf = d`` on the first step, else
  ``buf = mu * buf + (1 - dampening) * d``; ``d = d + mu * buf`` (Nesterov) or ``d = buf``;
  ``w = w - lr * d``.
* AdamW: ``w = w * (1 - lr * wd)``; ``m = m + (1 - b1) * (g - m)``; ``v = b2 * v + (1 - b2) * g * g``;
  ``w = w - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)`` with ``bc_i = 1 - b_i ** t``.

Backends (``kernels.dispatch`` rules): ``"triton"`` (one launch per group), ``"torch"`` (the
reference: per-parameter gather, the same math with torch ops, ``index_copy_`` back), ``"auto"``
(Triton on CUDA, and on CPU under ``TRITON_INTERPRET=1``; PyTorch otherwise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Union

import torch

from . import checks
from .dispatch import Backend, accumulation_dtype, interpret_mode, jit_lazily, resolve_backend
from .errors import ConfigError, ShapeError, StateError

try:  # Triton is optional: CPU users without it get the PyTorch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

# 1024 elements per program: a whole 1024-wide row (or a quarter of a 4096-wide one) per program,
# 4 fp32 vectors per thread at 8 warps; large enough to amortise the 4 table loads per program,
# small enough that the last, partly masked chunk of a row wastes little.
DEFAULT_BLOCK = 1024
_TABLE_COLS = 4  # param offset, param stride, length, packed offset


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SGDConfig:
    """``torch.optim.SGD`` hyper-parameters (no ``maximize``). Paper default: plain GD, lr 1e-4."""

    lr: float = 1e-4
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        if self.lr < 0 or self.momentum < 0 or self.weight_decay < 0:
            raise ConfigError(f"SGD lr, momentum and weight_decay must be >= 0: {self}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ConfigError("Nesterov momentum requires momentum > 0 and dampening = 0 "
                              f"(got momentum={self.momentum}, dampening={self.dampening}); set both or "
                              "use nesterov=False")


@dataclass(frozen=True)
class AdamWConfig:
    """``torch.optim.AdamW`` hyper-parameters (decoupled weight decay, bias correction)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01

    def __post_init__(self):
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or self.lr < 0 or self.eps < 0 or self.weight_decay < 0:
            raise ConfigError(f"invalid AdamW hyper-parameters: {self}; need 0 <= betas < 1 and lr, eps, "
                              "weight_decay >= 0")


OptimConfig = Union[SGDConfig, AdamWConfig]


@dataclass(frozen=True)
class RowSpec:
    """Rows ``index`` (``LongTensor [R]``, unique) of parameter ``param`` along ``dim``."""

    name: str
    param: torch.Tensor
    dim: int
    index: torch.Tensor


def packed_shape(param: torch.Tensor, dim: int, n_rows: int) -> tuple[int, ...]:
    """Shape of the packed block of ``n_rows`` rows of ``param`` along ``dim``: ``[R, C]`` for a
    2-D parameter (``C`` = the other dimension), ``[R]`` for a 1-D one."""
    if param.dim() == 1:
        if dim != 0:
            raise ShapeError(f"a 1-D parameter has rows along dim 0 only, got dim {dim}; pass dim=0")
        return (n_rows,)
    if param.dim() != 2 or dim not in (0, 1):
        raise ShapeError(f"row selection needs a 1-D or 2-D parameter and dim 0/1, got {tuple(param.shape)}, "
                         f"dim {dim}")
    return (n_rows, param.shape[1 - dim])


def _check_rows_of(param: torch.Tensor, dim: int, index: torch.Tensor, name: str = "param") -> tuple[int, ...]:
    """``param`` is a 1-D / 2-D float tensor, ``dim`` one of its dimensions and ``index`` rows
    inside it; returns the packed shape."""
    checks.tensor(name, param, dims=(1, 2))
    shape = packed_shape(param, dim, index.numel() if isinstance(index, torch.Tensor) else 0)
    checks.index(f"{name}: index", index, param.shape[dim], what=f"dimension {dim} of shape {tuple(param.shape)}")
    return shape


def gather_rows(param: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """The selected rows of ``param`` in packed layout (a new tensor, ``param``'s dtype)."""
    _check_rows_of(param, dim, index)
    rows = param.detach().index_select(dim, index.to(param.device))
    return rows.t().contiguous() if (param.dim() == 2 and dim == 1) else rows


def scatter_rows(param: torch.Tensor, dim: int, index: torch.Tensor, rows: torch.Tensor) -> None:
    """Write packed ``rows`` into ``param`` (in place, no autograd); other rows untouched."""
    shape = _check_rows_of(param, dim, index)
    checks.tensor("rows", rows)
    if tuple(rows.shape) != shape:
        raise ShapeError(f"rows must have the packed shape {list(shape)} for {index.numel()} rows of "
                         f"{tuple(param.shape)} along dim {dim}, got {tuple(rows.shape)}")
    src = rows.t() if (param.dim() == 2 and dim == 1) else rows
    with torch.no_grad():
        param.index_copy_(dim, index.to(param.device), src.to(param.dtype))


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
# Both kernels: one program per chunk of the table (param offset, param stride, length, packed
# offset), all int64; ``anchor`` is the group's first parameter, every parameter address is an
# element offset from it. ``RTNE_BF16``: round fp32 -> bf16 to nearest even by hand (Triton's
# interpreter truncates that conversion; compiled Triton rounds to nearest even by default).
# ``UNIT_STRIDE`` (every chunk contiguous) and ``ALIGNED`` (offsets and lengths multiples of 16) are
# checked on the host; they only let the compiler emit wide vector loads and stores.
# What the two kernels share (finding the chunk, loading the weight, writing it back) lives in
# the ``_chunk_*`` helpers below: plain functions here, ``@triton.jit`` functions once a kernel is
# first used (``dispatch.jit_lazily(..., helpers=...)`` binds them under these names).
def _chunk_pointers(anchor_ptr, table_ptr, UNIT_STRIDE: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK: tl.constexpr):
    """This program's chunk: ``(pptr, k, mask)``, the parameter element pointers, the packed
    offsets (into grad / master / state buffers) and the in-chunk mask."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * 4
    p_off = tl.load(row)
    p_stride = tl.load(row + 1)
    n = tl.load(row + 2)
    k_off = tl.load(row + 3)
    if ALIGNED:  # offsets and lengths are multiples of 16 elements: lets the compiler vectorise
        p_off = tl.multiple_of(p_off, 16)
        k_off = tl.multiple_of(k_off, 16)
        n = tl.multiple_of(n, 16)
    j = tl.arange(0, BLOCK).to(tl.int64)
    mask = j < n
    k = k_off + j
    if UNIT_STRIDE:  # contiguous rows (nn.Linear): keep the contiguity visible to the compiler
        pptr = anchor_ptr + p_off + j
    else:  # Conv1D columns: strided
        pptr = anchor_ptr + p_off + j * p_stride
    return pptr, k, mask


def _chunk_load(pptr, grad_ptr, master_ptr, k, mask, HAS_MASTER: tl.constexpr):
    """``(g, w)``: the gradient and the weight (fp32 master rows, or the parameter converted to
    the compute dtype) of this chunk."""
    g = tl.load(grad_ptr + k, mask=mask, other=0.0)
    if HAS_MASTER:
        w = tl.load(master_ptr + k, mask=mask, other=0.0)
    else:
        w = tl.load(pptr, mask=mask, other=0.0).to(g.dtype)
    return g, w


def _chunk_store(anchor_ptr, pptr, master_ptr, k, w, mask, HAS_MASTER: tl.constexpr, RTNE_BF16: tl.constexpr):
    """Write the updated weight ``w``: into the master rows, and rounded into the parameter."""
    if HAS_MASTER:
        tl.store(master_ptr + k, w, mask=mask)
    if RTNE_BF16:
        b = w.to(tl.uint32, bitcast=True)
        b = b + (((b >> 16) & 1) + 0x7FFF)
        tl.store(pptr, (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(pptr, w.to(anchor_ptr.dtype.element_ty), mask=mask)


def _sparse_sgd_kernel_src(anchor_ptr, table_ptr, grad_ptr, master_ptr, buf_ptr, hp_ptr,
                           HAS_MASTER: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                           RTNE_BF16: tl.constexpr, UNIT_STRIDE: tl.constexpr, ALIGNED: tl.constexpr,
                           BLOCK: tl.constexpr):
    pptr, k, mask = _chunk_pointers(anchor_ptr, table_ptr, UNIT_STRIDE, ALIGNED, BLOCK)
    lr = tl.load(hp_ptr)
    mu = tl.load(hp_ptr + 1)
    damp = tl.load(hp_ptr + 2)
    wd = tl.load(hp_ptr + 3)
    first = tl.load(hp_ptr + 4)
    g, w = _chunk_load(pptr, grad_ptr, master_ptr, k, mask, HAS_MASTER)
    d = g + wd * w
    if HAS_MOMENTUM:
        buf = tl.load(buf_ptr + k, mask=mask, other=0.0)
        buf = tl.where(first != 0, d, mu * buf + (1.0 - damp) * d)
        tl.store(buf_ptr + k, buf, mask=mask)
        if NESTEROV:
            d = d + mu * buf
        else:
            d = buf
    w = w - lr * d
    _chunk_store(anchor_ptr, pptr, master_ptr, k, w, mask, HAS_MASTER, RTNE_BF16)


def _sparse_adamw_kernel_src(anchor_ptr, table_ptr, grad_ptr, master_ptr, m_ptr, v_ptr, hp_ptr,
                             HAS_MASTER: tl.constexpr, RTNE_BF16: tl.constexpr, UNIT_STRIDE: tl.constexpr,
                             ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pptr, k, mask = _chunk_pointers(anchor_ptr, table_ptr, UNIT_STRIDE, ALIGNED, BLOCK)
    lr = tl.load(hp_ptr)
    beta1 = tl.load(hp_ptr + 1)
    beta2 = tl.load(hp_ptr + 2)
    eps = tl.load(hp_ptr + 3)
    wd = tl.load(hp_ptr + 4)
    step_size = tl.load(hp_ptr + 5)  # lr / (1 - beta1 ** t)
    bc2_sqrt = tl.load(hp_ptr + 6)  # sqrt(1 - beta2 ** t)
    g, w = _chunk_load(pptr, grad_ptr, master_ptr, k, mask, HAS_MASTER)
    m = tl.load(m_ptr + k, mask=mask, other=0.0)
    v = tl.load(v_ptr + k, mask=mask, other=0.0)
    w = w * (1.0 - lr * wd)
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    w = w - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    tl.store(m_ptr + k, m, mask=mask)
    tl.store(v_ptr + k, v, mask=mask)
    _chunk_store(anchor_ptr, pptr, master_ptr, k, w, mask, HAS_MASTER, RTNE_BF16)


_CHUNK_HELPERS = (_chunk_pointers, _chunk_load, _chunk_store)
_sparse_sgd_kernel = jit_lazily(_sparse_sgd_kernel_src, _CHUNK_HELPERS) if triton is not None else None
_sparse_adamw_kernel = jit_lazily(_sparse_adamw_kernel_src, _CHUNK_HELPERS) if triton is not None else None


# ---------------------------------------------------------------------------------------------
# packed layout
# ---------------------------------------------------------------------------------------------
@dataclass
class PackedParam:
    """One parameter's place in its group's packed buffers."""

    name: str
    param: torch.Tensor
    dim: int
    index: torch.Tensor  # LongTensor [R] on the parameter's device
    offset: int  # first element in the packed buffers
    shape: tuple[int, ...]  # packed shape [R, C] or [R]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset : self.offset + self.numel].view(self.shape)


def _segments(p: PackedParam) -> list[tuple[int, int, int, int]]:
    """``(element offset in p, element stride, length, packed offset)`` runs covering p's rows."""
    param, idx = p.param, p.index.tolist()
    out: list[tuple[int, int, int, int]] = []
    if param.dim() == 1:
        s0, C = param.stride(0), 1
        row_stride, col_stride, mergeable = s0, 0, True
    else:
        C = param.shape[1 - p.dim]
        row_stride, col_stride = param.stride(p.dim), param.stride(1 - p.dim)
        mergeable = col_stride == 1 and row_stride == C  # adjacent rows are adjacent in memory
    r = 0
    while r < len(idx):
        run = 1
        if mergeable:
            while r + run < len(idx) and idx[r + run] == idx[r] + run:
                run += 1
        if param.dim() == 1:
            out.append((idx[r] * row_stride, row_stride, run, p.offset + r))
        elif mergeable:
            out.append((idx[r] * row_stride, 1, run * C, p.offset + r * C))
        else:
            out.append((idx[r] * row_stride, col_stride, C, p.offset + r * C))
        r += run
    return out


def build_chunk_table(params: list[PackedParam], anchor: torch.Tensor, block: int) -> torch.Tensor:
    """``int64 [n_chunks, 4]`` (see module docstring) on the CPU."""
    item = anchor.element_size()
    rows: list[tuple[int, int, int, int]] = []
    for p in params:
        delta = p.param.data_ptr() - anchor.data_ptr()
        if delta % item:
            raise StateError(f"{p.name}: storage not aligned to its element size, so it cannot be addressed "
                             "from the anchor parameter's; make it a separate, aligned tensor (e.g. .clone())")
        rel = delta // item
        for off, stride, length, k in _segments(p):
            for c0 in range(0, length, block):
                rows.append((rel + off + c0 * stride, stride, min(block, length - c0), k + c0))
    if not rows:
        return torch.zeros((0, _TABLE_COLS), dtype=torch.int64)
    return torch.tensor(rows, dtype=torch.int64)


class _Group:
    """All selected rows of the parameters sharing one (device, dtype): packed buffers, table."""

    def __init__(self, specs: list[RowSpec], config: OptimConfig, master_weights: bool, block: int):
        p0 = specs[0].param
        self.device, self.dtype = p0.device, p0.dtype
        self.cdtype = accumulation_dtype(self.dtype)
        self.block = block
        self.params: list[PackedParam] = []
        off = 0
        for s in specs:
            shape = packed_shape(s.param, s.dim, int(s.index.numel()))
            self.params.append(PackedParam(s.name, s.param, s.dim, s.index.to(self.device), off, shape))
            off += math.prod(shape)
        self.numel = off
        self.param_shapes = [tuple(s.param.shape) for s in specs]
        z = lambda: torch.zeros(self.numel, dtype=self.cdtype, device=self.device)  # noqa: E731
        self.grad = z()
        self.has_master = master_weights and self.dtype in (torch.float16, torch.bfloat16)
        self.master = z() if self.has_master else None
        self.state: dict[str, torch.Tensor] = {}
        if isinstance(config, AdamWConfig):
            self.state = {"exp_avg": z(), "exp_avg_sq": z()}
        elif config.momentum != 0:
            self.state = {"momentum_buffer": z()}
        if self.has_master:
            self.load_master()
        self.anchor = p0
        self._ptrs: tuple[int, ...] = ()
        self._table: torch.Tensor | None = None
        self.unit_stride = self.aligned = False

    def load_master(self) -> None:
        """(Re)initialise the fp32 master rows from the current parameter values."""
        if self.master is not None:
            for p in self.params:
                p.view(self.master).copy_(gather_rows(p.param, p.dim, p.index))

    def table(self) -> torch.Tensor:
        """The chunk table, rebuilt if a parameter was moved (``data_ptr`` changed)."""
        ptrs = tuple(p.param.data_ptr() for p in self.params)
        if ptrs != self._ptrs or self._table is None:
            self.anchor = self.params[0].param
            cpu = build_chunk_table(self.params, self.anchor, self.block)
            self.unit_stride = bool((cpu[:, 1] == 1).all()) if len(cpu) else True
            self.aligned = bool((cpu[:, [0, 2, 3]] % 16 == 0).all()) if len(cpu) else True
            self._table = cpu.to(self.device)
            self._ptrs = ptrs
        return self._table


class RowSparseOptimizer:
    """SGD or AdamW on selected rows only (see module docstring).

    Args:
        specs: the rows to update (every parameter at most once).
        config: :class:`SGDConfig` or :class:`AdamWConfig`.
        master_weights: keep fp32 master rows for float16/bfloat16 parameters (the update is
            applied to the master rows and rounded into the weights). ``False`` applies it to
            the half-precision weights directly (what an fp16 ``torch.optim.SGD`` does).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        block: elements per Triton program (power of two).

    Use: write (or let autograd accumulate) gradients into :meth:`grad_view` blocks, call
    :meth:`step`, then :meth:`zero_grad`.
    """

    def __init__(self, specs: Iterable[RowSpec], config: OptimConfig, *, master_weights: bool = True,
                 backend: Backend | None = "auto", block: int = DEFAULT_BLOCK):
        specs = list(specs)
        if not specs:
            raise ConfigError("RowSparseOptimizer needs at least one RowSpec (rows to update)")
        if block <= 0 or block & (block - 1):
            raise ConfigError(f"block must be a power of two, got {block}")
        seen: set[str] = set()
        groups: dict[tuple[torch.device, torch.dtype], list[RowSpec]] = {}
        for s in specs:
            if s.name in seen:
                raise ConfigError(f"parameter {s.name} given twice; merge its rows into one RowSpec")
            seen.add(s.name)
            idx = s.index
            if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype != torch.long:
                raise ShapeError(f"{s.name}: index must be a 1-D LongTensor, got {getattr(idx, 'dtype', type(idx))} "
                                 f"{tuple(getattr(idx, 'shape', ()))}")
            checks.tensor(s.name, s.param, dims=(1, 2))
            packed_shape(s.param, s.dim, idx.numel())
            checks.index(f"{s.name}: index", idx, s.param.shape[s.dim], unique=True,
                         what=f"dimension {s.dim} of shape {tuple(s.param.shape)}")
            groups.setdefault((s.param.device, s.param.dtype), []).append(s)
        self.config = config
        self.backend = backend
        self.groups = [_Group(g, config, master_weights, block) for g in groups.values()]
        self._by_name = {p.name: (g, p) for g in self.groups for p in g.params}
        self.steps = 0

    # ---- views ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def _entry(self, name: str) -> tuple[_Group, PackedParam]:
        try:
            return self._by_name[name]
        except KeyError:
            raise StateError(f"this optimizer has no parameter {name!r}; it updates {', '.join(self._by_name)}") from None

    def grad_view(self, name: str) -> torch.Tensor:
        """The packed gradient block of ``name`` (``[R, C]`` or ``[R]``, compute dtype): a view
        into the flat gradient buffer."""
        g, p = self._entry(name)
        return p.view(g.grad)

    def rows(self, name: str) -> torch.Tensor:
        """Current packed rows of ``name`` (a copy, parameter dtype)."""
        _, p = self._entry(name)
        return gather_rows(p.param, p.dim, p.index)

    def state_view(self, name: str, key: str) -> torch.Tensor:
        """Packed optimizer state ``key`` (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``,
        ``master``) of ``name``."""
        g, p = self._entry(name)
        flat = g.master if key == "master" else g.state.get(key)
        if flat is None:
            kept = sorted(g.state) + (["master"] if g.master is not None else [])
            raise StateError(f"{name} has no {key!r} state; this optimizer keeps {kept}")
        return p.view(flat)

    def state_numel(self) -> dict[str, int]:
        """Elements held per state (``grad``, ``master`` and the optimizer's moments), summed
        over groups: each equals selected rows x row length (or 0 if that state is absent)."""
        out: dict[str, int] = {"grad": 0, "master": 0}
        for g in self.groups:
            out["grad"] += g.numel
            out["master"] += g.numel if g.master is not None else 0
            for k, t in g.state.items():
                out[k] = out.get(k, 0) + t.numel()
        return out

    def state_bytes(self) -> int:
        """Bytes of every buffer this optimizer holds (gradients included)."""
        total = 0
        for g in self.groups:
            for t in [g.grad, g.master, *g.state.values()]:
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    # ---- stepping ------------------------------------------------------------------------
    def zero_grad(self) -> None:
        for g in self.groups:
            g.grad.zero_()

    def sync_from_params(self) -> None:
        """Re-read master rows after the parameters were written from outside (e.g. restoring
        a checkpoint). Moments are kept."""
        for g in self.groups:
            g.load_master()

    def reset_state(self) -> None:
        """Forget moments and the step count (a fresh optimizer on the current rows)."""
        self.steps = 0
        for g in self.groups:
            for t in g.state.values():
                t.zero_()
            g.load_master()

    @torch.no_grad()
    def step(self) -> None:
        """One optimizer step on every selected row."""
        self._check_params()
        self.steps += 1
        for g in self.groups:
            if g.numel == 0:
                continue
            hp = self._hyper()
            if resolve_backend(g.device, self.backend) == "triton":
                self._step_triton(g, torch.tensor(hp, dtype=g.cdtype).to(g.device, non_blocking=True))
            else:
                self._step_torch(g, hp)

    def _check_params(self) -> None:
        """Each parameter still has the device, dtype and shape it had at construction (the
        kernels address its memory by them): a :class:`StateError` naming it otherwise."""
        for g in self.groups:
            for p, shape in zip(g.params, g.param_shapes):
                now = (p.param.device, p.param.dtype, tuple(p.param.shape))
                if now != (g.device, g.dtype, shape):
                    raise StateError(f"{p.name} changed since the optimizer was built ({tuple(shape)} "
                                     f"{g.dtype} on {g.device}, now {now[2]} {now[1]} on {now[0]}); build a new "
                                     "RowSparseOptimizer after moving or converting the model")

    def _hyper(self) -> list[float]:
        """Per-step scalars: AdamW ``[lr, b1, b2, eps, wd, lr / bc1, sqrt(bc2)]``; SGD ``[lr, mu,
        dampening, wd, first step]``."""
        c, t = self.config, self.steps
        if isinstance(c, AdamWConfig):
            b1, b2 = c.betas
            return [c.lr, b1, b2, c.eps, c.weight_decay, c.lr / (1 - b1 ** t), math.sqrt(1 - b2 ** t)]
        return [c.lr, c.momentum, c.dampening, c.weight_decay, 1.0 if t == 1 else 0.0]

    def _step_triton(self, g: _Group, hp: torch.Tensor) -> None:
        table = g.table()
        grid = (table.shape[0],)
        dummy = g.grad  # placeholder for absent buffers (never read: guarded by constexprs)
        master = g.master if g.master is not None else dummy
        nw = 8 if g.block >= 1024 else 4
        rtne = interpret_mode() and g.dtype == torch.bfloat16
        if isinstance(self.config, AdamWConfig):
            _sparse_adamw_kernel()[grid](g.anchor, table, g.grad, master, g.state["exp_avg"], g.state["exp_avg_sq"], hp,
                                       HAS_MASTER=g.has_master, RTNE_BF16=rtne, UNIT_STRIDE=g.unit_stride,
                                       ALIGNED=g.aligned, BLOCK=g.block, num_warps=nw)
        else:
            buf = g.state.get("momentum_buffer", dummy)
            _sparse_sgd_kernel()[grid](g.anchor, table, g.grad, master, buf, hp,
                                     HAS_MASTER=g.has_master, HAS_MOMENTUM=self.config.momentum != 0,
                                     NESTEROV=self.config.nesterov, RTNE_BF16=rtne, UNIT_STRIDE=g.unit_stride,
                                     ALIGNED=g.aligned, BLOCK=g.block, num_warps=nw)
        # the kernels write the weights through raw pointers: tell autograd's version counters,
        # so that whatever keys on them (e.g. a cache of prefix key/values) sees the change
        for p in g.params:
            torch.autograd.graph.increment_version(p.param)

    def _step_torch(self, g: _Group, hp: list[float]) -> None:
        """Reference: the same math per parameter with in-place torch ops on the packed views
        (``m + (1 - b1) (g - m)`` is ``torch.lerp``'s formula for weights below 0.5)."""
        adam = isinstance(self.config, AdamWConfig)
        for p in g.params:
            grad = p.view(g.grad)
            w = p.view(g.master) if g.has_master else gather_rows(p.param, p.dim, p.index).to(g.cdtype)
            if adam:
                lr, b1, b2, eps, wd, step_size, bc2_sqrt = hp
                m, v = p.view(g.state["exp_avg"]), p.view(g.state["exp_avg_sq"])
                if wd:
                    w.mul_(1 - lr * wd)
                m.lerp_(grad, 1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                w.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-step_size)
            else:
                lr, mu, damp, wd, first = hp
                d = grad.add(w, alpha=wd) if wd else grad
                if "momentum_buffer" in g.state:
                    buf = p.view(g.state["momentum_buffer"])
                    if first:
                        buf.copy_(d)
                    else:
                        buf.mul_(mu).add_(d, alpha=1 - damp)
                    d = d.add(buf, alpha=mu) if self.config.nesterov else buf
                w.add_(d, alpha=-lr)
            scatter_rows(p.param, p.dim, p.index, w)
