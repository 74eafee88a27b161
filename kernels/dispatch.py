"""What every kernel shares: the backend choice, the accumulation dtype, lazy ``@triton.jit``.

Backends (:data:`Backend`, one type for every kernel and its callers); rules of
:func:`resolve_backend`:

* ``backend="torch"``: always the PyTorch reference (any device, any dtype).
* ``backend="triton"``: the Triton kernel; needs ``triton`` importable and either a CUDA tensor
  or ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the tests), else
  :class:`~.errors.BackendUnavailable`.
* ``backend=None`` / ``"auto"``: Triton under ``TRITON_INTERPRET=1`` (so the tests exercise the
  kernels on CPU), Triton on CUDA when it is installed, PyTorch everywhere else.

Triton reads ``TRITON_INTERPRET`` when it is imported (its own ``triton.language`` helpers are
decorated then) and when a kernel is decorated, so the setting is pinned when this module is
first imported (:data:`INTERPRET`): set it before importing this package (the tests'
``conftest.py`` does). Kernels are decorated on first use (:func:`jit_lazily`).

Accumulation (:func:`accumulation_dtype`): every kernel and every reference accumulates, and
keeps optimizer state, in float32 for float16 / bfloat16 / float32 inputs and in float64 for
float64 inputs.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Callable, Literal, Sequence, get_args

import torch

from .errors import BackendUnavailable

#: The backend a caller asks for (``None`` is accepted wherever a ``Backend`` is, meaning "auto").
Backend = Literal["auto", "torch", "triton"]
#: What :func:`resolve_backend` decides.
ResolvedBackend = Literal["torch", "triton"]
BACKENDS: tuple[str, ...] = get_args(Backend)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every kernel (and reference) accumulates and keeps state in for inputs of
    ``dtype``: float64 for float64, float32 for everything else (float16, bfloat16, float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


INTERPRET: bool = _env_interpret()


def interpret_mode() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET`` as it was when this
    module was imported; changing the variable later cannot switch Triton over)."""
    return INTERPRET


def resolve_backend(device: torch.device | str, backend: Backend | None = None, *,
                    interpret: bool | None = None) -> ResolvedBackend:
    """``"triton"`` or ``"torch"`` for tensors on ``device`` (see the module docstring).
    ``interpret`` overrides :func:`interpret_mode` (for tests of these rules)."""
    interp = interpret_mode() if interpret is None else interpret
    choice = "auto" if backend is None else str(backend).lower()
    if choice not in BACKENDS:
        raise BackendUnavailable(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)} "
                                 "(or None for 'auto')")
    dev = torch.device(device)
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise BackendUnavailable("backend='triton' needs the triton package: install it (pip install triton) "
                                     "or use backend='torch'")
        if dev.type != "cuda" and not interp:
            raise BackendUnavailable(f"backend='triton' needs CUDA tensors (got {dev.type}); on CPU start Python "
                                     "with TRITON_INTERPRET=1 to run the kernels in Triton's interpreter, or use "
                                     "backend='torch'")
        return "triton"
    if triton_available() and (interp or dev.type == "cuda"):
        return "triton"
    return "torch"


_JITTED: dict[Callable[..., Any], Any] = {}


def _jit_once(fn: Callable[..., Any]) -> Any:
    """``triton.jit(fn)``, made once per source function."""
    if fn not in _JITTED:
        import triton  # noqa: PLC0415 (lazy on purpose: TRITON_INTERPRET must be pinned first)

        _JITTED[fn] = triton.jit(fn)
    return _JITTED[fn]


def jit_lazily(fn: Callable[..., Any], helpers: Sequence[Callable[..., Any]] = ()) -> Callable[[], Any]:
    """Return ``get()`` giving ``triton.jit(fn)``, decorated on first use.

    ``helpers`` are the plain functions ``fn`` calls as ``@triton.jit`` functions (shared code
    of several kernels). Triton looks a kernel's callees up by name in the kernel's module
    globals when it compiles, and they must be JIT functions then: ``get()`` decorates each
    helper (once, whichever kernel comes first) and binds it under its own name in ``fn``'s
    globals before decorating ``fn``. Give every helper a name of its own in the module."""
    cache: list[Any] = []

    def get() -> Any:
        if not cache:
            for h in helpers:
                fn.__globals__[h.__name__] = _jit_once(h)
            cache.append(_jit_once(fn))
        return cache[0]

    return get


def num_programs_hint(device: torch.device) -> int:
    """Programs that keep ``device`` busy: 4 per streaming multiprocessor on CUDA; a small
    constant under the interpreter (each program is a Python loop there)."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)
