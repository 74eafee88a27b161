"""The decode step's linear layers: ``F.linear`` (``x @ W.T``) vs the transposed form ``(W @ x.T).T``
of :mod:`cca_fast.generation.matmul`, over the row counts a step has, side by side in one run.

The default model's 210 layer weights (distinct tensors, 425 MB: read from memory as in a real
step, not from cache) are multiplied by ``M`` rows; each path is timed round-robin
(``harness.measure_round_robin``) and reported as time over the fp32 GEMM floor (the FLOPs at the
GEMM rate measured on the spot) and over the memory floor (the weights' bytes at the copy rate
measured on the spot). The threshold :data:`cca_fast.generation.matmul.SMALL_M` is chosen from
this table. Peer: ``F.linear`` is what transformers' layers call.

    python bench/generation/bench_linear_paths.py [--out bench/generation/results]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_generation import gemm_rate  # noqa: E402
from harness import environment_line, markdown_table, measure_round_robin, report  # noqa: E402

from cca_fast.generation.matmul import SMALL_M, small_m_linear  # noqa: E402

#: the default model (SmolLM2-135M): per layer q, k, v, o, gate, up, down as ``[N, K]``
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LAYERS = 30


def copy_rate(n_bytes: int = 256 << 20, reps: int = 5) -> float:
    """Best bytes/s of copying ``n_bytes`` (read + write counted once: the weights are only read)."""
    a = torch.empty(n_bytes // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,16,32,64,128,192,256,512")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(n, k) for _ in range(LAYERS) for n, k in SHAPES]
    n_bytes = sum(w.numel() * 4 for w in weights)
    flop_per_row = sum(2 * w.numel() for w in weights)
    rate, bw = gemm_rate(), copy_rate()
    results = []
    for m in (int(x) for x in a.rows.split(",")):
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        ref = [F.linear(xs[w.shape[1]].double(), w.double()) for w in weights[:7]]
        err = max((small_m_linear(xs[w.shape[1]], w) - r).abs().max().item() for w, r in zip(weights[:7], ref))
        fns = {"F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
               "(W @ x.T).T": lambda: [torch.mm(w, (torch.cat([xs[w.shape[1]]] * 2) if m == 1 else xs[w.shape[1]]).t())
                                       for w in weights]}
        t = measure_round_robin(fns, repeats=a.repeats)
        floor = max(flop_per_row * m / rate, n_bytes / bw)
        for name, tm in t.items():
            results.append({"rows": m, "path": name, "time": tm, "floor_ms": round(1e3 * floor, 2),
                            "floor_ratio": round(tm.p50_ms / (1e3 * floor), 2),
                            "taken": (name == "(W @ x.T).T") == (m <= SMALL_M)})
        results[-1]["max_abs_error_vs_float64"] = err  # the transposed path, first layer
        print(f"M={m}: " + ", ".join(f"{r['path']} {r['floor_ratio']}x" for r in results[-2:]), flush=True)
    res = report("linear_paths", "cpu", results, config={"layers": LAYERS, "shapes": SHAPES, "weight_bytes": n_bytes,
                                                         "gemm_gflops": round(rate / 1e9, 1),
                                                         "copy_gbytes_per_second": round(bw / 1e9, 1),
                                                         "small_m": SMALL_M})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear_paths.json").write_text(json.dumps(res, indent=1))
    by = {(r["rows"], r["path"]): r for r in results}
    rows = sorted({r["rows"] for r in results})
    md = ["# Linear layers of a decode step: F.linear vs (W @ x.T).T", "", environment_line(res["env"]), "",
          f"The default model's {LAYERS * len(SHAPES)} layer weights ({n_bytes / 1e6:.0f} MB, distinct tensors) times "
          f"M rows; p50 of {a.repeats} round-robin calls. Floor: max(FLOPs at the fp32 GEMM rate measured now, "
          f"{rate / 1e9:.1f} GFLOP/s; the weights' bytes at the copy rate measured now, {bw / 1e9:.1f} GB/s). "
          f"The decoder takes the transposed form up to M = {SMALL_M} (`SMALL_M`).", "",
          markdown_table(["M", "F.linear ms", "x floor", "(W @ x.T).T ms", "x floor", "speed-up", "taken"],
                         [[m, by[(m, "F.linear")]["time"].p50_ms, by[(m, "F.linear")]["floor_ratio"],
                           by[(m, "(W @ x.T).T")]["time"].p50_ms, by[(m, "(W @ x.T).T")]["floor_ratio"],
                           round(by[(m, "F.linear")]["time"].p50_ms / by[(m, "(W @ x.T).T")]["time"].p50_ms, 2),
                           "(W @ x.T).T" if m <= SMALL_M else "F.linear"] for m in rows])]
    (out / "linear_paths.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
