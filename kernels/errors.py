"""The kernels' one error family.

Every mistake a caller can make with these kernels (a backend that cannot run here, tensors of
the wrong shape, dtype or device, invalid optimizer settings) raises a :class:`KernelError` whose
message says what is wrong and how to fix it. This package imports nothing from the library that
ships it, so an application can catch the family by importing it from here (``KernelError`` is a
:class:`ValueError`, so code that catches ``ValueError`` keeps working).
"""
from __future__ import annotations


class KernelError(ValueError):
    """A kernel was called with an input or in an environment it cannot handle."""


class BackendUnavailable(KernelError):
    """The requested backend is unknown, or cannot run on these tensors in this process."""


class ShapeError(KernelError):
    """Tensors (or modules) whose shape, dtype, device or indices do not fit the kernel."""


class ConfigError(KernelError):
    """Invalid hyper-parameters or launch options (learning rate, betas, block size...)."""


class StateError(KernelError, RuntimeError):
    """An object is in a state the call cannot proceed from (a module already patched, a
    parameter that cannot be addressed). Also a :class:`RuntimeError`."""


__all__ = ["KernelError", "BackendUnavailable", "ShapeError", "ConfigError", "StateError"]
