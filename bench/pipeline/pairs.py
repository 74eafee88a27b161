"""Pairs 1-5 of the pipeline benchmark: each runs the reference and the fast implementation of one
stage on the same inputs, in the same process, and checks that they give the same result.

Every function returns a JSON-ready dict with ``reference`` and ``fast`` measurements, a
``ratio`` (reference / fast: > 1 means the fast path is faster), ``same`` (the equality check)
and ``check`` (what was compared, with the tolerance).
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "kernels"))
from harness import Timing, measure_round_robin, peak_memory_mib, timed  # noqa: E402

import cca_fast.stages.traces as traces_mod  # noqa: E402  (its extract_answer is the fake judge's on the GPU scale)
from cca_fast.data.problem import Problem  # noqa: E402
from cca_fast.delta import revert_delta  # noqa: E402
from cca_fast.stages.examples import PivotExample, collate  # noqa: E402
from cca_fast.generation import GenerationConfig, GenerationStats, generate  # noqa: E402
from cca_fast.models.runtime import frozen  # noqa: E402
from cca_fast.stages.localize.dcm import DCMConfig, dcm_loss, run_dcm  # noqa: E402
from cca_fast.stages.localize.select import select  # noqa: E402
from cca_fast.stages.pivots.search import compare_branching  # noqa: E402
from cca_fast.stages.pivots.algorithms import prefix_pivot, to_example  # noqa: E402
from cca_fast.evaluation.prompting import is_correct  # noqa: E402
from cca_fast.stages.traces import GreedyTrace, TraceConfig, TracePair, problem_seed  # noqa: E402
from cca_fast.stages.update import UpdateConfig, run_update  # noqa: E402
from cca_fast.models import runtime

#: tolerances by dtype (see bench/pipeline/README.md)
TOL = {
    torch.float64: {"dcm_grad_rel": 1e-8, "dcm_mask_q99": 1e-6, "dcm_loss_rtol": 1e-8, "attr_rel": 1e-8,
                    "update_rel": 1e-5},
    # float32: measured on the CPU scale (30 layers, ~870 positions): first-step gradients 1.8e-4,
    # losses 4.6e-5, 99% of masks 7e-5 after 2 Adam steps; update rows 8e-5 (SGD), 7e-4 (AdamW)
    torch.float32: {"dcm_grad_rel": 1e-3, "dcm_mask_q99": 5e-4, "dcm_loss_rtol": 3e-4, "attr_rel": 1e-4,
                    "update_rel": 1e-2},
    torch.bfloat16: {"dcm_grad_rel": 3e-2, "dcm_mask_q99": 2e-3, "dcm_loss_rtol": 3e-2, "attr_rel": 3e-2,
                     "update_rel": 0.1},
    torch.float16: {"dcm_grad_rel": 1e-2, "dcm_mask_q99": 2e-3, "dcm_loss_rtol": 1e-2, "attr_rel": 1e-2,
                    "update_rel": 0.05},
}


def correct(text: str, gold: float) -> bool:
    """Correctness as stage 1 judges it (the fake judge inside ``synthetic.fake_judge``)."""
    return is_correct(traces_mod.extract_answer(text), gold)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def _same_generations(a, b) -> list[bool]:
    return [(x.output_ids, x.text, x.finish_reason) == (y.output_ids, y.text, y.finish_reason) for x, y in zip(a, b)]


def _gen_side(gens, seconds: float, stats: GenerationStats) -> dict[str, Any]:
    useful = sum(g.n_generated for g in gens)
    return {"seconds": round(seconds, 3), "sequences": len(gens), "generated_tokens": useful,
            "decoded_tokens": useful + stats.discarded_tokens, "prefill_tokens": stats.prefill_tokens,
            "tokens_per_second": round(useful / seconds, 2) if seconds > 0 else None}


def _pair_of_generations(model, tok, prompts, cfg: GenerationConfig, device, seeds=None, reference: bool = True):
    ref_cfg = replace(cfg, batch_size=1, share_prefix=False, early_stop=False)
    sf, sr = GenerationStats(), GenerationStats()
    fast, tf = timed(lambda: generate(model, tok, prompts, cfg, row_seeds=seeds, stats=sf), device)
    if not reference:  # only the outputs are wanted (pair 1 not measured)
        return fast, fast, (tf, sf), (tf, sf)
    ref, tr = timed(lambda: generate(model, tok, prompts, ref_cfg, row_seeds=seeds, stats=sr), device)
    return fast, ref, (tf, sf), (tr, sr)


# ---- pair 1 ------------------------------------------------------------------------------------
def pair_generation(model, tok, problems: Sequence[Problem], prompts: list[list[int]], gen: GenerationConfig,
                    n_sample: int, trace: TraceConfig, device, reference: bool = True
                    ) -> tuple[dict, list[GreedyTrace], list[TracePair]]:
    """Greedy generation of ``problems`` and ``trace.k`` samples of the first ``n_sample`` of
    them (stage 1's temperatures and per-sample seeds): batched with per-sequence stopping and a
    shared prompt prefix vs one sequence at a time without early stop. Returns the result, the
    greedy traces and the flipped trace pairs found in the samples (first flip in order).
    ``reference=False``: the fast path only (its outputs are needed by the other pairs)."""
    generate(model, tok, prompts[:1], replace(gen, max_new_tokens=2))  # warm-up
    fast, ref, (tf, sf), (tr, sr) = _pair_of_generations(model, tok, prompts, gen, device, reference=reference)
    same = _same_generations(fast, ref)
    out = {"greedy": {"reference": _gen_side(ref, tr, sr), "fast": _gen_side(fast, tf, sf), "ratio": _ratio(tr, tf),
                      "same": all(same), "identical_sequences": sum(same)}}
    greedy = [GreedyTrace(p.id, g.prompt_ids, g.output_ids, g.text, correct(g.text, p.gold))
              for p, g in zip(problems, fast)]

    k, sampled = trace.k, list(range(min(n_sample, len(problems))))
    fast_s, ref_s, t = {}, {}, {"fast": 0.0, "reference": 0.0}
    stats = {"fast": GenerationStats(), "reference": GenerationStats()}
    for ok in (True, False):  # stage 1's temperature depends on the greedy trace's correctness
        rows = [i for i in sampled if greedy[i].correct == ok]
        if not rows:
            continue
        temp = trace.temperature_if_correct if ok else trace.temperature_if_wrong
        cfg = replace(gen, do_sample=True, temperature=temp, top_p=trace.top_p)
        ps = [prompts[i] for i in rows for _ in range(k)]
        seeds = [problem_seed(trace.seed, problems[i].id) + j for i in rows for j in range(k)]
        f, r, (a, s1), (b, s2) = _pair_of_generations(model, tok, ps, cfg, device, seeds, reference)
        t["fast"] += a
        t["reference"] += b
        for key, st in (("fast", s1), ("reference", s2)):
            for name in ("discarded_tokens", "prefill_tokens"):
                setattr(stats[key], name, getattr(stats[key], name) + getattr(st, name))
        for n, i in enumerate(rows):
            fast_s[i], ref_s[i] = f[n * k:(n + 1) * k], r[n * k:(n + 1) * k]
    flat_f = [g for i in sorted(fast_s) for g in fast_s[i]]
    flat_r = [g for i in sorted(ref_s) for g in ref_s[i]]
    same = _same_generations(flat_f, flat_r)
    out["k_sample"] = {"k": k, "problems": len(sampled),
                       "reference": _gen_side(flat_r, t["reference"], stats["reference"]),
                       "fast": _gen_side(flat_f, t["fast"], stats["fast"]), "ratio": _ratio(t["reference"], t["fast"]),
                       "same": all(same), "identical_sequences": sum(same)}
    out["check"] = "identical token ids, texts and finish reasons for every sequence"
    pairs = flipped_pairs([problems[i] for i in sorted(fast_s)], [greedy[i] for i in sorted(fast_s)],
                          [fast_s[i] for i in sorted(fast_s)], trace)
    return out, greedy, pairs


def flipped_pairs(problems, greedy: Sequence[GreedyTrace], samples, trace: TraceConfig) -> list[TracePair]:
    """The first sample (in order) whose correctness differs from the greedy trace's, per problem."""
    pairs = []
    for p, g, gens in zip(problems, greedy, samples):
        for j, s in enumerate(gens):
            ok = correct(s.text, p.gold)
            if ok != g.correct:
                temp = trace.temperature_if_correct if g.correct else trace.temperature_if_wrong
                pairs.append(TracePair(p.id, p.gold, list(g.prompt_ids), list(g.output_ids), g.text, g.correct,
                                       list(s.output_ids), s.text, ok, j, temp, j + 1))
                break
    return pairs


# ---- pair 2 ------------------------------------------------------------------------------------
def pair_branching(model, tok, pairs: Sequence[TracePair], gen: GenerationConfig) -> dict:
    """The literal per-position loop vs the pruned, batched search on the same flipped pairs. The
    loop generates as the authors' procedure does (and pair 1's and pair 6's references):
    one sequence at a time, ``max_new_tokens`` decoded per completion (no early stop)."""
    ref_gen = replace(gen, batch_size=1, share_prefix=False, early_stop=False)
    with torch.no_grad():
        res = compare_branching(model, tok, pairs, gen, reference_gen=ref_gen)
    found = sum(r["fast"]["pivot"] is not None for r in res["rows"])
    side = {}
    for impl in ("reference", "fast"):
        tot = res["totals"][impl]
        side[impl] = {"seconds": round(tot["seconds"], 3), "completions": tot["completions"],
                      "generated_tokens": tot["generated_tokens"],
                      "tokens_per_pivot": round(tot["generated_tokens"] / max(1, found), 1),
                      "seconds_per_pivot": round(tot["seconds"] / max(1, found), 3)}
    return {"pairs": res["pairs"], "pivots_found": found, **side, "ratio": round(res["time_ratio"], 3),
            "token_ratio": round(res["token_ratio"], 3), "same": res["identical"],
            "check": "identical pivot (position, desired and undesired token) for every pair", "rows": res["rows"]}


def pivot_examples(pairs: Sequence[TracePair], greedy: Sequence[GreedyTrace], n: int, vocab: int) -> list[PivotExample]:
    """``n`` pivot examples: prefix-method pivots of the flipped pairs, topped up with mid-trace cuts
    of greedy traces (desired = the greedy token there, undesired = the next token id)."""
    out = []
    for pair in pairs:
        piv = prefix_pivot(pair.greedy_ids, pair.sample_ids, pair.greedy_correct)
        if piv is not None and piv.desired != piv.undesired:
            out.append(to_example(piv, pair.prompt_ids, pair.problem_id, greedy_correct=pair.greedy_correct,
                                  method="prefix"))
    for g in greedy:
        if len(out) >= n:
            break
        t = len(g.output_ids) // 2
        if t >= 1:
            d = int(g.output_ids[t])
            out.append(PivotExample(g.problem_id, tuple(g.prompt_ids) + tuple(g.output_ids[:t]), d, (d + 1) % vocab,
                                    "greedy_cut", "greedy-cut", {"t": t}))
    return out[:n]


# ---- pair 3 ------------------------------------------------------------------------------------
def pair_dcm(model, space, examples: Sequence[PivotExample], batch_size: int, dtype: torch.dtype, device) -> dict:
    """One DCM epoch (paper hyper-parameters, no early stop), full-prefix recompute vs
    last-position mode; a second last-mode run of 2 epochs gives the steady-state epoch (prefix
    key/value cache reused, as ``cca run`` does)."""
    tol = TOL[dtype]
    base = DCMConfig(epochs=1, batch_size=batch_size, early_stop=False, reuse_prefix_cache=True, seed=0)
    full, t_full = timed(lambda: run_dcm(model, examples, replace(base, mode="full"), space=space), device)
    last, t_last = timed(lambda: run_dcm(model, examples, replace(base, mode="last"), space=space), device)
    stamps: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    run_dcm(model, examples, replace(base, mode="last", epochs=2), space=space,
            progress=lambda e: stamps.append((e["epoch"], time.perf_counter())))
    end1 = max(s for e, s in stamps if e == 0)
    first, steady = end1 - t0, max(s for e, s in stamps if e == 1) - end1
    grads = {}
    with frozen(model):  # the mask gradient of the first step, both modes (same mask: ones)
        batch = collate(list(examples[:batch_size]), runtime.pad_id(model), device)
        for mode in ("full", "last"):
            mask = torch.ones(space.total, dtype=torch.float32, device=batch.input_ids.device, requires_grad=True)
            dcm_loss(model, space, batch, mask, base.lambda_l1, mode)[0].backward()
            grads[mode] = mask.grad.double()
    grad_rel = float((grads["full"] - grads["last"]).abs().max() / grads["full"].abs().max().clamp_min(1e-30))
    d = (full.mask - last.mask).abs().double()
    q99 = float(torch.quantile(d, 0.99))
    loss_rel = max(abs(a["loss"] - b["loss"]) / max(abs(a["loss"]), 1e-12) for a, b in zip(full.history, last.history))
    same_sel = torch.equal(full.selected, last.selected)
    same = (grad_rel <= tol["dcm_grad_rel"] and q99 <= tol["dcm_mask_q99"] and loss_rel <= tol["dcm_loss_rtol"]
            and same_sel)
    paper = 50 * t_full / (first + 49 * steady)
    return {"examples": len(examples), "prefix_tokens": [len(e.prefix_ids) for e in examples], "batch_size": batch_size,
            "steps_per_epoch": len(full.history),
            "reference": {"epoch_seconds": round(t_full, 3)},
            "fast": {"first_epoch_seconds": round(t_last, 3), "first_epoch_seconds_2epoch_run": round(first, 3),
                     "steady_epoch_seconds": round(steady, 4)},
            "ratio": _ratio(t_full, steady), "ratio_first_epoch": _ratio(t_full, t_last),
            "ratio_50_epoch_run": round(paper, 3),
            "first_step_grad_max_rel_diff": grad_rel, "mask_max_abs_diff": float(d.max()), "mask_q99_abs_diff": q99,
            "masks_over_tol": int((d > tol["dcm_mask_q99"]).sum()), "components": int(d.numel()),
            "loss_max_rel_diff": loss_rel, "same_selection": same_sel, "same": same,
            "check": f"first-step mask gradients: max |g_full - g_last| <= {tol['dcm_grad_rel']:g} x max |g_full|; "
                     f"per-step losses within rel {tol['dcm_loss_rtol']:g}; after the epoch: 99% of "
                     f"|m_full - m_last| <= {tol['dcm_mask_q99']:g} (Adam's normalised steps amplify rounding for "
                     "components whose gradients nearly cancel: the max is reported) and the same selection"}


# ---- pair 4 ------------------------------------------------------------------------------------
def pair_attribution(model, examples: Sequence[PivotExample], dtype: torch.dtype, device, repeats: int,
                     warmup: int, memory: bool = True) -> tuple[dict, torch.Tensor]:
    """AtP of every component at the pivot (``cca_fast.attribute``) vs the floor (a plain
    forward + backward, no scoring) vs caching hooks (every activation and gradient kept, then
    einsum). Returns the result and the AtP scores."""
    from bench_attribution import method_fns

    batch = collate(examples, runtime.pad_id(model), device)
    fns = {k: v for k, v in method_fns(model, batch, backend=None).items()
           if k in ("floor", "fused_last", "caching_last")}
    last: dict[str, Any] = {}
    # round-robin: load from other processes hits all alike
    timing = measure_round_robin(fns, device, warmup=warmup, repeats=repeats, keep_last=last)
    med = {k: t.p50_ms / 1e3 for k, t in timing.items()}
    mem = {k: round(peak_memory_mib(fn, device), 1) for k, fn in fns.items()} if memory else {}
    a, b = last["fused_last"].scores.double(), last["caching_last"].scores.double()
    rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    tol = TOL[dtype]["attr_rel"]
    res = {"examples": len(examples), "tokens": int(batch.attention_mask.sum()),
           "seconds": {k: round(v, 4) for k, v in med.items()}, "time": {k: t.to_dict() for k, t in timing.items()},
           "peak_mib": mem,
           "ratio": _ratio(med["caching_last"], med["fused_last"]),
           "fused_over_floor": _ratio(med["fused_last"], med["floor"]),
           "memory_fused_over_caching": _ratio(mem["fused_last"], mem["caching_last"]) if mem else None,
           "scores_max_rel_diff": rel, "same": rel <= tol,
           "check": f"AtP scores of every component: max |fused - caching| <= {tol:g} x max |caching|"}
    return res, last["fused_last"].scores.detach().float().cpu()


# ---- pair 5 ------------------------------------------------------------------------------------
def _peak(fn, device, memory: bool):
    """(result, seconds, extra peak MiB or None)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out, s = timed(fn, device)
        return out, s, round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 1)
    out, s = timed(fn, device)
    return out, s, None


def _sgd_lr(model, space, sel, examples, rms_step: float) -> float:
    """An SGD learning rate whose first step moves the selected rows by ``rms_step`` (RMS): one
    probe step at lr 1 (reverted). In bf16 a step far below the rows' rounding would change
    nothing and leave the equality check nothing to compare."""
    probe = run_update(model, space, sel.indices, examples, UpdateConfig(optimizer="sgd", lr=1.0, max_steps=1))
    revert_delta(model, probe.delta)
    sq = sum(float((p.new.double() - p.base.double()).pow(2).sum()) for p in probe.delta.params.values())
    n = sum(p.new.numel() for p in probe.delta.params.values())
    if sq == 0:
        raise RuntimeError("the selected rows get no gradient (probe step changed nothing)")
    return rms_step / (sq / n) ** 0.5


def pair_update(model, space, examples: Sequence[PivotExample], scores: torch.Tensor, fraction: float, steps: int,
                lrs: dict[str, float | None], dtype: torch.dtype, device, memory: bool) -> dict:
    """Stage 3 on the AtP top ``fraction`` of components: the paper's procedure (dense gradients
    for every weight, selected rows gathered, stepped by ``torch.optim``, copied back; no shared
    prefix) vs row-selective backward + row-sparse step (+ shared prefix), for SGD and AdamW.
    ``lrs["sgd"] = None``: the rate whose first step moves the rows by 1e-3 RMS (see :func:`_sgd_lr`)."""
    sel = select("atp-fraction", space, scores=scores, fraction=fraction)
    lrs = dict(lrs)
    if lrs.get("sgd") is None:
        lrs["sgd"] = _sgd_lr(model, space, sel, examples, 1e-3)
    share = "share_prefix" in {f.name for f in fields(UpdateConfig)}
    tol = TOL[dtype]["update_rel"]
    out: dict[str, Any] = {"examples": len(examples), "components": len(sel.indices), "fraction": fraction,
                           "steps": steps, "lr": lrs, "check": f"updated rows: ||d_ref - d_fast|| <= {tol:g} x ||d_ref|| "
                                                    "(d = new - base rows), the same rows changed"}
    for opt in ("sgd", "adamw"):
        deltas, side = {}, {}
        for mode in ("reference", "sparse"):
            kw = {"optimizer": opt, "lr": lrs[opt], "max_steps": steps, "mode": mode, "batch_size": 8}
            if mode == "reference" and share:
                kw["share_prefix"] = False
            cfg = UpdateConfig(**kw)
            res, wall, peak = _peak(lambda: run_update(model, space, sel.indices, examples, cfg), device, memory)
            h = [r["seconds"] for r in res.history]
            per = [h[i] - h[i - 1] for i in range(1, steps)] or [h[0]]
            deltas[mode] = {n: (p.index, p.new.double() - p.base.double()) for n, p in res.delta.params.items()}
            revert_delta(model, res.delta)
            if peak is None and memory and opt == "sgd":  # CPU: profiler runs are slow; AdamW adds
                def one():                                  # state for the selected rows only
                    r = run_update(model, space, sel.indices, examples, replace(cfg, max_steps=1))
                    revert_delta(model, r.delta)
                peak = round(peak_memory_mib(one, device), 1)
            side["fast" if mode == "sparse" else "reference"] = {"step_seconds": round(statistics.median(per), 4),
                                                                 "step_time": Timing.of([x * 1e3 for x in per]).to_dict(),
                                                                 "wall_seconds": round(wall, 3), "peak_mib": peak}
        r, f = deltas["reference"], deltas["sparse"]
        same_rows = r.keys() == f.keys() and all(torch.equal(r[n][0], f[n][0]) for n in r)
        num = sum(float((r[n][1] - f[n][1]).pow(2).sum()) for n in r if n in f) ** 0.5
        den = sum(float(r[n][1].pow(2).sum()) for n in r) ** 0.5
        rel = num / den if den > 0 else float("inf")
        mr, mf = side["reference"]["peak_mib"], side["fast"]["peak_mib"]
        out[opt] = {**side, "ratio": _ratio(side["reference"]["step_seconds"], side["fast"]["step_seconds"]),
                    "memory_ratio": _ratio(mr, mf) if mr and mf else None, "update_norm": den,
                    "rel_diff": rel, "same": same_rows and den > 0 and rel <= tol}
    out["same"] = out["sgd"]["same"] and out["adamw"]["same"]
    return out
