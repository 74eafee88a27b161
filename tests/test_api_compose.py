"""The stages compose as a user embeds them: ``select()`` output straight into ``run_update``,
saved component names back into components, a user objective, short reprs, top-level result
types, and clear errors for the mistakes a newcomer makes first.

Numbers: float64 tiny llama. A user loss equal to the paper's (``-mean logit difference``) must give
the built-in objective's update to 1e-12 (the same math in another summation order; float64
rounding is ~1e-16 per operation on O(1) values); every other identity here is bitwise (the same
indices reach the same code).
"""
from __future__ import annotations

import pytest
import torch

import cca_fast as cca
from cca_fast.delta import bitwise_equal
from cca_fast.errors import CCAError
from cca_fast.stages.examples import logit_diff
from helpers import VOCAB, examples, tiny


def _cfg(**kw) -> cca.UpdateConfig:
    return cca.UpdateConfig(**{"max_steps": 3, "lr": 5e-2, "share_prefix": False, **kw})


def _same_delta(a: cca.SparseDelta, b: cca.SparseDelta, atol: float | None = None) -> None:
    assert sorted(a.params) == sorted(b.params)
    for name, pd in a.params.items():
        if atol is None:
            assert bitwise_equal(pd.new, b.params[name].new), name
        else:
            torch.testing.assert_close(pd.new, b.params[name].new, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def scored():
    model = tiny("llama")
    space = cca.ComponentSpace(model)
    ex = examples("llama", 6)
    attr = cca.attribute(model, cca.collate(ex, pad_id=0))
    return space, ex, cca.select("atp-topk", space, scores=attr, k=7)


# ---- selection -> update ---------------------------------------------------------------------------

def test_selection_goes_straight_into_run_update(scored):
    space, ex, sel = scored
    assert isinstance(sel, cca.Selection) and list(sel) == sel.indices
    by_sel = cca.run_update(tiny("llama"), space, sel, ex, _cfg())
    by_idx = cca.run_update(tiny("llama"), space, sel.indices, ex, _cfg())
    by_names = cca.run_update(tiny("llama"), space, sel.names(space), ex, _cfg())
    _same_delta(by_sel.delta, by_idx.delta)
    _same_delta(by_sel.delta, by_names.delta)
    assert by_sel.delta.meta["components"] == sel.names(space)


def test_a_selection_for_another_model_is_refused(scored):
    _, ex, sel = scored
    other = tiny("gpt2")
    with pytest.raises(CCAError, match="selection was made for a llama model with 64 components"):
        cca.run_update(other, cca.ComponentSpace(other), sel, ex, _cfg())
    with pytest.raises(CCAError, match="a boolean mask\\? pass mask.nonzero"):
        cca.run_update(tiny("llama"), scored[0], sel.mask(), ex, _cfg())


def test_saved_names_parse_back(scored):
    space, ex, sel = scored
    assert space.parse("L1.q4") == cca.Component(1, "q", 4)
    assert space.parse(["L0.mlp21", "L1.v1"]) == [cca.Component(0, "mlp", 21), cca.Component(1, "v", 1)]
    assert [space.index(n) for n in sel.names(space)] == sel.indices
    res = cca.run_update(tiny("llama"), space, sel, ex, _cfg(max_steps=1))
    again = cca.Selection.from_names(space, res.delta.meta["components"])
    assert again.indices == sel.indices and again.method == "names"
    for bad, msg in (("L1.x4", "not a component name: 'L1.x4'"), ("q4", "names look like 'L3.q4'"),
                     ("L1.q6", "component 'L1.q6' is not in this model .*q index 6 out of range \\[0, 6\\)"),
                     ("L2.q0", "layer 2 out of range")):
        with pytest.raises(CCAError, match=msg):
            space.parse(bad)


def test_unknown_kind_lists_the_kinds():
    for arch in ("llama", "gpt2", "phi3"):
        space = cca.ComponentSpace(tiny(arch))
        for call in (lambda: space.flat_index(0, "o", 1), lambda: space.offset(0, "o"),
                     lambda: space.adapter.site(0, "o")):
            with pytest.raises(CCAError, match="unknown component kind 'o'; the kinds are 'q', 'k', 'v', 'mlp'"):
                call()
    model = tiny("gpt2")
    with pytest.raises(CCAError, match="unknown component kind 'o'"):
        with cca.scale_components(model, cca.ComponentSpace(model), {(0, "o"): torch.ones(6)}):
            pass


# ---- user objective ---------------------------------------------------------------------------------

def _paper_loss(model, batch):
    logits = model(**batch.model_inputs()).logits[:, -1]
    return -logit_diff(logits, batch.desired, batch.undesired).mean()


def test_user_loss_equal_to_the_paper_objective_gives_its_update(scored):
    space, ex, sel = scored
    ref = cca.run_update(tiny("llama"), space, sel, ex, _cfg())
    for batch_size in (2, 6):  # the full-batch mean: the same gradient for any batch size
        got = cca.run_update(tiny("llama"), space, sel, ex, _cfg(batch_size=batch_size), loss=_paper_loss)
        _same_delta(got.delta, ref.delta, atol=1e-12)
        for h_got, h_ref in zip(got.history, ref.history):
            assert abs(h_got["train_loss"] + h_ref["train_logit_diff"]) < 1e-12  # loss = -mean ld
    assert got.delta.meta["hyperparameters"]["objective"] == "custom:_paper_loss"


def test_user_loss_on_items_of_its_own(scored):
    space, _, sel = scored
    g = torch.Generator().manual_seed(7)
    items = [torch.randint(3, VOCAB, (5,), generator=g) for _ in range(4)]

    def nll(model, batch):  # next-token loss of a list of id tensors
        ids = torch.stack(batch)
        logits = model(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    model = tiny("llama")
    res = cca.run_update(model, space, sel, items, _cfg(max_steps=4, lr=0.2), loss=nll)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert abs(float(nll(model, items)) - losses[-1]) < 1e-12  # the model is left at the last step


def test_user_loss_errors(scored):
    space, ex, sel = scored
    model = tiny("llama")
    with pytest.raises(CCAError, match="must return a scalar tensor"):
        cca.run_update(model, space, sel, ex, _cfg(), loss=lambda m, b: m(**b.model_inputs()).logits)
    with pytest.raises(CCAError, match="without a gradient: compute it from model"):
        cca.run_update(model, space, sel, ex, _cfg(), loss=lambda m, b: torch.tensor(1.0))
    with pytest.raises(CCAError, match="pass either loss=... or UpdateConfig.objective='hinge'"):
        cca.run_update(model, space, sel, ex, _cfg(objective="hinge"), loss=_paper_loss)
    with pytest.raises(CCAError, match="loss must be a callable"):
        cca.run_update(model, space, sel, ex, _cfg(), loss="logit_diff")
    for n, p in model.named_parameters():  # refused before any step: the model is untouched
        assert bitwise_equal(p, dict(tiny("llama").named_parameters())[n]), n


# ---- gold solutions from the top level --------------------------------------------------------------

def test_gold_nll_takes_top_level_sft_examples(scored):
    space, _, sel = scored
    g = torch.Generator().manual_seed(3)
    gold = [cca.SFTExample(tuple(torch.randint(3, VOCAB, (4,), generator=g).tolist()),
                           tuple(torch.randint(3, VOCAB, (3,), generator=g).tolist()), f"g{i}") for i in range(3)]
    res = cca.run_update(tiny("llama"), space, sel, [], _cfg(objective="gold_nll", lr=0.2), gold=gold)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


# ---- reprs -------------------------------------------------------------------------------------------

def test_reprs_are_short(scored):
    space, ex, sel = scored
    assert repr(space) == "ComponentSpace(llama: 2 layers x (q 6, k 2, v 2, mlp 22) = 64 components)"
    assert repr(sel).startswith("Selection('atp-topk': 7 of 64 components (10.9%)")
    res = cca.run_update(tiny("llama"), space, sel, ex, _cfg(max_steps=20))
    text = repr(res)
    assert len(text) < 300, text
    assert text.startswith("UpdateResult(best_step=20, best_val=None, steps=20, final train_logit_diff=")
    assert "SparseDelta(" in text and "7 components" in text
    handle = cca.apply_delta(tiny("llama"), res.delta.__class__.from_models(tiny("llama"), tiny("llama", seed=1)))
    assert repr(handle).startswith("DeltaHandle(SparseDelta(") and repr(handle).endswith(", applied)")
    big = cca.ComponentSpace(tiny("llama"))
    assert len(repr(cca.select("random", big, like=60, seed=0))) < 200


# ---- first mistakes ----------------------------------------------------------------------------------

def test_collate_without_a_pad_token_says_what_to_pass():
    ex = examples("llama", 2)
    with pytest.raises(CCAError, match="pad_id is None: the tokenizer has no pad token .*pad_id=tokenizer.eos_token_id"):
        cca.collate(ex, pad_id=None)
    with pytest.raises(CCAError, match="must be a token id"):
        cca.collate(ex, pad_id=-1)


def test_load_model_of_a_loaded_model_says_what_to_do():
    with pytest.raises(CCAError, match="load_model takes a name or a path .* got an already loaded model: a loaded "
                                       "model needs no loading"):
        cca.load_model(tiny("llama"))
    with pytest.raises(CCAError, match="got a dict"):
        cca.load_model({"model": "x"})
