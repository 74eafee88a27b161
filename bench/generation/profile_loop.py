"""torch.profiler over the real generation loop: 16 prompts of the default run's base evaluation,
greedy, the default run's decoding settings (160 new tokens at most, paper stops, 8 rows), the
embedded default model; the padded-batch decoder (``continuous=False``) and the slot decoder.

    python bench/generation/profile_loop.py [--n 16] [--out bench/generation/results/profile.md]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from harness import environment, environment_line  # noqa: E402
from prompts import base_eval_prompts  # noqa: E402

from cca_fast.experiments.config import RunConfig, procedure_settings  # noqa: E402
from cca_fast.generation import GenerationStats, generate  # noqa: E402
from cca_fast.models.loading import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default=str(HERE / "results" / "profile.md"))
    a = ap.parse_args()
    model, tok = load_model(None)
    model.eval()
    ids, _ = base_eval_prompts(tok)
    ids = ids[:a.n]
    gen = procedure_settings(RunConfig()).generation
    lines = [f"# Profile of the generation loop\n", f"env: {environment_line(environment('cpu', model))}\n",
             f"{a.n} base-evaluation prompts ({min(map(len, ids))}-{max(map(len, ids))} tokens), greedy, "
             f"max_new_tokens={gen.max_new_tokens}, {gen.batch_size} rows.\n"]
    for name, cont in (("padded batches (today's decoder)", False), ("slot decoder", True)):
        cfg = dataclasses.replace(gen, continuous=cont)
        generate(model, tok, ids[:2], dataclasses.replace(cfg, max_new_tokens=2))  # warm-up
        stats = GenerationStats()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            gens = generate(model, tok, ids, cfg, stats=stats)
            wall = time.perf_counter() - t0
        n_tok = sum(g.n_generated for g in gens)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=40)
        lines += [f"\n## {name}\n", f"wall {wall:.2f} s (under the profiler), {n_tok} new tokens, "
                  f"{stats.decode_steps} decode steps, {stats.prefill_tokens} prefill positions\n",
                  "```\n" + table + "\n```\n"]
        print(lines[-2], flush=True)
    Path(a.out).write_text("\n".join(lines))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
