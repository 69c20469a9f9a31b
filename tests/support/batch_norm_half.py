"""A process of tests/test_distributed.py's batch-norm check, in a module light to import (spawned children import
it): half of a batch through makd's all-reduce batch norm, forward and backward, on a 2-process gloo group; then
a per-process batch norm under DDP, whose running statistics rank 0 broadcasts before validation."""

from __future__ import annotations

import os
from typing import Any

import torch

from makd.engine.batch_norm import sync_batch_norms
from makd.engine.distributed import Dist, broadcast_buffers


def batch_norm_case() -> tuple[torch.Tensor, torch.nn.BatchNorm2d, torch.Tensor]:
    """8 images of 3 channels, a batch norm with non-trivial affine parameters, the gradient arriving from above."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 5, generator=generator) * 3 + 1
    norm = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2, generator=generator)
        norm.bias.uniform_(-1, 1, generator=generator)
    return x, norm, torch.randn(8, 3, 5, 5, generator=generator)


def batch_norm_half(rank: int, port: int, results: Any) -> None:
    """Process `rank` of 2 takes images rank, rank + 2, ...; puts (rank, layers left per process, output, input
    gradient, weight gradient, bias gradient, running variance, then of a per-process batch norm under DDP: its
    running variance after a training forward, and after `broadcast_buffers`) as arrays on `results`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    x, norm, upstream = batch_norm_case()
    model, left = sync_batch_norms(torch.nn.Sequential(norm), torch.device("cpu"))
    part = x[rank::2].clone().requires_grad_()
    out = model(part)
    (out * upstream[rank::2]).sum().backward()
    layer = model[0]
    alone = torch.nn.parallel.DistributedDataParallel(batch_norm_case()[1])  # statistics per process
    alone(x[rank::2])
    moved = alone.module.running_var.clone()
    broadcast_buffers(Dist(rank=rank, world_size=2), alone.module)
    results.put((rank, left, *(t.detach().numpy().copy() for t in (out, part.grad, layer.weight.grad, layer.bias.grad,
                                                                   layer.running_var, moved,
                                                                   alone.module.running_var))))
    torch.distributed.destroy_process_group()
