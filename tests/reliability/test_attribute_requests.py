"""``cca attribute`` and :func:`cca_fast.attribution.attribute` refuse meaningless requests with one
line naming the cause and the fix, before anything is written."""
from __future__ import annotations

import json

import pytest
import torch

from cca_fast.attribution import PivotBatch, attribute
from cca_fast.attribution_dataset.run import AttributeConfig, attribute_dataset
from cca_fast.errors import CCAError
from helpers import make_tiny


@pytest.mark.parametrize("row,words", [
    ({"prompt_ids": [1, 2, 3], "desired_ids": 4, "undesired_ids": 4}, ["are the same", "two different tokens"]),
    ({"prompt_ids": [1, 2, 3], "desired_ids": 10**6, "undesired_ids": 4}, ["outside", "[0, "]),
])
def test_meaningless_contrasts_are_refused_before_anything_is_written(tmp_path, row, words):
    model = make_tiny("llama", dtype=torch.float32)
    out = tmp_path / "attr"
    with pytest.raises(CCAError) as e:
        attribute_dataset(model, None, [row], out, AttributeConfig(plots=False))
    assert all(w in str(e.value) for w in words), e.value
    assert not (out / "chunks").exists()


def test_positions_target_without_a_target_is_refused(tmp_path):
    model = make_tiny("llama", dtype=torch.float32)
    row = {"prompt_ids": [1, 2, 3], "desired_ids": 4, "undesired_ids": 5}
    with pytest.raises(CCAError, match="no target continuation.*--positions last"):
        attribute_dataset(model, None, [row], tmp_path / "a", AttributeConfig(positions="target", plots=False))


def test_top_k_minus_one_is_refused():
    with pytest.raises(CCAError, match=r"top_k \(--top-k\) must be a positive integer"):
        AttributeConfig(top_k=-1)


def test_the_python_api_shares_the_check():
    model = make_tiny("llama", dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3]])
    batch = PivotBatch(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(3)[None],
                       desired=torch.tensor([4]),
                       undesired=torch.tensor([4]))
    with pytest.raises(CCAError, match="are the same"):
        attribute(model, batch)
