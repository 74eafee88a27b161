"""The generation section of the device check (``bench/gpu/check.py``): the slot decoder vs
transformers' ``generate`` with a static cache, eager and (on CUDA) compiled with CUDA graphs, on
one random model and prompts that share a prefix (the few-shot layout), in one process.

    python bench/generation/bench_device.py --device cuda --out generation.json
    python bench/generation/bench_device.py --tiny --out generation.json     # CPU rehearsal, toy sizes

Sides (each warmed up once, then timed once; every row decodes exactly ``max_new_tokens`` tokens,
no EOS stop, so every side does the same work):

* ``slots``: :func:`cca_fast.generation.generate` (the slot decoder: continuous batching over a
  preallocated cache, the shared prefix stored once), ``--slots`` slots;
* ``reference``: the same with one slot (the batch-1 reference) on the first ``--ref`` prompts: the
  greedy tokens of ``slots`` and of ``generate`` are compared with it (each first mismatch listed
  with the reference's logit gap between the two tokens, from a teacher-forced forward);
* ``generate (static cache)``: ``model.generate(cache_implementation="static",
  disable_compile=True)``, left-padded batches of ``--hf-batch``;
* ``generate (static cache, compiled, CUDA graphs)``: the same with transformers' automatic
  compilation (``torch.compile`` mode ``reduce-overhead``, i.e. CUDA graphs): CUDA only, listed as
  skipped elsewhere.

Model: a random Llama-3.2-1B shape in bf16 on CUDA (``LLAMA_1B`` of ``bench_attribution``), a toy
Llama in fp32 with ``--tiny``. Writes one harness-schema JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
for p in (HERE.parent, HERE.parent / "kernels"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
import harness  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_hidden_layers=2, vocab_size=64)
#: sizes: (prompts, shared prefix, own tokens at most, new tokens, slots, reference prompts, generate batch)
SIZES = {"gpu": dict(n=64, prefix=768, own=64, new=64, slots=64, ref=8, hf_batch=16),
         "tiny": dict(n=6, prefix=12, own=6, new=5, slots=4, ref=6, hf_batch=3)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_prompts(vocab: int, n: int, prefix: int, own: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts: one random ``prefix`` shared by all, then 1..``own`` random tokens each."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(3, vocab, (prefix,), generator=g).tolist()
    return [common + torch.randint(3, vocab, (int(k),), generator=g).tolist()
            for k in torch.randint(1, own + 1, (n,), generator=g)]


def run_slots(model, prompts, new: int, slots: int) -> list[list[int]]:
    from cca_fast.generation import GenerationConfig, generate

    cfg = GenerationConfig(max_new_tokens=new, slots=slots, stop_on_eos=False)
    return [g.output_ids for g in generate(model, None, prompts, cfg)]


def run_hf(model, prompts, new: int, batch: int, compiled: bool) -> list[list[int]]:
    """Greedy ``generate`` with a static cache, left-padded batches, exactly ``new`` tokens a row."""
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for b in range(0, len(prompts), batch):
        rows = prompts[b:b + batch]
        S = max(map(len, rows))
        ids = torch.zeros(len(rows), S, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(rows):
            ids[j, S - len(p):], mask[j, S - len(p):] = torch.tensor(p), 1
        with torch.no_grad():
            res = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new, cache_implementation="static",
                                 disable_compile=not compiled, pad_token_id=0, eos_token_id=None)
        out += res[:, S:].tolist()
    return out


def timed(fn, device: torch.device) -> tuple[float, Any]:
    fn()  # warm-up (compilation, CUDA graph capture, allocator)
    _sync(device)
    t0 = time.perf_counter()
    res = fn()
    _sync(device)
    return time.perf_counter() - t0, res


def mismatches(model, prompts, ref, other, side: str) -> list[dict[str, Any]]:
    """Each row of ``other`` whose tokens differ from ``ref``: the first position, both tokens and
    the reference model's logit gap between them there (teacher-forced, float32 logits)."""
    device = next(model.parameters()).device
    rows = []
    for i, (p, r, o) in enumerate(zip(prompts, ref, other)):
        d = next((k for k in range(min(len(r), len(o))) if r[k] != o[k]), None)
        if d is None:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + r[:d]], device=device)).logits[0, -1].float()
        rows.append({"side": side, "row": i, "position": d, "reference_token": r[d], "token": o[d],
                     "logit_gap": round(float(logits[r[d]] - logits[o[d]]), 6)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (the CI rehearsal)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    from bench_attribution import LLAMA_1B, build_model

    device = torch.device(a.device or ("cpu" if a.tiny else "cuda"))
    size = SIZES["tiny" if a.tiny else "gpu"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(TINY if a.tiny else LLAMA_1B, dtype, str(device))
    prompts = make_prompts(model.config.vocab_size, size["n"], size["prefix"], size["own"])
    new = size["new"]
    results: list[dict[str, Any]] = []

    def row(side: str, secs: float | None, outs, status: str = "ok", **extra) -> None:
        tokens = sum(map(len, outs)) if outs else 0
        results.append({"side": side, "status": status, "seconds": None if secs is None else round(secs, 3),
                        "new_tokens": tokens, "tokens_per_second": round(tokens / secs, 1) if secs else None,
                        **extra})

    t, slots_out = timed(lambda: run_slots(model, prompts, new, size["slots"]), device)
    row("slots", t, slots_out, slots=size["slots"])
    k = size["ref"]
    t, ref = timed(lambda: run_slots(model, prompts[:k], new, 1), device)
    row("reference (1 slot)", t, ref, prompts=k)
    t, hf = timed(lambda: run_hf(model, prompts, new, size["hf_batch"], compiled=False), device)
    row("generate (static cache)", t, hf, batch=size["hf_batch"])
    k_ref = (prompts[:k], ref)

    def save(hf_c) -> dict[str, Any]:
        """Write the JSON of what ran so far (a later side that runs out of time loses nothing)."""
        mism = mismatches(model, k_ref[0], ref, slots_out[:k], "slots")
        mism += mismatches(model, k_ref[0], ref, hf[:k], "generate (static cache)")
        by = {r["side"]: r for r in results}
        speed = {"slots_vs_generate_static": round(by["generate (static cache)"]["seconds"] / by["slots"]["seconds"], 2)}
        comp = by.get("generate (static cache, compiled, CUDA graphs)")
        if comp and comp["seconds"]:
            speed["slots_vs_generate_compiled"] = round(comp["seconds"] / by["slots"]["seconds"], 2)
        res = harness.report(
            "generation_device", device, results, model=model,
            config={"tiny": a.tiny, "dtype": str(dtype).replace("torch.", ""),
                    "model": "toy Llama" if a.tiny else "random Llama-3.2-1B shape", **size},
            targets={"slots_vs_generate": "> 1"}, speedups=speed,
            same_tokens={"slots_vs_reference": sum(x == y for x, y in zip(slots_out[:k], ref)),
                         "generate_vs_reference": sum(x == y for x, y in zip(hf[:k], ref)), "compared": k},
            mismatches=mism)
        harness.validate(res)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
        return res

    save(None)
    if device.type == "cuda":
        t, hf_c = timed(lambda: run_hf(model, prompts, new, size["hf_batch"], compiled=True), device)
        row("generate (static cache, compiled, CUDA graphs)", t, hf_c, batch=size["hf_batch"])
    else:
        row("generate (static cache, compiled, CUDA graphs)", None, None, status="skipped (CUDA only)")
    print(markdown(save(None)))
    return 0


def markdown(res: dict[str, Any]) -> str:
    """The section's tables for ``check.md``."""
    rows = [[r["side"], r["status"], r["seconds"], r["new_tokens"], r["tokens_per_second"]] for r in res["results"]]
    lines = [harness.markdown_table(["side", "status", "s", "new tokens", "tokens/s"], rows), "",
             "Speed-ups: " + ", ".join(f"{k} {v}x" for k, v in res["speedups"].items()),
             "Same tokens as the batch-1 reference: " + ", ".join(f"{k} {v}" for k, v in res["same_tokens"].items())]
    if res["mismatches"]:
        lines += ["", harness.markdown_table(["side", "row", "position", "ref token", "token", "logit gap"],
                                             [[m["side"], m["row"], m["position"], m["reference_token"], m["token"],
                                               m["logit_gap"]] for m in res["mismatches"]])]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
