"""The one record every stage passes around: a math word problem with its gold answer."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    """A word problem.

    Attributes:
        id: unique, stable identifier (e.g. ``"gsm8k-test-17"`` or ``"sym-0042-3"``).
        question: the question text shown to the model.
        answer: the reference solution text, ending ``#### N`` (may be empty if unknown).
        gold: the numeric gold answer (the number after ``####``), as float.
        template: the template (group) id for per-template accuracy; ``""`` when none.
        meta: free-form extra data (variable bindings, source file, ...); JSON-serialisable.
    """

    id: str
    question: str
    answer: str
    gold: float
    template: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Problem":
        return cls(
            id=str(d["id"]),
            question=d["question"],
            answer=d.get("answer", ""),
            gold=float(d["gold"]),
            template=str(d.get("template", "")),
            meta=dict(d.get("meta", {})),
        )
