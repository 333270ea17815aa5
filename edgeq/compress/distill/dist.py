"""Data-parallel distillation: the process group, batch sharding and the collectives the losses need.

Launched under ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the environment) the trainers
run one process per rank: gloo on CPU, nccl on CUDA. Every rank draws the same random numbers (batch
indices, SW directions: seeded per step, so no state has to be broadcast), takes its contiguous
``B/world`` slice of each global batch of ``B`` sequences, and trains a replica wrapped in
``DistributedDataParallel`` (block-wise: the block; end-to-end: the student), or with ``--fsdp`` an
FSDP-sharded student.

*The same global batch* means the same objective as one process on all ``B`` sequences, up to float
summation order:

* MSE, KL and the other per-token means: each rank's mean over its equal shard, averaged over ranks
  by DDP's gradient all-reduce, is the global mean;
* sliced Wasserstein is *not* a mean of per-token terms (it sorts the projections of all tokens), so
  each rank all-gathers the projections of every shard (``gather``; differentiable) and computes the
  global SW. Each rank then back-propagates the global SW's gradient w.r.t. its own shard's
  projections, scaled by ``world`` (the all-gather's backward sums the gradients that every rank's
  copy of the loss sends to a shard), and DDP's average over ranks returns exactly the full gradient;
* CAKLD's β (teacher confidence) and TSLD's token-weight normalizer are global-batch quantities,
  reduced over ranks before use (``mean``, ``logsumexp``).

Only rank 0 writes (run dir, plots, checkpoints); the others wait at a barrier.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from edgeq.errors import ConfigError

log = logging.getLogger(__name__)


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward all-reduces (sums) the gradient of the gathered tensor
    over ranks and returns this rank's rows: each rank's copy of a loss of the gathered tensor sends
    gradient to every shard."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.n = group, rank, local.shape[0]
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None, None, None


@dataclass
class DistContext:
    """Where this process stands: its rank, the world size, its device and the process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: object = None  # a second group for the loss collectives, apart from DDP's gradient buckets
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data ------------------------------------------------------------------------------------
    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (B, ...) -> (B/world, ...)."""
        b = batch.shape[0]
        if b % self.world:
            raise ConfigError(
                f"global batch of {b} sequences does not split over {self.world} processes; "
                f"use a --batch-size that is a multiple of {self.world}"
            )
        per = b // self.world
        return batch[self.rank * per : (self.rank + 1) * per]

    # -- collectives (identities in one process) ----------------------------------------------------
    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's (n, ...) tensor along dim 0, in rank order, keeping the autograd
        graph: the backward sums the incoming gradients over ranks and returns this rank's slice."""
        if not self.enabled:
            return local
        return _GatherRows.apply(local.contiguous(), self.group, self.rank, self.world)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a detached tensor (equal shards: the mean of per-shard means)."""
        if not self.enabled:
            return value
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out / self.world

    def logsumexp(self, local: torch.Tensor) -> torch.Tensor:
        """``logsumexp`` over all ranks' elements of a detached tensor."""
        local_lse = torch.logsumexp(local.detach().reshape(-1), 0)
        if not self.enabled:
            return local_lse
        parts = [torch.empty_like(local_lse) for _ in range(self.world)]
        dist.all_gather(parts, local_lse, group=self.group)
        return torch.logsumexp(torch.stack(parts), 0)

    def average_grads(self, params) -> None:
        """Average ``.grad`` of ``params`` over ranks (for steps that run outside DDP)."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.group)
                p.grad /= self.world

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.group)

    # -- wrappers -----------------------------------------------------------------------------------
    def ddp(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` wrapped in DDP (gradients averaged over ranks during backward); itself alone."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers (codes, zeros) never change during training: no per-step broadcast
        return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(requested_device: str = "auto") -> DistContext:
    """A ``DistContext`` for this process, initializing the default process group under torchrun."""
    from edgeq.compress.distill.launch import launched_world
    from edgeq.compress.run import pick_device

    world = launched_world()
    if world <= 1:
        return DistContext(device=pick_device(requested_device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    group = dist.new_group(backend="gloo" if device.type == "cpu" else backend)
    log.info("rank %d of %d on %s (%s)", rank, world, device, backend)
    return DistContext(rank, world, local_rank, device, group, owns)
