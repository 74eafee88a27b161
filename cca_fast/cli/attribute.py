"""``cca attribute DATA --output DIR``: score every q/k/v head, MLP neuron, attention output and
MLP output of a model over a data set.

DATA is a JSON Lines file (one object per line: ``prompt`` plus ``desired`` / ``undesired``
tokens or strings for ``--metric logit_diff``, a ``target`` continuation for ``logprob``,
a ``corrupt`` prompt for ``--method patch``; ``*_ids`` fields take token ids), a ``cca run``
directory (its pivot examples), or a local .json / .csv / .parquet table (``--field
prompt=question`` maps columns). The data set is streamed in chunks written to DIR/chunks/, so a
rerun of the same command continues where it stopped. Under ``torchrun --nproc_per_node N`` each
process scores a share of the chunks and the scores are all-reduced (gloo on CPU, nccl on GPUs).

Writes DIR/scores.safetensors, DIR/top_components.{csv,md}, DIR/plots/{heads,neurons}.png and
DIR/summary.json; prints the summary as JSON.
"""
from __future__ import annotations

import argparse
import json

from cca_fast.checks import cli_int
from cca_fast.cli.common import add_model_args
from cca_fast.errors import CCAError

NAME = "attribute"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``attribute`` subcommand to ``subparsers``; it runs :func:`run`."""
    from cca_fast.attribution_dataset.run import AttributeConfig

    d = AttributeConfig()
    p = subparsers.add_parser(NAME, help="attribution of every head and neuron over a data set (resumable, torchrun)",
                              description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    p.add_argument("data", metavar="DATA", help="a .jsonl file, a `cca run` directory, or a .json/.csv/.parquet table")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="output directory (a rerun resumes it)")
    g = p.add_argument_group("attribution")
    g.add_argument("--method", default=d.method, metavar="M",
                   help="gradxact (activation x gradient), patch ((a_clean - a_corrupt) . grad, needs a corrupt "
                        "prompt per example) or mean ((a - data-set mean) . grad)")
    g.add_argument("--metric", default=d.metric, metavar="M",
                   help="logit_diff (desired - undesired next token, the CCA metric), logprob (of the target "
                        "continuation) or loss (mean next-token cross-entropy)")
    g.add_argument("--positions", default=d.positions, metavar="P",
                   help="last (last prompt token), all (every token) or target (the positions predicting the target)")
    g.add_argument("--ig-steps", type=cli_int, default=d.ig_steps, metavar="N",
                   help="integrated-gradient steps between the corrupted and the clean input embeddings (EAP-IG; "
                        "--method patch); 0: plain attribution patching")
    g.add_argument("--batch-size", type=cli_int, default=d.batch_size, metavar="B", help="examples per forward/backward")
    g.add_argument("--chunk-size", type=cli_int, default=d.chunk_size, metavar="N",
                   help="examples per resumable chunk file")
    g.add_argument("--per-example", action="store_true", help="also store [N, total] per-example scores")
    g.add_argument("--top-k", type=cli_int, default=d.top_k, metavar="K", help="rows of the ranked table")
    g.add_argument("--mean-examples", type=cli_int, default=None, metavar="N",
                   help="--method mean: take the mean over the first N examples (default: all)")
    g.add_argument("--no-plots", action="store_true", help="do not draw the heat maps and distributions")
    g.add_argument("--field", action="append", default=[], metavar="NAME=COLUMN",
                   help="read field NAME (prompt, target, desired, undesired, corrupt, or their *_ids) from "
                        "COLUMN of the data (repeatable)")
    g.add_argument("--limit", type=cli_int, default=None, metavar="N", help="use the first N examples only")
    g.add_argument("--no-special-tokens", action="store_true",
                   help="tokenize text prompts without the tokenizer's special tokens (no BOS)")
    g.add_argument("--backend", default=None, choices=("auto", "torch", "triton"),
                   help="reduction kernel backend; default: Triton on CUDA, PyTorch elsewhere")
    add_model_args(p)
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="e.g. 'auto': spread the model over the visible GPUs (accelerate) for models larger than "
                        "one; not with torchrun")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _fields(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        name, sep, col = it.partition("=")
        if not sep or not name or not col:
            raise CCAError(f"--field {it!r}: expected NAME=COLUMN, e.g. --field prompt=question")
        out[name] = col
    return out


def run(args: argparse.Namespace) -> int:
    """Execute ``cca attribute``; returns the exit status."""
    import os

    from cca_fast.distributed import init_from_env, rank_device, shutdown
    from cca_fast.attribution_dataset.inputs import check_records, read_records
    from cca_fast.attribution_dataset.run import AttributeConfig, attribute_dataset
    from cca_fast.models.loading import load_model

    config = AttributeConfig(method=args.method, metric=args.metric, positions=args.positions,
                             ig_steps=args.ig_steps, batch_size=args.batch_size, chunk_size=args.chunk_size,
                             per_example=args.per_example, top_k=args.top_k, mean_examples=args.mean_examples,
                             plots=not args.no_plots, add_special_tokens=not args.no_special_tokens,
                             fields=_fields(args.field), limit=args.limit, backend=args.backend)
    # the data's structure is checked before the model is loaded (token-level checks follow)
    check_records(read_records(args.data, config.fields, config.limit), config.metric, config.method)
    if args.device_map is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CCAError("--device-map spreads one model over the GPUs of one process; do not combine it with torchrun")
    dist = init_from_env()
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device or rank_device(),
                                      attn_implementation=args.attn_implementation, device_map=args.device_map)
        result = attribute_dataset(model, tokenizer, args.data, args.output, config, progress=not args.quiet)
        if dist.main:
            from cca_fast.io import read_json

            summary = read_json(result.output / "summary.json")
            print(json.dumps({k: summary[k] for k in ("method", "metric", "positions", "n_examples", "n_rows",
                                                       "n_tokens", "seconds", "tokens_per_second",
                                                       "chunks_scored_now", "chunks_found_finished")}
                             | {"output": str(result.output), "world_size": dist.world,
                                "top": summary["top"][:5]}, indent=1))
        dist.leave()  # every rank together (the finally below only cleans up after an error)
    finally:
        shutdown()
    return 0
