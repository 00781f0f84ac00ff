"""Host-to-device copies that never make the host wait for the device.

A plain `tensor.to("cuda")` from ordinary (pageable) host memory synchronizes: CUDA cannot copy from
memory the OS may move, so it waits for the stream before it copies. From pinned memory with
non_blocking=True the copy is only queued. torch's caching host allocator records the copy on the
stream, so the pinned block is not handed out again before the copy has run. Off CUDA these are the
plain copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A Python sequence as a tensor on `device`; on CUDA the copy is queued, not waited for."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; on CUDA through a pinned staging copy, queued, not waited for."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
