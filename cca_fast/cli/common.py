"""Subcommands of the ``cca`` command line, one module each.

A command module exposes ``register(subparsers)``: it calls ``subparsers.add_parser(name,
help=..., description=...)`` (the parser class already shows defaults and adds ``--debug``),
adds its arguments (every one with a ``help``), and sets ``func=run`` where ``run(args) -> int``.

The helpers below give commands the same flags for the same things (model, data, prompt,
decoding) and turn them into library calls. Commands that build a configuration dataclass
(``cca run``, ``cca study``) only map flags to its fields (:class:`FieldFlag`): a flag not given
leaves the field at the dataclass's default, which is also what ``--help`` shows
(:func:`bind_flags`), so every default is written once, in the dataclass.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from cca_fast import checks
from cca_fast.checks import cli_int
from cca_fast.errors import CCAError

SPLITS = ("test", "train", "val", "all")
PROMPT_MODES = ("plain", "chat")
ATTN_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model --dtype --device --attn-implementation``."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="M",
                   help="hub id, local directory (save_pretrained), or .gguf file; default: the embedded "
                        "SmolLM2-135M-Instruct")
    g.add_argument("--dtype", default=None, metavar="DTYPE",
                   help="float32 | bfloat16 | float16 | float64; default: float32 on CPU, bfloat16 on GPU")
    g.add_argument("--device", default=None, metavar="DEV",
                   help="cpu | cuda | cuda:N | mps ...; default: cuda when available, else cpu")
    g.add_argument("--attn-implementation", default="auto", choices=ATTN_CHOICES,
                   help="attention implementation passed to transformers; auto: flash_attention_2 when "
                        "flash-attn is installed on CUDA with float16/bfloat16, else sdpa")


def add_data_args(parser: argparse.ArgumentParser, *, default_split: str = "test") -> None:
    """``--data --split --limit --seed --n-per-template --hub-split``."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="D",
                   help="built-in templates (default), a template directory or .json, a .jsonl file "
                        "(GSM8K format or cca_fast's), a .csv/.parquet file, or a hub name "
                        "(openai/gsm8k, apple/GSM-Symbolic, hf:NAME[:CONFIG])")
    g.add_argument("--split", default=default_split, choices=SPLITS,
                   help="which part of the per-template 52/8/40 train/val/test split to use (docs/method.md "
                        "section 0), or all problems")
    g.add_argument("--limit", type=cli_int, default=None, metavar="N",
                   help="use at most N problems of the split, taken round-robin over templates; default: all")
    g.add_argument("--seed", type=cli_int, default=0, metavar="S",
                   help="seed of template instantiation, of the split and of sampling")
    g.add_argument("--n-per-template", type=cli_int, default=50, metavar="N",
                   help="instances generated per template (template sources only)")
    g.add_argument("--hub-split", default="test", metavar="NAME",
                   help="split of a hub data set to download (e.g. openai/gsm8k's 'test')")
    g.add_argument("--skip-bad-templates", action="store_true",
                   help="template folders: leave out templates that cannot be parsed or "
                        "instantiated (each reported on stderr with its reason) instead of stopping "
                        "at the first")
    g.add_argument("--non-integer-answers", action="store_true",
                   help="templates: also accept instances whose #answer is not an integer (GSM8K "
                        "answers are integers, so by default such draws are rejected)")


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    """``--shots --n-shots --prompt-mode``."""
    g = parser.add_argument_group("prompt")
    g.add_argument("--shots", default=None, metavar="FILE",
                   help="few-shot exemplars, a JSON list of {question, target}; default: cca_fast's own 8 "
                        "(the paper's are the standard GSM8K CoT exemplars, e.g. gsm8k_cot_8shot.json)")
    g.add_argument("--n-shots", type=cli_int, default=8, metavar="K", help="number of exemplars in the prompt")
    g.add_argument("--prompt-mode", default="plain", choices=PROMPT_MODES,
                   help="plain text prompt (paper default) or the tokenizer's chat template")


def add_generation_args(parser: argparse.ArgumentParser, *, max_new_tokens: int = 400) -> None:
    """``--batch-size --slots --max-new-tokens --generation-dtype``."""
    g = parser.add_argument_group("decoding")
    g.add_argument("--batch-size", type=cli_int, default=8, metavar="B",
                   help="sequences decoded together by the padded-batch decoder (and the attribution batch)")
    g.add_argument("--slots", type=cli_int, default=128, metavar="S",
                   help="sequences the slot decoder decodes together (continuous batching, the shared "
                        "exemplars stored once)")
    g.add_argument("--max-new-tokens", type=cli_int, default=max_new_tokens, metavar="N",
                   help="new tokens per answer at most (the paper uses 1500: pass --max-new-tokens 1500 "
                        "for fidelity; the default suits CPU runs and GSM-style answers)")
    g.add_argument("--generation-dtype", default="float32", metavar="DTYPE",
                   help="float32 (default: the model's own dtype) or bfloat16 (opt-in: generation's matrix "
                        "products in bf16 under autocast, not token-identical to float32: on the default model ~1.3x "
                        "faster and 1.8 points less accurate, bench/generation/results/bf16_accuracy.md; "
                        "training and attribution are not affected)")


