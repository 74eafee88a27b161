"""User-facing errors.

Every mistake a user can make (a missing file, a malformed line, an unsupported architecture,
a bad template) raises :class:`CCAError` with a message that says what is wrong and how to fix
it. The CLI prints such errors as one line and exits with status 2, without a traceback.

The kernels (``cca_fast.kernels``) stand alone and import nothing from ``cca_fast``, so they
have their own family, :class:`KernelError` (a ``ValueError``; subclasses ``BackendUnavailable``,
``ShapeError``, ``ConfigError``, ``StateError``), re-exported here. It is *not* a
:class:`CCAError`: to catch every user-facing error, catch ``(CCAError, KernelError)``
(:data:`USER_ERRORS`), as the CLI does.
"""
from __future__ import annotations

from cca_fast.kernels.errors import KernelError


class CCAError(Exception):
    """An error caused by the user's input or environment, with an actionable message."""


class UnsupportedArchitectureError(CCAError):
    """The model's architecture has no component adapter."""


class WrappedModelError(UnsupportedArchitectureError):
    """No Hugging Face causal LM could be found inside the model object given (a wrapper cca_fast
    cannot see through); the message names the module tree it found."""


class DataError(CCAError):
    """A data file or data set could not be read or is malformed."""


class TemplateError(CCAError):
    """A GSM-Symbolic template could not be parsed, evaluated or instantiated."""


#: Every error whose message is meant for the user (the CLI prints these without a traceback).
USER_ERRORS: tuple[type[Exception], ...] = (CCAError, KernelError)

__all__ = ["CCAError", "UnsupportedArchitectureError", "WrappedModelError", "DataError", "TemplateError", "KernelError", "USER_ERRORS"]
