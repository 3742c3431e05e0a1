"""Multi-process training through ``torchrun``: process group, device, batch slicing, rank-0 duties.

``torchrun --nproc_per_node N -m diffusionlab train CONFIG --out DIR`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; :meth:`Distributed.from_env` reads them and picks ``cuda:LOCAL_RANK`` on GPU machines, and
:meth:`Distributed.start` joins the process group (NCCL on GPU, gloo on CPU) -- only once the run's input has
been validated, so a user error is found by every rank alike before any rank waits for another, and printed once,
by rank 0 (:func:`quiet_rank`). Without those variables everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from diffusionlab.errors import DiffusionLabError
from diffusionlab.training.build import resolve_device


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device_name: str = "auto", start: bool = False) -> "Distributed":
        """The ranks of a ``torchrun`` job from its environment (world size 1 without one); the process group is
        joined by :meth:`start` (at once with ``start=True``)."""
        world, rank, local = env_ranks()
        if world <= 1:
            return cls(device=resolve_device(device_name))
        device = resolve_device(device_name)
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise DiffusionLabError(f"LOCAL_RANK {local} has no CUDA device: this machine has "
                                        f"{torch.cuda.device_count()}; start fewer processes per node")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        out = cls(rank=rank, world_size=world, local_rank=local, device=device)
        if start:
            out.start()
        return out

    def start(self) -> "Distributed":
        """Join the process group (a no-op for one process or when already joined)."""
        if self.world_size > 1 and not tdist.is_initialized():
            tdist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        return self

    def local_batch(self, global_batch: int) -> int:
        """Per-rank batch; the global batch must divide evenly so it stays exactly as configured."""
        if global_batch % self.world_size:
            raise DiffusionLabError(
                f"train.batch_size = {global_batch} does not divide by the {self.world_size} processes; "
                "the global batch is kept as configured, so choose a multiple"
            )
        return global_batch // self.world_size

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel around ``module`` when distributed, else ``module`` itself."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a scalar tensor over ranks (identity when not distributed)."""
        if not self.enabled:
            return value
        v = value.clone()
        tdist.all_reduce(v, op=tdist.ReduceOp.SUM)
        return v / self.world_size

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (every rank gets the same answer; ``flag`` itself for one process)."""
        if not self.enabled or not tdist.is_initialized():
            return bool(flag)
        v = torch.tensor([1.0 if flag else 0.0], device=self.device)
        tdist.all_reduce(v, op=tdist.ReduceOp.MAX)
        return bool(v.item() > 0)

    def barrier(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.barrier()


def _env_int(name: str, default: str) -> int:
    raw = os.environ.get(name, default)
    try:
        value = int(raw)
    except ValueError:
        raise DiffusionLabError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise DiffusionLabError(f"environment variable {name} must be >= 0, got {raw!r}")
    return value


def env_ranks() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from the ``torchrun`` environment (``(1, 0, 0)`` without one)."""
    world = _env_int("WORLD_SIZE", "1")
    if world <= 1:
        return 1, 0, 0
    rank, local = _env_int("RANK", "0"), _env_int("LOCAL_RANK", "0")
    if rank >= world:
        raise DiffusionLabError(f"RANK {rank} is not below WORLD_SIZE {world}")
    return world, rank, local


def quiet_rank() -> bool:
    """Whether this process is a rank other than 0 of a ``torchrun`` job: it does not print user errors, which
    every rank finds alike (rank 0 prints them once)."""
    try:
        world, rank, _ = env_ranks()
    except DiffusionLabError:
        return False
    return world > 1 and rank != 0
