"""Plots of dataset attribution scores (matplotlib, Agg backend; written atomically).

* ``heads.png``: one layer x head heat map per kind (q, k, v), a diverging colour scale centred
  on 0 and shared by the three, plus a layer x {attn_out, mlp_out} map of the whole blocks;
* ``neurons.png``: per layer, the distribution of MLP neuron scores (box: quartiles, whiskers:
  1st-99th percentile, the most extreme neurons as dots) on a symmetric-log axis, and below it
  the sum of ``|score|`` per layer of heads, neurons and block outputs (which layers matter).
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from cca_fast.io import atomic_write_bytes

from .methods import Layout


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def plot_heads(layout: Layout, scores: torch.Tensor, path: Path, title: str = "") -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.colors import TwoSlopeNorm  # noqa: PLC0415

    parts = {k: v.double().cpu().numpy() for k, v in layout.split(scores.double().cpu()).items()}
    heads = [parts["q"], parts["k"], parts["v"]]
    vmax = max(float(abs(h).max()) for h in heads) or 1.0
    L = layout.n_layers
    widths = [h.shape[1] for h in heads] + [2]
    fig, axes = plt.subplots(1, 4, figsize=(3 + 0.35 * sum(widths) + 2, 2.2 + 0.22 * L),
                             gridspec_kw={"width_ratios": [max(w, 2) for w in widths]}, layout="constrained")
    yticks = list(range(L)) if L <= 16 else list(range(0, L, 2 if L <= 40 else 4))
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax)
    for ax, h, name in zip(axes[:3], heads, ("q heads", "k heads", "v heads")):
        im = ax.imshow(h, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest", origin="lower")
        ax.set_title(name)
        ax.set_xlabel("head")
        ax.set_yticks(yticks)
        ax.set_xticks(range(h.shape[1]) if h.shape[1] <= 16 else range(0, h.shape[1], max(1, h.shape[1] // 8)))
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[2], shrink=0.8, label="score (shared by q, k, v)")
    blocks = torch.cat([torch.from_numpy(parts["attn_out"]), torch.from_numpy(parts["mlp_out"])], 1).numpy()
    bmax = float(abs(blocks).max()) or 1.0
    im2 = axes[3].imshow(blocks, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -bmax, bmax),
                         interpolation="nearest", origin="lower")
    axes[3].set_xticks([0, 1], ["attn\nout", "mlp\nout"])
    axes[3].set_title("blocks")
    axes[3].set_yticks(yticks)
    fig.colorbar(im2, ax=axes[3], shrink=0.8, label="score")
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_neurons(layout: Layout, scores: torch.Tensor, path: Path, title: str = "") -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    parts = {k: v.double().cpu() for k, v in layout.split(scores.double().cpu()).items()}
    mlp = parts["mlp"]  # [L, d_ff]
    L = layout.n_layers
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.35 * L + 2), 7), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 2]})
    data = [mlp[layer].numpy() for layer in range(L)]
    ax.boxplot(data, positions=list(range(L)), whis=(1, 99), showfliers=True, widths=0.6,
               flierprops={"markersize": 2, "alpha": 0.5})
    lin = float(mlp.abs().quantile(0.5)) if mlp.numel() else 1.0
    ax.set_yscale("symlog", linthresh=max(lin, 1e-12))
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylabel("neuron score (symlog)")
    ax.set_title(title or "MLP neuron scores per layer (box: quartiles, whiskers: 1-99%)")
    x = list(range(L))
    for name, vals in (("q/k/v heads", parts["q"].abs().sum(1) + parts["k"].abs().sum(1) + parts["v"].abs().sum(1)),
                       ("MLP neurons", mlp.abs().sum(1)), ("attn_out", parts["attn_out"][:, 0].abs()),
                       ("mlp_out", parts["mlp_out"][:, 0].abs())):
        ax2.plot(x, vals.numpy(), marker="o", ms=3, label=name)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("sum of |score|")
    ax2.set_xticks(x if L <= 32 else range(0, L, 2))
    ax2.legend(fontsize=8)
    _save(fig, path)
