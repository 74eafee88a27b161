"""Branching pivot search: the literal per-position loop (reference) vs the pruned, batched
search, on real flipped traces of a model. Checks that both give identical pivots; reports
generated tokens and wall time per pivot, as ratios.

    python bench/pipeline/bench_branching.py                  # default model, 8 pairs, CPU
    python bench/pipeline/bench_branching.py --device cuda --pairs 16
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import environment  # noqa: E402

from cca_fast.data import load_problems  # noqa: E402
from cca_fast.generation import GenerationConfig, generate  # noqa: E402
from cca_fast.io import atomic_write_json  # noqa: E402
from cca_fast.models.loading import load_model  # noqa: E402
from cca_fast.stages.pivots.search import compare_branching  # noqa: E402
from cca_fast.evaluation.prompting import (PromptConfig, build_prompt, encode_prompts, extract_answer,  # noqa: E402
                                          is_correct, paper_stops)
from cca_fast.stages.traces import GreedyTrace, TraceConfig, sample_flip  # noqa: E402


def flipped_pairs(model, tok, problems, prompt, gen, trace_cfg, n_pairs):
    """The first ``n_pairs`` flipped trace pairs found among ``problems`` (in order)."""
    pairs = []
    for i in range(0, len(problems), gen.batch_size):
        part = problems[i : i + gen.batch_size]
        ids = encode_prompts([build_prompt(p.question, prompt, tok) for p in part], tok, prompt)
        for p, g in zip(part, generate(model, tok, ids, gen)):
            greedy = GreedyTrace(p.id, g.prompt_ids, g.output_ids, g.text, is_correct(extract_answer(g.text), p.gold))
            pair = sample_flip(model, tok, p, greedy, gen, trace_cfg)
            if pair.flipped:
                pairs.append(pair)
                if len(pairs) == n_pairs:
                    return pairs
    return pairs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--n-shots", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "branching_cpu.json"))
    args = ap.parse_args(argv)

    model, tok = load_model(args.model, device=args.device)
    problems = load_problems(None, n_per_template=3, seed=args.seed)
    prompt = PromptConfig(n_shots=args.n_shots)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, stops=paper_stops())
    pairs = flipped_pairs(model, tok, problems, prompt, gen, TraceConfig(k=10, seed=args.seed), args.pairs)
    with torch.no_grad():
        result = compare_branching(model, tok, pairs, gen)
    result = {"benchmark": "branching", "env": environment(args.device, model),
              "settings": {k: v for k, v in vars(args).items() if k != "output"}, **result}
    atomic_write_json(args.output, result)
    t = result["totals"]
    print(f"{result['pairs']} pairs, identical pivots: {result['identical']}")
    print("| search | completions | generated tokens | seconds |\n|---|---|---|---|")
    for impl in ("reference", "fast"):
        print(f"| {impl} | {t[impl]['completions']} | {t[impl]['generated_tokens']} | {t[impl]['seconds']:.1f} |")
    print(f"ratios (reference / fast): tokens {result['token_ratio']:.1f}x, time {result['time_ratio']:.1f}x")
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
