"""Multi-process training through ``torchrun``: process group, device, batch slicing, rank-0 duties.

``torchrun --nproc_per_node N -m diffusionlab train CONFIG --out DIR`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; :meth:`Distributed.from_env` then joins the process group (NCCL on GPU, gloo on CPU) and
picks ``cuda:LOCAL_RANK`` on GPU machines. Without those variables everything here is a no-op.
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
    def from_env(cls, device_name: str = "auto") -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=resolve_device(device_name))
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_name)
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not tdist.is_initialized():
            tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(rank=rank, world_size=world, local_rank=local, device=device)

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

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()
