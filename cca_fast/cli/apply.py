"""``cca apply DELTA [--model M] [--merge OUT] [--revert-check]``: check, apply, merge a sparse delta.

Loads the model (default: the delta's recorded base model, in the delta's dtype), applies the
delta (refusing, with a one-line error, a model it was not made for), prints a JSON summary,
optionally checks that reverting restores every parameter bit for bit, and optionally writes the
merged model (``save_pretrained``, plus the tokenizer) to ``OUT``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cca_fast.errors import USER_ERRORS, CCAError

NAME = "apply"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``apply`` subcommand to ``subparsers``; it runs :func:`run`."""
    p = subparsers.add_parser(
        NAME,
        help="apply a sparse delta to a model (verify, merge, revert-check)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    p.add_argument("delta", metavar="DELTA", help="delta directory (delta_config.json + delta.safetensors)")
    p.add_argument("--model", default=None,
                   help="base model: hub id, local directory, .gguf file or 'default'; "
                        "default: the base model recorded in the delta")
    p.add_argument("--merge", metavar="OUT", default=None,
                   help="write the merged model (save_pretrained + tokenizer) to this new directory")
    p.add_argument("--revert-check", action="store_true",
                   help="after applying, revert and check every parameter is bit-identical to the base, then re-apply")
    p.add_argument("--dtype", default=None, help="model dtype; default: the dtype the delta was made in")
    p.add_argument("--device", default=None, help="device; default: CUDA when available, else CPU")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the base-row hash check (shapes and dtypes are still checked)")
    p.add_argument("--overwrite", action="store_true", help="allow --merge into a non-empty directory")
    p.set_defaults(func=run)
    return p


def _base_name(meta: dict[str, Any]) -> str | None:
    """The base model the delta records (a local path, else its name), or ``None``."""
    base = meta.get("base_model") or {}
    src = base.get("source") or {}
    return (src.get("path") if src.get("kind") == "local" else None) or src.get("name") or base.get("name_or_path")


def _load(args: argparse.Namespace, meta: dict[str, Any]):
    from cca_fast.models.loading import load_model

    name = args.model or _base_name(meta)
    if not name:
        raise CCAError("the delta does not record its base model; pass --model")
    return load_model(name, dtype=args.dtype or meta.get("dtype") or None, device=args.device)


def run(args: argparse.Namespace) -> int:
    """Execute ``cca apply``; prints one JSON object to stdout; returns the exit status."""
    from cca_fast.delta import SparseDelta, apply_delta, bitwise_equal, merge_delta, revert_delta

    delta = SparseDelta.load(args.delta)
    if args.merge is not None:  # before the model is loaded; never onto an input (the delta, the model)
        from cca_fast.delta import check_merge_target
        from cca_fast.models.loading import local_model_path

        check_merge_target(args.merge, overwrite=args.overwrite,
                           inputs=[args.delta, local_model_path(args.model or _base_name(delta.meta))])
    model, tokenizer = _load(args, delta.meta)
    verify = not args.no_verify
    report: dict[str, Any] = {"delta": str(args.delta), "model": getattr(model.config, "_name_or_path", ""),
                              **delta.summary()}
    if not delta.params:
        report["note"] = "empty delta: the run kept the base weights, applying it changes nothing"
    if args.revert_check:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        handle = apply_delta(model, delta, verify=verify)
        changed = sorted(n for n, p in model.named_parameters() if not bitwise_equal(p, before[n]))
        outside = sorted(set(changed) - set(delta.params))
        revert_delta(model, handle)
        diff = sorted(n for n, p in model.named_parameters() if not bitwise_equal(p, before[n]))
        report["revert_check"] = {"params_changed_by_apply": len(changed), "changed_outside_delta": outside,
                                  "params_differing_after_revert": diff, "ok": not outside and not diff}
        del before
        if outside or diff:
            print(json.dumps(report, indent=1))
            raise CCAError(f"revert check failed: {len(diff)} parameters differ from the base after reverting"
                           + (f", apply changed parameters outside the delta: {outside[:3]}" if outside else ""))
    if args.merge is not None:
        out = merge_delta(model, delta, args.merge, tokenizer=tokenizer, verify=verify, overwrite=args.overwrite)
        report["merged_to"] = str(out)
    else:
        apply_delta(model, delta, verify=verify)
        report["applied"] = True
    print(json.dumps(report, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m cca_fast.cli.apply``); ``cca apply`` is the usual way."""
    parser = argparse.ArgumentParser(prog="cca")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
