"""Text stop rules for decoding: generic, passed in by the caller (``GenerationConfig.stops``).

A rule looks at the decoded text of one sequence and says where the first stop is. Decoding knows
nothing about any prompt format: the paper's rules (the answer sentence and the next few-shot
question) are built by :func:`cca_fast.evaluation.prompting.paper_stops` from these classes.

Protocol (:class:`StopRule`): ``reason`` (the ``finish_reason`` it gives) and
``find(text, new_from) -> (completed_at, cut) | None``: the first stop in ``text`` whose match
*completes* at or after ``new_from`` (text before ``new_from`` was already searched, so an
implementation may skip what cannot start a new match there); ``completed_at`` is where the match
ends (when several rules fire on the same token, the earliest wins), ``cut`` where the kept text
ends. Rules are frozen dataclasses, so a :class:`GenerationConfig` holding them can be written to
JSON and compared.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@runtime_checkable
class StopRule(Protocol):
    """What a text stop rule provides (see the module docstring)."""

    reason: str

    def find(self, text: str, new_from: int = 0) -> tuple[int, int] | None: ...


@dataclass(frozen=True)
class MarkerStop:
    """Stop at a literal ``marker``; the kept text ends *before* it (e.g. a new few-shot ``Q:``)."""

    marker: str
    reason: str = "marker"

    def __post_init__(self) -> None:
        if not self.marker:
            raise ValueError("MarkerStop needs a non-empty marker")

    def find(self, text: str, new_from: int = 0) -> tuple[int, int] | None:
        i = text.find(self.marker, max(0, new_from - len(self.marker) + 1))
        return None if i < 0 else (i + len(self.marker), i)


@dataclass(frozen=True)
class PatternStop:
    """Stop at the first match of a regular expression; the kept text ends *after* the match.

    Attributes:
        pattern: the expression (Python ``re`` syntax).
        reason: the ``finish_reason`` given.
        boundary: optional characters a match never spans except as its last character (e.g.
            ``"."`` for a sentence): the search then starts after the last boundary before the
            new text instead of at 0, so scanning stays linear in the text length.
    """

    pattern: str
    reason: str = "pattern"
    boundary: str = ""

    def __post_init__(self) -> None:
        try:
            self._regex
        except re.error as e:
            raise ValueError(f"PatternStop: bad regular expression {self.pattern!r}: {e}") from None

    @functools.cached_property
    def _regex(self) -> re.Pattern:
        return re.compile(self.pattern)

    def find(self, text: str, new_from: int = 0) -> tuple[int, int] | None:
        start = 0
        if self.boundary and new_from > 0:
            start = max(text.rfind(b, 0, new_from) for b in self.boundary) + 1
        m = self._regex.search(text, start)
        return None if m is None else (m.end(), m.end())
