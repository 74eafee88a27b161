"""``torch.distributed`` for ``cca attribute`` and ``cca run``: ranks, ownership, sums, gathers.

Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) :func:`init_from_env` starts a process
group (``nccl`` when CUDA is available, else ``gloo``). Work is split into *units* (a chunk of
dataset attribution, a generation batch or a problem of ``cca run``'s stage 1): rank ``r`` owns
the units ``i`` with ``i % world == r`` (:meth:`Dist.owns`). Dataset attribution all-reduces its
sums (:meth:`Dist.all_reduce_`); stage 1 computes its units with :func:`sharded`, which hands
every rank every unit's result in unit order, one round of ``world`` units at a time, so rank 0
can append them to the run's files exactly as one process would. Outside ``torchrun`` everything
is one rank and every call here is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from cca_fast.errors import CCAError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Dist:
    """``rank`` of ``world`` processes (``world == 1``: no process group)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, unit: int) -> bool:
        """Whether this rank computes unit (chunk, batch, problem) number ``unit``."""
        return unit % self.world == self.rank

    def _comm_device(self) -> torch.device:
        import torch.distributed as dist  # noqa: PLC0415

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks (in place, returned); the tensor may be on any device."""
        if self.world == 1:
            return t
        import torch.distributed as dist  # noqa: PLC0415

        dev = self._comm_device()
        buf = t if t.device == dev else t.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf.to(t.device))
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist  # noqa: PLC0415

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank (the argument of other ranks is ignored)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist  # noqa: PLC0415

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def leave(self) -> None:
        """Leave the process group together with every other rank (each must call it at the same
        point): a barrier, so that no rank closes its connections while another may still be
        exchanging data with it, then the group is destroyed (:func:`shutdown`). No-op on one rank.
        ``cca run`` calls it where stage 1 ends, so no group outlives the collectives (rank 0 then
        runs stages 2 and 3 alone, as one process)."""
        if self.world > 1:
            self.barrier()
            shutdown()

    def barrier(self) -> None:
        """Wait for every rank (no-op on one rank)."""
        if self.world > 1:
            import torch.distributed as dist  # noqa: PLC0415

            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()


def current() -> Dist:
    """The running process group's rank and size, or one rank."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


def init_from_env() -> Dist:
    """Start the process group when launched by ``torchrun`` with ``WORLD_SIZE > 1``
    (``nccl`` with CUDA, else ``gloo``; each rank on ``cuda:LOCAL_RANK``); else one rank."""
    import torch.distributed as dist  # noqa: PLC0415

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise CCAError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return current()


def rank_device(requested: str | None = None) -> str | None:
    """The device a rank loads its model on: ``cuda:LOCAL_RANK`` under ``torchrun`` with CUDA when
    ``requested`` is ``None`` or a bare ``"cuda"`` (each rank its own GPU), else ``requested``
    (``None``: the default device)."""
    if requested in (None, "cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return requested


def sharded(dist: Dist, units: Sequence[T], compute: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """``(unit, compute(unit))`` for every unit of ``units``, in order, on every rank.

    Rank ``r`` computes the units it owns (``i % world == r``); the units go in rounds of
    ``world`` (unit ``i`` in round ``i // world``), and each round's results are gathered to every
    rank before they are yielded. Each unit is computed exactly as one process computes it (same
    inputs, nothing shared between units), so the yielded sequence equals one process's; and a
    caller that writes each yielded result at once loses at most one round when interrupted.
    Every rank must call this with the same ``units`` (a collective per round).
    """
    for start in range(0, len(units), dist.world):
        mine = start + dist.rank
        result = compute(units[mine]) if mine < len(units) else None
        gathered = dist.all_gather_object(result) if dist.world > 1 else [result]
        for unit, res in zip(units[start : start + dist.world], gathered):
            yield unit, res


def shutdown() -> None:
    """Destroy the process group if one is running. Unreferenced collective work (and the tensors
    it holds) is collected first, while the interpreter is whole: freed during interpreter
    shutdown instead, gloo's worker threads would take the GIL of a finalising interpreter and
    abort the process ("terminate called without an active exception")."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        import gc  # noqa: PLC0415

        gc.collect()
        dist.destroy_process_group()
