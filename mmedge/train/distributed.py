"""torch.distributed support for training: ``mmedge train`` runs unchanged under
``torchrun --nproc-per-node N`` (and multi-node torchrun).

Scheme (the one open_clip uses): every rank draws the same *global* batch of
``N * b`` rows (same seed, same permutation, same augmentation noise) and keeps
its own contiguous slice of ``b`` rows; the towers run on the slice; for the
contrastive loss the embeddings of all ranks are all-gathered, with the local
slice put back so that gradients flow into it, and every rank computes the loss
over the whole global batch. DistributedDataParallel then averages the
gradients over ranks; since each rank's gradient covers only its own slice of a
loss that every rank computes in full, the loss is scaled by ``N`` so that the
sum of slices equals the single-process gradient of the same global batch. The
result: N workers train the same model as one worker with N times the batch.

Only rank 0 writes checkpoints, the run folder and progress; the others wait
at barriers. Backend: nccl when CUDA is available, else gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mmedge.errors import TrainError


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) training job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistContext":
        """Join the process group torchrun describes in the environment, if any."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            try:
                dist.init_process_group(backend=backend)
            except Exception as e:  # noqa: BLE001 - report any rendezvous failure the same way
                raise TrainError(f"cannot join the torch.distributed group (rank {rank} of {world}): {e}") from None
        return cls(rank=rank, world=world, local_rank=local_rank, backend=backend)

    def local_batch_size(self, global_batch: int) -> int:
        if global_batch % self.world:
            raise TrainError(f"global batch {global_batch} is not divisible by {self.world} processes")
        return global_batch // self.world

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of the global batch that belong to this rank (contiguous slice)."""
        if not self.enabled:
            return t
        n = t.shape[0]
        if n % self.world:
            raise TrainError(f"batch of {n} rows cannot be split evenly over {self.world} processes")
        b = n // self.world
        return t[self.rank * b : (self.rank + 1) * b]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """All ranks' (B, ...) tensors -> (world * B, ...), gradient flowing into the local part."""
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.detach().contiguous())
        parts[self.rank] = t
        return torch.cat(parts)

    def wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel around ``module`` when distributed, else ``module``."""
        if not self.enabled:
            return module
        return nn.parallel.DistributedDataParallel(module)

    @property
    def loss_scale(self) -> float:
        """Factor for losses computed over the gathered global batch (see module docstring)."""
        return float(self.world)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float) -> float:
        """Average of a Python float over ranks (for logging)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item() / self.world)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def unwrap(module: Any) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
