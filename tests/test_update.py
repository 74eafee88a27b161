"""Stage 3 (update) on tiny float64 models of several families.

Padded float64 batches use SDPA attention (eager attention in float64 turns fully masked padding
rows into NaN through a float32 softmax of -inf); Gemma2 has no SDPA path, so its examples all
have the same length (no padding).
"""
from __future__ import annotations

import pytest
import torch

from cca_fast import ComponentSpace
from cca_fast.delta import apply_delta, bitwise_equal
from cca_fast.errors import CCAError
from cca_fast.stages.examples import PivotExample, collate, logit_diff
from cca_fast.stages.update import UpdateConfig, eval_steps, run_update
from helpers import VOCAB, assert_only_owned_rows_may_differ, make_tiny

ARCHS = ["llama", "phi3", "gpt2", "qwen2", "gemma2"]  # separate / fused q|k|v and gate|up, Conv1D, biases, softcaps


def _model(arch, dtype=torch.float64):
    return make_tiny(arch, dtype=dtype, attn="eager" if arch == "gemma2" else "sdpa")


def _examples(n=5, seed=0, same_length=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 if same_length else int(torch.randint(3, 10, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        d, u = torch.randperm(VOCAB - 3, generator=g)[:2] + 3
        out.append(PivotExample(f"p{i}", tuple(ids), int(d), int(u)))
    return out


def _selection(space):
    """A head of each kind, the last q head, neurons incl. the first and last, over both layers."""
    o = space.offset
    return sorted({o(0, "q") + 0, o(1, "q") + space.counts["q"] - 1, o(0, "k") + 1, o(1, "v") + 0,
                   o(0, "mlp") + 0, o(1, "mlp") + 3, o(1, "mlp") + 4, o(1, "mlp") + space.counts["mlp"] - 1})


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _loss(model, examples):
    b = collate(examples, 0)
    logits = model(**b.model_inputs()).logits[:, -1]
    return -logit_diff(logits, b.desired, b.undesired).mean()


def test_eval_schedule_is_the_papers():
    assert eval_steps(50) == [0, 2, 4, 6, 8, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    assert eval_steps(7) == [0, 2, 4, 6, 7]
    assert eval_steps(0) == [0]


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_equals_reference_and_only_owned_rows_change(arch):
    """SGD (the paper's update), 3 steps, lr 0.05: the two modes compute the same float64 gradient
    up to summation order (~1e-16 relative), and SGD is linear in it, so rows agree to 1e-13."""
    ex = _examples(same_length=arch == "gemma2")
    runs = {}
    for mode in ("sparse", "reference"):
        model = _model(arch)
        space = ComponentSpace(model)
        sel = _selection(space)
        base = _params(model)
        res = run_update(model, space, sel, ex, UpdateConfig(lr=0.05, max_steps=3, mode=mode, batch_size=2))
        runs[mode] = _params(model)
        owned = space.owned_rows(sel)
        assert_only_owned_rows_may_differ(runs[mode], base, owned)
        for name, s in owned.items():
            p = runs[mode][name]
            assert not torch.equal(p.index_select(s.dim, s.index), base[name].index_select(s.dim, s.index)), name
        assert res.best_step == 3 and res.best_val is None
        lds = [h["train_logit_diff"] for h in res.history]
        assert len(lds) == 4 and lds[-1] > lds[0]  # descending -logit diff raises the logit diff
    for name in runs["sparse"]:
        torch.testing.assert_close(runs["sparse"][name], runs["reference"][name], rtol=0, atol=1e-13, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adamw_sparse_equals_reference(arch):
    """AdamW divides by sqrt(v): an element whose gradient is tiny through cancellation has a
    large relative error, so after 3 steps the agreement is 1e-9 absolute (lr 1e-2), not 1e-13."""
    ex = _examples()
    out = {}
    for mode in ("sparse", "reference"):
        model = _model(arch)
        space = ComponentSpace(model)
        run_update(model, space, _selection(space), ex,
                   UpdateConfig(lr=1e-2, max_steps=3, mode=mode, optimizer="adamw", weight_decay=0.1))
        out[mode] = _params(model)
    for name in out["sparse"]:
        torch.testing.assert_close(out["sparse"][name], out["reference"][name], rtol=0, atol=1e-9, msg=name)


def test_one_step_is_gradient_descent_on_minus_mean_logit_diff():
    """The paper's update W <- W - lr dL/dW with L = -mean logit diff, checked against a central
    finite difference of L in one weight element of a selected neuron's row. GPT-2 (LayerNorm,
    learned positions) is float64 end to end (Llama-like models compute RMSNorm and RoPE in
    float32, which limits a finite difference to ~1e-4). h = 1e-5: truncation ~h^2 L''' ~ 1e-10,
    rounding ~1e-16 / h ~ 1e-11, so relative tolerance 1e-7."""
    ex = _examples()
    model = _model("gpt2")
    space = ComponentSpace(model)
    sel = [space.offset(1, "mlp") + 3]
    name = "transformer.h.1.mlp.c_fc.weight"  # Conv1D [in, out]: the neuron's row is column 3
    lr = 1e-3
    w0 = model.get_parameter(name).detach().clone()
    with torch.no_grad():
        h = 1e-5
        p = model.get_parameter(name)
        p[5, 3] += h
        lp = float(_loss(model, ex))
        p[5, 3] -= 2 * h
        lm = float(_loss(model, ex))
        p[5, 3] += h
    fd = (lp - lm) / (2 * h)
    run_update(model, space, sel, ex, UpdateConfig(lr=lr, max_steps=1))
    step = float(w0[5, 3] - model.get_parameter(name).detach()[5, 3]) / lr
    assert abs(fd) > 1e-3
    assert step == pytest.approx(fd, rel=1e-7)


def test_minibatch_size_does_not_change_the_full_batch_gradient():
    ex = _examples(7)
    out = []
    for bs in (1, 3, 8):
        model = _model("qwen2")
        space = ComponentSpace(model)
        run_update(model, space, _selection(space), ex, UpdateConfig(lr=0.05, max_steps=2, batch_size=bs))
        out.append(_params(model))
    for other in out[1:]:
        for n in out[0]:
            torch.testing.assert_close(other[n], out[0][n], rtol=0, atol=1e-13)


def test_best_step_is_chosen_by_validation_and_model_left_there():
    ex = _examples()
    model = _model("llama")
    space = ComponentSpace(model)
    seen = {}
    scores = iter([0.2, 0.5, 0.7, 0.7, 0.1, 0.3])  # steps 0, 2, 4, 6, 8, 9

    def validate(m):
        step = len(seen)
        seen[[0, 2, 4, 6, 8, 9][step]] = _params(m)
        return next(scores)

    records = []
    res = run_update(model, space, _selection(space), ex, UpdateConfig(lr=0.05, max_steps=9), validate=validate,
                     progress=records.append)
    assert res.best_step == 4 and res.best_val == 0.7  # ties keep the earliest step
    assert [h["step"] for h in res.history if "val" in h] == [0, 2, 4, 6, 8, 9]
    assert records == res.history and len(records) == 10
    for n, p in model.named_parameters():
        assert bitwise_equal(p, seen[4][n]), n
    # the delta holds exactly the best step's rows and reproduces the model from the base
    fresh = _model("llama")
    apply_delta(fresh, res.delta)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert bitwise_equal(p, q), n
    assert res.delta.meta["metrics"]["best_step"] == 4 and res.delta.meta["components"][0].startswith("L0.q")


def test_base_wins_restores_base_bit_exactly():
    ex = _examples()
    model = _model("gpt2")
    base = _params(model)
    space = ComponentSpace(model)
    calls = []

    def validate(m):  # the base model scores best
        calls.append(len(calls))
        return 1.0 if len(calls) == 1 else 0.0

    res = run_update(model, space, _selection(space), ex, UpdateConfig(lr=0.05, max_steps=4), validate=validate)
    assert res.best_step == 0 and len(calls) == 3  # steps 0, 2, 4
    for n, p in model.named_parameters():
        assert bitwise_equal(p, base[n]), n
    assert res.delta.params == {} and res.delta.meta["kept_base"]  # the base kept: an empty delta


def test_no_dense_weight_gradient_in_sparse_mode_and_flags_restored():
    ex = _examples()
    model = _model("llama")
    model.train()
    model.get_parameter("model.norm.weight").requires_grad_(False)
    space = ComponentSpace(model)
    grads_seen = []

    def validate(m):
        grads_seen.append([n for n, p in m.named_parameters() if p.grad is not None or p.requires_grad])
        assert not m.training
        return 0.0

    run_update(model, space, _selection(space), ex, UpdateConfig(lr=0.05, max_steps=2), validate=validate)
    assert grads_seen and all(g == [] for g in grads_seen)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert not model.get_parameter("model.norm.weight").requires_grad
    assert model.get_parameter("model.embed_tokens.weight").requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision_models(dtype):
    """fp32: gradients differ between modes by float32 summation order (~1e-7 relative) -> 1e-6 on
    rows of magnitude ~0.5 after 2 steps of lr 0.05. fp16/bf16 (fp32 master rows): the dense
    reference rounds dW to the weight dtype before the step while the sparse path keeps it fp32,
    so the rows agree to within a couple of ulps of the half type (rtol 2^-8 fp16, 2^-6 bf16)."""
    ex = _examples()
    out = {}
    for mode in ("sparse", "reference"):
        model = _model("llama", dtype=dtype)
        space = ComponentSpace(model)
        base = _params(model)
        run_update(model, space, _selection(space), ex, UpdateConfig(lr=0.05, max_steps=2, mode=mode))
        out[mode] = _params(model)
        assert any(not torch.equal(out[mode][n], base[n]) for n in base)
    tol = {torch.float32: dict(rtol=0, atol=1e-6), torch.float16: dict(rtol=2.0 ** -8, atol=1e-4),
           torch.bfloat16: dict(rtol=2.0 ** -6, atol=1e-3)}[dtype]
    for n in out["sparse"]:
        torch.testing.assert_close(out["sparse"][n].float(), out["reference"][n].float(), **tol, msg=n)


def test_no_mask_baseline_updates_every_parameter():
    ex = _examples()
    model = _model("llama")
    space = ComponentSpace(model)
    base = _params(model)
    lr = 0.01
    grads = torch.autograd.grad(_loss(model, ex), list(model.parameters()))
    res = run_update(model, space, [], ex, UpdateConfig(lr=lr, max_steps=1, scope="all"))
    for (n, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(p.detach(), base[n] - lr * g, rtol=0, atol=1e-13, msg=n)
    assert set(res.delta.params) == set(base) and res.delta.meta["fraction"] == 1.0


def test_bad_input_raises_cca_error():
    model = _model("llama")
    space = ComponentSpace(model)
    with pytest.raises(CCAError, match="no components selected"):
        run_update(model, space, [], _examples(), UpdateConfig(max_steps=1))
    with pytest.raises(CCAError, match="at least one training example"):
        run_update(model, space, [0], [], UpdateConfig(max_steps=1))
    with pytest.raises(CCAError, match="in \\[0"):
        run_update(model, space, [space.total], _examples(), UpdateConfig(max_steps=1))
    for bad in (dict(optimizer="adam"), dict(mode="fast"), dict(max_steps=-1), dict(lr=float("nan")),
                dict(optimizer="sgd", nesterov=True)):
        with pytest.raises(CCAError):
            run_update(model, space, [0], _examples(), UpdateConfig(**bad))
