"""``torch.distributed`` for dataset attribution: which rank owns which chunk, and sums.

Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) :func:`init_from_env` starts a process
group (``nccl`` when CUDA is available, else ``gloo``); every rank scores the chunks ``i`` with
``i % world == rank`` and the summed scores are all-reduced. Outside ``torchrun`` everything is
one rank and every call here is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from cca_fast.errors import CCAError


@dataclass(frozen=True)
class Dist:
    """``rank`` of ``world`` processes (``world == 1``: no process group)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, chunk: int) -> bool:
        """Whether this rank scores chunk ``chunk``."""
        return chunk % self.world == self.rank

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

    def barrier(self) -> None:
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


def rank_device() -> str | None:
    """``cuda:LOCAL_RANK`` under ``torchrun`` with CUDA, else ``None`` (the default device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None


def shutdown() -> None:
    """Destroy the process group if one is running."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
