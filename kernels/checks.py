"""Input checks every kernel entry point runs before it launches anything (Triton or PyTorch).

A kernel reads memory through the indices and strides it is given: an out-of-range row index
reads garbage on the Triton path (an illegal memory access on a GPU) and a raw ``RuntimeError``
or device-side assert on the PyTorch path. So each public entry point checks, on the host and
before any launch, what the kernel assumes: tensor ranks and shapes, floating dtypes the kernels
support, one device for every tensor, and integer indices that are 1-D and inside the dimension
they address. A failed check raises a :class:`~.errors.ShapeError` (a :class:`~.errors.KernelError`)
that names the argument, what it got and what it needs.

An index range check reads ``min`` and ``max`` back to the host (one synchronisation on a GPU),
once per index tensor: a tensor that passed is stamped with its version counter and the bound,
so the same unchanged tensor passed again (every forward of a patched module) is not read again.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import ShapeError

#: what every kernel computes in (accumulation: float32 for the half types, float64 for float64)
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
#: attribute an index tensor gets once it passed :func:`index` (its version counter and the bound)
_CHECKED = "_kernels_index_checked"


def tensor(name: str, t: object, *, dims: int | Sequence[int] | None = None, floating: bool = True) -> torch.Tensor:
    """``t`` is a tensor (of ``dims`` dimensions, of a supported floating dtype when ``floating``)."""
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = (dims,) if isinstance(dims, int) else tuple(dims) if dims is not None else None
    if allowed is not None and t.dim() not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        raise ShapeError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise ShapeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; the kernels take {names} "
                         "(convert it first, e.g. .float())")
    return t


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Every given tensor (``None`` skipped) is on one device; returns it."""
    given = {k: v for k, v in tensors.items() if v is not None}
    devices = {str(v.device) for v in given.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in given.items())
        raise ShapeError(f"tensors on different devices ({where}); move them to one device first")
    return next(iter(given.values())).device


def same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    """Every given tensor has one dtype; returns it."""
    dtypes = {v.dtype for v in tensors.values()}
    if len(dtypes) > 1:
        what = ", ".join(f"{k} {str(v.dtype).replace('torch.', '')}" for k, v in tensors.items())
        raise ShapeError(f"tensors of different dtypes ({what}); convert them to one dtype first")
    return next(iter(dtypes))


def index(name: str, idx: object, size: int, *, what: str = "dimension", unique: bool = False) -> torch.Tensor:
    """``idx`` is a 1-D integer tensor with every entry in ``[0, size)`` (and, with ``unique``,
    no entry twice). Returns it."""
    if not isinstance(idx, torch.Tensor):
        raise ShapeError(f"{name} must be a 1-D integer tensor of indices, got {type(idx).__name__}")
    if idx.dim() != 1 or idx.dtype not in INDEX_DTYPES:
        raise ShapeError(f"{name} must be a 1-D integer tensor (e.g. torch.long) of indices, got "
                         f"{str(idx.dtype).replace('torch.', '')} of shape {tuple(idx.shape)}")
    stamp = (idx._version, int(size), bool(unique))
    if getattr(idx, _CHECKED, None) == stamp:  # this very tensor, unchanged since it passed
        return idx
    if idx.numel():
        lo, hi = (int(v) for v in torch.aminmax(idx.to(torch.long)))
        if lo < 0 or hi >= size:
            bad = lo if lo < 0 else hi
            raise ShapeError(f"{name} holds index {bad}, outside [0, {size}) of the {what} it addresses; "
                             f"pass {'unique ' if unique else ''}indices in range")
        if unique and idx.unique().numel() != idx.numel():
            raise ShapeError(f"{name} holds an index twice; pass unique indices (e.g. idx.unique())")
    setattr(idx, _CHECKED, stamp)
    return idx


def positive(name: str, value: object) -> int:
    """``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ShapeError(f"{name} must be an integer >= 1, got {value!r}")
    return value
