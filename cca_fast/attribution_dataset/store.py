"""Output files of :func:`cca_fast.attribute_dataset` (all written atomically).

``OUTPUT/``

=============================  ========================================================================
``attribute_config.json``      the configuration and the data fingerprint (a rerun must match it)
``chunks/chunk_NNNNN.st``      one finished chunk of examples (safetensors): ``sums [total]`` fp64,
                               ``metric [n]``, ``index [n]``, ``n_rows``, ``n_tokens``, and
                               ``per_example [n, total]`` with ``per_example``; a rerun skips it
``baseline_mean.safetensors``  ``method="mean"``: the mean activation of every hooked tensor
``scores.safetensors``         ``scores [total]`` (flat: components, then attn_out / mlp_out per
                               layer), per kind ``q [L, Hq]`` ``k`` ``v`` ``mlp [L, d_ff]``
                               ``attn_out [L]`` ``mlp_out [L]``, ``metric [N]``, and
                               ``per_example [N, total]`` with ``per_example``
``top_components.csv / .md``   the components ranked by ``|score|``
``summary.json``               totals, timings, attributed tokens per second
``plots/heads.png``            layer x head heat maps of q / k / v and the block outputs
``plots/neurons.png``          per-layer neuron score distributions and per-layer totals
=============================  ========================================================================
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch

from cca_fast.io import atomic_write_bytes, atomic_write_text

from .methods import BLOCK_KINDS, Layout

CHUNKS = "chunks"
CONFIG = "attribute_config.json"
SCORES = "scores.safetensors"
MEAN = "baseline_mean.safetensors"


def chunk_path(out: Path, i: int) -> Path:
    return out / CHUNKS / f"chunk_{i:05d}.safetensors"


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save  # noqa: PLC0415

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    """Tensors of a safetensors file, or ``None`` when it is missing or damaged."""
    from safetensors.torch import load  # noqa: PLC0415

    try:
        return load(path.read_bytes())
    except (OSError, ValueError, RuntimeError, Exception):  # noqa: BLE001 - a damaged file is recomputed
        return None


def write_chunk(out: Path, i: int, sums: torch.Tensor, metric: torch.Tensor, index: torch.Tensor, n_rows: int,
                n_tokens: int, per_example: torch.Tensor | None) -> None:
    t = {"sums": sums.double(), "metric": metric.double(), "index": index.long(),
         "n_rows": torch.tensor([n_rows]), "n_tokens": torch.tensor([n_tokens])}
    if per_example is not None:
        t["per_example"] = per_example.double()
    _save(t, chunk_path(out, i))


def read_chunk(out: Path, i: int, index: list[int], total: int, per_example: bool) -> dict[str, torch.Tensor] | None:
    """The finished chunk ``i`` if its file holds the expected examples and shapes, else ``None``."""
    t = _load(chunk_path(out, i))
    if t is None or "sums" not in t or t["sums"].shape != (total,) or t["index"].tolist() != list(index):
        return None
    if per_example and ("per_example" not in t or t["per_example"].shape != (len(index), total)):
        return None
    return t


def write_mean(out: Path, means: list[torch.Tensor]) -> None:
    _save({f"g{i}": m for i, m in enumerate(means)}, out / MEAN)


def read_mean(out: Path, n: int) -> list[torch.Tensor] | None:
    t = _load(out / MEAN)
    if t is None or len(t) != n:
        return None
    return [t[f"g{i}"] for i in range(n)]


def write_scores(out: Path, layout: Layout, scores: torch.Tensor, metric: torch.Tensor,
                 per_example: torch.Tensor | None, meta: dict[str, Any]) -> None:
    t: dict[str, torch.Tensor] = {"scores": scores, "metric": metric}
    for kind, v in layout.split(scores).items():
        t[kind] = v[..., 0] if kind in BLOCK_KINDS else v
    if per_example is not None:
        t["per_example"] = per_example
    _save(t, out / SCORES, {"cca_attribute": json.dumps(meta, default=str)})


def ranked(layout: Layout, scores: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
    """The ``top_k`` entries with the largest ``|score|`` (components and blocks)."""
    s = scores.double().cpu()
    order = torch.sort(s.abs(), descending=True, stable=True).indices[: max(0, int(top_k))]
    rows = []
    for rank, i in enumerate(order.tolist(), 1):
        layer, kind, index = layout.name(i)
        name = f"L{layer}.{kind}" if kind in BLOCK_KINDS else f"L{layer}.{kind}{index}"
        rows.append({"rank": rank, "component": name, "layer": layer, "kind": kind, "index": index,
                     "score": float(s[i]), "abs_score": abs(float(s[i]))})
    return rows


def write_tables(out: Path, layout: Layout, scores: torch.Tensor, top_k: int, meta: dict[str, Any]) -> None:
    rows = ranked(layout, scores, top_k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["rank", "component", "layer", "kind", "index", "score", "abs_score"])
    w.writeheader()
    for r in rows:
        w.writerow({**r, "score": f"{r['score']:.6g}", "abs_score": f"{r['abs_score']:.6g}"})
    atomic_write_text(out / "top_components.csv", buf.getvalue())
    per_kind = {k: v.double().abs().sum().item() for k, v in layout.split(scores.double().cpu()).items()}
    lines = [f"# Attribution: {meta.get('method')} / {meta.get('metric')} at {meta.get('positions')} positions", "",
             f"{meta.get('n_examples')} examples, {meta.get('n_rows')} scored positions, model "
             f"{meta.get('model')}; mean metric {meta.get('mean_metric', float('nan')):.4g}.", "",
             "Sum of |score| per kind: " + ", ".join(f"{k} {v:.4g}" for k, v in per_kind.items()), "",
             f"Top {len(rows)} by |score| (positive: the component raises the metric relative to its baseline):", "",
             "| rank | component | score |", "|---:|---|---:|"]
    lines += [f"| {r['rank']} | {r['component']} | {r['score']:.4g} |" for r in rows]
    atomic_write_text(out / "top_components.md", "\n".join(lines) + "\n")
