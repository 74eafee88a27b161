"""User-facing errors.

Every mistake a user can make (a missing file, a malformed line, an unsupported architecture,
a bad template) raises :class:`CCAError` with a message that says what is wrong and how to fix
it. The CLI prints such errors as one line and exits with status 2, without a traceback.
"""
from __future__ import annotations


class CCAError(Exception):
    """An error caused by the user's input or environment, with an actionable message."""


class UnsupportedArchitectureError(CCAError):
    """The model's architecture has no component adapter."""


class DataError(CCAError):
    """A data file or data set could not be read or is malformed."""


class TemplateError(CCAError):
    """A GSM-Symbolic template could not be parsed, evaluated or instantiated."""
