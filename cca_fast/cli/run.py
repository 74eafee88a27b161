"""``cca run``: the whole CCA method, end to end, resumable (METHOD sections 0-3)."""
from __future__ import annotations

import argparse
import json

from cca_fast.cli.common import add_generation_args, add_model_args, add_prompt_args, check_positive

DESCRIPTION = """\
Run Constructive Circuit Amplification end to end on a model and data set:

  data       seeded per-template splits (52/8/40)
  base_eval  greedy traces of the training split; base accuracy on the test split
  traces     stage 1: for training problems of weak templates (base accuracy < --weak-threshold),
             k samples; the first whose correctness is opposite to the greedy trace is kept
  pivots     stage 1: the pivotal token of each pair (--pivot-method branching|prefix)
  localize   stage 2: components by DCM, AtP (top-k / fraction) or a random control
  update     stage 3: gradient descent on the selected rows only, best step by validation accuracy
  cca_eval   the updated model (base + the saved sparse delta) on the test split
  report     OUTPUT/report.json, report.md, components.png

Every stage writes its output to OUTPUT; run the same command again to resume after an
interruption (finished stages are not recomputed; traces, pivots and evaluations resume per item).
The sparse delta is in OUTPUT/delta (apply it with `cca apply`).

With no arguments: the embedded SmolLM2-135M-Instruct on the built-in templates, sized for a few
minutes on 2 CPU cores. Paper-size configuration (GPU): --n-per-template 50 --max-train-problems 0
--max-val-problems 0 --max-new-tokens 1500 --update-steps 50 --shots gsm8k_cot_8shot.json (see README).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="the whole CCA method end to end (resumable)", description=DESCRIPTION)
    add_run_args(p)
    s2 = p.add_argument_group("selection")
    s2.add_argument("--selector", default="dcm", choices=["dcm", "atp-topk", "atp-fraction", "random", "none"],
                    help="component selection; random = the control; none = the no-mask baseline "
                         "(update every weight)")
    s2.add_argument("--select-k", type=int, default=None, metavar="K", help="components for atp-topk")
    s2.add_argument("--select-fraction", type=float, default=None, metavar="F",
                    help="fraction of components for atp-fraction or random")
    s2.add_argument("--select-count", type=int, default=None, metavar="N", help="components for random")
    o = p.add_argument_group("output")
    o.add_argument("--output", default="runs/cca", metavar="DIR", help="run directory (resumable)")
    o.add_argument("--until", default=None, metavar="STAGE",
                   help="stop after this stage (data, base_eval, traces, pivots, localize, update, cca_eval)")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags of every pipeline setting except the selector and the output (shared by
    ``cca run`` and ``cca study``, which may override defaults with ``p.set_defaults``)."""
    add_model_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="D",
                   help="built-in templates (default), a template folder or file, a JSONL file, or a hub name")
    g.add_argument("--n-per-template", type=int, default=8, metavar="N", help="instances per template")
    g.add_argument("--seed", type=int, default=0, metavar="S", help="seed of instances, splits, samples")
    g.add_argument("--max-train-problems", type=int, default=12, metavar="N",
                   help="at most N training problems go to stage 1 (0 = all)")
    g.add_argument("--max-val-problems", type=int, default=12, metavar="N",
                   help="cap on validation problems, evaluated at every validation step (0 = all)")
    g.add_argument("--max-test-problems", type=int, default=0, metavar="N", help="cap on test problems (0 = all)")
    g.add_argument("--weak-threshold", type=float, default=0.8, metavar="A",
                   help="templates with base training accuracy below A give training examples")
    add_prompt_args(p)
    add_generation_args(p, max_new_tokens=160)
    g.add_argument("--procedure", default="fast", choices=["fast", "reference"],
                   help="reference: the authors' procedure (one sequence at a time without early stop, literal "
                        "branching, full-prefix DCM, dense-gradient update): the same results, slower; for "
                        "benchmarks and checks")
    s1 = p.add_argument_group("stage 1")
    s1.add_argument("--k", type=int, default=10, help="samples drawn per problem to find a flipped trace")
    s1.add_argument("--pivot-method", default="branching", choices=["branching", "prefix"],
                    help="how the pivotal token is found")
    s1.add_argument("--branching", default="fast", choices=["fast", "reference"],
                    help="fast: pruned batched search (same pivots); reference: the literal per-position loop")
    s2 = p.add_argument_group("stage 2")
    s2.add_argument("--dcm-lambda", type=float, default=0.01, help="DCM L1 weight (paper 0.01)")
    s2.add_argument("--dcm-epochs", type=int, default=50, help="DCM epochs (paper 50)")
    s2.add_argument("--dcm-mode", default="last", choices=["last", "full"],
                    help="last: prefix K/V computed once, only the last token re-run; full: the reference")
    s3 = p.add_argument_group("stage 3")
    s3.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="paper: sgd")
    s3.add_argument("--lr", type=float, default=1e-4, help="learning rate (paper 1e-4)")
    s3.add_argument("--update-steps", type=int, default=8, help="optimizer steps (paper 50)")
    s3.add_argument("--update-mode", default="sparse", choices=["sparse", "reference"],
                    help="sparse: row-selective gradients + row-sparse step; reference: dense gradients")


def config_from_args(args: argparse.Namespace):
    from cca_fast.experiments.pipeline import RunConfig
    from cca_fast.stages.traces import TraceConfig

    for name in ("batch_size", "max_new_tokens", "n_per_template", "k", "update_steps", "dcm_epochs"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name))
    return RunConfig(
        output=args.output, model=args.model, dtype=args.dtype, device=args.device,
        attn_implementation=args.attn_implementation, data=args.data, n_per_template=args.n_per_template,
        seed=args.seed, weak_threshold=args.weak_threshold,
        max_train_problems=args.max_train_problems or None, max_val_problems=args.max_val_problems or None,
        max_test_problems=args.max_test_problems or None, prompt_mode=args.prompt_mode, shots=args.shots,
        n_shots=args.n_shots, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        trace=TraceConfig(k=args.k, seed=args.seed), pivot_method=args.pivot_method, branching=args.branching,
        selector=getattr(args, "selector", "dcm"), select_k=getattr(args, "select_k", None),
        select_fraction=getattr(args, "select_fraction", None), select_count=getattr(args, "select_count", None),
        dcm={"lambda_l1": args.dcm_lambda, "epochs": args.dcm_epochs, "mode": args.dcm_mode, "seed": args.seed,
             # last mode: keep each batch's prefix K/V for the whole run (memory for speed; exact)
             "reuse_prefix_cache": args.dcm_mode == "last"},
        update={"optimizer": args.optimizer, "lr": args.lr, "max_steps": args.update_steps, "mode": args.update_mode},
        procedure=args.procedure,
    )


def run(args: argparse.Namespace) -> int:
    from cca_fast.experiments.pipeline import run_cca

    report = run_cca(config_from_args(args), until=args.until, progress=not args.quiet)
    if report is not None:
        keys = ("base_accuracy", "cca_accuracy", "n_test", "components_selected", "components_total", "fraction")
        print(json.dumps({k: report[k] for k in keys}))
    return 0
