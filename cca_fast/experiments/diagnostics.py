"""Why a CCA update will (not) transfer: diagnostics of pivots and of the update direction.

Issue 12: on the embedded default the stage-3 update changes nothing on held-out problems. These
functions measure, before any evaluation is spent, the quantities that explain it:

* :func:`pivot_table` / :func:`summarize_pivots`: per pivot its direction, position ``t`` in the
  trace, whether the desired token is already the argmax (then raising its margin cannot change
  greedy decoding there), its rank and probabilities, and whether its prefix lies on the greedy
  path that decoding takes at test time;
* :func:`per_example_gradients` / :func:`gradient_alignment`: each pivot's logit-difference
  gradient on the selected rows, and how aligned they are (orthogonal gradients = each pivot
  pulls its own way, nothing shared to generalise);
* :func:`transfer_ratio`: the leave-fold-out gain of one SGD step on the held-out pivots relative
  to its gain on the training pivots;
* :func:`gold_alignment`: whether the summed pivot gradient also lowers the gold solutions' loss;
* :func:`changed_traces`: how many greedy test traces an update changes at all (eval JSONL records);
* :func:`diagnose`: all of the above except the last, in one JSON-able dict.

Conventions. The *logit difference* of an example is ``logit[desired] - logit[undesired]`` of the
next-token logits at its last prefix position (:func:`cca_fast.stages.examples.logit_diff`). The
*selected rows* are those :meth:`ComponentSpace.owned_rows` gives for the selected components; a
gradient over them is a flat vector of ``D`` entries: parameters in the sorted order of
``owned_rows``, each one's ``p.index_select(dim, index)`` flattened row-major (``D`` is
:func:`row_count`). Gradients are float32 (float64 for a float64 model). Every function leaves the
model's weights bit-identical, its ``requires_grad`` flags and training flag as they were, and no
``.grad`` set.
"""
from __future__ import annotations

import statistics
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from cca_fast.stages.sft import SFTExample, sft_nll, shared_prefix_len
from cca_fast.errors import CCAError
from cca_fast.models import runtime
from cca_fast.models.components import ComponentSpace, RowSelection, restore_rows, snapshot_rows
from cca_fast.stages.batches import collate_for_loss, last_logits
from cca_fast.stages.examples import PivotExample, collate, logit_diff

Selection = Sequence[int] | torch.Tensor


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _check_examples(examples: Sequence[PivotExample], least: int = 1) -> None:
    if len(examples) < least:
        raise CCAError(f"diagnostics need at least {least} pivot example(s), got {len(examples)} "
                       "(stage 1 found no pivotal tokens?)")
    if any(len(e.prefix_ids) == 0 for e in examples):
        raise CCAError("a pivot example has an empty prefix (prefix_ids): every example needs the prompt tokens")


def _plan(space: ComponentSpace, selection: Selection) -> dict[str, RowSelection]:
    """``space.owned_rows`` of the selection, after checking it (non-empty, in range)."""
    sel = torch.as_tensor(selection if isinstance(selection, torch.Tensor) else list(selection),
                          dtype=torch.long).flatten().unique()
    if sel.numel() == 0:
        raise CCAError("no components selected: the diagnostics of an update need at least one component")
    if int(sel.min()) < 0 or int(sel.max()) >= space.total:
        raise CCAError(f"selected component indices must be in [0, {space.total}), got "
                       f"[{int(sel.min())}, {int(sel.max())}]")
    return space.owned_rows(sel)


