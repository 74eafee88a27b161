"""Every method of ``attribute_dataset`` against its slow exact twin on a tiny float64 model.

The twin is activation patching of one component at a time, written independently here (its own
hooks, one unpadded forward per example, its own metric): component ``c``'s activation at the
scored positions is set to ``a - s * (a - baseline)`` and ``f(s)`` is the summed metric.

* first-order identity, every component and block: ``score_c = -f'(0)``, checked with a central
  difference ``-(f(eps) - f(-eps)) / (2 eps)``, ``eps = 1e-4``. Its truncation error is
  ``eps^2 / 6 * |f'''| ~ 1e-9`` and its rounding error ``~1e-16 * |f| / eps ~ 1e-12``, so we
  allow ``1e-6`` times the largest score (absolute): far below any real mismatch (O(1)).
* exact agreement: with the final norm removed, the logit difference at the last position is
  linear in the last layer's MLP neurons and MLP output; there a full patch (``s = 1``, the
  activation replaced by its baseline) must equal the score to rounding (``1e-10`` relative).
* integrated gradients: against the definition computed by caching (``retain_grad`` at every
  site, one unpadded forward / backward per example and step), ``1e-10`` relative (float64
  rounding of sums over a few hundred terms), and equal to exact patching on the linear part.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cca_fast.attribution_dataset import AttributeConfig, attribute_dataset
from cca_fast.attribution_dataset.inputs import Example
from cca_fast.attribution_dataset.methods import ALL_KINDS, Layout
from cca_fast.models.components import ComponentSpace
from helpers import VOCAB, make_tiny

EPS = 1e-4


class _RMSNorm64(nn.Module):
    """RMSNorm entirely in the input dtype: transformers' RMSNorm computes in float32, whose
    rounding (1e-8 relative) would swamp a finite difference; the float64 twin keeps every
    operation of the model float64."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _model(arch: str = "llama") -> nn.Module:
    """A tiny float64 model (SDPA attention: eager softmax runs in float32) with float64 norms."""
    model = make_tiny(arch, torch.float64, attn="sdpa")
    for name, mod in list(model.named_modules()):
        if type(mod).__name__.endswith("RMSNorm"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _RMSNorm64(mod))
    return model


def _examples(n: int = 5, seed: int = 0, equal_corrupt: bool = True) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P = int(torch.randint(3, 8, (1,), generator=g))
        L = int(torch.randint(1, 4, (1,), generator=g))
        prompt = tuple(torch.randint(3, VOCAB, (P,), generator=g).tolist())
        target = tuple(torch.randint(3, VOCAB, (L,), generator=g).tolist())
        Pc = P if equal_corrupt else int(torch.randint(2, 9, (1,), generator=g))
        corrupt = tuple(torch.randint(3, VOCAB, (Pc,), generator=g).tolist())
        d, u = torch.randint(3, VOCAB, (2,), generator=g).tolist()
        out.append(Example(i, f"ex{i}", prompt, target, d, u if u != d else d + 1, corrupt))
    return out


def _for_metric(examples: list[Example], metric: str) -> list[Example]:
    """logit_diff runs on the prompt only (no target), as the loader makes it."""
    if metric != "logit_diff":
        return examples
    return [Example(e.index, e.source, e.prompt_ids, (), e.desired, e.undesired, e.corrupt_ids) for e in examples]


# ---- the twin ----------------------------------------------------------------------------------

def _metric(metric: str, logits: torch.Tensor, e: Example) -> torch.Tensor:
    """Metric of one unpadded example from ``logits [T, V]``."""
    P = len(e.prompt_ids)
    if metric == "logit_diff":
        return logits[P - 1, e.desired] - logits[P - 1, e.undesired]
    ids = torch.tensor(e.prompt_ids + e.target_ids)
    lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[:, 0]  # [T-1], lp[t] = log p(x_{t+1})
    if metric == "logprob":
        return lp[P - 1 :].sum()
    return -lp.mean()


