"""Stage 3 with a shared prefix (``UpdateConfig.share_prefix``) against the plain path.

The examples share a random common prefix of odd length (23 tokens) and have suffixes of 0, 1, 3,
7 and 4 tokens (the first example *is* the common prefix, so the shared prefix must be cut to 22
tokens for it to keep one suffix token).

Where the two paths can differ, and by how much:

* float64 + SDPA computes the forward in float64 except Llama-style RMSNorm, which casts its input
  to float32; both paths feed it values equal up to float64 summation order (~1e-16 relative),
  which round to the same float32 number, so the losses agree to ~1e-16 (tolerance 1e-12).
* The *backward* of that float32 RMSNorm rounds the incoming gradient to float32. In the shared
  path the prefix positions receive the sum of all rows' gradients (through the expanded cache)
  before that rounding; the plain path rounds each row's gradient, then sums. Both are float32
  roundings of the same float64 gradient, so RMSNorm families agree to a few float32 ulps of the
  gradient scale (tolerance 2^-20 * max|grad| per tensor), while GPT-2 (LayerNorm in float64)
  agrees to 1e-13.
* Eager attention computes its softmax in float32, whose sums run over a different number of
  (masked) slots in the two layouts: float32-level agreement (2^-18 relative) for those checks.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cca_fast import ComponentSpace
from cca_fast.errors import CCAError
from cca_fast.stages.examples import PivotBatch, PivotExample
from cca_fast.stages.batches import SharedPrefixBatch, collate_for_loss, group_by_prefix, last_logits
from cca_fast.stages.objectives import TrainingObjective
from cca_fast.stages.update import UpdateConfig, run_update
from helpers import VOCAB, assert_only_owned_rows_may_differ, make_tiny

PREFIX = 23
SUFFIXES = (0, 1, 3, 7, 4)


def _examples(seed=0, prefix=PREFIX, suffixes=SUFFIXES):
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(3, VOCAB, (prefix,), generator=g).tolist()
    out = []
    for i, n in enumerate(suffixes):
        suffix = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        d, u = (torch.randperm(VOCAB - 3, generator=g)[:2] + 3).tolist()
        out.append(PivotExample(f"p{i}", tuple(common + suffix), d, u))
    return out


def _config(**kw):
    kw.setdefault("min_shared_prefix", 8)
    kw.setdefault("batch_size", 8)
    return UpdateConfig(**kw)


def _loss_and_grads(model, examples, **kw):
    """``(mean logit difference, {name: dL/dW})`` of one ``TrainingObjective.pass_`` with dense gradients."""
    batches = TrainingObjective(model, examples, _config(**kw))
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    ld = batches.pass_(backward=True)["logit_diff"]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    return ld, grads, batches


def _assert_grads_close(got, ref, rel, atol=0.0):
    assert set(got) == set(ref)
    for n in ref:
        tol = atol + rel * float(ref[n].abs().max())
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=tol, msg=n)


def test_collate_cuts_the_prefix_so_every_row_keeps_a_suffix_token():
    model = make_tiny("llama", attn="sdpa")
    ex = _examples()
    b = collate_for_loss(model, ex, pad_id=0, device="cpu", min_shared=8)
    assert isinstance(b, SharedPrefixBatch) and b.prefix_len == PREFIX - 1
    S = max(SUFFIXES) + 1
    assert b.input_ids.shape == (5, S) and b.attention_mask.shape == (5, PREFIX - 1 + S)
    for i, n in enumerate(SUFFIXES):
        real = n + 1  # the cut token joins every suffix
        assert b.input_ids[i, S - real:].tolist() == list(ex[i].prefix_ids[PREFIX - 1:])
        assert b.attention_mask[i].tolist() == [1] * (PREFIX - 1) + [0] * (S - real) + [1] * real
        # positions continue from the prefix for every row, whatever its padding
        assert b.position_ids[i, S - real:].tolist() == list(range(PREFIX - 1, PREFIX - 1 + real))
    assert b.prefix_ids[0].tolist() == list(ex[0].prefix_ids[:PREFIX - 1])
    # no example equal to the common prefix: the whole common prefix is shared
    b2 = collate_for_loss(model, ex[1:], pad_id=0, device="cpu", min_shared=8)
    assert b2.prefix_len == PREFIX


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt2", "olmo2", "gemma3_text"])
def test_loss_and_dense_gradients_equal_the_plain_path(arch):
    """(a) loss within 1e-12 and (b) every weight gradient (see the module docstring for the
    tolerances); the shared path really ran (one SharedPrefixBatch)."""
    model = make_tiny(arch, attn="sdpa")
    ex = _examples()
    ld_s, g_s, b_s = _loss_and_grads(model, ex, share_prefix=True)
    ld_p, g_p, b_p = _loss_and_grads(model, ex, share_prefix=False)
    assert [type(b) for b in b_s.batches] == [SharedPrefixBatch]
    assert [type(b) for b in b_p.batches] == [PivotBatch]
    assert abs(ld_s - ld_p) <= 1e-12 and abs(ld_p) > 1e-3
    if arch == "gpt2":
        _assert_grads_close(g_s, g_p, rel=0, atol=1e-13)
    else:
        _assert_grads_close(g_s, g_p, rel=2.0 ** -20)
    # the prefix's gradient reaches the first layer's weights through the cache: a detached
    # cache would lose most of it (every prefix position), far beyond the tolerance above
    assert any(float(g.abs().max()) > 1e-3 for n, g in g_s.items() if ".0." in n)


def test_several_minibatches_and_per_example_reference():
    """Two shared mini-batches (batch_size 3) against the plain path one example at a time (no
    padding at all): the same full-batch gradient. GPT-2: float64 throughout, 1e-13."""
    model = make_tiny("gpt2", attn="sdpa")
    ex = _examples(seed=1, prefix=17, suffixes=(2, 0, 5, 1, 3, 6))
    ld_s, g_s, b_s = _loss_and_grads(model, ex, share_prefix=True, batch_size=3)
    ld_p, g_p, _ = _loss_and_grads(model, ex, share_prefix=False, batch_size=1)
    assert [type(b) for b in b_s.batches] == [SharedPrefixBatch, SharedPrefixBatch]
    assert abs(ld_s - ld_p) <= 1e-12
    _assert_grads_close(g_s, g_p, rel=0, atol=1e-13)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_eager_attention(arch):
    """Eager attention (float32 softmax, see the module docstring: 2^-18 relative), against the
    plain path one example at a time (no padding, so no fully masked float64 eager rows). The
    shared layout has no fully masked query row either (pad slots see the prefix): no NaN."""
    model = make_tiny(arch, attn="eager")
    ex = _examples(seed=2)
    ld_s, g_s, b_s = _loss_and_grads(model, ex, share_prefix=True)
    ld_p, g_p, _ = _loss_and_grads(model, ex, share_prefix=False, batch_size=1)
    assert isinstance(b_s.batches[0], SharedPrefixBatch)
    assert ld_s == pytest.approx(ld_p, rel=2.0 ** -18, abs=1e-12)
    _assert_grads_close(g_s, g_p, rel=2.0 ** -18)


class _NoLogitsToKeep(nn.Module):
    """A model whose forward takes no ``logits_to_keep`` (as some remote-code models). It is a
    model of its own (config + input embeddings, as a ``PreTrainedModel``), not a wrapper that
    ``runtime.unwrap`` would look through."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, use_cache=use_cache)


