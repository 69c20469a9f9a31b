"""Tensors sent between processes as ONE shared-memory buffer.

torch sends each tensor of a DataLoader worker's batch in its own shared-memory segment, and the receiver fetches
each segment's handle from a thread of the worker; objects that are not tensors (PIL images, numpy arrays) are
pickled through a pipe in small writes, each by a thread of the worker. While the worker makes its next batch,
those threads wait for its interpreter lock, and the process that consumes the batch waits with them. Packing a
batch into one buffer leaves one handle to fetch (makd/labels/inputs.py, makd/teachers/hf_prompts.py).
"""

from __future__ import annotations

from typing import Any

ALIGN = 64  # bytes: every packed tensor starts at a multiple of this (any dtype's alignment)


def pack(tensors: list[Any]) -> tuple[Any, list[tuple[Any, tuple[int, ...], int]]]:
    """(one uint8 buffer holding every tensor's bytes, [(dtype, shape, offset)])."""
    import torch

    layout, offset = [], 0
    for tensor in tensors:
        layout.append((tensor.dtype, tuple(tensor.shape), offset))
        offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
    buffer = torch.empty(offset, dtype=torch.uint8)
    for (_, _, start), tensor in zip(layout, tensors):
        flat = tensor.contiguous().reshape(-1).view(torch.uint8)
        buffer[start:start + flat.numel()] = flat
    return buffer, layout


def unpack(buffer: Any, layout: list[tuple[Any, tuple[int, ...], int]]) -> list[Any]:
    """The tensors of `pack`, as views of the buffer (no copy)."""
    import torch

    out = []
    for dtype, shape, start in layout:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        out.append(buffer[start:start + size].view(dtype).reshape(shape))
    return out
