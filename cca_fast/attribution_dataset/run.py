"""``attribute_dataset``: score every head, neuron and block output over a data set.

Streams the data set in chunks of ``chunk_size`` examples (each scored in batches of
``batch_size``; memory is bounded by one batch plus one ``[total]`` accumulator, and
``[chunk_size, total]`` with ``per_example``); every finished chunk is written atomically to
``OUTPUT/chunks/`` so a rerun (after a crash or Ctrl-C) skips it. Under ``torchrun`` each rank
scores the chunks ``i % world == rank`` and the sums are all-reduced (:mod:`cca_fast.distributed`).
The final scores are the fp64 sum of the chunk sums (see :mod:`.store` for every file).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from cca_fast.errors import CCAError
from cca_fast.io import atomic_write_json, check_or_write_config, check_writable_dir, refuse_links
from cca_fast.kernels.dispatch import Backend
from cca_fast.models import runtime
from cca_fast.models.adapters import KINDS
from cca_fast.models.components import ComponentSpace

from . import store
from cca_fast.distributed import Dist, current
from .inputs import Example, Record, check_options, fingerprint, make_batch, read_records, tokenize_records
from .methods import Layout, Scorer, iter_batches

if TYPE_CHECKING:
    from cca_fast.attribution import Attribution


@dataclass
class AttributeConfig:
    """Options of :func:`attribute_dataset` (and of ``cca attribute``).

    Attributes:
        method: ``"gradxact"`` (activation x gradient), ``"patch"`` (attribution patching against
            each example's corrupted prompt) or ``"mean"`` (against the data-set mean activation).
        metric: ``"logit_diff"`` (the CCA metric), ``"logprob"`` (of the target continuation) or
            ``"loss"`` (mean next-token cross-entropy).
        positions: ``"last"`` (last prompt token), ``"all"`` or ``"target"`` (see
            :func:`~cca_fast.attribution_dataset.methods.position_mask`).
        ig_steps: integrated-gradient steps (``method="patch"``; 0 = plain attribution patching).
        batch_size: examples per forward / backward pass.
        chunk_size: examples per resumable output chunk.
        per_example: also keep ``[N, total]`` per-example scores.
        top_k: rows of the ranked table.
        mean_examples: ``method="mean"``: examples the mean is taken over (``None``: all).
        plots: write the heat maps and distributions.
        add_special_tokens: tokenize text prompts with the tokenizer's special tokens (BOS).
        fields: data field -> column / key of the input file.
        limit: use the first ``limit`` examples only.
        backend: reduction kernel backend (``None``: Triton on CUDA, PyTorch elsewhere).
        pad_id: left-padding token (``None``: the model's rule, ``runtime.pad_id``).
    """

    method: str = "gradxact"
    metric: str = "logit_diff"
    positions: str = "last"
    ig_steps: int = 0
    batch_size: int = 8
    chunk_size: int = 64
    per_example: bool = False
    top_k: int = 50
    mean_examples: int | None = None
    plots: bool = True
    add_special_tokens: bool = True
    fields: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    backend: Backend | None = None
    pad_id: int | None = None

    def __post_init__(self) -> None:
        check_options(self.metric, self.method, self.positions, self.ig_steps)
        from cca_fast import checks

        for name in ("batch_size", "chunk_size", "top_k"):
            checks.positive(f"AttributeConfig.{name}", getattr(self, name), flag="--" + name.replace("_", "-"))
        for name in ("mean_examples", "limit"):
            checks.positive(f"AttributeConfig.{name}", getattr(self, name), flag="--" + name.replace("_", "-"),
                            allow_none=True, hint="or None for all")

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share (batching, plots and table size may change)."""
        d = asdict(self)
        for k in ("top_k", "plots", "backend", "batch_size"):
            d.pop(k)
        return d


@dataclass
class DatasetAttribution:
    """Result of :func:`attribute_dataset`.

    Attributes:
        layout: indexes :attr:`scores` (components, then attn_out / mlp_out per layer).
        scores: ``[layout.total]`` fp64, summed over examples.
        metric: ``[N]`` the metric of each example.
        per_example: ``[N, layout.total]`` or ``None``.
        n_rows: scored positions; n_tokens: tokens run through the model (clean prompts).
        chunks_done, chunks_skipped: chunks scored now / found finished (this rank).
        seconds: wall time of the scoring.
        output: the output directory.
    """

    layout: Layout
    scores: torch.Tensor
    metric: torch.Tensor
    per_example: torch.Tensor | None
    n_rows: int
    n_tokens: int
    chunks_done: int
    chunks_skipped: int
    seconds: float
    output: Path

    def kind(self, kind: str) -> torch.Tensor:
        """``[n_layers, count]`` scores of ``kind`` (``count = 1`` for attn_out / mlp_out)."""
        return self.layout.split(self.scores)[kind]

    def component_scores(self) -> torch.Tensor:
        """``[space.total]``: the scores of the q / k / v heads and MLP neurons in
        :class:`~cca_fast.models.components.ComponentSpace` order (the first ``space.total``
        entries of :attr:`scores`; the attn_out / mlp_out block scores after them are left out),
        what :func:`~cca_fast.stages.localize.select.select` ranks."""
        return self.scores[: self.layout.space.total]

    def attribution(self) -> "Attribution":
        """The component scores as an :class:`~cca_fast.attribution.Attribution` (every kind
        scored; ``metric_value``: the summed metric), so that ``select("atp-topk", space,
        scores=result.attribution(), k=...)`` (or ``scores=result``) takes them as they are."""
        from cca_fast.attribution import Attribution  # noqa: PLC0415

        return Attribution(self.layout.space, self.component_scores(), None, KINDS, False,
                           float(self.metric.sum()), 0)

    def top(self, k: int = 20) -> list[dict[str, Any]]:
        return store.ranked(self.layout, self.scores, k)


def load_examples(data: str | Path | Sequence[Any], tokenizer: Any, config: AttributeConfig,
                  vocab_size: int | None = None) -> list[Example]:
    """:class:`Example` s from a path (JSONL, ``cca run`` directory, table), records, dicts, or
    :class:`~cca_fast.stages.examples.PivotExample` s."""
    from cca_fast.stages.examples import PivotExample  # noqa: PLC0415

    if isinstance(data, (str, Path)):
        records = read_records(data, config.fields, config.limit)
    else:
        items = list(data)[: config.limit] if config.limit else list(data)
        if not items:
            raise CCAError("no examples given")
        if all(isinstance(x, Example) for x in items):
            return items
        records = []
        for i, x in enumerate(items):
            if isinstance(x, PivotExample):
                records.append(Record(f"example {i}", {"prompt_ids": list(x.prefix_ids), "desired": x.desired,
                                                       "undesired": x.undesired}))
            elif isinstance(x, Record):
                records.append(x)
            elif isinstance(x, dict):
                records.append(Record(f"example {i}", x))
            else:
                raise CCAError(f"example {i}: expected a dict, Record, Example or PivotExample, got {type(x).__name__}")
    return tokenize_records(records, tokenizer, config.metric, config.method, config.positions, config.ig_steps,
                            vocab_size, config.add_special_tokens)


def _model_name(model: nn.Module) -> str:
    src = getattr(model, "cca_source", None)
    if src is not None:
        return str(getattr(src, "path", "") or getattr(src, "name", ""))
    return str(getattr(model.config, "_name_or_path", "") or model.config.model_type)


def _mean(scorer: Scorer, examples: list[Example], config: AttributeConfig, pad: int, dist: Dist,
          out: Path) -> list[torch.Tensor]:
    """The data set's mean activation per hooked tensor (read back on a rerun)."""
    saved = store.read_mean(out, len(scorer.groups))
    if saved is not None:
        return saved
    use = examples[: config.mean_examples] if config.mean_examples else examples
    sums: list[torch.Tensor | None] = [None] * len(scorer.groups)
    count = 0
    mine = [e for i, e in enumerate(use) if dist.owns(i // config.chunk_size)]
    for batch_ex in iter_batches(mine, config.batch_size):
        s, n = scorer.mean_pass(make_batch(batch_ex, pad))
        sums = [x if acc is None else acc + x for acc, x in zip(sums, s)]
        count += n
    sums = [s if s is not None else torch.zeros(g.hi - g.lo, dtype=scorer.acc, device=scorer.home)
            for s, g in zip(sums, scorer.groups)]
    sums = [dist.all_reduce_(s.double()) for s in sums]
    total = dist.all_reduce_(torch.tensor([float(count)], dtype=torch.float64))
    if total.item() == 0:
        raise CCAError("no scored positions to take the mean activation over")
    means = [(s / total.item()).to(scorer.acc) for s in sums]
    if dist.main:
        store.write_mean(out, means)
    dist.barrier()
    return [m.to(s.device) for m, s in zip(means, sums)]


def attribute_dataset(model: nn.Module, tokenizer: Any, data: str | Path | Sequence[Any], output: str | Path,
                      config: AttributeConfig | None = None, progress: bool = True, *,
                      space: ComponentSpace | None = None) -> DatasetAttribution:
    """Score every q / k / v head, MLP neuron, attention output and MLP output over ``data``.

    Args:
        model: a causal LM of a supported family (frozen during the call; any device or dtype,
            or spread over devices with ``device_map``).
        tokenizer: its tokenizer (for text fields; may be ``None`` when every field is token ids).
        data: a ``.jsonl`` path, a ``cca run`` directory (its pivots), a ``.json`` / ``.csv`` /
            ``.parquet`` table, or a sequence of dicts / ``PivotExample`` / :class:`Example`.
        output: directory of the chunk files, scores, tables and plots (see :mod:`.store`).
        config: :class:`AttributeConfig`.
        progress: a tqdm bar over examples (rank 0).
    Returns:
        :class:`DatasetAttribution` (the same on every rank).
    """
    config = config or AttributeConfig()
    dist = current()
    vocab = getattr(model.config, "vocab_size", None) or getattr(getattr(model.config, "text_config", None), "vocab_size", None)
    examples = load_examples(data, tokenizer, config, vocab)
    out = Path(output)
    if dist.main:
        check_writable_dir(out, "the attribution output directory")
        refuse_links(out, (store.CHUNKS, "plots"))  # every write there would follow a planted link
    space = space if space is not None else ComponentSpace(model)
    layout = Layout(space)
    ident = {**config.identity(), "model": _model_name(model), "n_examples": len(examples),
             "data_fingerprint": fingerprint(examples), "total": layout.total}
    if dist.main:
        check_or_write_config(out / store.CONFIG, ident, {}, f"the attribution output directory {out}")
    dist.barrier()
    if not dist.main:
        check_or_write_config(out / store.CONFIG, ident, {}, f"the attribution output directory {out}", write=False)
    pad = runtime.pad_id(model, tokenizer, explicit=config.pad_id)
    chunks = [examples[i : i + config.chunk_size] for i in range(0, len(examples), config.chunk_size)]
    mine = [i for i in range(len(chunks)) if dist.owns(i)]
    start = time.perf_counter()
    done = skipped = 0
    bar = None
    if progress and dist.main:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=sum(len(chunks[i]) for i in mine), desc=f"attribute ({config.method})", unit="ex")
    try:
        with Scorer(model, space, method=config.method, metric=config.metric, positions=config.positions,
                    ig_steps=config.ig_steps, per_example=config.per_example, backend=config.backend) as scorer:
            if config.method == "mean":
                scorer.mean = _mean(scorer, examples, config, pad, dist, out)
            for i in mine:
                idx = [e.index for e in chunks[i]]
                if store.read_chunk(out, i, idx, layout.total, config.per_example) is not None:
                    skipped += 1
                    if bar is not None:
                        bar.update(len(idx))
                    continue
                sums = torch.zeros(layout.total, dtype=torch.float64)
                per = torch.zeros(len(idx), layout.total, dtype=torch.float64) if config.per_example else None
                metric = torch.zeros(len(idx), dtype=torch.float64)
                pos = {j: k for k, j in enumerate(idx)}
                n_rows = n_tokens = 0
                for batch_ex in iter_batches(chunks[i], config.batch_size):
                    batch = make_batch(batch_ex, pad)
                    res = scorer.score(batch)
                    rows = torch.tensor([pos[e.index] for e in batch_ex])
                    sums += res.sums.double().cpu()
                    metric[rows] = res.metric.double().cpu()
                    if per is not None:
                        per[rows] = res.per_example.double().cpu()
                    n_rows += res.n_rows
                    n_tokens += sum(e.n_tokens for e in batch_ex)
                    if bar is not None:
                        bar.update(len(batch_ex))
                        bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - start, 1e-9):.0f}")
                store.write_chunk(out, i, sums, metric, torch.tensor(idx), n_rows, n_tokens, per)
                done += 1
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    dist.barrier()
    result = _gather(out, chunks, mine, layout, config, dist, done, skipped, seconds)
    if dist.main:
        _write_outputs(out, result, config, model, seconds)
    dist.barrier()
    return result


def _gather(out: Path, chunks: list[list[Example]], mine: list[int], layout: Layout, config: AttributeConfig,
            dist: Dist, done: int, skipped: int, seconds: float) -> DatasetAttribution:
    """Sum this rank's chunk files (fp64, chunk order) and all-reduce over ranks."""
    N = sum(len(c) for c in chunks)
    scores = torch.zeros(layout.total, dtype=torch.float64)
    metric = torch.zeros(N, dtype=torch.float64)
    per = torch.zeros(N, layout.total, dtype=torch.float64) if config.per_example else None
    counts = torch.zeros(2, dtype=torch.float64)
    for i in mine:
        idx = [e.index for e in chunks[i]]
        t = store.read_chunk(out, i, idx, layout.total, config.per_example)
        if t is None:
            raise CCAError(f"chunk {i} of {out} is missing or damaged after scoring; run again to recompute it")
        scores += t["sums"]
        metric[t["index"]] = t["metric"]
        if per is not None:
            per[t["index"]] = t["per_example"]
        counts += torch.tensor([float(t["n_rows"][0]), float(t["n_tokens"][0])], dtype=torch.float64)
    for x in (scores, metric, counts) + ((per,) if per is not None else ()):
        dist.all_reduce_(x)
    return DatasetAttribution(layout, scores, metric, per, int(counts[0]), int(counts[1]), done, skipped, seconds, out)


def _write_outputs(out: Path, r: DatasetAttribution, config: AttributeConfig, model: nn.Module, seconds: float) -> None:
    meta = {"method": config.method, "metric": config.metric, "positions": config.positions,
            "ig_steps": config.ig_steps, "n_examples": int(r.metric.numel()), "n_rows": r.n_rows,
            "n_tokens": r.n_tokens, "model": _model_name(model), "mean_metric": float(r.metric.mean()),
            "layout": {"n_layers": r.layout.n_layers, "counts": dict(r.layout.space.counts),
                       "components_total": r.layout.space.total, "total": r.layout.total,
                       "order": "components (layer-major, q k v mlp), then attn_out mlp_out per layer"}}
    store.write_scores(out, r.layout, r.scores, r.metric, r.per_example, meta)
    store.write_tables(out, r.layout, r.scores, config.top_k, meta)
    if config.plots:
        from .plots import plot_heads, plot_neurons  # noqa: PLC0415

        what = f"{config.method} / {config.metric} @ {config.positions}, {meta['n_examples']} examples"
        plot_heads(r.layout, r.scores, out / "plots" / "heads.png", what)
        plot_neurons(r.layout, r.scores, out / "plots" / "neurons.png", f"MLP neuron scores per layer ({what})")
    atomic_write_json(out / "summary.json", {**meta, "chunks_scored_now": r.chunks_done,
                                             "chunks_found_finished": r.chunks_skipped,
                                             "seconds": round(seconds, 3),
                                             "tokens_per_second": round(r.n_tokens / seconds, 3) if seconds > 0 and r.chunks_done else None,
                                             "top": store.ranked(r.layout, r.scores, 10)})
