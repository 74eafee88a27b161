"""Shared fixtures of the stage-2 tests: tiny float64 models and left-padded pivot examples."""
from __future__ import annotations

import torch

from cca_fast.stages.examples import PivotExample
from tiny_models import VOCAB, make_tiny


def tiny(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    """A tiny model; SDPA attention except Gemma-2 (eager only). Eager attention in float64
    turns fully masked (left-padding) rows into NaN, so Gemma-2 gets equal-length examples."""
    return make_tiny(arch, dtype=dtype, seed=seed, attn="eager" if arch == "gemma2" else "sdpa")


def examples(arch: str, n: int = 5, seed: int = 0, min_len: int = 2, max_len: int = 9) -> list[PivotExample]:
    """``n`` examples with prefixes of different lengths (same length for Gemma-2)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 if arch == "gemma2" else int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        d, u = torch.randint(3, VOCAB, (2,), generator=g).tolist()
        out.append(PivotExample(f"p{i}", tuple(ids), d, u if u != d else (d + 1) % VOCAB))
    return out