def _params(model: nn.Module, plan: Mapping[str, RowSelection]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    missing = [n for n in plan if n not in params]
    if missing:
        raise CCAError(f"the component space names parameters the model does not have: {missing[:3]} "
                       "(was the space built for another model?)")
    return {n: params[n] for n in plan}


def _grad_dtype(params: Mapping[str, torch.Tensor]) -> torch.dtype:
    return torch.float64 if next(iter(params.values())).dtype == torch.float64 else torch.float32


def row_count(model: nn.Module, space: ComponentSpace, selection: Selection) -> int:
    """``D``: the number of weights in the selected rows (the length of a gradient vector)."""
    plan = _plan(space, selection)
    params = _params(model, plan)
    return sum(params[n].numel() // params[n].shape[s.dim] * s.index.numel() for n, s in plan.items())


def _flat_rows(tensors: Mapping[str, torch.Tensor | None], params: Mapping[str, torch.Tensor],
               plan: Mapping[str, RowSelection], dtype: torch.dtype) -> torch.Tensor:
    """``[D]``: the selected rows of each (gradient) tensor, flattened in plan order (zeros for a
    ``None`` gradient: rows with no path to the logits)."""
    parts = []
    for n, s in plan.items():
        p, t = params[n], tensors[n]
        idx = s.index.to(p.device)
        if t is None:
            shape = list(p.shape)
            shape[s.dim] = idx.numel()
            parts.append(torch.zeros(shape, dtype=dtype, device=p.device).flatten())
        else:
            parts.append(t.detach().index_select(s.dim, idx).to(dtype).flatten())
    return torch.cat(parts)


@torch.no_grad()
def _add_to_rows(params: Mapping[str, torch.Tensor], plan: Mapping[str, RowSelection],
                 base: Mapping[str, torch.Tensor], delta: torch.Tensor) -> None:
    """Selected rows <- ``base`` rows + ``delta`` (``[D]``, plan order), computed in the gradient's
    dtype and cast to the parameter's."""
    off = 0
    for n, s in plan.items():
        b = base[n]
        d = delta[off : off + b.numel()].view(b.shape).to(b.device)
        off += b.numel()
        params[n].index_copy_(s.dim, s.index.to(b.device), (b.to(d.dtype) + d).to(b.dtype))


@contextmanager
def _grad_on(model: nn.Module, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Eval mode; only the selected parameters require grad (autograd then computes no other
    weight gradient); flags restored after."""
    with runtime.eval_mode(model), runtime.frozen(model):
        for p in params.values():
            p.requires_grad_(True)
        yield


def _sorted_chunks(examples: Sequence[PivotExample], batch_size: int) -> list[list[int]]:
    """Example indices in lexicographic token order (long shared prefixes), in chunks."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].prefix_ids)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _last_logits(model: nn.Module, examples: Sequence[PivotExample], pad: int, batch_size: int) -> torch.Tensor:
    """``[N, V]`` next-token logits at each example's last position (no grad), in input order;
    each mini-batch's common prefix runs once (:func:`collate_for_loss`)."""
    device = runtime.input_device(model)
    out: list[torch.Tensor | None] = [None] * len(examples)
    with torch.no_grad(), runtime.eval_mode(model):
        for chunk in _sorted_chunks(examples, batch_size):
            batch = collate_for_loss(model, [examples[i] for i in chunk], pad, device)
            logits = last_logits(model, batch)
            for j, i in enumerate(chunk):
                out[i] = logits[j]
    return torch.stack(out)  # type: ignore[arg-type]


def _logit_diffs(model: nn.Module, examples: Sequence[PivotExample], pad: int, batch_size: int) -> torch.Tensor:
    """``[N]`` logit differences (no grad), in input order."""
    logits = _last_logits(model, examples, pad, batch_size)
    d = torch.tensor([e.desired for e in examples], device=logits.device)
    u = torch.tensor([e.undesired for e in examples], device=logits.device)
    return logit_diff(logits, d, u)


def _sum_gradient(model: nn.Module, params: Mapping[str, torch.Tensor], plan: Mapping[str, RowSelection],
                  examples: Sequence[PivotExample], pad: int, batch_size: int) -> torch.Tensor:
    """``[D]``: gradient of the *summed* logit difference over ``examples`` on the selected rows
    (mini-batches with shared prefixes, accumulated)."""
    device = runtime.input_device(model)
    dtype = _grad_dtype(params)
    total = None
    names = list(plan)
    with _grad_on(model, params):
        for chunk in _sorted_chunks(examples, batch_size):
            batch = collate_for_loss(model, [examples[i] for i in chunk], pad, device)
            ld = logit_diff(last_logits(model, batch), batch.desired, batch.undesired).sum()
            grads = torch.autograd.grad(ld, [params[n] for n in names], allow_unused=True)
            g = _flat_rows(dict(zip(names, grads)), params, plan, dtype)
            total = g if total is None else total + g
    assert total is not None
    return total


def _cos(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a.double(), b.double()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return None
    return float(a @ b) / (na * nb)


def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


# ---------------------------------------------------------------------------------------------
# 1. the pivot table
# ---------------------------------------------------------------------------------------------
def pivot_table(model: nn.Module, examples: Sequence[PivotExample],
                greedy: Mapping[str, Sequence[int]] | None = None, pad_id: int | None = None,
                batch_size: int = 8) -> list[dict[str, Any]]:
    """One row per pivot, in input order.

    Args:
        model: the causal LM (any device / dtype; not modified).
        examples: ``N`` pivots; ``meta["t"]`` is the pivot's index in its trace, so the trace part
            of the prefix is ``prefix_ids[len(prefix_ids) - t:]``.
        greedy: ``{problem_id: greedy trace token ids}`` (generated tokens only, no prompt), or
            ``None``.
        pad_id: padding id (default :func:`cca_fast.models.runtime.pad_id`).
        batch_size: examples per forward (memory only).
    Returns:
        ``[{"problem_id", "direction", "method", "t", "desired", "undesired", "desired_is_argmax",
        "desired_rank", "logit_diff", "p_desired", "p_undesired", "on_greedy_path"}]``:
        ``desired_rank`` is the number of tokens whose logit is strictly above the desired one
        (0 = argmax; ``desired_is_argmax`` is ``desired_rank == 0``); probabilities are the softmax
        of the ``[V]`` next-token logits; ``on_greedy_path`` is whether the trace part of the prefix
        equals ``greedy[problem_id][:t]`` (``None`` without ``greedy``, for a problem missing from
        it, or for an example without ``meta["t"]``); ``t`` is ``None`` when unknown.
    """
    _check_examples(examples)
    pad = runtime.pad_id(model, explicit=pad_id)
    logits = _last_logits(model, examples, pad, batch_size).double()  # [N, V]
    probs = logits.softmax(-1)
    rows = []
    for i, e in enumerate(examples):
        lg = logits[i]
        rank = int((lg > lg[e.desired]).sum())
        t = e.meta.get("t")
        t = None if t is None else int(t)
        on_path = None
        if greedy is not None and t is not None and e.problem_id in greedy:
            if not 0 <= t <= len(e.prefix_ids):
                raise CCAError(f"pivot of problem {e.problem_id!r}: meta['t'] = {t} is outside its prefix of "
                               f"{len(e.prefix_ids)} tokens")
            trace = [int(x) for x in e.prefix_ids[len(e.prefix_ids) - t:]] if t else []
            ref = [int(x) for x in list(greedy[e.problem_id])[:t]]
            on_path = trace == ref
        rows.append({
            "problem_id": e.problem_id, "direction": e.direction, "method": e.method, "t": t,
            "desired": int(e.desired), "undesired": int(e.undesired),
            "desired_is_argmax": rank == 0, "desired_rank": rank,
            "logit_diff": float(lg[e.desired] - lg[e.undesired]),
            "p_desired": float(probs[i, e.desired]), "p_undesired": float(probs[i, e.undesired]),
            "on_greedy_path": on_path,
        })
    return rows


def summarize_pivots(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summary of :func:`pivot_table` rows.

    Returns:
        ``{"n", "by_direction": {direction: count}, "by_method": {method: count},
        "fraction_desired_is_argmax", "fraction_desired_is_argmax_by_direction": {direction: f},
        "n_greedy_path_known", "fraction_on_greedy_path" (over rows where it is known; ``None`` if
        none), "median_t", "median_logit_diff"}``.
    """
    n = len(rows)
    by_dir: dict[str, int] = {}
    by_method: dict[str, int] = {}
    argmax_by_dir: dict[str, int] = {}
    for r in rows:
        d = str(r.get("direction", ""))
        by_dir[d] = by_dir.get(d, 0) + 1
        m = str(r.get("method", ""))
        by_method[m] = by_method.get(m, 0) + 1
        argmax_by_dir[d] = argmax_by_dir.get(d, 0) + bool(r["desired_is_argmax"])
    known = [bool(r["on_greedy_path"]) for r in rows if r.get("on_greedy_path") is not None]
    ts = [int(r["t"]) for r in rows if r.get("t") is not None]
    return {
        "n": n,
        "by_direction": dict(sorted(by_dir.items())),
        "by_method": dict(sorted(by_method.items())),
        "fraction_desired_is_argmax": (sum(bool(r["desired_is_argmax"]) for r in rows) / n) if n else None,
        "fraction_desired_is_argmax_by_direction": {d: argmax_by_dir[d] / c for d, c in sorted(by_dir.items())},
        "n_greedy_path_known": len(known),
        "fraction_on_greedy_path": (sum(known) / len(known)) if known else None,
        "median_t": _median(ts),
        "median_logit_diff": _median([float(r["logit_diff"]) for r in rows]),
    }


# ---------------------------------------------------------------------------------------------
# 2-3. per-example gradients and their alignment
# ---------------------------------------------------------------------------------------------
def per_example_gradients(model: nn.Module, space: ComponentSpace, examples: Sequence[PivotExample],
                          selection: Selection, pad_id: int | None = None) -> torch.Tensor:
    """Each example's gradient of its logit difference on the selected rows.

    One forward and backward per example (batch 1: no padding); autograd computes the gradients of
    the selected parameters only, whose selected rows are gathered.

    Args:
        model: the causal LM (not modified).
        space: its :class:`ComponentSpace`.
        examples: ``N`` pivots.
        selection: selected components (flat indices).
    Returns:
        ``[N, D]`` (float32; float64 for a float64 model), on the model's device; columns in the
        layout of the module docstring (``D`` = :func:`row_count`).

    Cost: ``N`` forward and backward passes of full sequences, and ``4 N D`` bytes (float32): for
    SmolLM2-135M, ``D`` is ~0.6M at 2% of the components and ~40M at 80% (then 64 examples take
    ~10 GB; :func:`diagnose` caps ``N`` by ``max_gradient_bytes``).
    """
    _check_examples(examples)
    plan = _plan(space, selection)
    params = _params(model, plan)
    names = list(plan)
    dtype = _grad_dtype(params)
    pad = runtime.pad_id(model, explicit=pad_id)
    device = runtime.input_device(model)
    out = None
    with _grad_on(model, params):
        for i, e in enumerate(examples):
            batch = collate([e], pad, device)
            ld = logit_diff(last_logits(model, batch), batch.desired, batch.undesired).sum()
            grads = torch.autograd.grad(ld, [params[n] for n in names], allow_unused=True)
            g = _flat_rows(dict(zip(names, grads)), params, plan, dtype)
            del grads
            if out is None:
                out = torch.empty((len(examples), g.numel()), dtype=dtype, device=g.device)
            out[i] = g
    assert out is not None
    return out


def gradient_alignment(G: torch.Tensor) -> dict[str, Any]:
    """How aligned per-example gradients are.

    Args:
        G: ``[N, D]`` (``N >= 2``), e.g. from :func:`per_example_gradients`.
    Returns:
        ``{"n", "dim", "n_zero" (rows with zero norm: left out of every cosine),
        "mean_pairwise_cos", "median_pairwise_cos", "fraction_positive_pairs" (over the
        ``n (n - 1) / 2`` off-diagonal pairs of non-zero rows), "mean_cos_with_rest",
        "median_cos_with_rest" (cosine of each row with the sum of the other rows),
        "norm_mean", "norm_cv" (coefficient of variation of the row norms: one pivot dominating
        the summed gradient shows as a large value)}``; computed in float64 from the Gram matrix
        (:func:`gram`, no float64 copy of ``G``).
    """
    if G.dim() != 2 or G.shape[0] < 2:
        raise CCAError(f"gradient_alignment needs a [N, D] matrix with N >= 2, got shape {tuple(G.shape)}")
    K = gram(G).cpu()  # [N, N] float64
    n = K.shape[0]
    norms = K.diagonal().clamp(min=0).sqrt()
    nz = norms > 0
    idx = nz.nonzero().flatten()
    m = idx.numel()
    pair = None
    if m >= 2:
        C = K[idx][:, idx] / (norms[idx, None] * norms[None, idx])
        iu = torch.triu_indices(m, m, offset=1)
        pair = C[iu[0], iu[1]]
    # cos(g_i, S - g_i) with S = sum_j g_j: g_i . (S - g_i) = rowsum_i - K_ii and
    # |S - g_i|^2 = sum(K) - 2 rowsum_i + K_ii
    rowsum, total = K.sum(1), K.sum()
    rest = []
    for i in range(n):
        other = float(total - 2 * rowsum[i] + K[i, i])
        if norms[i] > 0 and other > 0:
            rest.append(float(rowsum[i] - K[i, i]) / (float(norms[i]) * other ** 0.5))
    n_norms = norms
    return {
        "n": int(G.shape[0]), "dim": int(G.shape[1]), "n_zero": int((~nz).sum()),
        "mean_pairwise_cos": float(pair.mean()) if pair is not None else None,
        "median_pairwise_cos": float(pair.median()) if pair is not None else None,
        "fraction_positive_pairs": float((pair > 0).double().mean()) if pair is not None else None,
        "mean_cos_with_rest": _mean(rest), "median_cos_with_rest": _median(rest),
        "norm_mean": float(n_norms.mean()),
        "norm_cv": float(n_norms.std() / n_norms.mean()) if float(n_norms.mean()) > 0 else None,
    }


def gram(G: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """``G G^T`` (``[N, N]``, float64, on ``G``'s device) accumulated over column chunks of
    ``chunk`` entries, each upcast to float64 (memory ``8 N chunk`` bytes, not ``8 N D``)."""
    K = torch.zeros((G.shape[0], G.shape[0]), dtype=torch.float64, device=G.device)
    for c in range(0, G.shape[1], chunk):
        part = G[:, c : c + chunk].detach().to(torch.float64)
        K += part @ part.T
    return K


# ---------------------------------------------------------------------------------------------
# 4. leave-fold-out transfer of one step
# ---------------------------------------------------------------------------------------------
def fold_indices(n: int, folds: int, seed: int = 0) -> list[list[int]]:
    """``min(folds, n)`` disjoint folds covering ``0 .. n-1``: a seeded permutation dealt round-robin,
    each fold sorted."""
    k = min(folds, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sorted(perm[f::k]) for f in range(k)]


def transfer_ratio(model: nn.Module, space: ComponentSpace, examples: Sequence[PivotExample], selection: Selection,
                   lr: float, folds: int = 5, seed: int = 0, *, gradients: torch.Tensor | None = None,
                   pad_id: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Held-out gain of one SGD step relative to its training gain, leave-fold-out.

    For each fold ``f`` (:func:`fold_indices`): ``g`` = gradient on the selected rows of the mean
    logit difference over the *other* folds; the rows take one ascent step ``W <- W + lr * g``
    (stage 3's SGD step on ``-mean logit difference``); the mean logit-difference gain
    (after - before) is measured on fold ``f`` (held out) and on the other folds (training); the
    rows are then restored bit-identically.

    Args:
        examples: ``N >= 2`` pivots.
        lr: step size (> 0).
        folds: number of folds (``>= 2``; ``min(folds, N)`` are used).
        gradients: ``[N, D]`` per-example gradients of these examples (:func:`per_example_gradients`,
            same order): the training gradient is then their mean over the other folds (no backward
            pass here), equal to the mini-batched gradient up to summation order.
    Returns:
        ``{"lr", "folds", "seed", "n", "per_fold": [{"fold", "n_train", "n_heldout", "train_gain",
        "heldout_gain", "step_norm"}], "mean_train_gain", "mean_heldout_gain", "ratio"
        (mean held-out / mean training gain; ``None`` when the training gain is 0)}``.
    """
    _check_examples(examples, least=2)
    if not (isinstance(lr, (int, float)) and lr > 0 and lr == lr and lr != float("inf")):
        raise CCAError(f"transfer_ratio needs a positive finite learning rate, got {lr!r}")
    if not isinstance(folds, int) or folds < 2:
        raise CCAError(f"transfer_ratio needs folds >= 2, got {folds!r}")
    plan = _plan(space, selection)
    params = _params(model, plan)
    if gradients is not None and gradients.shape[0] != len(examples):
        raise CCAError(f"gradients has {gradients.shape[0]} rows for {len(examples)} examples")
    pad = runtime.pad_id(model, explicit=pad_id)
    split = fold_indices(len(examples), folds, seed)
    base = snapshot_rows(params, plan)
    before = _logit_diffs(model, examples, pad, batch_size).double()
    per_fold = []
    try:
        for f, held in enumerate(split):
            held_set = set(held)
            train = [i for i in range(len(examples)) if i not in held_set]
            if gradients is not None:
                g = torch.zeros_like(gradients[0])
                for i in train:  # no [n_train, D] copy
                    g += gradients[i]
                g /= len(train)
            else:
                g = _sum_gradient(model, params, plan, [examples[i] for i in train], pad, batch_size) / len(train)
            _add_to_rows(params, plan, base, lr * g)
            after = _logit_diffs(model, examples, pad, batch_size).double()
            restore_rows(params, plan, base)
            gain = after - before
            per_fold.append({"fold": f, "n_train": len(train), "n_heldout": len(held),
                             "train_gain": float(gain[train].mean()), "heldout_gain": float(gain[held].mean()),
                             "step_norm": float(lr * g.double().norm())})
    finally:
        restore_rows(params, plan, base)
    tr = _mean([r["train_gain"] for r in per_fold])
    ho = _mean([r["heldout_gain"] for r in per_fold])
    return {"lr": float(lr), "folds": len(split), "seed": seed, "n": len(examples), "per_fold": per_fold,
            "mean_train_gain": tr, "mean_heldout_gain": ho,
            "ratio": (ho / tr) if tr else None}


# ---------------------------------------------------------------------------------------------
# 5. alignment with the gold solutions' loss
# ---------------------------------------------------------------------------------------------
def gold_alignment(model: nn.Module, space: ComponentSpace, examples: Sequence[PivotExample],
                   gold: Sequence[SFTExample], selection: Selection, pad_id: int | None = None, *,
                   gradients: torch.Tensor | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Cosine between the pivots' ascent direction and the gold solutions' descent direction.

    ``a`` = gradient of the summed logit difference of ``examples`` on the selected rows (what a
    stage-3 step follows); ``b`` = minus the gradient of the gold targets' summed NLL
    (:func:`cca_fast.stages.sft.sft_nll`, in mini-batches of ``batch_size`` sharing their
    common prompt prefix) on the same rows. A negative cosine: the update raises the gold
    solutions' loss to first order.

    Args:
        gold: the gold-solution sequences (e.g. of the training problems).
        gradients: ``[N, D]`` per-example gradients of ``examples`` (then ``a`` is their sum).
    Returns:
        ``{"cos", "n_examples", "n_gold", "gold_tokens", "gold_nll_mean" (per target token, base
        weights), "per_example_cos_mean", "fraction_examples_positive" (the last two only with
        ``gradients``)}``.
    """
    _check_examples(examples)
    if not gold:
        raise CCAError("gold_alignment needs at least one gold-solution example")
    plan = _plan(space, selection)
    params = _params(model, plan)
    names = list(plan)
    dtype = _grad_dtype(params)
    pad = runtime.pad_id(model, explicit=pad_id)
    if gradients is not None:
        if gradients.shape[0] != len(examples):
            raise CCAError(f"gradients has {gradients.shape[0]} rows for {len(examples)} examples")
        a = gradients.sum(0)
    else:
        a = _sum_gradient(model, params, plan, examples, pad, batch_size)
    b, nll_total, tokens = None, 0.0, 0
    with _grad_on(model, params):
        for i in range(0, len(gold), batch_size):
            chunk = list(gold[i : i + batch_size])
            P = shared_prefix_len(chunk) if len(chunk) > 1 else 0
            nll, n_tok = sft_nll(model, chunk, pad_id=pad, prefix=chunk[0].prompt_ids[:P])
            grads = torch.autograd.grad(nll, [params[n] for n in names], allow_unused=True)
            g = -_flat_rows(dict(zip(names, grads)), params, plan, dtype)
            b = g if b is None else b + g
            nll_total += float(nll.detach())
            tokens += n_tok
    assert b is not None
    out: dict[str, Any] = {"cos": _cos(a, b), "n_examples": len(examples), "n_gold": len(gold),
                           "gold_tokens": tokens, "gold_nll_mean": nll_total / tokens if tokens else None}
    if gradients is not None:
        per = [c for c in (_cos(gradients[i], b) for i in range(gradients.shape[0])) if c is not None]
        out["per_example_cos_mean"] = _mean(per)
        out["fraction_examples_positive"] = (sum(c > 0 for c in per) / len(per)) if per else None
    return out


# ---------------------------------------------------------------------------------------------
# 6. how many greedy test traces an update changes
# ---------------------------------------------------------------------------------------------
def changed_traces(base_records: Sequence[Mapping[str, Any]], new_records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Compare two evaluations' per-problem records (eval JSONL dicts with ``id``, ``output``,
    ``correct``), matched by ``id``.

    Returns:
        ``{"n" (ids in both), "output_changed", "wrong_to_correct", "correct_to_wrong",
        "fraction_changed", "base_correct", "new_correct" (over the matched ids), "only_base",
        "only_new" (unmatched ids)}``.
    Raises:
        CCAError: a record lacks a key, or an id repeats within one list.
    """
    def index(records: Sequence[Mapping[str, Any]], which: str) -> dict[str, Mapping[str, Any]]:
        out: dict[str, Mapping[str, Any]] = {}
        for r in records:
            missing = [k for k in ("id", "output", "correct") if k not in r]
            if missing:
                raise CCAError(f"{which} record lacks {missing} (eval records need 'id', 'output', 'correct')")
            key = str(r["id"])
            if key in out:
                raise CCAError(f"{which} records repeat the id {key!r}")
            out[key] = r
        return out

    base, new = index(base_records, "base"), index(new_records, "new")
    both = [k for k in base if k in new]
    changed = sum(base[k]["output"] != new[k]["output"] for k in both)
    w2c = sum(not bool(base[k]["correct"]) and bool(new[k]["correct"]) for k in both)
    c2w = sum(bool(base[k]["correct"]) and not bool(new[k]["correct"]) for k in both)
    return {"n": len(both), "output_changed": changed, "wrong_to_correct": w2c, "correct_to_wrong": c2w,
            "fraction_changed": changed / len(both) if both else None,
            "base_correct": sum(bool(base[k]["correct"]) for k in both),
            "new_correct": sum(bool(new[k]["correct"]) for k in both),
            "only_base": sum(k not in new for k in base), "only_new": sum(k not in base for k in new)}


# ---------------------------------------------------------------------------------------------
# 7. everything at once
# ---------------------------------------------------------------------------------------------
def subsample(n: int, max_examples: int, seed: int = 0) -> list[int]:
    """Indices of a deterministic subsample: all of ``0 .. n-1`` when ``n <= max_examples``, else
    ``max_examples`` of them drawn by a ``seed``-ed permutation, sorted."""
    if n <= max_examples:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_examples].tolist())


def diagnose(model: nn.Module, space: ComponentSpace, examples: Sequence[PivotExample], selection: Selection, *,
             greedy: Mapping[str, Sequence[int]] | None = None, gold: Sequence[SFTExample] | None = None,
             lr: float = 1e-3, folds: int = 5, seed: int = 0, max_examples: int = 64,
             max_gradient_bytes: int = 4 << 30, pad_id: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """All diagnostics of pivots and of the update direction, as one JSON-able dict.

    The pivot table covers every example (forward passes only). The gradient parts (alignment,
    transfer, gold alignment) use a deterministic subsample of at most ``max_examples`` examples
    (:func:`subsample` with ``seed``), whose per-example gradients are computed once and reused;
    the subsample is smaller when ``n D`` gradient entries would exceed ``max_gradient_bytes``
    (``gradient_subsample["limited_by"]`` says which cap applied).

    Returns:
        ``{"n_examples", "pivots": {"rows", "summary"}, "gradient_subsample": {"n_total", "n_used",
        "max_examples", "max_gradient_bytes", "limited_by" (``None``, ``"max_examples"`` or
        ``"max_gradient_bytes"``), "seed", "subsampled", "indices"}, "n_components", "rows_dim" (``D``),
        "alignment" (:func:`gradient_alignment`; ``None`` for a single example), "transfer"
        (:func:`transfer_ratio`; ``None`` for a single example), "gold" (:func:`gold_alignment`,
        ``None`` without ``gold``)}``.
    """
    _check_examples(examples)
    from cca_fast import checks

    checks.positive("max_examples", max_examples)
    D = row_count(model, space, selection)  # also checks the selection, before any forward pass
    params = _params(model, _plan(space, selection))
    itemsize = torch.finfo(_grad_dtype(params)).bits // 8
    by_bytes = int(max_gradient_bytes) // (D * itemsize)
    cap = min(max_examples, by_bytes)
    if cap < min(2, len(examples)):
        raise CCAError(f"max_gradient_bytes={max_gradient_bytes} holds {by_bytes} gradient(s) of {D} entries: "
                       f"raise it to at least {2 * D * itemsize} or select fewer components")
    limited_by = None
    if len(examples) > cap:
        limited_by = "max_examples" if max_examples <= by_bytes else "max_gradient_bytes"
    pad = runtime.pad_id(model, explicit=pad_id)
    rows = pivot_table(model, examples, greedy, pad_id=pad, batch_size=batch_size)
    idx = subsample(len(examples), cap, seed)
    sub = [examples[i] for i in idx]
    G = per_example_gradients(model, space, sub, selection, pad_id=pad)
    n_sel = int(torch.as_tensor(selection if isinstance(selection, torch.Tensor) else list(selection),
                                dtype=torch.long).unique().numel())
    out: dict[str, Any] = {
        "n_examples": len(examples),
        "pivots": {"rows": rows, "summary": summarize_pivots(rows)},
        "gradient_subsample": {"n_total": len(examples), "n_used": len(sub), "max_examples": max_examples,
                               "max_gradient_bytes": int(max_gradient_bytes), "limited_by": limited_by,
                               "seed": seed, "subsampled": len(sub) < len(examples), "indices": idx},
        "n_components": n_sel, "rows_dim": int(G.shape[1]),
        "alignment": gradient_alignment(G) if len(sub) >= 2 else None,
        "transfer": (transfer_ratio(model, space, sub, selection, lr, folds, seed, gradients=G, pad_id=pad,
                                    batch_size=batch_size) if len(sub) >= 2 else None),
        "gold": (gold_alignment(model, space, sub, gold, selection, pad, gradients=G, batch_size=batch_size)
                 if gold else None),
    }
    return out


__all__ = ["pivot_table", "summarize_pivots", "per_example_gradients", "gradient_alignment", "fold_indices",
           "transfer_ratio", "gold_alignment", "changed_traces", "subsample", "diagnose", "row_count", "gram"]