def _positions(positions: str, metric: str, e: Example) -> list[int]:
    P, T = len(e.prompt_ids), e.n_tokens
    if positions == "last" or (positions == "target" and metric == "logit_diff"):
        return [P - 1]
    if positions == "all":
        return list(range(T))
    return list(range(P - 1, T - 1))


def _hook(model, site, fn):
    mod = model.get_submodule(site.module_name)
    if site.io == "output":
        return mod.register_forward_hook(lambda _m, _i, out: fn(out))
    return mod.register_forward_pre_hook(lambda _m, args: (fn(args[0]),) + tuple(args[1:]))


def _capture(model, site, ids: tuple[int, ...]) -> torch.Tensor:
    """The site's activation ``[T, C]`` on one unpadded sequence."""
    box = {}
    h = _hook(model, site, lambda x: box.setdefault("x", x.detach()[0].clone()) is None or x)
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        h.remove()
    return box["x"]


def _sites(layout: Layout):
    for layer in range(layout.n_layers):
        for kind in ALL_KINDS:
            site = layout.site(layer, kind)
            for i in range(site.n):
                yield layer, kind, i, site


def _baselines(model, layout, examples, method, metric, positions):
    """Per (layer, kind, example): the baseline activation ``[len(positions), C]`` at the scored positions."""
    out = {}
    seen = set()
    for layer, kind, _i, site in _sites(layout):
        if (layer, kind) in seen:
            continue
        seen.add((layer, kind))
        acts = []
        for e in examples:
            pos = _positions(positions, metric, e)
            a = _capture(model, site, e.prompt_ids + e.target_ids)
            if method == "patch":
                c = _capture(model, site, e.corrupt_ids + e.target_ids)
                shift = e.n_tokens - (len(e.corrupt_ids) + len(e.target_ids))  # right-aligned
                acts.append(c[[p - shift for p in pos]])
            elif method == "gradxact":
                acts.append(torch.zeros_like(a[pos]))
            else:
                acts.append(a[pos])
        if method == "mean":
            mean = torch.cat(acts).mean(0)
            acts = [mean.expand(len(_positions(positions, metric, e)), -1) for e in examples]
        for e, a in zip(examples, acts):
            out[(layer, kind, e.index)] = a
    return out


def _patched_metrics(model, site, examples, base, metric, positions, layer, kind, s: float) -> torch.Tensor:
    """``f(s)`` for every component of the site at once (row ``j`` of a replicated batch patches
    component ``j``): ``[site.n]``, summed over examples."""
    n, w = site.n, site.width
    total = torch.zeros(n, dtype=torch.float64)
    for e in examples:
        pos = _positions(positions, metric, e)
        b = base[(layer, kind, e.index)]  # [len(pos), C]

        def fn(x, pos=pos, b=b):
            x = x.clone()
            for j in range(n):
                lo, hi = site.start + j * w, site.start + (j + 1) * w
                a = x[j, pos, lo:hi]
                x[j, pos, lo:hi] = a - s * (a - b[:, lo:hi])
            return x

        h = _hook(model, site, fn)
        try:
            with torch.no_grad():
                logits = model(torch.tensor([e.prompt_ids + e.target_ids] * n)).logits
        finally:
            h.remove()
        total += torch.stack([_metric(metric, logits[j], e) for j in range(n)])
    return total


def _fd_scores(model, layout, examples, method, metric, positions) -> torch.Tensor:
    base = _baselines(model, layout, examples, method, metric, positions)
    out = torch.zeros(layout.total, dtype=torch.float64)
    for layer in range(layout.n_layers):
        for kind in ALL_KINDS:
            site = layout.site(layer, kind)
            args = (model, site, examples, base, metric, positions, layer, kind)
            o = layout.offset(layer, kind)
            out[o : o + site.n] = -(_patched_metrics(*args, EPS) - _patched_metrics(*args, -EPS)) / (2 * EPS)
    return out


