"""Fixtures for the data-layer tests: where the shared (read-only, not in the repo) data lives."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """``$CCA_SHARED_DATA`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("CCA_SHARED_DATA")
    return Path(env) if env else (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared data folder {d} is absent (set CCA_SHARED_DATA to its location)")
    return d


@pytest.fixture(scope="session")
def symbolic_dir(shared_data: Path) -> Path:
    d = shared_data / "gsm_symbolic" / "templates" / "symbolic"
    if not d.is_dir():
        pytest.skip(f"GSM-Symbolic templates folder {d} is absent")
    return d
