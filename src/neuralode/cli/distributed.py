"""Data-parallel training with ``torch.distributed``: unchanged commands under ``torchrun``.

``torchrun --nproc_per_node=N neuralode train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address; :func:`setup` then joins the process group (gloo on
CPU, nccl on GPU), and the model is wrapped in ``DistributedDataParallel``. Every rank draws the
same global batch from the same seeded generator and keeps its own slice of it
(:meth:`Dist.shard`); rank 0 alone writes logs, metrics, checkpoints and plots.

Gradient averaging: DDP averages parameter gradients over ranks. Each rank's loss is its
slice's mean multiplied by ``world_size * n_rank / n_global`` (see :meth:`Dist.shard`), so the
average equals the gradient of the global batch's mean loss exactly, also for a last batch that
does not split evenly. This works for every gradient method, the adjoint included: its custom
``autograd.Function`` returns parameter gradients that DDP's hooks all-reduce like any other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "setup", "teardown"]


@dataclass(frozen=True)
class Dist:
    """Rank, world size and device of this process (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's contiguous slice of a global batch and its loss weight.

        The weight ``world_size * len(slice) / len(indices)`` makes the DDP average of the
        weighted slice means equal the mean over the global batch.
        """
        if not self.enabled:
            return indices, 1.0
        part = indices.tensor_split(self.world_size)[self.rank]
        return part, self.world_size * len(part) / len(indices)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if ``flag`` is true on some rank (e.g. a Ctrl-C)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device_kind: str) -> Dist:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``).

    Parameters
    ----------
    device_kind : {"cpu", "cuda"}
        gloo for CPU training, nccl for CUDA (each rank on ``cuda:LOCAL_RANK``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world_size=world, local_rank=local)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` when distributed, unchanged otherwise.

    DDP broadcasts rank 0's parameters at construction, so all ranks start identical.
    """
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
