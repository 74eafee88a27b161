"""Test set-up: Triton kernels run under the CPU interpreter when no GPU is present; tests marked
``cuda`` are skipped without one; fixtures shared by several modules (their helpers are in
``helpers.py``, importable from every sub-folder through ``pythonpath`` in ``pytest.ini``)."""
import os
from pathlib import Path

import pytest

try:
    import torch

    if not torch.cuda.is_available():
        # must be set before any @triton.jit kernel is defined (at import of cca_fast.kernels.*)
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    torch = None


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``cuda`` when CUDA is unavailable."""
    if torch is not None and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The tiny biased model and data of the end-to-end tests (``helpers.make_pipeline_workdir``),
    built once per module."""
    from helpers import make_pipeline_workdir

    return make_pipeline_workdir(tmp_path_factory.mktemp("pipeline"))
