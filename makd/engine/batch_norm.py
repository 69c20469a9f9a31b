"""Batch-norm statistics over the global batch of every DDP process (`train.sync_bn`).

On GPUs this is torch's SyncBatchNorm (timm's converter, which also keeps timm's fused BatchNormAct layers). torch
has no CPU kernel for it, so on other devices `AllReduceBatchNorm` computes the same statistics from all-reduced
per-channel sums (gloo): two processes with B/2 images each then train as one process with B images (to float
rounding; tests/test_distributed.py), instead of normalising each half on its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """The layers that normalise with batch statistics when training."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


class AllReduceBatchNorm(_BatchNorm):
    """Batch norm over the whole DDP batch on any device: per-channel sums, then sums of squared deviations, are
    all-reduced (with autograd: the backward pass all-reduces their gradients, as SyncBatchNorm's does). Outside
    training, or in one process, it is plain batch norm."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        x = x.float()  # as batch norm under autocast
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        local = x.new_tensor([x.numel() // x.shape[1]])
        sums = _summed(torch.cat([x.sum(dims), local]))
        count = sums[-1]
        mean = sums[:-1] / count
        centred = x - mean.view(shape)
        var = _summed((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), momentum)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


class _SumOverProcesses(torch.autograd.Function):
    """all_reduce(SUM) whose backward pass sums the gradients over the processes too (each process's loss depends
    on every process's share of the sums)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _summed(t: Tensor) -> Tensor:
    return _SumOverProcesses.apply(t)


def sync_batch_norms(model: nn.Module, device: torch.device) -> tuple[nn.Module, int]:
    """`model` with its batch norms synchronised across processes, and how many layers stay per process (other
    batch-norm kinds on a device without SyncBatchNorm)."""
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model), 0
    left = 0
    for name, child in list(model.named_children()):
        if type(child) in PLAIN:
            setattr(model, name, _all_reduce_copy(child))
        elif isinstance(child, _BatchNorm):
            left += 1
        else:
            left += sync_batch_norms(child, device)[1]
    return model, left


def _all_reduce_copy(norm: _BatchNorm) -> AllReduceBatchNorm:
    new = AllReduceBatchNorm(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats,
                             device=norm.running_mean.device if norm.running_mean is not None else None)
    new.load_state_dict(norm.state_dict())
    new.train(norm.training)
    return new
