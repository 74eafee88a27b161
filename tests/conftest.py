"""Test set-up: Triton kernels run under the CPU interpreter when no GPU is present, and the
helpers in this folder (``tiny_models``) are importable from every sub-folder."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import torch

    if not torch.cuda.is_available():
        # must be set before any @triton.jit kernel is defined (at import of cca_fast.kernels.*)
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
