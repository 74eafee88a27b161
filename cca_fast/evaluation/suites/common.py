"""What the suites share: where the data lives, seeded subsets, the result record."""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

from cca_fast.errors import DataError

T = TypeVar("T")

ENV_VAR = "CCA_SHARED_DATA"
HOW_TO_PASS = ("pass data_root=DIR (SuiteConfig) or --side-data DIR (cca side-effects), or set "
               f"{ENV_VAR}; DIR must hold mmlu/{{dev,test}}/*.csv, truthfulqa/TruthfulQA.csv and gsm8k/test.jsonl")


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """The side-effect data folder: ``data_root``, else ``$CCA_SHARED_DATA``, else
    ``../shared/data`` relative to the current directory.

    Raises:
        DataError: the folder named does not exist, or none was named and the default is absent.
    """
    if data_root is not None:
        p = Path(data_root).expanduser()
        if not p.is_dir():
            raise DataError(f"side-effect data folder {p} does not exist; {HOW_TO_PASS}")
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DataError(f"{ENV_VAR}={env} is not a folder; {HOW_TO_PASS}")
        return p
    p = Path.cwd() / ".." / "shared" / "data"
    if p.is_dir():
        return p.resolve()
    raise DataError(f"no side-effect data folder: {p.resolve()} (the default) does not exist; {HOW_TO_PASS}")


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a :class:`DataError` naming it and what to pass."""
    if not path.is_file():
        raise DataError(f"{what} file {path} not found; {HOW_TO_PASS}")
    return path


def seeded_subset(items: Sequence[T], limit: int | None, seed: int, salt: str) -> list[T]:
    """``limit`` items drawn without replacement by a generator seeded with ``(salt, seed)``,
    in their original order; all items when ``limit`` is ``None`` or not smaller."""
    check_limit(limit, salt)
    if limit is None or limit >= len(items):
        return list(items)
    picked = sorted(random.Random(f"{salt}:{seed}").sample(range(len(items)), limit))
    return [items[i] for i in picked]


def check_limit(limit: int | None, name: str) -> None:
    from cca_fast import checks

    checks.positive(f"{name} limit", limit, allow_none=True, hint="or None for all items", error=DataError)


@dataclass
class SuiteResult:
    """One suite's outcome.

    Attributes:
        name: ``"mmlu"``, ``"truthfulqa"`` or ``"perplexity"``.
        metric_name: what ``metric`` is (``"accuracy"``, ``"perplexity"``).
        metric: the headline number.
        higher_is_better: direction of ``metric``.
        n: items scored.
        details: suite-specific numbers and settings (per subject accuracy, mean NLL, ...).
        per_item: one dict per item with at least ``id`` and ``correct`` (accuracy suites) or
            ``nll`` and ``n_tokens`` (perplexity): enough for paired deltas and bootstraps.
        seconds: wall time of the suite.
    """

    name: str
    metric_name: str
    metric: float
    higher_is_better: bool
    n: int
    details: dict[str, Any] = field(default_factory=dict)
    per_item: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
