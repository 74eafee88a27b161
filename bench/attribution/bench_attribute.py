"""``cca attribute`` vs a caching-hooks implementation of the same method (the way TransformerLens
and nnsight users write attribution patching: cache every site activation and, with
``retain_grad``, its full gradient, then reduce with ``einsum``).

Both score the same sites (every q / k / v head, MLP neuron, attention output and MLP output)
with gradient x activation of the logit difference at the scored positions. Each measurement runs
in a fresh subprocess, so peak memory is that run's own:

* CPU: peak resident memory (``VmHWM``, reset before the warm-up batch) minus the resident memory then
  (the loaded model);
* CUDA: ``torch.cuda.max_memory_allocated`` minus the memory after loading the model.

Attributed tokens per second = tokens run through forward + backward / wall time (after one
warm-up batch). ``cca attribute`` is timed end to end through :func:`attribute_dataset`
(chunk files included); the caching twin does no I/O.

Usage::

    python bench/attribution/bench_attribute.py            # CPU: the embedded SmolLM2-135M itself
    python bench/attribution/bench_attribute.py --model smollm2-135m-shape   # a random Llama of that shape (no gguf needed)
    python bench/attribution/bench_attribute.py --gpu      # + random 1B / 8B Llama at 512 / 2048 tokens (CUDA only)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # bench/harness.py; cca_fast itself comes from the installed package
    sys.path.insert(0, str(HERE.parent))

SHAPES = {  # random Llama-shaped models (config fields)
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, vocab_size=49152),
    "llama-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256),
    "llama-8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256),
}


def _status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> float:
    """Reset the kernel's peak-RSS counter (``/proc/self/clear_refs`` 5); the RSS now, MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # pragma: no cover - not Linux: the peak then includes the model load
        pass
    return _status_mib("VmRSS")


def _load(model_name: str, device: str, dtype: torch.dtype):
    if model_name == "default":
        from cca_fast.models.loading import load_model

        model, _ = load_model(None, dtype=dtype, device=device)
        return model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", **SHAPES[model_name], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _examples(vocab: int, batch: int, seq: int, n_batches: int):
    from cca_fast.attribution_dataset.inputs import Example

    g = torch.Generator().manual_seed(0)
    return [Example(i, f"bench{i}", tuple(torch.randint(10, vocab - 1, (seq,), generator=g).tolist()), (),
                    int(torch.randint(10, vocab, (1,), generator=g)), int(torch.randint(10, vocab, (1,), generator=g)))
            for i in range(batch * n_batches)]


