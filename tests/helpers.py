"""Checks and drivers shared by several test modules."""
from __future__ import annotations

import argparse
from types import ModuleType

import torch

from cca_fast.delta import bitwise_equal


def run_cli(command: ModuleType, argv: list[str]) -> int:
    """Run one ``cca`` subcommand module (``cca_fast.cli.common.<name>``) on ``argv``."""
    parser = argparse.ArgumentParser(prog="cca")
    command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def assert_only_owned_rows_may_differ(params: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                                      owned: dict) -> None:
    """Every parameter not in ``owned`` (``ComponentSpace.owned_rows``) and every row of an owned
    parameter outside its selected rows is bit-identical to ``base``."""
    for name, p in params.items():
        p = p.detach()
        if name not in owned:
            assert bitwise_equal(p, base[name]), f"{name} changed"
            continue
        s = owned[name]
        keep = torch.ones(p.shape[s.dim], dtype=torch.bool)
        keep[s.index.cpu()] = False
        other = keep.nonzero().flatten().to(p.device)
        assert bitwise_equal(p.index_select(s.dim, other), base[name].index_select(s.dim, other)), name
