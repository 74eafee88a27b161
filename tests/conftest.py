"""Test set-up: Triton kernels run under the CPU interpreter when no GPU is present; fixtures
shared by several modules (their helpers are in ``helpers.py``, importable from every sub-folder through ``pythonpath`` in ``pytest.ini``)."""
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


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The tiny biased model and data of the end-to-end tests (``helpers.make_pipeline_workdir``),
    built once per module."""
    from helpers import make_pipeline_workdir

    return make_pipeline_workdir(tmp_path_factory.mktemp("pipeline"))