def load_model_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from the model flags."""
    from cca_fast.models.loading import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device,
                      attn_implementation=args.attn_implementation)


def round_robin(problems: list, limit: int | None) -> list:
    """At most ``limit`` problems, interleaving templates (1st of each template, then 2nd, ...)
    so that a small limit still covers many templates; order within a template is kept."""
    if limit is None or limit >= len(problems):
        return list(problems)
    groups: dict[str, list] = {}
    for p in problems:
        groups.setdefault(p.template, []).append(p)
    out: list = []
    depth = 0
    while len(out) < limit:
        for g in groups.values():
            if depth < len(g):
                out.append(g[depth])
                if len(out) == limit:
                    break
        depth += 1
    return out


def load_problems_from_args(args: argparse.Namespace) -> list:
    """The problems of ``args.split`` of ``args.data`` (see :func:`add_data_args`)."""
    from cca_fast import data

    import sys

    checks.positive("--n-per-template", args.n_per_template)
    checks.positive("--limit", args.limit, allow_none=True)
    checks.seed("--seed", args.seed, flag=None)
    skipped: list[str] = []

    def report(where: str, reason: str) -> None:
        skipped.append(where)
        print(f"cca: skipped bad template {where}: {reason}", file=sys.stderr)

    config = data.InstantiateConfig(integer_answers=not getattr(args, "non_integer_answers", False))
    problems = data.load_problems(args.data, n_per_template=args.n_per_template, seed=args.seed,
                                  split=args.hub_split, instantiate_config=config,
                                  skip_bad_templates=getattr(args, "skip_bad_templates", False),
                                  on_skip=report)
    if skipped:
        print(f"cca: skipped {len(skipped)} bad template(s) of {args.data}; loaded the rest",
              file=sys.stderr)
    if args.split != "all":
        splits = data.split_problems(problems, seed=args.seed)
        problems = list(getattr(splits, args.split))
    if not problems:
        raise CCAError(f"the {args.split!r} split of {args.data or 'the built-in data'} is empty; "
                       "use more problems or --split all")
    return round_robin(problems, args.limit)


# ---- flags -> configuration fields ------------------------------------------------------------------
def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class FieldFlag:
    """How one command-line flag sets configuration fields.

    Attributes:
        dest: the argparse destination (``dcm_epochs`` for ``--dcm-epochs``).
        path: the dotted field path it sets (``dcm.epochs``; ``run.dcm.epochs`` in a study).
        to_field: flag value -> field value (e.g. ``0`` -> ``None`` for "0 = all").
        to_flag: field value -> flag value, for the default shown in ``--help``.
        also: flag value -> ``{path: value}`` of further fields the same flag sets.
    """

    dest: str
    path: str
    to_field: Callable[[Any], Any] = _same
    to_flag: Callable[[Any], Any] = _same
    also: Callable[[Any], dict[str, Any]] | None = None

    def under(self, prefix: str) -> "FieldFlag":
        """The same flag setting fields of a configuration nested at ``prefix`` (``"run"``)."""
        also = self.also
        return FieldFlag(self.dest, f"{prefix}.{self.path}", self.to_field, self.to_flag,
                         None if also is None else (lambda v: {f"{prefix}.{k}": x for k, x in also(v).items()}))


def get_path(obj: Any, path: str) -> Any:
    """The value of the dotted field ``path`` of ``obj``."""
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def bind_flags(parser: argparse.ArgumentParser, flags: Sequence[FieldFlag], base: Any) -> None:
    """Make the arguments of ``flags`` (already added to ``parser``) leave their fields alone when
    not given (``argparse.SUPPRESS``), and append the default read from ``base`` (the
    configuration a command starts from) to their help."""
    by_dest = {f.dest: f for f in flags}
    missing = set(by_dest) - {a.dest for a in parser._actions}
    if missing:
        raise ValueError(f"flags without an argument: {sorted(missing)}")
    for action in parser._actions:
        flag = by_dest.get(action.dest)
        if flag is None:
            continue
        action.default = argparse.SUPPRESS
        shown = flag.to_flag(get_path(base, flag.path))
        if shown is not None and shown is not False:
            if isinstance(shown, (list, tuple)):
                shown = ",".join(map(str, shown))
            action.help = f"{action.help} (default: {shown})"


def overrides_from_args(args: argparse.Namespace, flags: Sequence[FieldFlag]) -> dict[str, Any]:
    """The nested dict of the fields set by the flags given in ``args`` (for ``from_dict``)."""
    given = vars(args)
    out: dict[str, Any] = {}
    for flag in flags:
        if flag.dest not in given:
            continue
        value = given[flag.dest]
        fields = {flag.path: flag.to_field(value), **(flag.also(value) if flag.also else {})}
        for path, v in fields.items():
            *parents, leaf = path.split(".")
            node = out
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = v
    return out


def zero_is_none(value: int | None) -> int | None:
    """``0`` on the command line means "no cap" (``None``)."""
    return value or None


def none_is_zero(value: int | None) -> int | None:
    return 0 if value is None else value
