"""The ``cca`` command line.

Each subcommand lives in its own module ``cca_fast.cli.common.<name>`` exposing
``register(subparsers)``, which adds its parser (created through ``subparsers.add_parser``) and
sets ``func=<callable(args) -> int>`` as a default. ``COMMANDS`` lists the modules in the order
``cca --help`` shows them.

Errors: a :class:`~cca_fast.errors.CCAError` (a user mistake: missing file, bad option value...)
or a :class:`~cca_fast.errors.KernelError` (a kernel refusing its input or backend) prints
``error: <message>`` on stderr and exits with status 2, without a traceback; ``--debug`` (before
or after the subcommand) shows the traceback instead. Argument errors also exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from cca_fast.version import __version__
from cca_fast.errors import USER_ERRORS

COMMANDS = ["eval", "run", "study", "apply", "suites", "attribute"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults (except ``None`` and off flags, whose help says what happens) and keeps the
    description's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """Parser class of every subcommand: defaults shown in ``--help``, and a ``--debug`` flag
    (so ``cca eval --debug`` works as well as ``cca --debug eval``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show full tracebacks on errors (default: off)")


def build_parser(commands: Sequence[str] = tuple(COMMANDS)) -> argparse.ArgumentParser:
    """The ``cca`` parser with every subcommand of ``commands`` registered."""
    parser = argparse.ArgumentParser(
        prog="cca",
        description="Constructive Circuit Amplification (arXiv 2512.16914): find the pivotal tokens of a "
                    "model's math reasoning, localise the components that decide them, and update only "
                    "those components.",
        epilog="Run `cca COMMAND --help` for the options of each command.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cca_fast {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors (default: off)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name in commands:
        module = importlib.import_module(f"cca_fast.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cca`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        from cca_fast.io import DISK_FULL, disk_full_error

        if args.debug or e.errno not in DISK_FULL:
            raise
        print(f"error: {disk_full_error(e, f'cca {args.command}', 'run the same command again')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130

