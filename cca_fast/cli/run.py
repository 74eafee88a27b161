"""``cca run``: the whole CCA method, end to end, resumable (docs/method.md sections 0-3)."""
from __future__ import annotations

import argparse
import json

from cca_fast.checks import cli_int, finite_float, kind_budget_arg
from cca_fast.cli.common import (FieldFlag, add_generation_args, add_model_args, add_prompt_args, bind_flags,
                                 none_is_zero, overrides_from_args, zero_is_none)
from cca_fast.experiments.config import BRANCHINGS, PIVOT_FILTERS, PIVOT_METHODS, PIVOT_SOURCES, PROCEDURES
from cca_fast.stages.objectives import OBJECTIVES

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

With no arguments: recipe fisher-sft (sparse SFT on the gold solutions of the rows with the largest
Fisher score of that loss, 3% of each kind's heads and neurons) with the embedded
SmolLM2-135M-Instruct on the built-in templates, about 15 minutes on 2 CPU cores (README);
--recipe circuit-sft selects by AtP on the pivots instead, --recipe paper runs the paper's procedure.
Paper-size configuration (GPU): --n-per-template 50 --max-train-problems 0
--max-val-problems 0 --max-new-tokens 1500 --update-steps 50 --shots gsm8k_cot_8shot.json (see README).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from cca_fast.experiments.config import SELECTORS
    from cca_fast.experiments.steps import STEP_NAMES

    p = subparsers.add_parser("run", help="the whole CCA method end to end (resumable)", description=DESCRIPTION)
    add_run_args(p)
    from cca_fast.experiments.recipes import DEFAULT_RECIPE, RECIPES, recipe_config

    p.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE,
                   help="a named bundle of settings (cca_fast.experiments.recipes); other flags override it "
                        "(the defaults shown are the default recipe's). fisher-sft: sparse SFT on the gold solutions of the "
                        "rows of largest Fisher score (3%% of each kind); circuit-sft: the same on the AtP top 2%%; "
                        "paper: the paper's procedure (RunConfig())")
    s2 = p.add_argument_group("selection")
    s2.add_argument("--selector", choices=SELECTORS,
                    help="component selection; random = the control; none = the no-mask baseline "
                         "(update every weight)")
    s2.add_argument("--select-k", type=cli_int, metavar="K", help="components for atp-topk")
    s2.add_argument("--select-fraction", type=finite_float, metavar="F",
                    help="fraction of components for atp-fraction or random")
    s2.add_argument("--select-count", type=cli_int, metavar="N", help="components for random")
    s2.add_argument("--select-per-kind", type=kind_budget_arg, metavar="BUDGET",
                    help="a budget per kind, fractions of each kind's heads / neurons: q=0.05,k=0.05,v=0.05,mlp=0.01, "
                         "or one fraction for every kind (atp-fraction, random, fisher, grad-weight, movement)")
    s2.add_argument("--anti", dest="select_anti", action="store_true", default=None,
                    help="the anti-selection control: the lowest-ranked components at the same per-kind counts")
    o = p.add_argument_group("output")
    o.add_argument("--output", metavar="DIR", help="run directory (resumable)")
    o.add_argument("--until", default=None, choices=STEP_NAMES, metavar="STEP",
                   help=f"stop after this step ({', '.join(STEP_NAMES)})")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    bind_flags(p, RUN_FLAGS + RUN_ONLY_FLAGS, recipe_config(DEFAULT_RECIPE))
    p.set_defaults(func=run)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags of every pipeline setting except the selector and the output (shared by
    ``cca run`` and ``cca study``); :data:`RUN_FLAGS` maps them to :class:`RunConfig` fields,
    whose defaults :func:`~cca_fast.cli.common.bind_flags` shows."""
    add_model_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="D",
                   help="built-in templates (default), a template folder or file, a JSONL file, or a hub name")
    g.add_argument("--n-per-template", type=cli_int, metavar="N", help="instances per template")
    g.add_argument("--skip-bad-templates", action="store_true",
                   help="template folders: leave out templates that cannot be parsed or instantiated (each "
                        "reported with its reason) instead of stopping at the first")
    g.add_argument("--non-integer-answers", action="store_true",
                   help="templates: also accept instances whose #answer is not an integer")
    g.add_argument("--seed", type=cli_int, metavar="S",
                   help="seed of instances, splits, stage-1 samples, DCM shuffles and the random control")
    g.add_argument("--extra-train-data", metavar="D",
                   help="a second source (as --data) whose problems join the training split only (ids "
                        "'extra:...', their own template group), e.g. GSM8K's train.jsonl")
    g.add_argument("--extra-train-max", type=cli_int, metavar="N",
                   help="at most N extra training problems, a seeded draw (0 = all); each is base-evaluated")
    g.add_argument("--extra-test-data", metavar="D",
                   help="a further source (as --data) whose problems all join the test split (ids 'extra:...', "
                        "their own template group), e.g. GSM8K's test.jsonl for a test split of over 1,300 problems")
    g.add_argument("--extra-test-max", type=cli_int, metavar="N",
                   help="at most N extra test problems, a seeded draw (0 = all)")
    g.add_argument("--max-train-problems", type=cli_int, metavar="N",
                   help="at most N training problems go to stage 1 (0 = all)")
    g.add_argument("--max-val-problems", type=cli_int, metavar="N",
                   help="cap on validation problems, evaluated at every validation step (0 = all)")
    g.add_argument("--max-test-problems", type=cli_int, metavar="N", help="cap on test problems (0 = all)")
    g.add_argument("--weak-threshold", type=finite_float, metavar="A",
                   help="templates with base training accuracy below A give training examples")
    add_prompt_args(p)
    add_generation_args(p)
    g.add_argument("--procedure", choices=PROCEDURES,
                   help="reference: the authors' procedure (one sequence at a time without early stop, literal "
                        "branching, full-prefix DCM, dense-gradient update): the same results, slower; for "
                        "benchmarks and checks")
    s1 = p.add_argument_group("stage 1")
    s1.add_argument("--k", type=cli_int, help="samples drawn per problem to find a flipped trace")
    s1.add_argument("--pivot-method", choices=PIVOT_METHODS, help="how the pivotal token is found")
    s1.add_argument("--branching", choices=BRANCHINGS,
                    help="fast: pruned batched search (same pivots); reference: the literal per-position loop")
    s1.add_argument("--pivot-source", choices=PIVOT_SOURCES,
                    help="stage 3's pivots: paper (sampled flipped traces), fork (greedy-path forks), both")
    s1.add_argument("--pivot-filter", choices=PIVOT_FILTERS,
                    help="not_argmax: drop pivots whose desired token is already the base model's argmax")
    s1.add_argument("--fork-p-min", type=finite_float, metavar="P",
                    help="greedy-path forks: least probability of the alternative token")
    s1.add_argument("--fork-max", type=cli_int, metavar="N", help="greedy-path forks: candidate positions per problem")
    s1.add_argument("--val-from-train", type=cli_int, metavar="N",
                    help="validation also takes N training-split problems stage 1 did not use")
    s1.add_argument("--no-diagnostics", action="store_true",
                    help="skip diagnostics.json (pivot table, gradient alignment, transfer, gold alignment)")
    s2 = p.add_argument_group("stage 2")
    s2.add_argument("--dcm-lambda", type=finite_float, help="DCM L1 weight (paper 0.01)")
    s2.add_argument("--dcm-epochs", type=cli_int, help="DCM epochs (paper 50)")
    s2.add_argument("--dcm-mode", choices=["last", "full"],
                    help="last: prefix K/V computed once and kept for the whole run, only the last token re-run; "
                         "full: the reference (no prefix cache)")
    s3 = p.add_argument_group("stage 3")
    s3.add_argument("--optimizer", choices=["sgd", "adamw"], help="paper: sgd")
    s3.add_argument("--lr", type=finite_float, help="learning rate (paper 1e-4)")
    s3.add_argument("--update-steps", type=cli_int, help="optimizer steps (paper 50)")
    s3.add_argument("--eval-every", type=cli_int, metavar="N", help="validation every N steps after the early steps")
    s3.add_argument("--eval-every-early", type=cli_int, metavar="N",
                    help="validation every N steps during the first --early-steps steps")
    s3.add_argument("--early-steps", type=cli_int, metavar="N", help="how many steps count as early")
    s3.add_argument("--update-mode", choices=["sparse", "reference"],
                    help="sparse: row-selective gradients + row-sparse step; reference: dense gradients")
    s3.add_argument("--objective", choices=OBJECTIVES,
                    help="logit_diff (paper), hinge (capped margin), gold_nll (gold solutions on the selected rows)")
    s3.add_argument("--margin", type=finite_float, help="hinge: the logit difference above which a pivot stops pulling")
    s3.add_argument("--retain-weight", type=finite_float,
                    help="weight of the KL to the base model on the pivots' other trace tokens (0 = none)")


#: the pipeline flags of :func:`add_run_args` -> :class:`RunConfig` fields (``cca run`` and ``cca study``)
RUN_FLAGS: list[FieldFlag] = [
    *(FieldFlag(name, name) for name in ("model", "dtype", "device", "attn_implementation", "data",
                                         "extra_train_data", "extra_test_data", "n_per_template", "seed", "weak_threshold", "procedure",
                                         "pivot_method", "branching", "pivot_source", "pivot_filter",
                                         "val_from_train")),
    *(FieldFlag(name, name, zero_is_none, none_is_zero)
      for name in ("max_train_problems", "max_val_problems", "max_test_problems", "extra_train_max",
                   "extra_test_max")),
    FieldFlag("skip_bad_templates", "skip_bad_templates"),
    FieldFlag("non_integer_answers", "integer_answers", to_field=lambda v: not v, to_flag=lambda v: not v),
    FieldFlag("shots", "prompt.exemplars"),
    FieldFlag("n_shots", "prompt.n_shots"),
    FieldFlag("prompt_mode", "prompt.mode"),
    FieldFlag("batch_size", "generation.batch_size"),
    FieldFlag("slots", "generation.slots"),
    FieldFlag("max_new_tokens", "generation.max_new_tokens"),
    FieldFlag("generation_dtype", "generation.compute_dtype"),
    FieldFlag("k", "trace.k"),
    FieldFlag("dcm_lambda", "dcm.lambda_l1"),
    FieldFlag("dcm_epochs", "dcm.epochs"),
    # "last" keeps each batch's prefix K/V for the whole run (memory for speed; exact); "full" has none
    FieldFlag("dcm_mode", "dcm.mode", also=lambda mode: {"dcm.reuse_prefix_cache": mode == "last"}),
    FieldFlag("optimizer", "update.optimizer"),
    FieldFlag("lr", "update.lr"),
    FieldFlag("update_steps", "update.max_steps"),
    FieldFlag("eval_every", "update.eval_every"),
    FieldFlag("eval_every_early", "update.eval_every_early"),
    FieldFlag("early_steps", "update.early_steps"),
    FieldFlag("update_mode", "update.mode"),
    FieldFlag("objective", "update.objective"),
    FieldFlag("margin", "update.margin"),
    FieldFlag("retain_weight", "update.retain_weight"),
    FieldFlag("fork_p_min", "fork.p_min"),
    FieldFlag("fork_max", "fork.max_forks"),
    FieldFlag("no_diagnostics", "diagnostics", to_field=lambda v: not v, to_flag=lambda v: not v),
]
#: the flags only ``cca run`` has (a study sets the selection per condition)
RUN_ONLY_FLAGS: list[FieldFlag] = [FieldFlag(name, name) for name in
                                   ("selector", "select_k", "select_fraction", "select_count", "select_per_kind",
                                    "select_anti", "output")]


def config_from_args(args: argparse.Namespace):
    """The :class:`RunConfig` of ``cca run``'s flags: the ``--recipe``'s configuration (default
    :data:`~cca_fast.experiments.recipes.DEFAULT_RECIPE`) with the given flags' fields set."""
    from cca_fast.experiments.recipes import DEFAULT_RECIPE, recipe_config

    return recipe_config(getattr(args, "recipe", None) or DEFAULT_RECIPE,
                         overrides_from_args(args, RUN_FLAGS + RUN_ONLY_FLAGS))


def run(args: argparse.Namespace) -> int:
    """Execute ``cca run`` (under ``torchrun``: stage 1 shared out across the ranks, rank 0 prints
    the summary); returns the exit status."""
    from cca_fast.distributed import shutdown
    from cca_fast.experiments.pipeline import run_cca

    try:
        report = run_cca(config_from_args(args), until=args.until, progress=not args.quiet)
    finally:
        shutdown()
    if report is not None:
        keys = ("base_accuracy", "cca_accuracy", "n_test", "components_selected", "components_total", "fraction")
        print(json.dumps({k: report[k] for k in keys}))
    return 0
