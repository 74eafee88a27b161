"""Value checks, one set for the whole package: the configuration dataclasses, the command line and
the library entry points call these (each dataclass checks its own fields).

Every check raises :class:`~cca_fast.errors.CCAError` (or the ``error`` class given) naming the
field (``RunConfig.select_fraction``), the command-line flag when there is one
(``--select-fraction``), the value given and the range it must be in. NaN and infinities are
refused everywhere a number is checked, so a saved ``config.json`` never holds a value that
differs from itself (``nan != nan`` would make even the identical command refuse to resume).
Integers are bounded by :data:`INT_MAX` (what a C ``long long``, and so torch, numpy and the
random generators, can hold), so a value no code can use is refused up front, not in a later
stage.

:func:`finite_float` and :func:`cli_int` are ``argparse`` types: every float flag of ``cca``
refuses ``nan`` / ``inf`` while the command line is parsed, and every integer flag a value beyond
:data:`INT_MAX`.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

from cca_fast.errors import CCAError

#: the largest integer the code can pass on (a signed 64-bit ``long long``: torch, numpy, seeds)
INT_MAX = 2**63 - 1
#: the largest seed: torch, numpy and ``random`` all take it (numpy's legacy seeds are 32-bit, so
#: derived seeds are reduced modulo 2**32 where numpy needs them)
SEED_MAX = INT_MAX


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
           lo_open: bool = False, hi_open: bool = False, allow_none: bool = False, hint: str = "",
           error: type[Exception] = CCAError) -> None:
    """``value`` is a finite real number (int or float, not bool) within the given bounds."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            ok = math.isfinite(value)
        except OverflowError:  # an int too large for a float
            ok = False
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise error(f"{_where(field, flag)} must be a finite number {_interval(lo, hi, lo_open, hi_open)}, "
                    f"got {value!r}{'; ' + hint if hint else ''}")


def integer(field: str, value: Any, *, flag: str | None = None, lo: int = 1, hi: int | None = None,
            allow_none: bool = False, hint: str = "", error: type[Exception] = CCAError) -> None:
    """``value`` is an int (not bool) with ``lo <= value <= hi`` (``hi`` at most :data:`INT_MAX`).
    ``lo=1`` (the default) is the positive-integer check (:func:`positive`)."""
    if value is None and allow_none:
        return
    hi = INT_MAX if hi is None else min(hi, INT_MAX)
    ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    if not ok:
        if hi == INT_MAX:
            kind = "a positive integer" if lo == 1 else f"an integer >= {lo}"
            if isinstance(value, int) and not isinstance(value, bool) and value > hi:
                kind += f" of at most {INT_MAX} (2**63 - 1, what the code can use)"
        else:
            kind = f"an integer in [{lo}, {hi}]"
        raise error(f"{_where(field, flag)} must be {kind}, got {value!r}{'; ' + hint if hint else ''}")


def positive(field: str, value: Any, *, flag: str | None = None, allow_none: bool = False, hint: str = "",
             error: type[Exception] = CCAError) -> None:
    """``value`` is an integer >= 1 (``None`` too when ``allow_none``)."""
    integer(field, value, flag=flag, lo=1, allow_none=allow_none, hint=hint, error=error)


def seed(field: str, value: Any, *, flag: str | None = "--seed", error: type[Exception] = CCAError) -> None:
    """``value`` is a seed every generator takes: an integer in ``[0, SEED_MAX]``."""
    integer(field, value, flag=flag, lo=0, hi=SEED_MAX, error=error,
            hint="a seed is an integer from 0 to 2**63 - 1, e.g. 0")


def token_contrast(desired: int, undesired: int, where: str, vocab_size: int | None = None) -> None:
    """The one check of a logit-difference request (``cca attribute``, :func:`~cca_fast.attribution_dataset.run.attribute_dataset`
    and :func:`cca_fast.attribution.attribute` call it): two different token ids, both in the
    vocabulary. ``desired == undesired`` would score every component 0 without a word."""
    for name, t in (("desired", desired), ("undesired", undesired)):
        if vocab_size is not None and not 0 <= int(t) < vocab_size:
            raise CCAError(f"{where}: the {name} token id {t} is outside the vocabulary [0, {vocab_size}); "
                           "were the ids made with another tokenizer?")
    if int(desired) == int(undesired):
        raise CCAError(f"{where}: the desired and the undesired token are the same (id {desired}), so their logit "
                       "difference is 0 and every score would be 0; give two different tokens")


def kind_budget(field: str, value: Any, kinds: tuple[str, ...], *, flag: str | None = "--select-per-kind",
                error: type[Exception] = CCAError) -> None:
    """``value`` is a per-kind budget: a non-empty dict mapping some of ``kinds`` to a fraction of
    that kind's components in ``[0, 1]`` (not all 0), e.g. ``{"q": 0.05, "k": 0.05, "v": 0.05,
    "mlp": 0.01}``."""
    example = "e.g. q=0.05,k=0.05,v=0.05,mlp=0.01 (a fraction of each kind's heads / neurons)"
    if not isinstance(value, dict) or not value:
        raise error(f"{_where(field, flag)} must map kinds ({', '.join(kinds)}) to fractions, got {value!r}; {example}")
    unknown = [k for k in value if k not in kinds]
    if unknown:
        raise error(f"{_where(field, flag)}: unknown kind {unknown[0]!r}; kinds are {', '.join(kinds)}; {example}")
    for k, v in value.items():
        number(f"{field}[{k!r}]", v, flag=flag, lo=0, hi=1, error=error, hint=example)
    if not any(float(v) > 0 for v in value.values()):
        raise error(f"{_where(field, flag)} selects nothing (every fraction is 0), got {value!r}; {example}")


# ---- argparse types ------------------------------------------------------------------------------
def finite_float(text: str) -> float:
    """``argparse`` type of every float flag: a finite number (``nan``, ``inf`` refused while the
    command line is parsed, so they never reach a saved configuration)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r} (NaN and infinities are not "
                                         "settings; pass a number such as 0.5)")
    return value


def cli_int(text: str) -> int:
    """``argparse`` type of every integer flag: an integer of at most :data:`INT_MAX` in size
    (ranges are the configuration's checks)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if abs(value) > INT_MAX:
        raise argparse.ArgumentTypeError(f"{text} is beyond what the code can use: integers must lie within "
                                         f"+-{INT_MAX} (2**63 - 1)")
    return value


def kind_budget_arg(text: str) -> dict[str, float]:
    """``argparse`` type of ``--select-per-kind``: ``q=0.05,k=0.05,v=0.05,mlp=0.01`` (kinds left
    out get 0), or one number for every kind (``0.01``). Ranges are checked by
    :func:`kind_budget` when the configuration is built."""
    from cca_fast.models.adapters import KINDS

    text = text.strip()
    try:
        return {k: finite_float(text) for k in KINDS}
    except argparse.ArgumentTypeError:
        pass
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, val = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{part!r} is not KIND=FRACTION; write e.g. q=0.05,k=0.05,v=0.05,mlp=0.01")
        if kind.strip() in out:
            raise argparse.ArgumentTypeError(f"kind {kind.strip()!r} given twice in {text!r}")
        out[kind.strip()] = finite_float(val)
    if not out:
        raise argparse.ArgumentTypeError("empty budget; write e.g. q=0.05,k=0.05,v=0.05,mlp=0.01 or one fraction (0.01)")
    return out