def _fast(model, examples, tmp_path, **kw) -> torch.Tensor:
    cfg = AttributeConfig(batch_size=2, chunk_size=3, plots=False, **kw)
    return attribute_dataset(model, None, examples, tmp_path / "out", cfg, progress=False).scores


CASES = [("gradxact", "logit_diff", "last"), ("gradxact", "logprob", "target"), ("gradxact", "loss", "all"),
         ("patch", "logit_diff", "last"), ("patch", "logprob", "all"), ("mean", "logit_diff", "last"),
         ("mean", "loss", "target")]


@pytest.mark.parametrize("method,metric,positions", CASES)
def test_first_order_identity_every_component(tmp_path, method, metric, positions):
    model = _model()
    ex = _for_metric(_examples(), metric)
    got = _fast(model, ex, tmp_path, method=method, metric=metric, positions=positions)
    ref = _fd_scores(model, Layout(ComponentSpace(model)), ex, method, metric, positions)
    tol = 1e-6 * float(ref.abs().max())  # central-difference error budget, see the module docstring
    assert float(ref.abs().max()) > 1e-3  # the check is not vacuous
    torch.testing.assert_close(got, ref, rtol=0, atol=tol)


def test_patch_corrupt_of_another_length_at_last_position(tmp_path):
    """Corrupted prompts of other lengths are right-aligned (the last prompt tokens meet)."""
    model = _model("qwen2")
    ex = _for_metric(_examples(equal_corrupt=False, seed=3), "logit_diff")
    got = _fast(model, ex, tmp_path, method="patch", metric="logit_diff", positions="last")
    ref = _fd_scores(model, Layout(ComponentSpace(model)), ex, "patch", "logit_diff", "last")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


def _linear_model():
    model = _model()
    model.model.norm = nn.Identity()  # logits linear in the last layer's MLP neurons and output
    return model


@pytest.mark.parametrize("method,ig", [("gradxact", 0), ("patch", 0), ("mean", 0), ("patch", 4)])
def test_exact_patching_where_the_metric_is_linear(tmp_path, method, ig):
    model = _linear_model()
    layout = Layout(ComponentSpace(model))
    ex = _for_metric(_examples(seed=1), "logit_diff")
    got = _fast(model, ex, tmp_path, method=method, metric="logit_diff", positions="last", ig_steps=ig)
    base = _baselines(model, layout, ex, method, "logit_diff", "last")
    last = layout.n_layers - 1
    checked = 0
    for layer, kind, i, site in _sites(layout):
        if layer != last or kind not in ("mlp", "mlp_out"):
            continue
        if i:
            continue
        args = (model, site, ex, base, "logit_diff", "last", layer, kind)
        exact = _patched_metrics(*args, 0.0) - _patched_metrics(*args, 1.0)  # clean - patched, [n]
        o = layout.offset(layer, kind)
        torch.testing.assert_close(got[o : o + site.n], exact, rtol=1e-10, atol=1e-12)  # rounding only
        checked += site.n
    assert checked == layout.count("mlp") + 1


def _ig_reference(model, layout, examples, steps: int) -> torch.Tensor:
    """EAP-IG by definition: mean over midpoints of the cached site gradients, dotted with
    ``a_clean - a_corrupt`` at the last prompt position; one example at a time, no padding."""
    out = torch.zeros(layout.total, dtype=torch.float64)
    emb = model.get_input_embeddings()
    sites = [(layer, kind, layout.site(layer, kind)) for layer in range(layout.n_layers) for kind in ALL_KINDS]
    for e in examples:
        P = len(e.prompt_ids)
        clean = {(lay, k): _capture(model, s, e.prompt_ids)[P - 1] for lay, k, s in sites}
        corr = {(lay, k): _capture(model, s, e.corrupt_ids)[P - 1] for lay, k, s in sites}
        grads = {key: torch.zeros_like(v) for key, v in clean.items()}
        with torch.no_grad():
            ec, eb = emb(torch.tensor([e.prompt_ids])), emb(torch.tensor([e.corrupt_ids]))
        for k in range(steps):
            alpha = (k + 0.5) / steps
            store = {}

            def keep(x, key):
                x.retain_grad()
                store[key] = x
                return x

            hs = [_hook(model, s, lambda x, key=(lay, kd): keep(x, key)) for lay, kd, s in sites]
            try:
                x = (eb + alpha * (ec - eb)).requires_grad_(True)
                logits = model(inputs_embeds=x).logits[0]
                _metric("logit_diff", logits, e).backward()
            finally:
                for h in hs:
                    h.remove()
            for key in grads:
                grads[key] += store[key].grad[0, P - 1] / steps
        for lay, kd, s in sites:
            d = (clean[(lay, kd)] - corr[(lay, kd)]) * grads[(lay, kd)]
            per = d[s.start : s.stop].view(s.n, s.width).sum(-1)
            o = layout.offset(lay, kd)
            out[o : o + s.n] += per
    return out


