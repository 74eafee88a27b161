"""``cca side-effects``: MMLU / TruthfulQA / GSM8K-perplexity side-effect suites of a model, and of
the model with a sparse delta applied (docs/method.md section 0, "Side effects")."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cca_fast.checks import cli_int
from cca_fast import checks
from cca_fast.cli.common import add_model_args

NAME = "side-effects"
DESCRIPTION = """\
Score a model on local-file side-effect suites, by continuation log-likelihood as lm-eval-harness
scores them: MMLU 5-shot (accuracy, per subject), TruthfulQA MC1-style (best answer vs the
incorrect ones, summed log-probs, lm-eval's QA primer) and the perplexity of GSM8K test
solutions given their question.

With --delta DIR the suites run twice on one loaded model: without the delta ("before") and with
it ("after"; it is reverted at the end), and the output also holds "compare": deltas with paired
bootstrap intervals. --model defaults to the delta's recorded base model.

Writes OUTPUT (JSON): per suite {metric_name, metric, n, details, per_item, seconds} and meta;
with --delta {before, after, compare, delta}. Data: --side-data DIR, else $CCA_SHARED_DATA,
else ../shared/data. Limits default to the full sets (14042 MMLU questions: slow on a CPU).
"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``side-effects`` subcommand; it runs :func:`run`."""
    p = subparsers.add_parser(NAME, aliases=["suites"], description=DESCRIPTION,
                              help="side-effect suites (MMLU, TruthfulQA, GSM8K perplexity), before/after a delta")
    add_model_args(p)
    g = p.add_argument_group("suites")
    g.add_argument("--delta", default=None, metavar="DIR",
                   help="also score the model with this sparse delta applied, and compare")
    g.add_argument("--side-data", default=None, metavar="DIR",
                   help="folder with mmlu/{dev,test}/, truthfulqa/TruthfulQA.csv, gsm8k/test.jsonl; default: "
                        "$CCA_SHARED_DATA, else ../shared/data")
    g.add_argument("--suites", default="mmlu,truthfulqa,perplexity", metavar="LIST",
                   help="comma-separated suites to run (mmlu, truthfulqa, perplexity)")
    g.add_argument("--mmlu-limit", type=cli_int, default=None, metavar="N",
                   help="MMLU questions, stratified over subjects; default: all 14042")
    g.add_argument("--truthfulqa-limit", type=cli_int, default=None, metavar="N",
                   help="TruthfulQA questions, a seeded subset; default: all 817")
    g.add_argument("--ppl-limit", type=cli_int, default=None, metavar="N",
                   help="GSM8K test solutions for perplexity, a seeded subset; default: all 1319")
    g.add_argument("--mmlu-shots", type=cli_int, default=5, metavar="K", help="MMLU dev examples before each question")
    g.add_argument("--no-truthfulqa-preamble", action="store_true",
                   help="score TruthfulQA zero-shot, without lm-eval's 6-question QA primer")
    g.add_argument("--seed", type=cli_int, default=0, metavar="S", help="seed of the subsets")
    g.add_argument("--batch-size", type=cli_int, default=8, metavar="B", help="distinct model inputs per forward pass")
    g.add_argument("--logprob-dtype", default="float32", choices=("float32", "float64"),
                   help="dtype of the log-softmax (logits are upcast to it)")
    g.add_argument("--n-boot", type=cli_int, default=1000, metavar="N", help="bootstrap resamples of --delta comparisons")
    o = p.add_argument_group("output")
    o.add_argument("--output", default="runs/side_effects.json", metavar="FILE", help="JSON file to write")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _load(args: argparse.Namespace, meta: dict[str, Any] | None) -> tuple[Any, Any]:
    from cca_fast.errors import CCAError
    from cca_fast.models.loading import load_model

    name = args.model
    dtype = args.dtype
    if meta is not None:
        if name is None:
            base = meta.get("base_model") or {}
            src = base.get("source") or {}
            name = (src.get("path") if src.get("kind") == "local" else None) or src.get("name") \
                or base.get("name_or_path")
            if not name:
                raise CCAError("the delta does not record its base model; pass --model")
        dtype = dtype or meta.get("dtype") or None
    return load_model(name, dtype=dtype, device=args.device, attn_implementation=args.attn_implementation)


def _check_output(output: str) -> None:
    """``--output`` names a file that can be written: its folder is created and probed before any
    suite runs (the results of a long run are not lost at the end)."""
    from cca_fast.errors import CCAError
    from cca_fast.io import check_writable_dir

    path = Path(output).expanduser()
    if path.is_dir():
        raise CCAError(f"--output {path} is a folder; --output names the JSON file to write "
                       f"(e.g. {path / 'side_effects.json'})")
    check_writable_dir(path.parent, "--output's folder")


def _summary(res: dict[str, Any]) -> str:
    parts = []
    for name in ("mmlu", "truthfulqa", "perplexity"):
        if name in res:
            r = res[name]
            parts.append(f"{name} {r['metric_name']} {r['metric']:.4f} (n={r['n']}, {r['seconds']:.0f}s)")
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Execute ``cca side-effects``; returns the exit status."""
    from cca_fast.io import atomic_write_json
    from cca_fast.evaluation.suites import SuiteConfig, compare, resolve_data_root, run_suites

    for flag in ("mmlu_limit", "truthfulqa_limit", "ppl_limit"):
        checks.positive("--" + flag.replace("_", "-"), getattr(args, flag), allow_none=True)
    checks.positive("--batch-size", args.batch_size)
    checks.positive("--n-boot", args.n_boot)
    _check_output(args.output)
    from cca_fast.models.loading import check_model_name

    check_model_name(args.model)
    config = SuiteConfig(data_root=str(resolve_data_root(args.side_data)), suites=args.suites,
                         mmlu_limit=args.mmlu_limit, truthfulqa_limit=args.truthfulqa_limit, ppl_limit=args.ppl_limit,
                         mmlu_shots=args.mmlu_shots, truthfulqa_preamble=not args.no_truthfulqa_preamble,
                         batch_size=args.batch_size, seed=args.seed, logprob_dtype=args.logprob_dtype,
                         progress=not args.quiet)
    delta = None
    if args.delta:
        from cca_fast.delta import SparseDelta

        delta = SparseDelta.load(args.delta)  # read and check before the (slow) model load
    model, tokenizer = _load(args, delta.meta if delta is not None else None)
    if delta is not None:
        from cca_fast.delta import check_fits

        check_fits(model, delta)  # before the "before" suites, not after them
    before = run_suites(model, tokenizer, config)
    if delta is None:
        out: dict[str, Any] = before
        print(f"side-effects: {_summary(before)}")
    else:
        from cca_fast.delta import apply_delta, revert_delta

        print(f"side-effects (before): {_summary(before)}")
        sys.stdout.flush()
        handle = apply_delta(model, delta)
        try:
            after = run_suites(model, tokenizer, config)
        finally:
            revert_delta(model, handle)
        print(f"side-effects (after):  {_summary(after)}")
        cmp = compare(before, after, n_boot=args.n_boot, seed=args.seed)
        out = {"before": before, "after": after, "compare": cmp,
               "delta": {"path": str(args.delta), **delta.summary()}}
        for name, e in cmp.items():
            if name != "bootstrap":
                ci = e.get("ci")
                print(f"  {name}: {e['metric_name']} {e['before']:.4f} -> {e['after']:.4f} (delta {e['delta']:+.4f}"
                      + (f", paired 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "") + ")")
    path = Path(args.output)
    atomic_write_json(path, out)
    print(f"-> {path}")
    sys.stdout.flush()
    return 0