class _NoCache(_NoLogitsToKeep):
    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache)


def test_model_without_logits_to_keep_and_without_cache():
    inner = make_tiny("qwen2", attn="sdpa")
    ex = _examples(seed=3)
    ref = TrainingObjective(inner, ex, _config(share_prefix=False)).pass_(backward=False)["logit_diff"]
    wrapped = _NoLogitsToKeep(inner)
    b = TrainingObjective(wrapped, ex, _config())
    assert isinstance(b.batches[0], SharedPrefixBatch)
    assert abs(b.pass_(backward=False)["logit_diff"] - ref) <= 1e-12
    no_cache = TrainingObjective(_NoCache(inner), ex, _config())
    assert isinstance(no_cache.batches[0], PivotBatch)  # falls back to the plain path
    assert abs(no_cache.pass_(backward=False)["logit_diff"] - ref) <= 1e-12


def test_falls_back_to_the_plain_path():
    """(d) no common prefix, a prefix below min_shared_prefix, a batch of one, a sequence longer
    than the sliding window: plain batches, and the same loss as share_prefix=False."""
    model = make_tiny("llama", attn="sdpa")
    g = torch.Generator().manual_seed(4)
    disjoint = [PivotExample(f"p{i}", (3 + i,) + tuple(torch.randint(3, VOCAB, (n,), generator=g).tolist()), 5, 6)
                for i, n in enumerate((4, 9, 6))]
    b = TrainingObjective(model, disjoint, _config(batch_size=2))
    plain = TrainingObjective(model, disjoint, _config(batch_size=2, share_prefix=False))
    assert all(isinstance(x, PivotBatch) for x in b.batches)
    # nothing shared: the very batches of the plain path (length order), so the same loss bit for bit
    assert [x.input_ids.tolist() for x in b.batches] == [x.input_ids.tolist() for x in plain.batches]
    assert b.pass_(backward=False)["logit_diff"] == plain.pass_(backward=False)["logit_diff"]
    short = _examples(prefix=7)
    assert isinstance(collate_for_loss(model, short, 0, "cpu", min_shared=8), PivotBatch)
    # short[0] is the whole common prefix: 6 shareable tokens, not 7
    assert isinstance(collate_for_loss(model, short, 0, "cpu", min_shared=7), PivotBatch)
    assert isinstance(collate_for_loss(model, short, 0, "cpu", min_shared=6), SharedPrefixBatch)
    assert isinstance(collate_for_loss(model, _examples()[:1], 0, "cpu", min_shared=8), PivotBatch)
    model.config.sliding_window = PREFIX  # the longest padded sequence has 22 + 8 > 23 slots
    try:
        assert isinstance(collate_for_loss(model, _examples(), 0, "cpu", min_shared=8), PivotBatch)
    finally:
        model.config.sliding_window = None
    with pytest.raises(CCAError, match="min_shared_prefix"):
        UpdateConfig(min_shared_prefix=0).check()


