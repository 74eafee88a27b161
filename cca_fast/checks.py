"""Value checks shared by the configuration dataclasses (each dataclass checks its own fields).

Every check raises :class:`~cca_fast.errors.CCAError` naming the field (``RunConfig.select_fraction``),
the command-line flag when there is one (``--select-fraction``), the value given and the range
it must be in. NaN and infinities are refused everywhere a number is checked, so a saved
``config.json`` never holds a value that differs from itself (``nan != nan`` would make even
the identical command refuse to resume).
"""
from __future__ import annotations

import math
from typing import Any

from cca_fast.errors import CCAError


def _where(field: str, flag: str | None) -> str:
    return field + (f" ({flag})" if flag else "")


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "any finite number"


def number(field: str, value: Any, *, flag: str | None = None, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False, allow_none: bool = False, hint: str = "") -> None:
    """``value`` is a finite real number (int or float, not bool) within the given bounds."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise CCAError(f"{_where(field, flag)} must be a finite number {_interval(lo, hi, lo_open, hi_open)}, "
                       f"got {value!r}{'; ' + hint if hint else ''}")


def integer(field: str, value: Any, *, flag: str | None = None, lo: int = 1, hi: int | None = None,
            allow_none: bool = False, hint: str = "") -> None:
    """``value`` is an int (not bool) with ``lo <= value`` (and ``<= hi``)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        kind = "a positive integer" if lo == 1 and hi is None else f"an integer {rng}"
        raise CCAError(f"{_where(field, flag)} must be {kind}, got {value!r}{'; ' + hint if hint else ''}")
