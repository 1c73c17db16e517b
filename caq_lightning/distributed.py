"""FSDP2 under Lightning's ``ModelParallelStrategy``: sharding the frozen models and the gradients of the replicated
transforms (see docs/scaling.md). Every function is a no-op without a device mesh."""

from __future__ import annotations

import torch
from torch import nn

from caq_lightning.errors import CAQError
from caq_lightning.models import get_adapter


def shard(model: nn.Module, mesh) -> None:  # noqa: ANN001 (DeviceMesh or None)
    """FSDP2: shard each decoder layer, then the rest of the model, over the data-parallel mesh."""
    if mesh is None:
        return
    from torch.distributed.fsdp import fully_shard

    data_parallel = mesh["data_parallel"]
    for layer in get_adapter(model.config).layers(model):
        fully_shard(layer, mesh=data_parallel)
    fully_shard(model, mesh=data_parallel)


def check_mesh(mesh) -> None:  # noqa: ANN001
    if mesh is not None and mesh["tensor_parallel"].size() > 1:
        raise CAQError("tensor parallelism is not supported: use ModelParallelStrategy(tensor_parallel_size=1)")


def average_replicated_grads(parameters, mesh) -> None:  # noqa: ANN001
    """FSDP2 reduces the gradients of the parameters it shards; the replicated transforms (R1, R2, scales) are
    averaged here, so every rank takes the same step and they stay identical."""
    if mesh is None:
        return
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None and not isinstance(p.grad, DTensor)]
    if not grads:
        return
    group = mesh["data_parallel"].get_group()
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=group)
    flat /= torch.distributed.get_world_size(group)
    for g, avg in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(avg.view_as(g))


def clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float, algorithm: str | None) -> None:
    """Global-norm clipping over a mix of sharded (DTensor) and replicated grads, which torch's clip_grad_norm_
    refuses."""
    if algorithm not in (None, "norm"):
        raise CAQError("under FSDP2 only gradient_clip_algorithm=norm is supported: drop the algorithm setting")
    from torch.distributed.tensor import DTensor

    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norms = [g.norm().full_tensor() if isinstance(g, DTensor) else g.norm() for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms).float())
    scale = float((max_norm / (total + 1e-6)).clamp(max=1.0))
    for g in grads:
        g.mul_(scale)
