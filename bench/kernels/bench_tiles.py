"""Sweep of ``row_grad``'s launch configurations (``kernels/row_grad.py``: ``TILE_CANDIDATES``).

For every owning projection of a Llama-3-8B layer (q ``[4096, 4096]``, k / v ``[1024, 4096]``, up
``[14336, 4096]``) at 0.2 / 1.6 / 10 % of its rows (whole heads for q/k/v) and ``--tokens``
tokens, each candidate's ``row_grad`` is timed (``bench/harness.py``: 20 / 50 / 80 % quantiles),
beside the dense ``dY^T X`` the row-selective gradient replaces. The result names, per table key
``(dtype, tile_bucket(R), tile_bucket(C))``, the fastest candidate and its speed-up over
``DEFAULT_TILES``, and prints the ``MEASURED_TILES`` entries to pin (only winners >= 5 % faster
than the default: below that the quantiles overlap).

    python bench/kernels/bench_tiles.py --device cuda --out tiles.json          # on a GPU
    TRITON_INTERPRET=1 python bench/kernels/bench_tiles.py --device cpu --tiny  # the code path

On the CPU the kernel runs in Triton's interpreter (set ``TRITON_INTERPRET=1`` before Python
starts): the times mean nothing there, only that every candidate runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
import harness  # noqa: E402

FRACTIONS = (0.002, 0.016, 0.10)
#: projection: (out, in, rows per unit) of a Llama-3-8B layer (head_dim 128; a neuron is one row)
LLAMA3_8B = {"q": (4096, 4096, 128), "k": (1024, 4096, 128), "v": (1024, 4096, 128), "up": (14336, 4096, 1)}
TINY = {"q": (64, 48, 16), "up": (176, 48, 1)}
SPEEDUP_TO_PIN = 1.05


def _rows(out: int, unit: int, fraction: float, g: torch.Generator) -> torch.Tensor:
    units = out // unit
    chosen = torch.randperm(units, generator=g)[: max(1, round(fraction * units))].sort().values
    return (chosen[:, None] * unit + torch.arange(unit)).flatten()


def sweep(device: torch.device, dtype: torch.dtype, shapes: dict[str, tuple[int, int, int]], tokens: int,
          fractions: tuple[float, ...], warmup: int, repeats: int) -> dict[str, Any]:
    """The measured rows and the winner per table key (see the module docstring)."""
    from cca_fast.kernels.row_grad import DEFAULT_TILES, TILE_CANDIDATES, row_grad, tile_bucket

    g = torch.Generator().manual_seed(0)
    rows_out: list[dict[str, Any]] = []
    winners: dict[str, dict[str, Any]] = {}
    dname = str(dtype).replace("torch.", "")
    for proj, (n_out, n_in, unit) in shapes.items():
        x = torch.randn(tokens, n_in, generator=g).to(device=device, dtype=dtype)
        dy = torch.randn(tokens, n_out, generator=g).to(device=device, dtype=dtype)
        dense = harness.measure(lambda: dy.t() @ x, device, warmup=warmup, repeats=repeats)
        for f in fractions:
            rows = _rows(n_out, unit, f, g).to(device)
            R = int(rows.numel())
            key = f"{dname}/{tile_bucket(R)}/{tile_bucket(n_in)}"
            fns = {t.name: (lambda t=t: row_grad(dy, x, rows, backend="triton", tiles=t)) for t in TILE_CANDIDATES}
            timing = harness.measure_round_robin(fns, device, warmup=warmup, repeats=repeats)
            base = timing[DEFAULT_TILES.name].p50_ms
            for t in TILE_CANDIDATES:
                rows_out.append({"projection": proj, "shape": [n_out, n_in], "fraction_components": f, "R": R,
                                 "C": n_in, "N": tokens, "dtype": dname, "key": key, "tiles": t.name,
                                 "time": timing[t.name], "speedup_vs_default": round(base / timing[t.name].p50_ms, 4),
                                 "dense_time": dense})
            best = min(TILE_CANDIDATES, key=lambda t: timing[t.name].p50_ms)
            w = winners.setdefault(key, {"cases": []})
            w["cases"].append({"projection": proj, "fraction_components": f, "best": best.name,
                               "best_p50_ms": timing[best.name].p50_ms, "default_p50_ms": base,
                               "dense_p50_ms": dense.p50_ms})
            print(f"{proj:>2} {f:6.1%} R={R:5d} C={n_in}: default {timing[DEFAULT_TILES.name]}  best {best.name} "
                  f"{timing[best.name]}  dense dW {dense}", flush=True)
    # one winner per key: the candidate with the lowest summed median over the key's cases
    for key, w in winners.items():
        cases = [r for r in rows_out if r["key"] == key]
        total = {t.name: sum(r["time"].p50_ms for r in cases if r["tiles"] == t.name) for t in TILE_CANDIDATES}
        best = min(total, key=total.get)
        w.update(best=best, speedup_vs_default=round(total[DEFAULT_TILES.name] / total[best], 4),
                 pin=total[DEFAULT_TILES.name] / total[best] >= SPEEDUP_TO_PIN and best != DEFAULT_TILES.name)
    return {"rows": rows_out, "winners": winners}


def pin_lines(winners: dict[str, dict[str, Any]], device_name: str) -> list[str]:
    """The ``MEASURED_TILES`` entries to paste into ``kernels/row_grad.py`` (winners to pin)."""
    from cca_fast.kernels.row_grad import TILE_CANDIDATES

    by_name = {t.name: t for t in TILE_CANDIDATES}
    out = []
    for key, w in sorted(winners.items()):
        if not w["pin"]:
            continue
        t = by_name[w["best"]]
        dt, r, c = key.split("/")
        out.append(f"    ({dt!r}, {r}, {c}): RowGradTiles({t.block_r}, {t.block_c}, {t.block_n}, num_warps={t.num_warps}, "
                   f"num_stages={t.num_stages}),  # {device_name}: {w['speedup_vs_default']:.2f}x DEFAULT_TILES")
    return out


def markdown(rep: dict[str, Any]) -> str:
    """Per key: the winner, its speed-up over the default, and whether to pin it."""
    rows = [[k, w["best"], f"{w['speedup_vs_default']:.2f}x", "yes" if w["pin"] else "no",
             ", ".join(f"{c['projection']} {c['fraction_components']:.1%}" for c in w["cases"])]
            for k, w in sorted(rep["winners"].items())]
    lines = ["## row_grad tiles", "", harness.environment_line(rep["env"]), "",
             harness.markdown_table(["key (dtype/R/C bucket)", "fastest", "vs default", "pin", "cases"], rows)]
    if rep["pin"]:
        lines += ["", "Pin in `kernels/row_grad.py` `MEASURED_TILES`:", "", "```python", *rep["pin"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokens", type=int, default=None, help="N (default 4096; 40 with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (the code path, e.g. under the interpreter)")
    ap.add_argument("--warmup", type=int, default=None, help="default 3 (0 with --tiny)")
    ap.add_argument("--repeats", type=int, default=None, help="default 20 (1 with --tiny)")
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    args = ap.parse_args(argv)
    from cca_fast.kernels.dispatch import resolve_backend

    device = torch.device(args.device)
    resolve_backend(device, "triton")  # the kernel must run here: CUDA, or TRITON_INTERPRET=1
    dtype = getattr(torch, args.dtype)
    tokens = args.tokens or (40 if args.tiny else 4096)
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 3)
    repeats = args.repeats if args.repeats is not None else (1 if args.tiny else 20)
    res = sweep(device, dtype, TINY if args.tiny else LLAMA3_8B, tokens, FRACTIONS, warmup, repeats)
    cfg = {"dtype": args.dtype, "tokens": tokens, "fractions": list(FRACTIONS), "warmup": warmup, "repeats": repeats,
           "shapes": TINY if args.tiny else LLAMA3_8B, "speedup_to_pin": SPEEDUP_TO_PIN}
    rep = harness.report("row_grad_tiles", device, res["rows"], config=cfg, winners=res["winners"])
    rep["pin"] = pin_lines(res["winners"], rep["env"]["device"])
    harness.validate(rep)
    from cca_fast.io import atomic_write_text

    atomic_write_text(args.out, json.dumps(rep, indent=1) + "\n")
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
