"""``cca study``: base vs CCA (each selector) vs the random control vs the no-mask update vs LoRA,
with side effects and bootstrap intervals, in one resumable command."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from cca_fast.checks import cli_int, finite_float
from cca_fast.cli.common import FieldFlag, bind_flags, none_is_zero, overrides_from_args
from cca_fast.cli.run import RUN_FLAGS, add_run_args
from cca_fast.errors import CCAError
from cca_fast.experiments.recipes import study_variants

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
    from cca_fast.experiments.study import StudyConfig

    p = subparsers.add_parser("study", help="CCA vs base, random control, no-mask and LoRA, with side effects",
                              description=DESCRIPTION)
    add_run_args(p)  # their defaults: StudyConfig().run, study-size (experiments.study.study_run_defaults)
    g = p.add_argument_group("conditions")
    g.add_argument("--selectors", metavar="LIST", help="comma-separated CCA selectors: dcm, atp-fraction, atp-topk")
    g.add_argument("--select-fraction", type=finite_float, metavar="F", help="fraction for atp-fraction")
    g.add_argument("--select-k", type=cli_int, metavar="K", help="k for atp-topk")
    g.add_argument("--controls", metavar="LIST",
                   help="comma-separated controls and baselines: random, none, lora (empty: none of them)")
    g.add_argument("--random-like", metavar="SEL",
                   help="the random control selects as many components as this selector did")
    g.add_argument("--variants", metavar="LIST",
                   help="comma-separated recipes (cca_fast.experiments.recipes) run as further conditions; "
                        "NAME:random adds its random control, NAME:none its update on every weight")
    g.add_argument("--random-seeds", type=cli_int, metavar="N",
                   help="draws of each random variant (a distribution: the selector is compared with their pool)")
    lg = p.add_argument_group("LoRA baseline")
    lg.add_argument("--lora-r", type=cli_int, help="LoRA rank (paper 16)")
    lg.add_argument("--lora-alpha", type=finite_float, help="LoRA alpha (paper 32)")
    lg.add_argument("--lora-lr", type=finite_float, help="LoRA learning rate (AdamW)")
    lg.add_argument("--lora-epochs", type=cli_int, help="LoRA epochs at most (best by validation)")
    sg = p.add_argument_group("side effects")
    sg.add_argument("--side-data", metavar="DIR",
                    help="folder holding mmlu/, truthfulqa/ and gsm8k/ (default: $CCA_SHARED_DATA, else ../shared/data)")
    sg.add_argument("--mmlu-limit", type=cli_int, metavar="N",
                    help="MMLU test questions, stratified by subject (0 = all 14042)")
    sg.add_argument("--truthfulqa-limit", type=cli_int, metavar="N", help="TruthfulQA questions (0 = all 817)")
    sg.add_argument("--ppl-limit", type=cli_int, metavar="N", help="GSM8K test solutions for perplexity (0 = all)")
    sg.add_argument("--no-side-effects", action="store_true", help="skip the side-effect suites")
    o = p.add_argument_group("output")
    o.add_argument("--bootstrap", type=cli_int, metavar="B", help="bootstrap resamples")
    o.add_argument("--output", metavar="DIR", help="study directory (resumable)")
    o.add_argument("--threads", type=cli_int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    bind_flags(p, STUDY_FLAGS, StudyConfig())
    p.set_defaults(func=run)


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _abs_if_path(value: str | None) -> str | None:
    """Local paths are stored absolute, so that a study resumes from any working directory."""
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() else value


def _limit(flag: str) -> Callable[[int], int | None]:
    def to_field(value: int) -> int | None:
        if value < 0:
            raise CCAError(f"{flag} must be >= 0 (0 = the whole set)")
        return value or None
    return to_field


def _run_flag(flag: FieldFlag) -> FieldFlag:
    """A pipeline flag of the study's shared RunConfig (local paths made absolute)."""
    if flag.dest in ("model", "data", "shots"):
        flag = FieldFlag(flag.dest, flag.path, _abs_if_path, flag.to_flag, flag.also)
    return flag.under("run")


#: ``cca study``'s flags -> :class:`~cca_fast.experiments.study.StudyConfig` fields
STUDY_FLAGS: list[FieldFlag] = [
    *(_run_flag(f) for f in RUN_FLAGS),
    FieldFlag("selectors", "selectors", _list),
    FieldFlag("controls", "controls", _list),
    FieldFlag("variants", "variants", lambda text: study_variants(_list(text)), lambda v: ",".join(v) or None),
    *(FieldFlag(name, name) for name in ("select_fraction", "select_k", "random_like", "bootstrap", "output",
                                                 "random_seeds")),
    FieldFlag("lora_r", "lora.r"),
    FieldFlag("lora_alpha", "lora.alpha"),
    FieldFlag("lora_lr", "lora.lr"),
    FieldFlag("lora_epochs", "lora.epochs"),
    FieldFlag("side_data", "suites.data_root", _abs_if_path),
    *(FieldFlag(f"{s}_limit", f"suites.{s}_limit", _limit(f"--{s}-limit"), none_is_zero)
      for s in ("mmlu", "truthfulqa", "ppl")),
    FieldFlag("no_side_effects", "side_effects", lambda skip: not skip, lambda run: not run),
]


def study_config_from_args(args: argparse.Namespace):
    """The :class:`StudyConfig` of ``cca study``'s flags: ``StudyConfig()`` with the given flags' fields set."""
    from cca_fast.experiments.study import StudyConfig

    return StudyConfig.from_dict(overrides_from_args(args, STUDY_FLAGS))


def run(args: argparse.Namespace) -> int:
    import os

    from cca_fast.experiments.study import run_study

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CCAError("cca study runs as one process (under torchrun only `cca run` shares out its stage 1 and "
                       "`cca attribute` its chunks): run it without torchrun")
    if args.threads is not None:
        import torch

        from cca_fast import checks

        checks.positive("--threads", args.threads, hint="the number of CPU threads torch uses, e.g. 2")

        torch.set_num_threads(args.threads)
    study = run_study(study_config_from_args(args), progress=not args.quiet)
    for v in study["verdicts"]:
        print(v)
    print(json.dumps({r["condition"]: round(r["test_accuracy"]["value"], 4) for r in study["rows"]}))
    return 0
