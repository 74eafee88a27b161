"""``cca study``: base vs CCA (each selector) vs the random control vs the no-mask update vs LoRA,
with side effects and bootstrap intervals, in one resumable command."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cca_fast.cli.common import check_positive
from cca_fast.cli.run import add_run_args, config_from_args

DESCRIPTION = """\
Does CCA work on this model? On the same seeded splits, with the same training examples:

  base           the model as loaded
  CCA            one condition per --selectors entry (dcm, atp-fraction, atp-topk)
  random         the control: as many random components as --random-like's selection
  none           the no-mask update: the same update on every weight
  lora           LoRA (r=16, alpha=32, peft) on the gold solutions of the same training problems

Each is selected on the validation split (best update step / epoch) and scored on the test split:
accuracy with a 95% stratified bootstrap interval, paired differences to the base and to the
random control, components and parameters changed, and side effects before vs after: MMLU 5-shot,
TruthfulQA MC1 and the perplexity of held-out GSM8K solutions (local files, see --side-data).

Writes OUTPUT/study.md, study.json and study.png; every condition's `cca run` directory is kept
under OUTPUT. Run the same command again to resume after an interruption.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("study", help="CCA vs base, random control, no-mask and LoRA, with side effects",
                              description=DESCRIPTION)
    add_run_args(p)
    # study-size defaults: at least 200 test problems on the built-in data (34 templates x 6);
    # stage-2/3 settings chosen for SmolLM2-135M without looking at test problems (README, "The study"):
    # lr from the training-set gradient (the paper's 1e-4 moves the training logit difference by
    # 0.003 per step), the step by validation accuracy; 100 DCM epochs so that masks can cross 0.5
    p.set_defaults(n_per_template=15, max_train_problems=48, max_val_problems=0, batch_size=16,
                   lr=1e-3, update_steps=10, dcm_epochs=100)
    g = p.add_argument_group("conditions")
    g.add_argument("--selectors", default="dcm,atp-fraction", metavar="LIST",
                   help="comma-separated CCA selectors: dcm, atp-fraction, atp-topk")
    g.add_argument("--select-fraction", type=float, default=0.02, metavar="F", help="fraction for atp-fraction")
    g.add_argument("--select-k", type=int, default=None, metavar="K", help="k for atp-topk")
    g.add_argument("--controls", default="random,none,lora", metavar="LIST",
                   help="comma-separated controls and baselines: random, none, lora (empty: none of them)")
    g.add_argument("--random-like", default="atp-fraction", metavar="SEL",
                   help="the random control selects as many components as this selector did")
    lg = p.add_argument_group("LoRA baseline")
    lg.add_argument("--lora-r", type=int, default=16, help="LoRA rank (paper 16)")
    lg.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha (paper 32)")
    lg.add_argument("--lora-lr", type=float, default=2e-4, help="LoRA learning rate (AdamW)")
    lg.add_argument("--lora-epochs", type=int, default=3, help="LoRA epochs at most (best by validation)")
    sg = p.add_argument_group("side effects")
    sg.add_argument("--side-data", default=None, metavar="DIR",
                    help="folder holding mmlu/, truthfulqa/ and gsm8k/ (default: $CCA_SHARED_DATA, else ../shared/data)")
    sg.add_argument("--mmlu-limit", type=int, default=114, metavar="N",
                    help="MMLU test questions, stratified by subject (0 = all 14042)")
    sg.add_argument("--truthfulqa-limit", type=int, default=100, metavar="N", help="TruthfulQA questions (0 = all 817)")
    sg.add_argument("--ppl-limit", type=int, default=50, metavar="N", help="GSM8K test solutions for perplexity (0 = all)")
    sg.add_argument("--no-side-effects", action="store_true", help="skip the side-effect suites")
    o = p.add_argument_group("output")
    o.add_argument("--bootstrap", type=int, default=10_000, metavar="B", help="bootstrap resamples")
    o.add_argument("--output", default="runs/study", metavar="DIR", help="study directory (resumable)")
    o.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _abs_if_path(value: str | None) -> str | None:
    """Local paths are stored absolute, so that a study resumes from any working directory."""
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() else value


def study_config_from_args(args: argparse.Namespace):
    from cca_fast.experiments.study import StudyConfig

    from cca_fast.errors import CCAError

    for name in ("mmlu_limit", "truthfulqa_limit", "ppl_limit"):
        if getattr(args, name) < 0:
            raise CCAError(f"--{name.replace('_', '-')} must be >= 0 (0 = the whole set)")
    check_positive("--bootstrap", args.bootstrap)
    run = config_from_args(args)
    run.data, run.shots, run.model = _abs_if_path(run.data), _abs_if_path(run.shots), _abs_if_path(run.model)
    suites = {"mmlu_limit": args.mmlu_limit or None, "truthfulqa_limit": args.truthfulqa_limit or None,
              "ppl_limit": args.ppl_limit or None}
    if args.side_data:
        suites["data_root"] = _abs_if_path(args.side_data)
    return StudyConfig(output=args.output, run=run, selectors=_list(args.selectors),
                       select_fraction=args.select_fraction, select_k=args.select_k, controls=_list(args.controls),
                       random_like=args.random_like,
                       lora={"r": args.lora_r, "alpha": args.lora_alpha, "lr": args.lora_lr, "epochs": args.lora_epochs},
                       side_effects=not args.no_side_effects, suites=suites, bootstrap=args.bootstrap)


def run(args: argparse.Namespace) -> int:
    from cca_fast.experiments.study import run_study

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    study = run_study(study_config_from_args(args), progress=not args.quiet)
    for v in study["verdicts"]:
        print(v)
    print(json.dumps({r["condition"]: round(r["test_accuracy"]["value"], 4) for r in study["rows"]}))
    return 0
