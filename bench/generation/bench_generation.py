"""Generation benchmark: the previous decoder vs the slot decoder vs transformers' ``generate``.

    python bench/generation/bench_generation.py [--baseline 3f1174f] [--ref-problems 238] ...

On the default run's 238 base-evaluation prompts (``prompts.py``) with the embedded default model
and the default run's decoding settings (greedy, 160 new tokens at most, the paper's stops, 8
rows), in one run, every side in its own process (``side.py``):

* **previous**: the decoder of ``--baseline`` (an export of that commit, ``git archive``, under ``--base-dir``,
  put first on ``PYTHONPATH``), through the base-evaluation stage's own ``eval_resumable``;
* **new**: this tree's decoder, the same call;
* **reference**: this tree, one sequence at a time (``batch_size=1``), on the first
  ``--ref-problems`` prompts: every greedy token of *new* and *previous* is compared with it; each
  mismatch is listed with the reference model's logit gap between the two tokens at the first
  differing position (a teacher-forced forward);
* **generate**: ``model.generate(cache_implementation="static")`` on the first ``--hf-problems``
  prompts, each row stopped after as many tokens as the new decoder produced (same work);
* a **batch sweep** of the new decoder (1 / 8 / 32 / 64 slots) on the first ``--sweep-problems``
  prompts; **sampled traces** (the traces stage's settings: temperature 1.2 / 0.8 by greedy
  correctness, ``sample_batch`` samples per problem, per-row seeds) of the first
  ``--trace-problems`` training problems: previous vs new vs the batch-1 reference.

The compute floor of each workload is its FLOPs (every matrix product of the model on the positions
actually run: the exemplars once, each prompt's own tokens, each new token; attention over the
context) divided by the fp32 GEMM rate measured on the spot; ``floor_ratio`` = wall / floor.
Results: ``results/generation.json`` and ``results/generation.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from harness import environment_line, markdown_table, report  # noqa: E402
from prompts import base_eval_prompts  # noqa: E402


def side(job: dict[str, Any], code: Path | None, tmp: Path, name: str) -> dict[str, Any]:
    """Run ``side.py`` on ``job`` in a fresh process; ``code`` = a checkout first on the path."""
    jf, of = tmp / f"{name}.job.json", tmp / f"{name}.out.json"
    jf.write_text(json.dumps(job))
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "side.py"), str(jf), str(of)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    out = json.loads(of.read_text())
    print(f"  {name}: {out['seconds']:.1f} s ({time.perf_counter() - t0:.1f} s with loading) from {out['cca_fast']}",
          flush=True)
    return out


def gemm_rate(dtype=torch.float32, m: int = 512, k: int = 576, n: int = 1536, reps: int = 20) -> float:
    """Best fp32 GEMM FLOP/s of ``[m, k] @ [k, n]`` (the default model's MLP shape) over ``reps``."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * m * k * n / best


def flops(cfg: Any, body: int, prompts: list[list[int]], outputs: list[list[int]], shared: int) -> float:
    """FLOPs of the matrix products: ``shared`` exemplar positions once, each prompt's own
    positions, each new token (+ its lm head), attention over each position's context."""
    att = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    head = 2 * cfg.hidden_size * cfg.vocab_size
    f = shared * 2 * body + att * shared * shared / 2
    for p, o in zip(prompts, outputs):
        own = len(p) - shared
        f += own * 2 * body + att * own * (shared + len(p)) / 2 + head
        f += len(o) * (2 * body + head) + att * len(o) * (len(p) + len(o) / 2)
    return f


def first_diff(a: list[int], b: list[int]) -> int | None:
    n = min(len(a), len(b))
    d = next((i for i in range(n) if a[i] != b[i]), None)
    return d


def mismatches(model, prompts, ref, other, label: str) -> list[dict[str, Any]]:
    """Rows whose tokens differ from the reference: position, tokens, the reference model's logit
    gap between them (teacher-forced, fp32) and the top-2 gap there."""
    out = []
    for i, (p, r, o) in enumerate(zip(prompts, ref, other)):
        d = first_diff(r, o)
        if d is None:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + r[:d]])).logits[0, -1].float()
        top = logits.topk(2).values
        out.append({"side": label, "row": i, "position": d, "reference_token": r[d], "token": o[d],
                    "logit_gap": round(float(logits[r[d]] - logits[o[d]]), 7),
                    "top2_gap": round(float(top[0] - top[1]), 7)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="3f1174f")
    ap.add_argument("--base-dir", default=str(Path(tempfile.gettempdir()) / "gen_base"))
    ap.add_argument("--problems", type=int, default=238)
    ap.add_argument("--ref-problems", type=int, default=238)
    ap.add_argument("--hf-problems", type=int, default=32)
    ap.add_argument("--sweep-problems", type=int, default=64)
    ap.add_argument("--sweep", default="1,8,32,64")
    ap.add_argument("--trace-problems", type=int, default=24)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()

    base = Path(a.base_dir)
    if not base.exists():
        base.mkdir(parents=True)  # a plain export of the baseline commit (no worktree registered)
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", a.baseline], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=tar, check=True)
    from cca_fast.experiments.config import RunConfig, procedure_settings
    from cca_fast.models.loading import load_model
    from cca_fast.stages.traces import TraceConfig, problem_seed

    model, tok = load_model(None)
    model.eval()
    cfg = model.config
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    ids, problems = base_eval_prompts(tok)
    ids, problems = ids[:a.problems], problems[:a.problems]
    from cca_fast.generation.prefix import shared_len
    shared = shared_len(ids, 16)
    rate = gemm_rate()
    print(f"GEMM {rate / 1e9:.1f} GFLOP/s; {len(ids)} prompts, exemplars {shared} tokens", flush=True)
    gen = procedure_settings(RunConfig()).generation
    results: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_gen_"))

    def row(workload: str, name: str, secs: float, prompts, outs, n_shared: int, **extra) -> dict[str, Any]:
        """One result; the floor is the workload's (the exemplars computed once), whatever the
        decoder does (``n_shared`` is kept for the record)."""
        tokens = sum(len(o) for o in outs)
        floor = flops(cfg, body, prompts, outs, shared) / rate
        r = {"workload": workload, "decoder": name, "seconds": round(secs, 2), "new_tokens": tokens,
             "tokens_per_second": round(tokens / secs, 1), "floor_seconds": round(floor, 2),
             "floor_ratio": round(secs / floor, 2), **extra}
        results.append(r)
        return r


    def write(done: bool = False) -> None:
        """Write the JSON and Markdown of the parts measured so far (each part adds rows)."""
        by = {(r["workload"], r["decoder"]): r for r in results}
        speed = {}
        if ("base_eval", "new") in by:
            speed["base_eval_new_vs_previous"] = round(by[("base_eval", "previous")]["seconds"]
                                                       / by[("base_eval", "new")]["seconds"], 2)
            speed["base_eval_new_floor_ratio"] = by[("base_eval", "new")]["floor_ratio"]
        hf_key = next((k for k in by if k[1] == "transformers generate (static cache)"), None)
        if hf_key:
            speed[f"{hf_key[0]}_new_vs_generate"] = round(by[hf_key]["seconds"] / by[(hf_key[0], "new")]["seconds"], 2)
        checks = []
        if "base_eval_new_vs_previous" in speed:
            checks += [(">= 4x the previous decoder on the base evaluation", speed["base_eval_new_vs_previous"], 4, 1),
                       ("within 2x of the compute floor", speed["base_eval_new_floor_ratio"], 2, -1)]
        if hf_key:
            checks.append(("ahead of transformers' generate (static cache)", speed[f"{hf_key[0]}_new_vs_generate"],
                           1.0, 1))
        res = report("generation", "cpu", results, model=model,
                     config={"baseline": a.baseline, "problems": len(ids), "exemplar_tokens": shared,
                             "gemm_gflops": round(rate / 1e9, 1), "generation": gen.to_dict(), **sizes,
                             "complete": done},
                     targets={"new_vs_previous": ">= 4", "floor_ratio": "<= 2", "new_vs_generate": "> 1"},
                     speedups=speed, same_outputs=same, mismatches=mism)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "generation.json").write_text(json.dumps(res, indent=1))
        md = ["# Generation benchmark" + ("" if done else " (partial: the run is not finished)"), "",
              environment_line(res["env"]), "",
              f"GEMM (fp32, 512x576x1536) measured: {rate / 1e9:.1f} GFLOP/s; exemplar prefix {shared} tokens.", "",
              markdown_table(["workload", "decoder", "s", "new tokens", "tokens/s", "floor s", "x floor"],
                             [[r["workload"], r["decoder"], r["seconds"], r["new_tokens"], r["tokens_per_second"],
                               r["floor_seconds"], r["floor_ratio"]] for r in results]),
              "", "Speed-ups: " + ", ".join(f"{k} {v}x" if "floor" not in k else f"{k} {v}" for k, v in speed.items()),
              "", "Targets: " + "; ".join(f"{name}: {v}x ({'met' if (v >= lim if sign > 0 else v <= lim) else 'MISSED'})"
                                          for name, v, lim, sign in checks),
              "", "Same tokens: " + ", ".join(f"{k} {v}" for k, v in same.items()), "",
              f"Token mismatches vs the batch-1 reference: {len(mism)}", ""]
        if mism:
            md.append(markdown_table(["side", "row", "position", "ref token", "token", "logit gap", "top-2 gap"],
                                     [[m["side"], m["row"], m["position"], m["reference_token"], m["token"],
                                       m["logit_gap"], m["top2_gap"]] for m in mism]))
        (out / "generation.md").write_text("\n".join(md) + "\n")
        if done:
            print("\n".join(md))

    sizes: dict[str, int] = {}
    same: dict[str, Any] = {}
    mism: list[dict[str, Any]] = []

    # ---- base evaluation: previous vs new (the stage's own call), then the batch-1 reference
    print("base evaluation", flush=True)
    new = side({"mode": "eval", "limit": a.problems}, None, tmp, "eval_new")
    previous = side({"mode": "eval", "limit": a.problems}, base, tmp, "eval_previous")
    row("base_eval", "previous", previous["seconds"], ids, previous["outputs"], 0)
    row("base_eval", "new", new["seconds"], ids, new["outputs"], shared)
    same.update({"new_vs_previous": sum(x == y for x, y in zip(new["outputs"], previous["outputs"])),
                 "accuracy_new": sum(new["correct"]) / len(ids),
                 "accuracy_previous": sum(previous["correct"]) / len(ids)})
    write()
    # ---- transformers' generate (static cache) on a subset, same token counts as the new decoder
    nh = min(a.hf_problems, len(ids))
    sub = ids[:nh]
    lengths = [len(o) for o in new["outputs"][:nh]]
    hf = side({"mode": "hf", "prompts": sub, "lengths": lengths, "batch_size": gen.batch_size}, None, tmp, "hf")
    sub_new = side({"mode": "generate", "prompts": sub, "config": {}}, None, tmp, "sub_new")
    sub_previous = side({"mode": "generate", "prompts": sub, "config": {}}, base, tmp, "sub_previous")
    row(f"base_eval[:{nh}]", "transformers generate (static cache)", hf["seconds"], sub, hf["outputs"], 0)
    row(f"base_eval[:{nh}]", "new", sub_new["seconds"], sub, sub_new["outputs"], shared)
    row(f"base_eval[:{nh}]", "previous", sub_previous["seconds"], sub, sub_previous["outputs"], 0)
    sizes["hf_problems"] = nh
    write()

    # ---- batch sweep of the new decoder
    ns = min(a.sweep_problems, len(ids))
    for b in [int(x) for x in a.sweep.split(",")]:
        s = side({"mode": "generate", "prompts": ids[:ns], "config": {"slots": b}}, None, tmp, f"sweep{b}")
        row(f"sweep[:{ns}]", f"new, {b} slots", s["seconds"], ids[:ns], s["outputs"], shared, slots=b)
        sizes["sweep_problems"] = ns
        write()

    # ---- the batch-1 reference on the base evaluation: identity of every greedy token
    nr = min(a.ref_problems, len(ids))
    ref = side({"mode": "generate", "prompts": ids[:nr], "config": {"batch_size": 1, "slots": 1}}, None, tmp, "eval_ref")
    row("base_eval", "reference (new, 1 slot)", ref["seconds"], ids[:nr], ref["outputs"], shared)
    sizes["ref_problems"] = nr
    mism += mismatches(model, ids[:nr], ref["outputs"], new["outputs"][:nr], "new")
    mism += mismatches(model, ids[:nr], ref["outputs"], previous["outputs"][:nr], "previous")
    same.update({"new_vs_reference": sum(x == y for x, y in zip(new["outputs"], ref["outputs"])),
            "previous_vs_reference": sum(x == y for x, y in zip(previous["outputs"], ref["outputs"])),
            "new_vs_previous": sum(x == y for x, y in zip(new["outputs"], previous["outputs"])), "compared": nr,
            "accuracy_new": sum(new["correct"]) / len(ids), "accuracy_previous": sum(previous["correct"]) / len(ids)})
    print(same, flush=True)
    write()
    mism += mismatches(model, sub[:nr], ref["outputs"][:min(nh, nr)], hf["outputs"][:min(nh, nr)], "generate")
    write()

    # ---- sampled traces (the traces stage's settings)
    tc = TraceConfig()
    nt = min(a.trace_problems, 136, len(ids))
    prompts, seeds, temps = [], [], []
    for i in range(nt):
        t = tc.temperature_if_correct if new["correct"][i] else tc.temperature_if_wrong
        for j in range(tc.sample_batch):
            prompts.append(ids[i]), seeds.append(problem_seed(tc.seed, problems[i].id) + j), temps.append(t)
    tr_out: dict[str, Any] = {}
    for temp in sorted(set(temps)):
        rows = [k for k, t in enumerate(temps) if t == temp]
        job = {"mode": "generate", "prompts": [prompts[k] for k in rows], "seeds": [seeds[k] for k in rows],
               "config": {"do_sample": True, "temperature": temp, "top_p": tc.top_p}}
        for name, code, extra in (("new", None, {}), ("previous", base, {}), ("reference", None, {"batch_size": 1, "slots": 1})):
            j2 = dict(job, config={**job["config"], **extra})
            o = side(j2, code, tmp, f"traces_{name}_{temp}")
            d = tr_out.setdefault(name, {"seconds": 0.0, "outputs": [None] * len(prompts)})
            d["seconds"] += o["seconds"]
            for k, out in zip(rows, o["outputs"]):
                d["outputs"][k] = out
    for name in ("previous", "new", "reference"):
        row(f"traces[:{nt}]x{tc.sample_batch}", name, tr_out[name]["seconds"], prompts, tr_out[name]["outputs"],
            0 if name == "previous" else shared)
    same["traces_new_vs_reference"] = sum(x == y for x, y in zip(tr_out["new"]["outputs"], tr_out["reference"]["outputs"]))
    same["traces_previous_vs_reference"] = sum(x == y for x, y in zip(tr_out["previous"]["outputs"],
                                                                   tr_out["reference"]["outputs"]))
    same["traces_compared"] = len(prompts)
    sizes["trace_problems"] = nt
    mism += mismatches(model, prompts, tr_out["reference"]["outputs"], tr_out["new"]["outputs"], "traces new")

    write(done=True)


if __name__ == "__main__":
    main()
