"""The decode step's small-M matrix-product path equals ``F.linear`` (float64 reference on random
odd shapes) and switches only plain ``nn.Linear`` layers, restoring them afterwards."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cca_fast.generation import matmul


@pytest.mark.parametrize("m", [0, 1, 2, 7, 64, 65, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_small_m_linear_matches_linear(m, bias):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(1, m, 37, generator=g)
    w = torch.randn(53, 37, generator=g)
    b = torch.randn(53, generator=g) if bias else None
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = matmul.small_m_linear(x, w, b)
    assert got.shape == (1, m, 53) and got.dtype == torch.float32
    # fp32 products of 37 terms of size ~1: error ~1e-6; 1e-4 leaves room and catches any layout slip
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-4)


def test_small_batch_linears_switches_plain_linears_only():
    class Sub(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(5, 4), Sub(4, 3), nn.Linear(3, 2, bias=False)).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    ref = model(x)
    with matmul.small_batch_linears(model) as ctx:
        assert [type(m) for m in ctx.layers] == [nn.Linear, nn.Linear]
        assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-12)  # float64: reduction order only
    assert all("forward" not in m.__dict__ for m in model)
