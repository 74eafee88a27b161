"""Pair 6: the whole ``cca run`` (``run_cca``) with ``procedure="reference"`` (the authors'
procedure) vs the default fast path, on the same data splits, and the check that both runs
wrote the same results."""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from cca_fast.data.loaders import write_problems_jsonl
from cca_fast.data.problem import Problem
from cca_fast.delta import SparseDelta, revert_delta
from cca_fast.io import read_json, read_jsonl
from cca_fast.experiments.pipeline import RunConfig, run_cca

PROCEDURES = ("fast", "reference")  # fast first: any warm-up favours the reference


def _by(key: str, rows) -> dict:
    return {r[key]: r for r in rows}


def compare_runs(fast: Path, ref: Path, update_tol: float, ld_rtol: float) -> dict[str, Any]:
    """What two run directories agree on (every stage output), each as a bool, plus the numbers
    behind the tolerances."""
    out: dict[str, Any] = {}
    for name in ("eval_base_train", "eval_base_test", "eval_cca_test"):
        a, b = _by("id", read_jsonl(fast / f"{name}.jsonl")), _by("id", read_jsonl(ref / f"{name}.jsonl"))
        out[name] = a == b
        out[f"{name}_identical"] = sum(a[k] == b.get(k) for k in a)
    tf, tr = _by("problem_id", read_jsonl(fast / "traces.jsonl")), _by("problem_id", read_jsonl(ref / "traces.jsonl"))
    drop = ("generated_tokens",)  # samples drawn one at a time (reference) or 4 at a time (fast)
    out["traces"] = tf.keys() == tr.keys() and all(
        {k: v for k, v in tf[p].items() if k not in drop} == {k: v for k, v in tr[p].items() if k not in drop}
        for p in tf)
    pf, pr = _by("problem_id", read_jsonl(fast / "pivots.jsonl")), _by("problem_id", read_jsonl(ref / "pivots.jsonl"))

    def ex(r):
        return None if r["example"] is None else {**r["example"], "method": None}

    out["pivots"] = pf.keys() == pr.keys() and all(ex(pf[p]) == ex(pr[p]) for p in pf)
    out["pivots_found"] = sum(r["example"] is not None for r in pf.values())
    sf, sr = (read_json(d / "selection.json")["indices"] for d in (fast, ref))
    out["selection"] = sf == sr
    out["selected"] = len(sf)
    out["selection_jaccard"] = len(set(sf) & set(sr)) / max(1, len(set(sf) | set(sr)))
    uf, ur = read_json(fast / "update.json"), read_json(ref / "update.json")
    out["update_best_step"] = (uf["best_step"], uf["best_val"]) == (ur["best_step"], ur["best_val"])
    lds = [(a["train_logit_diff"], b["train_logit_diff"]) for a, b in zip(uf["history"], ur["history"])]
    out["train_logit_diff_max_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in lds)
    out["update_history"] = (len(uf["history"]) == len(ur["history"])
                             and all(a.get("val") == b.get("val") for a, b in zip(uf["history"], ur["history"]))
                             and out["train_logit_diff_max_rel_diff"] <= ld_rtol)
    df, dr = SparseDelta.load(fast / "delta"), SparseDelta.load(ref / "delta")
    same_rows = df.params.keys() == dr.params.keys() and all(
        torch.equal(df.params[n].index, dr.params[n].index) for n in df.params)
    num = den = 0.0
    for n, b in dr.params.items():
        a = df.params.get(n)
        d_ref = b.new.double() - b.base.double()
        den += float(d_ref.pow(2).sum())
        if a is not None and a.new.shape == b.new.shape:
            num += float((a.new.double() - a.base.double() - d_ref).pow(2).sum())
    out["delta_rel_diff"] = (num / den) ** 0.5 if den > 0 else None
    # (both runs kept step 0, the base: identical deltas are required then)
    out["delta"] = same_rows and (out["delta_rel_diff"] <= update_tol if den > 0 else num == 0.0)
    keys = ("eval_base_train", "eval_base_test", "traces", "pivots", "selection", "update_best_step",
            "update_history", "delta", "eval_cca_test")
    out["same"] = all(out[k] for k in keys)
    out["check"] = ("identical base/test/CCA-test generations, trace pairs, pivots, selection, best step and "
                    f"validation accuracies; train logit differences within rel {ld_rtol:g}; delta rows: "
                    f"||d_fast - d_ref|| <= {update_tol:g} x ||d_ref||")
    return out


def pair_whole_run(config: RunConfig, splits: dict[str, list[Problem]], workdir: Path, *, update_tol: float,
                   ld_rtol: float, model=None) -> dict[str, Any]:
    """``run_cca`` twice (fast, then reference) on ``splits`` (written as the runs' ``data/``).

    Args:
        config: the run configuration (``output`` and ``procedure`` are set here).
        model: an in-memory model that ``run_cca`` was given (``synthetic.serve_model``): the
            delta each run leaves applied is reverted after it.
    """
    res: dict[str, Any] = {"config": config.to_dict(), "splits": {k: len(v) for k, v in splits.items()}}
    for proc in PROCEDURES:
        out = workdir / proc
        shutil.rmtree(out, ignore_errors=True)
        for name, probs in splits.items():
            write_problems_jsonl(probs, out / "data" / f"{name}.jsonl")
        t = time.perf_counter()
        report = run_cca(dataclasses.replace(config, output=str(out), procedure=proc), progress=False)
        wall = time.perf_counter() - t
        if model is not None:
            revert_delta(model, SparseDelta.load(out / "delta"))
        stages = read_json(out / "stages.json")
        res[proc] = {"wall_seconds": round(wall, 2), "stage_seconds": stages,
                     "stage_total": round(sum(stages.values()), 2),
                     "report": {k: report[k] for k in ("base_accuracy", "cca_accuracy", "n_examples", "n_flipped",
                                                       "components_selected", "components_total", "best_step",
                                                       "pivot_search")}}
    res["stage_ratios"] = {s: round(res["reference"]["stage_seconds"][s] / res["fast"]["stage_seconds"][s], 3)
                           for s in res["fast"]["stage_seconds"]
                           if res["fast"]["stage_seconds"][s] > 0 and s in res["reference"]["stage_seconds"]}
    res["ratio"] = round(res["reference"]["wall_seconds"] / res["fast"]["wall_seconds"], 3)
    res.update(compare_runs(workdir / "fast", workdir / "reference", update_tol, ld_rtol))
    return res
