"""Stage 2 selection (``cca_fast.stages.localize.select``): every method on hand-made scores and masks
(exact expectations, no tolerance), the random control, and the JSON round trip."""
from __future__ import annotations

import json

import pytest
import torch

from cca_fast.attribution import Attribution
from cca_fast.errors import CCAError
from cca_fast.stages.localize import (Selection, select, select_atp_fraction, select_atp_topk, select_dcm,
                               select_random)
from cca_fast.models.components import ComponentSpace
from helpers import tiny


@pytest.fixture(scope="module")
def space():
    return ComponentSpace(tiny("llama"))  # 2 layers x (6 q + 2 k + 2 v + 22 mlp) = 64


def test_dcm_threshold(space):
    mask = torch.linspace(0, 1, space.total)
    sel = select_dcm(mask, space)
    assert sel.indices == torch.nonzero(mask >= 0.5).flatten().tolist()
    assert sel.method == "dcm" and sel.params == {"threshold": 0.5}
    assert select_dcm(mask, space, threshold=0.9).indices == torch.nonzero(mask >= 0.9).flatten().tolist()
    exact = torch.zeros(space.total)
    exact[[3, 40]] = 0.5  # m >= 0.5 is kept (boundary included)
    assert select("dcm", space, mask=exact).indices == [3, 40]


def test_atp_topk_and_fraction_order_and_ties(space):
    scores = torch.zeros(space.total)
    scores[[10, 2, 50]] = torch.tensor([3.0, 2.0, 1.0])
    scores[[7, 30]] = -5.0
    assert select_atp_topk(scores, space, 2).indices == [2, 10]
    assert select_atp_topk(scores, space, 3).indices == [2, 10, 50]
    # ties (all the zeros) are broken by lower flat index
    assert select_atp_topk(scores, space, 5).indices == [0, 1, 2, 10, 50]
    assert select_atp_topk(scores, space, 2, by="abs").indices == [7, 30]
    frac = select_atp_fraction(scores, space, 3 / space.total)
    assert frac.indices == [2, 10, 50] and frac.params["k"] == 3
    assert select("atp-fraction", space, scores=scores, fraction=0.0).indices == []
    c = select_atp_topk(scores, space, 3).counts
    assert c == {"q": 1, "k": 0, "v": 0, "mlp": 2}  # 2 = L0.q2, 10 = L0.mlp0, 50 = L1.mlp18


def test_topk_from_attribution_respects_scored_kinds(space):
    scores = torch.arange(space.total, dtype=torch.float32)
    att = Attribution(space, scores * 0, kinds=("q", "k", "v"))
    att.scores = torch.where(att.eligible(), scores, torch.zeros(()))
    sel = select_atp_topk(att, space, 4)
    assert sel.counts["mlp"] == 0 and len(sel) == 4
    assert sel.indices == sorted(att.order()[:4].tolist())
    with pytest.raises(CCAError, match="k must be"):
        select_atp_topk(att, space, space.total)  # only 20 heads were scored


def test_random_control(space):
    like = select_atp_topk(torch.arange(space.total, dtype=torch.float32), space, 9)
    a = select_random(space, like, seed=1)
    assert a.counts == like.counts and len(a) == 9 and a.indices == sorted(set(a.indices))
    assert select_random(space, like, seed=1).indices == a.indices
    assert any(select_random(space, like, seed=s).indices != a.indices for s in range(2, 6))
    b = select("random", space, like=12, seed=0)
    assert len(b) == 12 and b.params["match_kinds"] is False
    with pytest.raises(CCAError, match="size"):
        select_random(space, space.total + 1)


def test_json_round_trip_is_atomic(tmp_path, space):
    sel = select_atp_topk(torch.randn(space.total, generator=torch.Generator().manual_seed(0)), space, 7)
    path = sel.save(tmp_path / "sub" / "selection.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["selection.json"]  # no temp file left
    back = Selection.load(path)
    assert back == sel
    data = json.loads(path.read_text())
    assert data["n_selected"] == 7 and data["fraction"] == pytest.approx(7 / space.total)
    assert back.mask().sum() == 7 and back.components(space)[0] == space.component(back.indices[0])


def test_errors(tmp_path, space):
    with pytest.raises(CCAError, match="unknown selection method"):
        select("greedy", space)
    with pytest.raises(CCAError, match="needs k"):
        select("atp-topk", space, scores=torch.zeros(space.total))
    with pytest.raises(CCAError, match="fraction"):
        select_atp_fraction(torch.zeros(space.total), space, 1.5)
    with pytest.raises(CCAError, match="tensor"):
        select_dcm(torch.zeros(3), space)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CCAError, match="not valid JSON"):
        Selection.load(bad)
    bad.write_text(json.dumps({"method": "dcm", "indices": [1, 99], "total": 64}))
    with pytest.raises(CCAError, match="outside"):
        Selection.load(bad)
    with pytest.raises(CCAError, match="not found"):
        Selection.load(tmp_path / "missing.json")
    other = ComponentSpace(tiny("gpt2"))
    with pytest.raises(CCAError, match="was made for"):
        select_random(other, select_dcm(torch.ones(space.total), space))
