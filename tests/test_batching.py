"""The one batching primitive (``cca_fast.generation.batching``): padding puts every row's tokens,
mask and positions where they belong (exact integers), and suffixes run on a prefix's cache give
each row the logits of its full sequence run alone (float64 tiny models: agreement to ~1e-12)."""
from __future__ import annotations

import pytest
import torch

from cca_fast.generation.batching import pad, run_suffixes
from cca_fast.generation.prefix import on_shared_prefix, run_prefix
from cca_fast.generation.state import expand
from helpers import tiny


def test_pad_left_right_and_offsets():
    b = pad([[5, 6, 7], [8]], 0)
    assert b.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]] and b.starts == [0, 2]
    r = pad([[5, 6, 7], [8]], 9, side="right", offset=4)
    assert r.input_ids.tolist() == [[5, 6, 7], [8, 9, 9]] and r.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert r.position_ids.tolist() == [[4, 5, 6], [4, 4, 4]] and r.starts == [0, 0]
    t = pad([[1, 2], [3]], 0, offset=torch.tensor([10, 20]), width=4)
    assert t.input_ids.tolist() == [[0, 0, 1, 2], [0, 0, 0, 3]] and t.position_ids[:, -1].tolist() == [11, 20]
    with pytest.raises(ValueError, match="side must be"):
        pad([[1]], 0, side="middle")


def _alone(model, seq):
    with torch.no_grad():
        return model(input_ids=torch.tensor([seq])).logits[0, -1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_suffixes_on_a_prefix_equal_each_row_alone(arch):
    model = tiny(arch).eval()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, V, (7,), generator=g).tolist()
    rows = [torch.randint(3, V, (k,), generator=g).tolist() for k in (1, 4, 2)]
    ref = torch.stack([_alone(model, prefix + r) for r in rows])
    batch = pad(rows, 0, offset=len(prefix))
    with torch.no_grad():
        shared = on_shared_prefix(model, prefix, batch)[:, -1]
        _, cache = run_prefix(model, prefix)
        expand(cache, len(rows))
        ones = torch.ones(1, len(prefix), dtype=torch.long)
        direct = run_suffixes(model, batch, cache=cache, prefix_mask=ones)[0][:, -1]
    # float64: only summation order differs between the batched and the single-row forwards
    torch.testing.assert_close(shared, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(direct, ref, rtol=0, atol=1e-10)
