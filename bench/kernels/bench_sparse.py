"""Benchmark: row-sparse optimizer step and row-selective backward vs their dense counterparts.

Two measurements, each at 0.2 %, 1.6 % and 10 % of the components selected (a component = a q/k/v
head or an MLP neuron; a selected head owns ``head_dim`` rows of its projection, a selected neuron
one row of the up projection, so the fraction of rows of the owning weights is about the same):

* ``optimizer``: one AdamW step over the owning weights of every layer (q, k, v, up).
  ``dense``: ``torch.optim.AdamW(fused=True)`` (``foreach=True`` where fused is unsupported) on
  full-size gradients that are zero outside the selection (the dense *masked* update). Weight decay
  0 so that the dense step leaves unselected rows unchanged, as the sparse one does.
  ``sparse``: :class:`cca_fast.kernels.sparse_optim.RowSparseOptimizer` (one Triton launch on
  CUDA; the PyTorch path on CPU), gradients already in its packed buffer.
  Memory = bytes the optimizer needs besides the weights: ``dense`` = ``exp_avg`` + ``exp_avg_sq``
  + the dense gradients; ``sparse`` = packed gradient + moments (+ fp32 master rows for bf16/fp16
  weights), all exactly ``selected rows x in`` elements. On CUDA the allocator's peak during
  optimizer creation + first step is reported as well.
* ``backward``: the backward of one projection over ``tokens`` rows of input, for each owning
  shape, with that fraction of its rows selected (whole heads for q/k/v, at least one). ``dense``: autograd of ``F.linear`` with the weight requiring grad (``dX`` and the full
  ``dW``). ``row_selective``: :class:`cca_fast.kernels.row_grad.RowSelectiveProjection` (``dX``
  and ``dW[R]`` only). Memory = extra bytes allocated at peak during the backward: from
  ``torch.cuda.max_memory_allocated`` on CUDA, from ``torch.profiler`` memory events on CPU.

* ``stage3_step``: one whole stage-3 step (forward + backward over a batch of prefixes, then the
  SGD step) on a randomly initialised Llama-shaped model with the preset's layer shapes (fewer
  layers): ``sparse`` mode vs ``reference`` mode of :mod:`cca_fast.stages.update`.

Timing and memory: ``bench/harness.py`` (20 / 50 / 80 % quantiles of ``--repeats`` calls after
``--warmup`` calls: CUDA events on CUDA, ``time.perf_counter`` on CPU; peak extra memory of a
separate call). Speed and memory are reported separately, as ratios of medians (dense / sparse
for time, sparse / dense for memory). Every row of ``results`` names its ``measurement``
(``optimizer``, ``backward``, ``stage3_step``).

Presets: ``llama3-8b`` (32 layers, hidden 4096, 32 q heads / 8 kv heads of 128, d_ff 14336, bf16,
4096 tokens; for CUDA), ``check`` (the same shapes, 8 layers: ``bench/gpu/check.py``'s time
budget), ``cpu-small`` (4 layers, hidden 1024, 16 / 4 heads of 64, d_ff 2816, fp32, 1024 tokens;
< 5 min on 2 CPU cores) and ``tiny`` (the code path in seconds).

Usage::

    python bench/kernels/bench_sparse.py --device cpu                       # writes results/sparse_cpu.json
    python bench/kernels/bench_sparse.py --device cuda --preset llama3-8b  # writes results/sparse_cuda.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
import harness  # noqa: E402

# GPU target (issue 4), documented; checked by this script only where a GPU runs it
TARGET = {"fraction": 0.016, "sparse_step_speedup_min": 10.0, "sparse_memory_ratio_max": 0.03}


@dataclass(frozen=True)
class Preset:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    d_ff: int
    tokens: int
    dtype: str


PRESETS = {
    "llama3-8b": Preset(32, 4096, 32, 8, 128, 14336, 4096, "bfloat16"),
    "check": Preset(8, 4096, 32, 8, 128, 14336, 4096, "bfloat16"),
    "cpu-small": Preset(4, 1024, 16, 4, 64, 2816, 1024, "float32"),
    "tiny": Preset(2, 64, 4, 2, 16, 176, 32, "float32"),
}
FRACTIONS = (0.002, 0.016, 0.10)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> harness.Timing:
    """:class:`harness.Timing` of ``fn`` (quantiles in ms; ``.p50_ms`` is the median)."""
    return harness.measure(fn, device, warmup=warmup, repeats=repeats)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Extra bytes allocated at peak during one call of ``fn`` (``harness.peak_memory_bytes``)."""
    return harness.peak_memory_bytes(fn, device)


