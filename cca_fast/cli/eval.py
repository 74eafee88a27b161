"""``cca eval``: few-shot accuracy of a model on word problems (docs/method.md section 0)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cca_fast import checks
from cca_fast.cli.common import (add_data_args, add_generation_args, add_model_args, add_prompt_args,
               load_model_from_args, load_problems_from_args)
from cca_fast.models import runtime

DESCRIPTION = """\
Evaluate a model: build the 8-shot chain-of-thought prompt for each problem, decode greedily
until the answer sentence ("... answer is N."), EOS or a new "Q:", extract the answer as the
paper does and report accuracy per template, averaged over templates (docs/method.md section 0).

Writes OUTPUT/eval.json: accuracy, micro_accuracy, n, per_template, records (one per problem:
id, template, question, gold, output, prediction, correct, finish_reason, n_generated), config
and model. Paper fidelity: --max-new-tokens 1500 --shots gsm8k_cot_8shot.json.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="accuracy of a model on word problems", description=DESCRIPTION)
    add_model_args(p)
    add_data_args(p, default_split="test")
    add_prompt_args(p)
    add_generation_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--output", default="runs/eval", metavar="DIR", help="directory for eval.json")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cca_fast.evaluation.evaluate import evaluate
    from cca_fast.generation.decode import GenerationConfig, check_compute_dtype
    from cca_fast.evaluation.prompting import PromptConfig, paper_stops

    from cca_fast.io import check_writable_dir

    checks.positive("--batch-size", args.batch_size)
    checks.positive("--slots", args.slots)
    checks.positive("--max-new-tokens", args.max_new_tokens)
    check_compute_dtype("--generation-dtype", args.generation_dtype)
    from cca_fast.models.loading import check_model_name

    check_writable_dir(args.output, "--output")  # before the work whose results go there
    check_model_name(args.model)
    prompt = PromptConfig(mode=args.prompt_mode, exemplars=args.shots, n_shots=args.n_shots)
    prompt.shots()  # read and check the exemplar file before the (slow) model load
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, slots=args.slots,
                                  seed=args.seed, stops=paper_stops(), compute_dtype=args.generation_dtype)  # written into eval.json's meta as decoded
    problems = load_problems_from_args(args)
    model, tokenizer = load_model_from_args(args)
    result = evaluate(model, tokenizer, problems, prompt=prompt, generation=generation, progress=not args.quiet)

    source = getattr(model, "cca_source", None)
    result.meta["model"] = source.to_dict() if hasattr(source, "to_dict") else {"name": args.model or "default"}
    result.meta["config"] = {
        "command": "eval",
        "data": args.data, "split": args.split, "limit": args.limit, "seed": args.seed,
        "n_per_template": args.n_per_template, "hub_split": args.hub_split,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(runtime.input_device(model)), "attn_implementation": runtime.attention_backend(model),
    }  # the prompt and generation configs are saved by evaluate() as prompt_config / generation_config
    path = result.save(Path(args.output) / "eval.json")
    print(f"eval: {result.summary()} -> {path}")
    sys.stdout.flush()
    return 0
