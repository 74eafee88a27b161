"""bf16 generation benchmark: the slot decoder in float32 (the default) vs under bf16 autocast
(``--generation-dtype bfloat16``) vs the model cast to bf16 (``--dtype bfloat16``), beside
transformers' ``generate``.

    python bench/generation/bench_bf16.py [--prompts 16] [--new-tokens 40] [--slots 8,64]

On the first ``--prompts`` of the default run's base-evaluation prompts (``prompts.py``: the
quick start's 8-shot prompts, ~970 tokens each) with the embedded default model, greedy, every
row exactly ``--new-tokens`` new tokens (no stop rule: every variant does the same work), in one
process, for each slot count:

* **float32**: the slot decoder as a run uses it (``compute_dtype="float32"``);
* **bf16 autocast**: the same model under ``compute_dtype="bfloat16"`` (matrix products in bf16,
  norms, softmax and the residual stream in float32);
* **bf16 autocast, frozen weights** (the first slot count only): the same with every weight's
  ``requires_grad`` off, as in the update stage's validation;
* **bf16 weights**: a copy of the model cast with ``model.to(torch.bfloat16)``, ``compute_dtype="float32"``
  (everything in bf16, what ``--dtype bfloat16`` loads);

and once, the peer a user would pick: transformers' ``model.generate(cache_implementation="static")``
on the float32 model, 8-row left-padded batches, the same token counts.

Per variant: seconds, new tokens/s, the speed-up over float32 at the same slot count
(``float32 s / variant s``: above 1 is faster), over ``generate``, and the ratio to the floor:
``max(FLOPs / GEMM rate, forwards x weight bytes / memory bandwidth)``, the GEMM rate measured on
the spot in the variant's dtype (fp32 or bf16, the model's MLP shape), the bandwidth from a large
copy; FLOPs as in ``bench_generation.py`` (the exemplars once). Token agreement with float32 at the
same slot count: the share of rows with identical greedy tokens and the mean position of the first
differing token (over the rows that differ). Results: ``results/bf16.json``, ``results/bf16.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_generation import first_diff, flops, gemm_rate  # noqa: E402
from harness import environment_line, markdown_table, report  # noqa: E402
from prompts import base_eval_prompts  # noqa: E402
from side import _gen_config, hf_generate, timed_generate  # noqa: E402

PEER = "transformers generate (static cache), float32"
FROZEN = "bf16 autocast, frozen weights"


def bandwidth(mib: int = 256, reps: int = 5) -> float:
    """Best bytes/s of copying a ``mib`` MiB float32 tensor (read + write)."""
    a = torch.empty(mib * 2**18)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / best


def agreement(ref: list[list[int]], other: list[list[int]]) -> tuple[float, float | None]:
    """``(share of rows identical to ref, mean first differing position over the rows that differ)``."""
    diffs = [d for d in (first_diff(r, o) for r, o in zip(ref, other)) if d is not None]
    return 1 - len(diffs) / len(ref), (sum(diffs) / len(diffs) if diffs else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--slots", default="8,64")
    ap.add_argument("--hf-batch", type=int, default=8, help="generate's batch (0: skip the peer)")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()

    from cca_fast.generation.prefix import shared_len
    from cca_fast.generation.state import GenerationStats
    from cca_fast.models import runtime
    from cca_fast.models.loading import load_model

    model, tok = load_model(None)
    model.eval()
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    cfg = model.config
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    weight_bytes = sum(p.numel() for p in model.parameters())  # x element size; tied weights counted once
    ids = base_eval_prompts(tok)[0][:a.prompts]
    shared = shared_len(ids, 16)
    rates = {"float32": gemm_rate(torch.float32), "bfloat16": gemm_rate(torch.bfloat16)}
    bw = bandwidth()
    print(f"GEMM fp32 {rates['float32'] / 1e9:.1f}, bf16 {rates['bfloat16'] / 1e9:.1f} GFLOP/s; "
          f"copy {bw / 1e9:.1f} GB/s; {len(ids)} prompts, exemplars {shared} tokens", flush=True)
    base = {"max_new_tokens": a.new_tokens, "stops": (), "stop_on_eos": False}
    variants = [("float32", model, "float32", torch.float32),
                ("bf16 autocast", model, "bfloat16", torch.bfloat16),
                ("bf16 weights", model16, "float32", torch.bfloat16)]
    results: list[dict[str, Any]] = []
    outputs: dict[tuple[str, int], list[list[int]]] = {}

    def row(name: str, slots: int, secs: float, outs: list[list[int]], dtype: torch.dtype, forwards: int) -> dict:
        tokens = sum(len(o) for o in outs)
        compute = flops(cfg, body, ids, outs, shared) / rates[str(dtype).replace("torch.", "")]
        memory = forwards * weight_bytes * torch.finfo(dtype).bits / 8 / bw
        floor = max(compute, memory)
        r = {"variant": name, "slots": slots, "seconds": round(secs, 2), "new_tokens": tokens,
             "tokens_per_second": round(tokens / secs, 1), "forwards": forwards,
             "compute_floor_seconds": round(compute, 2), "bandwidth_floor_seconds": round(memory, 2),
             "floor_ratio": round(secs / floor, 2)}
        results.append(r)
        print(f"  {name}, {slots} slots: {secs:.1f} s", flush=True)
        return r

    slot_counts = [int(x) for x in a.slots.split(",")]
    for s in slot_counts:
        frozen = [(FROZEN, model, "bfloat16", torch.bfloat16)] if s == slot_counts[0] else []
        for name, m, compute_dtype, dtype in variants[:2] + frozen + variants[2:]:
            stats = GenerationStats()
            gen = _gen_config({**base, "slots": s, "compute_dtype": compute_dtype})
            with runtime.frozen(m) if name == FROZEN else contextlib.nullcontext():
                secs, outs = timed_generate(m, tok, ids, gen, stats=stats)
            outputs[(name, s)] = outs
            r = row(name, s, secs, outs, dtype, stats.decode_steps + 1)  # + the shared prefix's forward
            ref = outputs[("float32", s)]
            f32 = next(x for x in results if x["variant"] == "float32" and x["slots"] == s)
            r["speedup_vs_float32"] = round(f32["seconds"] / r["seconds"], 2)
            r["identical_rows"], r["mean_first_difference"] = agreement(ref, outs)
    if a.hf_batch:
        t0 = time.perf_counter()
        outs = hf_generate(model, tok, ids, [a.new_tokens] * len(ids), a.hf_batch)
        batches = -(-len(ids) // a.hf_batch)
        r = row(PEER, a.hf_batch, time.perf_counter() - t0, outs, torch.float32, batches * a.new_tokens)
        r["identical_rows"], r["mean_first_difference"] = agreement(next(iter(outputs.values())), outs)
        for x in results[:-1]:
            x["speedup_vs_generate"] = round(r["seconds"] / x["seconds"], 2)

    fp32_vs_slots = {f"float32 {s} slots vs {t} slots": agreement(outputs[("float32", s)], outputs[("float32", t)])[0]
                     for (n, s) in outputs for (n2, t) in outputs if n == n2 == "float32" and s < t}
    res = report("generation_bf16", "cpu", results, model=model,
                 config={"prompts": len(ids), "new_tokens_per_row": a.new_tokens, "exemplar_tokens": shared,
                         "gemm_gflops": {k: round(v / 1e9, 1) for k, v in rates.items()},
                         "copy_gbytes_per_second": round(bw / 1e9, 1), "weights": weight_bytes,
                         "float32_identical_across_slots": fp32_vs_slots})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bf16.json").write_text(json.dumps(res, indent=1))
    md = ["# bf16 generation", "", environment_line(res["env"]), "",
          f"{len(ids)} base-evaluation prompts (exemplars {shared} tokens), greedy, {a.new_tokens} new tokens a row; "
          f"GEMM measured: fp32 {rates['float32'] / 1e9:.1f}, bf16 {rates['bfloat16'] / 1e9:.1f} GFLOP/s; "
          f"copy {bw / 1e9:.1f} GB/s.", "",
          markdown_table(["variant", "slots (generate: rows)", "s", "new tokens", "tokens/s", "x float32 speed",
                          "x generate speed", "x floor", "identical rows", "mean first difference"],
                         [[r["variant"], r["slots"], r["seconds"], r["new_tokens"], r["tokens_per_second"],
                           r.get("speedup_vs_float32"), r.get("speedup_vs_generate"), r["floor_ratio"],
                           f"{r['identical_rows']:.0%}", r["mean_first_difference"]] for r in results]), "",
          "x float32 speed: float32's seconds / the variant's at the same slot count (above 1: faster); x generate "
          "speed: generate's seconds / the variant's; x floor: seconds / max(compute floor, bandwidth floor) in the "
          "variant's dtype; identical rows: rows whose greedy tokens equal float32's at the same slot count "
          "(generate: at the first slot count); mean first difference: the first differing token's position, over "
          "the rows that differ.", "",
          verdict(results), "",
          *([f"Float32 across slot counts: {k}: {v:.0%} identical rows" for k, v in fp32_vs_slots.items()] + [""]),
          f"Command: `python bench/generation/bench_bf16.py --prompts {a.prompts} --new-tokens {a.new_tokens} "
          f"--slots {a.slots}`, one process, on a shared 2-core machine under the heavy-job lock "
          "(absolute CPU times are indicative; the ratios are from one run)."]
    (out / "bf16.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def verdict(results: list[dict[str, Any]]) -> str:
    """One plain sentence per bf16 variant: faster or not than float32, at which slot counts."""
    lines = []
    for name in ("bf16 autocast", FROZEN, "bf16 weights"):
        ups = [(r["slots"], r["speedup_vs_float32"]) for r in results if r["variant"] == name]
        faster = [s for s, u in ups if u > 1.05]
        detail = ", ".join(f"{u}x at {s} slots" for s, u in ups)
        lines.append(f"**{name}**: " + (f"faster than float32 at {', '.join(map(str, faster))} slots" if faster else
                                        "NOT faster than float32 (within 5% or slower)") + f" ({detail}).")
    return " ".join(lines)


if __name__ == "__main__":
    main()
