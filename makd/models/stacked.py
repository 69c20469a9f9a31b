"""K students of one architecture as one network: the cheap way to train many seeds of a small model.

Every convolution of member k becomes group block k of a grouped convolution, every batch norm a block of
channels of a K-times wider batch norm, every head a batched matrix product; member k's images travel in
channel block k. Each member keeps its own weights, batch-norm statistics, data and gradients, so training
the stack is training the K students side by side — one kernel launch instead of K, and wide layers that
vectorise well. The conversion covers the layers makd's small students are made of; `stack_students` checks
the stack against each member on random inputs and refuses architectures it does not reproduce (a layer that
mixes channels outside a convolution would otherwise mix members).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from makd.errors import MakdError
from makd.models.student import Student, StudentOutput

STATELESS = (nn.ReLU, nn.Identity, nn.Dropout, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Sequential, nn.ModuleList)


class StackedLinear(nn.Module):
    """K linear layers: x [K, B, in] -> [K, B, out]. The bias is kept flat ([K * out]) so it stays a 1-D
    parameter, as a bias is (the optimiser does not decay 1-D parameters)."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.members, self.out_features = len(layers), layers[0].out_features
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]).clone())
        self.bias = nn.Parameter(torch.cat([layer.bias.detach() for layer in layers]).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.view(self.members, 1, -1), x, self.weight.transpose(1, 2))

    def member(self, k: int) -> dict[str, torch.Tensor]:
        n = self.out_features
        return {"weight": self.weight[k], "bias": self.bias[k * n:(k + 1) * n]}


def _stack_module(modules: Sequence[nn.Module]) -> nn.Module:
    first, k = modules[0], len(modules)
    if type(first) is nn.Conv2d:
        conv = nn.Conv2d(first.in_channels * k, first.out_channels * k, first.kernel_size, first.stride, first.padding,
                         first.dilation, first.groups * k, first.bias is not None, first.padding_mode)
        with torch.no_grad():
            conv.weight.copy_(torch.cat([m.weight for m in modules]))
            if first.bias is not None:
                conv.bias.copy_(torch.cat([m.bias for m in modules]))
        return conv
    if type(first) is nn.BatchNorm2d:
        norm = nn.BatchNorm2d(first.num_features * k, first.eps, first.momentum, first.affine, first.track_running_stats)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(norm, name).copy_(torch.cat([getattr(m, name) for m in modules]))
            norm.num_batches_tracked.copy_(first.num_batches_tracked)
        return norm
    if type(first) is nn.Linear:
        return StackedLinear(modules)
    if first._parameters or first._buffers:
        raise MakdError(f"cannot stack {type(first).__name__} layers (only Conv2d, BatchNorm2d and Linear hold weights "
                        "in a stacked student)")
    stacked = copy.copy(first)  # a container or a stateless layer: stack its children
    stacked._modules = {name: None if child is None else _stack_module([m._modules[name] for m in modules])
                        for name, child in first._modules.items()}
    return stacked


class StackedStudent(nn.Module):
    """K students side by side; `forward` takes [K, B, C, H, W] and returns StudentOutput of [K, B, ...]."""

    def __init__(self, students: Sequence[Student]) -> None:
        super().__init__()
        first = students[0]
        self.members = len(students)
        self.register_buffer("mean", torch.cat([s.mean for s in students], dim=1))
        self.register_buffer("std", torch.cat([s.std for s in students], dim=1))
        self.backbone = _stack_module([s.backbone for s in students])
        self.class_head = StackedLinear([s.class_head for s in students])
        self.aspect_head = None if first.aspect_head is None else _stack_module([s.aspect_head for s in students])
        self.template = [copy.deepcopy(first).to("meta")]  # a list: not a submodule, not in the state dict

    def forward(self, x: torch.Tensor) -> StudentOutput:
        k, b = x.shape[:2]
        # Member k's images in channel block k. Contiguous (NCHW) on purpose: oneDNN's channels-last grouped
        # convolution gives wrong weight gradients for some groups of narrow layers (tests/test_seed_batch.py).
        wide = x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:])
        features = self.backbone((wide - self.mean).div_(self.std)).view(b, k, -1).transpose(0, 1)  # [K, B, F]
        aspects = self.aspect_head(features) if self.aspect_head is not None else None
        return StudentOutput(self.class_head(features), aspects)

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's state dict, shaped as a plain Student's (what its student file holds)."""
        template = self.template[0]
        stacked = dict(self.named_parameters()) | dict(self.named_buffers())
        state: dict[str, torch.Tensor] = {}
        for name, value in template.state_dict().items():
            if name.endswith("num_batches_tracked"):
                state[name] = stacked[name].detach().clone()
                continue
            module_name, _, leaf = name.rpartition(".")
            module = self.get_submodule(module_name) if module_name else self
            if isinstance(module, StackedLinear):
                state[name] = module.member(k)[leaf].detach().clone()
            else:
                state[name] = stacked[name].detach().chunk(self.members, dim=1 if name in ("mean", "std") else 0)[k].clone()
            if state[name].shape != value.shape:
                raise MakdError(f"stacked student: {name} of member {k} has shape {tuple(state[name].shape)}, "
                                f"expected {tuple(value.shape)}")
        return state


def stack_students(students: Sequence[Student], check: bool = True) -> StackedStudent:
    """The stack of `students` (same architecture), checked to reproduce each of them."""
    stacked = StackedStudent(students)
    if check:
        verify_stack(stacked, students)
    return stacked


@torch.no_grad()
def verify_stack(stacked: StackedStudent, students: Sequence[Student], tolerance: float = 1e-4) -> None:
    """Random inputs through the stack and through each member (in eval mode: no statistics change)."""
    c = students[0].mean.shape[1]
    size = 32
    x = torch.rand(len(students), 3, c, size, size, generator=torch.Generator().manual_seed(0)).to(stacked.mean.device)
    modes = [s.training for s in students], stacked.training
    stacked.eval()
    for s in students:
        s.eval()
    try:
        out = stacked(x)
        for k, student in enumerate(students):
            ref = student(x[k])
            scale = max(1.0, float(ref.class_logits.abs().max()))
            if float((out.class_logits[k] - ref.class_logits).abs().max()) > tolerance * scale:
                raise MakdError(f"model {type(students[0].backbone).__name__}: its layers mix channels in a way a "
                                "stacked student cannot reproduce; train the seeds one by one (batch_seeds: 1)")
    finally:
        stacked.train(modes[1])
        for s, mode in zip(students, modes[0]):
            s.train(mode)