def _caching(model, examples, batch: int, positions: str):
    """The caching-hooks twin: every activation and gradient kept, reduced afterwards."""
    from cca_fast.attribution_dataset.inputs import make_batch
    from cca_fast.attribution_dataset.methods import ALL_KINDS, Layout, metric_values, position_mask
    from cca_fast.models.components import ComponentSpace

    layout = Layout(ComponentSpace(model))
    sites = [layout.site(layer, k) for layer in range(layout.n_layers) for k in ALL_KINDS]
    totals = torch.zeros(layout.total, dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    for i in range(0, len(examples), batch):
        b = make_batch(examples[i : i + batch], 0, next(model.parameters()).device)
        cache: dict = {}
        leaves = []

        def keep(key, x):
            x.retain_grad()
            cache[key] = x
            return x

        hs = [model.get_input_embeddings().register_forward_hook(
            lambda _m, _i, out: leaves.append(out.detach().requires_grad_(True)) or leaves[-1])]
        for key in {(s.module_name, s.io) for s in sites}:
            mod = model.get_submodule(key[0])
            if key[1] == "output":
                hs.append(mod.register_forward_hook(lambda _m, _i, out, key=key: keep(key, out)))
            else:
                hs.append(mod.register_forward_pre_hook(lambda _m, a, key=key: (keep(key, a[0]),) + tuple(a[1:])))
        try:
            with torch.enable_grad():
                logits = model(**b.inputs(), use_cache=False, logits_to_keep=1).logits
                metric_values("logit_diff", logits, b).sum().backward()
        finally:
            for h in hs:
                h.remove()
        mask = position_mask(positions, "logit_diff", b).to(logits.dtype)
        with torch.no_grad():
            for s in sites:
                x = cache[(s.module_name, s.io)]
                a = x[..., s.start : s.stop].unflatten(-1, (s.n, s.width)).float()
                g = x.grad[..., s.start : s.stop].unflatten(-1, (s.n, s.width)).float()
                per = torch.einsum("btnw,btnw,bt->n", a, g, mask.float())
                o = layout.offset(s.layer, s.kind)
                totals[o : o + s.n] += per.double().cpu()
        del cache, leaves
    return totals


def _one(args) -> dict:
    """One measurement (run in its own process)."""
    from cca_fast.attribution_dataset import AttributeConfig, attribute_dataset

    dtype = getattr(torch, args.dtype)
    model = _load(args.model, args.device, dtype)
    cuda = args.device.startswith("cuda")
    examples = _examples(model.config.vocab_size, args.batch, args.seq, args.batches + 1)
    warm, timed_ex = examples[: args.batch], [
        type(e)(i, e.source, e.prompt_ids, e.target_ids, e.desired, e.undesired) for i, e in enumerate(examples[args.batch :])]
    if cuda:  # the peak covers the warm-up batch and the timed runs
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def run(exs, out):
        if args.impl == "cca":
            cfg = AttributeConfig(positions=args.positions, batch_size=args.batch, chunk_size=len(exs), plots=False)
            return attribute_dataset(model, None, exs, out, cfg, progress=False).scores
        return _caching(model, exs, args.batch, args.positions)

    from harness import Timing

    times = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rss0 = _reset_peak()  # the peak covers the warm-up too: freed heap is not returned to the OS, so
            run(warm, Path(tmp) / "warm")  # a peak reset after it would miss memory the timed runs reuse
            for r in range(args.repeats):  # a fresh output folder each time: nothing is resumed
                t = time.perf_counter()
                scores = run(timed_ex, Path(tmp) / f"timed{r}")
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError:
        return {"oom": True}
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _status_mib("VmHWM") - rss0
    timing = Timing.of([1000 * t for t in times])
    sec = timing.p50_ms / 1000
    return {"oom": False, "time": timing.to_dict(), "seconds": sec, "tokens": args.seq * len(timed_ex),
            "tokens_per_s": args.seq * len(timed_ex) / sec,
            "peak_mib": peak, "checksum": float(scores.abs().sum())}


def _spawn(model: str, impl: str, device: str, dtype: str, batch: int, seq: int, batches: int, positions: str,
           repeats: int = 3) -> dict:
    cmd = [sys.executable, __file__, "--one", "--model", model, "--impl", impl, "--device", device, "--dtype", dtype,
           "--repeats", str(repeats),
           "--batch", str(batch), "--seq", str(seq), "--batches", str(batches), "--positions", positions]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        if "OutOfMemory" in p.stderr or "out of memory" in p.stderr:
            return {"oom": True}
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="cca")
    ap.add_argument("--model", default="default",
                    help="'default' (the embedded SmolLM2-135M, loaded) or a random Llama of one of these shapes: "
                         + ", ".join(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--positions", default="all")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell (the median is reported)")
    ap.add_argument("--gpu", action="store_true", help="also the GPU sizes (random 1B / 8B Llama, 512 / 2048 tokens; CUDA only)")
    ap.add_argument("--cpu-seqs", default="128,256", help="sequence lengths of the CPU rows")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args)))
        return
    from harness import environment_line, report, validate

    rows = []
    plan = [(args.model, "cpu", "float32", args.batch, s, args.batches, pos)
            for s in (int(x) for x in args.cpu_seqs.split(",")) for pos in ("all", "last")]
    if args.gpu and torch.cuda.is_available():
        plan += [(m, "cuda", "bfloat16", 1, s, 2, "all") for m in ("llama-1b-shape", "llama-8b-shape") for s in (512, 2048)]
    for model, device, dtype, batch, seq, batches, pos in plan:
        res = {impl: _spawn(model, impl, device, dtype, batch, seq, batches, pos, args.repeats) for impl in ("cca", "caching")}
        row = {"model": model, "device": device, "dtype": dtype, "batch": batch, "seq": seq, "positions": pos, **res}
        if not res["cca"]["oom"] and not res["caching"]["oom"]:
            row["speedup"] = res["cca"]["tokens_per_s"] / res["caching"]["tokens_per_s"]
            row["memory_ratio"] = res["caching"]["peak_mib"] / max(res["cca"]["peak_mib"], 1e-9)
            row["same_scores"] = abs(res["cca"]["checksum"] - res["caching"]["checksum"]) <= 1e-3 * res["caching"]["checksum"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    tag = "gpu" if any(r["device"] == "cuda" for r in rows) else "cpu"
    result = report("attribute", "cuda" if tag == "gpu" else "cpu", rows,
                    config={"model": args.model, "batches": args.batches, "repeats": args.repeats, "cpu_seqs": args.cpu_seqs,
                            "method": "gradient x activation", "metric": "logit_diff"})
    validate(result)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"attribute_{tag}.json").write_text(json.dumps(result, indent=1))
    md = ["# `cca attribute` vs caching hooks", "", environment_line(result["env"]), "",
          "Gradient x activation of the logit difference, every q/k/v head, MLP neuron, attention and MLP output. "
          "Tokens/s: attributed tokens per second (forward + backward, one warm-up batch excluded); peak: extra "
          "memory over the loaded model (MiB); each cell is its own process.", "",
          "| model | device | batch x seq | positions | cca tok/s | caching tok/s | speed-up | cca peak | caching peak | memory ratio | same scores |",
          "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]

    def f(r, k, fmt):
        return "OOM" if r["oom"] else format(r[k], fmt)
    for r in rows:
        md.append(f"| {r['model']} | {r['device']} {r['dtype']} | {r['batch']} x {r['seq']} | {r['positions']} | "
                  f"{f(r['cca'], 'tokens_per_s', '.0f')} | {f(r['caching'], 'tokens_per_s', '.0f')} | "
                  f"{r.get('speedup', float('nan')):.2f}x | {f(r['cca'], 'peak_mib', '.0f')} | "
                  f"{f(r['caching'], 'peak_mib', '.0f')} | {r.get('memory_ratio', float('nan')):.1f}x | "
                  f"{r.get('same_scores', '-')} |")
    (out / f"attribute_{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
