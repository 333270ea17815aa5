"""``--fsdp``: the end-to-end student sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each decoder block and then the root are ``fully_shard``-ed, so a rank keeps 1/world of every
parameter (the trainable scales and the frozen latent weights alike) and of Adam's state, and
all-gathers a block's parameters only while that block runs. Gradients are reduce-scattered and
averaged over ranks, as DDP averages them, so the loss curve matches DDP's and one process's.
Measured with torch 2.13 CPU wheels: FSDP2 runs on CPU over gloo, with frozen and trainable
parameters in one group.

Checkpoints hold full tensors (``full_tensors``: a collective that every rank joins, rank 0 writes),
so a resume may use another process count; ``restore_optimizer`` scatters them back into the sharded
state. ``unshard_student`` gathers the trained parameters on every rank before export.
"""

from __future__ import annotations

import torch

from edgeq.compress.distill.dist import DistContext


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_student(student: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """Shard ``student`` in place (blocks, then the root); returns it (now an FSDP module)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from edgeq.compress.calibration import get_module
    from edgeq.compress.mappings import family_for

    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    family = family_for(student.config.to_dict())
    for block in get_module(student, family.blocks):
        fully_shard(block, mesh=mesh)
    fully_shard(student, mesh=mesh)
    return student


def unshard_student(student: torch.nn.Module, ctx: DistContext) -> None:
    """Replace every sharded parameter by its full tensor, on every rank (a collective)."""
    with torch.no_grad():
        for module in student.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if _is_dtensor(p):
                    full = torch.nn.Parameter(p.full_tensor().clone(), requires_grad=False)
                    module._parameters[name] = full


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of possibly sharded tensors; every rank must call it."""
    return {k: (v.full_tensor() if _is_dtensor(v) else v) for k, v in tensors.items()}


def restore_optimizer(opt: torch.optim.Optimizer, saved: dict[str, torch.Tensor]) -> None:
    """Load full Adam state into an optimizer over sharded parameters (each rank keeps its shard)."""
    from torch.distributed.tensor import distribute_tensor

    from edgeq.compress.distill.checkpoint import restore_optimizer as restore_plain

    params = [p for group in opt.param_groups for p in group["params"]]
    sharded = {}
    for flat, value in saved.items():
        index, key = flat.split(".", 1)
        p = params[int(index)]
        if _is_dtensor(p) and value.shape == p.shape:
            value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        sharded[flat] = value
    restore_plain(opt, sharded)