def test_grouping_puts_examples_with_long_common_prefixes_together():
    a, b = _examples(seed=5), _examples(seed=6)
    mixed = [a[0], b[0], a[1], b[1], a[2], b[2]]
    groups = group_by_prefix(mixed, 3)
    assert sorted(map(frozenset, groups), key=str) == sorted([frozenset(a[:3]), frozenset(b[:3])], key=str)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_run_update_sparse_shared_equals_plain(arch):
    """(c) 3 SGD steps (lr 0.05) in sparse mode, share_prefix on vs off: selected rows agree (GPT-2
    1e-13: float64 throughout; Llama 3e-7: the dense check's gradient bound 2^-20 * max|grad|,
    with |grad| < 2 here, times lr 0.05, over 3 steps; measured 2e-8), every other row stays
    bit-identical to the base."""
    ex = _examples(seed=7)
    out = {}
    for share in (True, False):
        model = make_tiny(arch, attn="sdpa")
        space = ComponentSpace(model)
        o = space.offset
        sel = [o(0, "q") + 1, o(1, "k") + 0, o(0, "v") + 1, o(0, "mlp") + 2, o(1, "mlp") + 5]
        base = {n: p.detach().clone() for n, p in model.named_parameters()}
        res = run_update(model, space, sel, ex, _config(lr=0.05, max_steps=3, share_prefix=share))
        out[share] = {n: p.detach().clone() for n, p in model.named_parameters()}
        owned = space.owned_rows(sel)
        assert_only_owned_rows_may_differ(out[share], base, owned)
        lds = [h["train_logit_diff"] for h in res.history]
        assert lds[-1] > lds[0]
    atol = 1e-13 if arch == "gpt2" else 3e-7
    for n in out[True]:
        torch.testing.assert_close(out[True][n], out[False][n], rtol=0, atol=atol, msg=n)


def test_scope_all_with_shared_prefix():
    """The no-mask baseline (dense, every parameter) on the shared path: one step equals the plain
    path's to 1e-13 (GPT-2, float64 throughout, lr 0.01)."""
    ex = _examples(seed=8)
    out = {}
    for share in (True, False):
        model = make_tiny("gpt2", attn="sdpa")
        run_update(model, ComponentSpace(model), [], ex, _config(lr=0.01, max_steps=1, scope="all", share_prefix=share))
        out[share] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n in out[True]:
        torch.testing.assert_close(out[True][n], out[False][n], rtol=0, atol=1e-13, msg=n)


def test_last_logits_shared_matches_plain_for_a_float32_model():
    """float32: the two layouts differ by float32 summation order only (2^-16 relative to the
    logit scale)."""
    model = make_tiny("qwen3", dtype=torch.float32, attn="sdpa")
    ex = _examples(seed=9)
    with torch.no_grad():
        shared = last_logits(model, collate_for_loss(model, ex, 0, "cpu", min_shared=8))
        plain = last_logits(model, collate_for_loss(model, ex, 0, "cpu", min_shared=10 ** 6))
    assert shared.shape == (len(ex), VOCAB)
    torch.testing.assert_close(shared, plain, rtol=0, atol=2.0 ** -16 * float(plain.abs().max()))