def test_integrated_gradients_equal_their_definition(tmp_path):
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    ex = _for_metric(_examples(seed=2), "logit_diff")
    got = _fast(model, ex, tmp_path, method="patch", metric="logit_diff", positions="last", ig_steps=3)
    ref = _ig_reference(model, Layout(ComponentSpace(model)), ex, 3)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))  # fp64 rounding only


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_other_layouts_first_order(tmp_path, arch):
    """Fused qkv (GPT-2 Conv1D, Phi-3) and GPT-2's attn.c_proj as the attention output."""
    model = _model(arch)
    ex = _for_metric(_examples(seed=4), "logit_diff")
    ex = [Example(e.index, e.source, e.prompt_ids[:5] + (7,) * (5 - len(e.prompt_ids[:5])), (), e.desired,
                  e.undesired, e.corrupt_ids) for e in ex]
    got = _fast(model, ex, tmp_path, method="gradxact", metric="logit_diff", positions="all")
    ref = _fd_scores(model, Layout(ComponentSpace(model)), ex, "gradxact", "logit_diff", "all")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("method", ["gradxact", "patch", "mean"])
def test_block_output_is_the_sum_of_its_neurons(tmp_path, method):
    """Llama's down projection has no bias, so ``(W h) . g = h . (W^T g)``: each layer's MLP-output
    score equals the sum of its neuron scores (float64 rounding: 1e-10 relative)."""
    model = _model()
    ex = _for_metric(_examples(seed=5), "logprob")
    r = attribute_dataset(model, None, ex, tmp_path / "o", AttributeConfig(method=method, metric="logprob",
                          positions="all", plots=False), progress=False)
    torch.testing.assert_close(r.kind("mlp").sum(1), r.kind("mlp_out")[:, 0], rtol=1e-10, atol=1e-12)


def test_dataset_scores_go_straight_into_select(tmp_path):
    """``select`` takes a DatasetAttribution (or its component_scores()): the first
    ``space.total`` scores, in ComponentSpace order; the raw [total + 2 * n_layers] tensor is
    refused with a message naming the fix."""
    from cca_fast.errors import CCAError
    from cca_fast.models.components import ComponentSpace
    from cca_fast.stages.localize.select import select

    model = make_tiny("llama")
    space = ComponentSpace(model)
    ex = [Example(i, f"e{i}", (3 + i, 5, 7 + i, 9), (), 4, 6, None) for i in range(3)]
    r = attribute_dataset(model, None, ex, tmp_path / "o", AttributeConfig(plots=False), progress=False)
    comp = r.component_scores()
    assert comp.shape == (space.total,) and torch.equal(comp, r.scores[: space.total])
    for scores in (r, r.attribution(), comp):
        sel = select("atp-topk", space, scores=scores, k=5)
        expected = torch.sort(comp, descending=True, stable=True).indices[:5]
        assert sel.indices == sorted(expected.tolist())
    with pytest.raises(CCAError, match="component_scores"):
        select("atp-topk", space, scores=r.scores, k=5)