def selection_rows(p: Preset, fraction: float, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per layer ``{kind: rows}`` for ``fraction`` of the components drawn uniformly (seeded)."""
    g = torch.Generator().manual_seed(seed)
    counts = {"q": p.heads, "k": p.kv_heads, "v": p.kv_heads, "mlp": p.d_ff}
    per_layer = sum(counts.values())
    out = []
    for _ in range(p.layers):
        chosen = torch.randperm(per_layer, generator=g)[: max(1, round(fraction * per_layer))].sort().values
        rows, off = {}, 0
        for kind, n in counts.items():
            idx = chosen[(chosen >= off) & (chosen < off + n)] - off
            off += n
            if kind == "mlp":
                rows["up"] = idx
            else:
                rows[kind] = (idx[:, None] * p.head_dim + torch.arange(p.head_dim)).flatten()
        out.append(rows)
    return out


def owning_shapes(p: Preset) -> dict[str, tuple[int, int]]:
    return {"q": (p.heads * p.head_dim, p.hidden), "k": (p.kv_heads * p.head_dim, p.hidden),
            "v": (p.kv_heads * p.head_dim, p.hidden), "up": (p.d_ff, p.hidden)}


# ---------------------------------------------------------------------------------------------
# optimizer step
# ---------------------------------------------------------------------------------------------
def bench_optimizer(p: Preset, fraction: float, device: torch.device, dtype: torch.dtype, warmup: int,
                    repeats: int) -> dict[str, Any]:
    from cca_fast.kernels.dispatch import resolve_backend
    from cca_fast.kernels.sparse_optim import AdamWConfig, RowSparseOptimizer, RowSpec

    shapes = owning_shapes(p)
    sel = selection_rows(p, fraction)
    g = torch.Generator(device="cpu").manual_seed(1)
    params, specs = [], []
    for layer in range(p.layers):
        for kind, shape in shapes.items():
            w = torch.nn.Parameter(torch.randn(shape, generator=g).to(device=device, dtype=dtype))
            params.append(w)
            rows = sel[layer][kind]
            if rows.numel():
                specs.append(RowSpec(f"{layer}.{kind}", w, 0, rows.to(device)))
    n_elems = sum(w.numel() for w in params)
    sel_rows = sum(s.index.numel() for s in specs)
    sel_elems = sum(s.index.numel() * s.param.shape[1] for s in specs)
    hyper = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    # dense masked AdamW: full gradients, zero outside the selection
    for w in params:
        w.grad = torch.zeros_like(w)
    for s in specs:
        s.param.grad[s.index] = torch.randn(s.index.numel(), s.param.shape[1], generator=g).to(device=device, dtype=dtype)
    try:
        dense = torch.optim.AdamW(params, fused=True, **hyper)
        dense.step()
        dense_impl = "fused"
    except (RuntimeError, TypeError):
        dense = torch.optim.AdamW(params, foreach=True, **hyper)
        dense_impl = "foreach"
    dense_peak = None
    if device.type == "cuda":  # fresh optimizer: state is created lazily at the first step
        dense = torch.optim.AdamW(params, **({"fused": True} if dense_impl == "fused" else {"foreach": True}), **hyper)
        dense_peak = peak_extra_bytes(dense.step, device)
    dense_ms = median_ms(dense.step, device, warmup, repeats)
    dense_state = sum(t.numel() * t.element_size() for st in dense.state.values() for t in st.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    dense_grads = sum(w.grad.numel() * w.grad.element_size() for w in params)
    for w in params:
        w.grad = None
    del dense

    # sparse
    sparse_peak = None

    def build():
        return RowSparseOptimizer(specs, AdamWConfig(**hyper))

    if device.type == "cuda":
        holder = {}
        sparse_peak = peak_extra_bytes(lambda: holder.setdefault("o", build()).step(), device)
        sparse = holder["o"]
    else:
        sparse = build()
    for s in specs:
        sparse.grad_view(s.name).normal_()
    sparse_ms = median_ms(sparse.step, device, warmup, repeats)
    numel = sparse.state_numel()
    sparse_state = sparse.state_bytes() - numel["grad"] * sparse.groups[0].grad.element_size()
    sparse_grads = numel["grad"] * sparse.groups[0].grad.element_size()
    out = {
        "fraction_components": fraction, "rows_selected": sel_rows, "elements_selected": sel_elems,
        "elements_total": n_elems, "fraction_elements": sel_elems / n_elems,
        "dense_impl": dense_impl, "sparse_backend": resolve_backend(device, "auto"),
        "measurement": "optimizer", "dense_time": dense_ms, "sparse_time": sparse_ms,
        "dense_ms": dense_ms.p50_ms, "sparse_ms": sparse_ms.p50_ms, "speedup": dense_ms.p50_ms / sparse_ms.p50_ms,
        "dense_state_bytes": dense_state, "dense_grad_bytes": dense_grads,
        "sparse_state_bytes": sparse_state, "sparse_grad_bytes": sparse_grads,
        "memory_ratio_state": sparse_state / dense_state,
        # fp16/bf16 weights: the same without fp32 master rows (``master_weights=False``)
        "sparse_state_bytes_no_master": sparse_state - numel["master"] * 4,
        "memory_ratio_state_no_master": (sparse_state - numel["master"] * 4) / dense_state,
        "memory_ratio_with_grads": (sparse_state + sparse_grads) / (dense_state + dense_grads),
    }
    if device.type == "cuda":
        out.update(dense_peak_bytes=dense_peak, sparse_peak_bytes=sparse_peak,
                   memory_ratio_peak=sparse_peak / dense_peak if dense_peak else None)
    return out


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
def bench_backward(p: Preset, fraction: float, device: torch.device, dtype: torch.dtype, warmup: int,
                   repeats: int) -> list[dict[str, Any]]:
    from cca_fast.kernels.dispatch import resolve_backend
    from cca_fast.kernels.row_grad import RowSelectiveProjection, zero_delta

    g = torch.Generator().manual_seed(2)
    out = []
    for kind, (n_out, n_in) in owning_shapes(p).items():
        # ``fraction`` of the projection's rows (at least one head / one neuron), whole heads for q/k/v
        width = 1 if kind == "up" else p.head_dim
        units = n_out // width
        chosen = torch.randperm(units, generator=g)[: max(1, round(fraction * units))].sort().values
        rows = (chosen[:, None] * width + torch.arange(width)).flatten().to(device)
        w = torch.randn(n_out, n_in, generator=g).to(device=device, dtype=dtype)
        x = torch.randn(p.tokens, n_in, generator=g).to(device=device, dtype=dtype).requires_grad_()
        dy = torch.randn(p.tokens, n_out, generator=g).to(device=device, dtype=dtype)

        w_dense = w.clone().requires_grad_()
        y_dense = F.linear(x, w_dense)
        delta = zero_delta((rows.numel(), n_in), torch.float32 if dtype != torch.float64 else dtype, device)
        y_sparse = RowSelectiveProjection.apply(x, w, None, rows, None, delta, None, False, "auto")

        def dense():
            return torch.autograd.grad(y_dense, (x, w_dense), dy, retain_graph=True)

        def sparse():
            return torch.autograd.grad(y_sparse, (x, delta), dy, retain_graph=True)

        dense_ms = median_ms(dense, device, warmup, repeats)
        sparse_ms = median_ms(sparse, device, warmup, repeats)
        dense_mem = peak_extra_bytes(dense, device)
        sparse_mem = peak_extra_bytes(sparse, device)
        out.append({
            "fraction_components": fraction, "projection": kind, "shape": [n_out, n_in], "tokens": p.tokens,
            "rows_selected": int(rows.numel()), "backend": resolve_backend(device, "auto"),
            "measurement": "backward", "dense_time": dense_ms, "row_selective_time": sparse_ms,
            "dense_ms": dense_ms.p50_ms, "row_selective_ms": sparse_ms.p50_ms,
            "speedup": dense_ms.p50_ms / sparse_ms.p50_ms,
            "dense_peak_bytes": dense_mem, "row_selective_peak_bytes": sparse_mem,
            "memory_ratio": sparse_mem / dense_mem if dense_mem else None,
            "weight_grad_bytes_dense": n_out * n_in * w.element_size(),
            "weight_grad_bytes_row_selective": int(rows.numel()) * n_in * delta.element_size(),
        })
    return out


# ---------------------------------------------------------------------------------------------
# one whole stage-3 step (forward + backward + optimizer) on a random Llama-shaped model
# ---------------------------------------------------------------------------------------------
def bench_stage3_step(p: Preset, fraction: float, device: torch.device, dtype: torch.dtype, warmup: int,
                      repeats: int, layers: int, batch: int, seq: int) -> dict[str, Any]:
    """Mean-logit-difference gradient over ``batch`` prefixes of ``seq`` tokens plus one SGD step:
    ``sparse`` mode (frozen weights, row-selective gradients, row-sparse step) vs ``reference``
    mode (dense autograd gradients for every weight, rows gathered and stepped)."""
    from contextlib import ExitStack

    from transformers import LlamaConfig, LlamaForCausalLM

    from cca_fast import ComponentSpace
    from cca_fast.stages.examples import PivotExample
    from cca_fast.stages.objectives import TrainingObjective
    from cca_fast.stages.update import UpdateConfig, _ReferenceStepper, _SparseStepper

    cfg = LlamaConfig(hidden_size=p.hidden, intermediate_size=p.d_ff, num_attention_heads=p.heads,
                      num_key_value_heads=p.kv_heads, head_dim=p.head_dim, num_hidden_layers=layers,
                      vocab_size=4096, max_position_embeddings=max(2 * seq, 256), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    space = ComponentSpace(model)
    g = torch.Generator().manual_seed(3)
    sel = torch.randperm(space.total, generator=g)[: max(1, round(fraction * space.total))]
    plan = space.owned_rows(sel)
    examples = [PivotExample(str(i), tuple(torch.randint(3, 4096, (seq,), generator=g).tolist()), 5, 6)
                for i in range(batch)]
    ucfg = UpdateConfig(lr=1e-4, batch_size=batch)
    batches = TrainingObjective(model, examples, ucfg)
    from cca_fast.models.runtime import attention_backend

    out: dict[str, Any] = {"measurement": "stage3_step", "attn_implementation": attention_backend(model),
                           "fraction_components": fraction, "components_selected": int(sel.numel()),
                           "layers": layers, "batch": batch, "seq": seq}
    for mode, cls in (("sparse", _SparseStepper), ("reference", _ReferenceStepper)):
        for q in model.parameters():
            q.requires_grad_(False)
            q.grad = None
        stepper = cls(model, plan, ucfg)
        with ExitStack() as stack:
            stepper.context(stack)

            def step():
                stepper.zero_grad()
                batches.pass_(backward=True)
                stepper.step()

            out[f"{mode}_time"] = median_ms(step, device, warmup, repeats)
            out[f"{mode}_ms"] = out[f"{mode}_time"].p50_ms
            out[f"{mode}_peak_bytes"] = peak_extra_bytes(step, device)
    for q in model.parameters():
        q.grad = None
    out["speedup"] = out["reference_ms"] / out["sparse_ms"]
    out["memory_ratio"] = out["sparse_peak_bytes"] / out["reference_peak_bytes"] if out["reference_peak_bytes"] else None
    return out


# ---------------------------------------------------------------------------------------------
def _rows(r: dict[str, Any], measurement: str) -> list[dict[str, Any]]:
    """The rows of one measurement (results written before the harness kept them under their own key)."""
    if measurement in r:
        return r[measurement]
    return [x for x in r.get("results", []) if x.get("measurement") == measurement]


def markdown_tables(r: dict[str, Any]) -> str:
    """The result as markdown tables (what ``sparse.md`` shows); times are medians."""
    mib = 1 / 2 ** 20
    if "schema" in r:
        c = r["config"]
        head = f"{harness.environment_line(r['env'])}; preset `{c['preset']}` ({c['shapes']['dtype']})."
    else:  # a result file written before bench/harness.py
        head = (f"{r['device']} ({r['device_name']}, {r['cpu_threads']} thread(s)), torch {r['versions']['torch']}, "
                f"triton {r['versions']['triton']}, {r['date']}, preset `{r['preset']}` ({r['shapes']['dtype']}).")
        c = r
    lines = [head, "",
             "**Optimizer step** (AdamW over q/k/v/up of every layer):", "",
             "| selected | elements | dense masked AdamW | sparse | speed-up | dense state MiB | sparse state MiB "
             "| memory ratio (state) | memory ratio (with grads) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for o in _rows(r, "optimizer"):
        lines.append(f"| {o['fraction_components']:.1%} | {o['fraction_elements']:.2%} | {o['dense_ms']:.2f} ms "
                     f"({o['dense_impl']}) | {o['sparse_ms']:.3f} ms ({o['sparse_backend']}) | {o['speedup']:.1f}x | "
                     f"{o['dense_state_bytes'] * mib:.1f} | {o['sparse_state_bytes'] * mib:.2f} | "
                     f"{o['memory_ratio_state']:.2%} | {o['memory_ratio_with_grads']:.2%} |")
    lines += ["", f"**Backward of one projection** ({c['shapes']['tokens']} tokens):", "",
              "| selected | projection | dense | row-selective | speed-up | peak MiB dense | peak MiB row-sel. "
              "| memory ratio |", "|---|---|---|---|---|---|---|---|"]
    for b in _rows(r, "backward"):
        mr = b["memory_ratio"]
        lines.append(f"| {b['fraction_components']:.1%} | {b['projection']} {tuple(b['shape'])} | {b['dense_ms']:.2f} ms | "
                     f"{b['row_selective_ms']:.2f} ms | {b['speedup']:.2f}x | {b['dense_peak_bytes'] * mib:.1f} | "
                     f"{b['row_selective_peak_bytes'] * mib:.1f} | {'n/a' if mr is None else f'{mr:.0%}'} |")
    if _rows(r, "stage3_step"):
        c = c["stage3_step_config"]
        lines += ["", f"**Whole stage-3 step** (random Llama, {c['layers']} layers of the preset's shapes, "
                      f"batch {c['batch']} x {c['seq']} tokens, forward + backward + SGD step):", "",
                  "| selected | reference mode | sparse mode | speed-up | peak MiB reference | peak MiB sparse "
                  "| memory ratio |", "|---|---|---|---|---|---|---|"]
        for e in _rows(r, "stage3_step"):
            mr = e["memory_ratio"]
            lines.append(f"| {e['fraction_components']:.1%} | {e['reference_ms']:.1f} ms | {e['sparse_ms']:.1f} ms | "
                         f"{e['speedup']:.2f}x | {e['reference_peak_bytes'] * mib:.1f} | {e['sparse_peak_bytes'] * mib:.1f} "
                         f"| {'n/a' if mr is None else f'{mr:.0%}'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="shapes (default: llama3-8b on CUDA, cpu-small on CPU)")
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    ap.add_argument("--warmup", type=int, default=None, help="default: 5 on CUDA, 2 on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="default: 50 on CUDA, 11 on CPU")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default 1 on CPU: the machines are shared, and oversubscribed OpenMP "
                         "threads wait milliseconds at every barrier; torch's default on CUDA)")
    ap.add_argument("--out", default=None, help="JSON path (default: results/sparse_<device>.json)")
    ap.add_argument("--no-stage3", action="store_true", help="skip the whole stage-3 step measurement")
    ap.add_argument("--tables", default=None, metavar="JSON",
                    help="only print the markdown tables of an existing result file")
    args = ap.parse_args(argv)
    if args.tables:
        print(markdown_tables(json.loads(Path(args.tables).read_text())))
        return 0
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    preset_name = args.preset or ("llama3-8b" if device.type == "cuda" else "cpu-small")
    p = PRESETS[preset_name]
    dtype = getattr(torch, p.dtype)
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 2)
    repeats = args.repeats if args.repeats is not None else (50 if device.type == "cuda" else 11)
    t0 = time.perf_counter()
    e2e = {"tiny": dict(layers=1, batch=2, seq=16)}.get(preset_name) or (
        dict(layers=4, batch=8, seq=512) if device.type == "cuda" else dict(layers=2, batch=4, seq=64))
    cfg = {"preset": preset_name, "shapes": asdict(p), "fractions": list(args.fractions), "warmup": warmup,
           "repeats": repeats, "stage3_step_config": e2e,
           "memory": "peak extra bytes of a separate call (bench/harness.py) + exact state tensor bytes"}
    rows: list[dict[str, Any]] = []
    for f in args.fractions:
        r = bench_optimizer(p, f, device, dtype, warmup, repeats)
        rows.append(r)
        print(f"optimizer  {f:6.1%}: dense {r['dense_time']}  sparse {r['sparse_time']}  "
              f"x{r['speedup']:6.1f}  memory {r['memory_ratio_state']:.2%} (with grads {r['memory_ratio_with_grads']:.2%})",
              flush=True)
    for f in args.fractions:
        for r in bench_backward(p, f, device, dtype, warmup, repeats):
            rows.append(r)
            mr = r["memory_ratio"]
            print(f"backward   {f:6.1%} {r['projection']:>2} {tuple(r['shape'])}: dense {r['dense_time']}  "
                  f"row-selective {r['row_selective_time']}  x{r['speedup']:5.2f}  "
                  f"peak memory {'n/a' if mr is None else f'{mr:.2%}'}", flush=True)
    if not args.no_stage3:
        for f in args.fractions:
            r = bench_stage3_step(p, f, device, dtype, warmup, max(3, repeats // 2), **e2e)
            rows.append(r)
            mr = r["memory_ratio"]
            print(f"stage-3 step {f:6.1%}: reference {r['reference_time']}  sparse {r['sparse_time']}  "
                  f"x{r['speedup']:5.2f}  peak memory {'n/a' if mr is None else f'{mr:.2%}'}", flush=True)
    extra: dict[str, Any] = {}
    if device.type == "cuda":
        at = [r for r in rows if r["measurement"] == "optimizer" and math.isclose(r["fraction_components"], TARGET["fraction"])]
        if at:
            r = at[0]
            extra["target_met"] = (r["speedup"] >= TARGET["sparse_step_speedup_min"]
                                   and r["memory_ratio_state"] <= TARGET["sparse_memory_ratio_max"])
    extra["seconds"] = round(time.perf_counter() - t0, 1)
    result = harness.report("sparse", device, rows, config=cfg, targets={"gpu": TARGET}, **extra)
    harness.validate(result)
    out = Path(args.out) if args.out else HERE / "results" / f"sparse_{device.type}.json"
    from cca_fast.io import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    print(markdown_tables(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
