"""Device helpers shared by handlers and the runner: pick, move, bring back, detect OOM."""

from __future__ import annotations

import re

import numpy as np
import torch

__all__ = ["pick_device", "to_device", "to_host", "is_oom"]

_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def pick_device(spec: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a torch.device.

    ``auto`` means the first GPU when CUDA is available, else the CPU. Asking for
    CUDA where there is none is an error now rather than a crash at first batch.
    """
    match = _SPEC.match(spec.strip().lower()) if isinstance(spec, str) else None
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ValueError(f"bad device {spec!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for CUDA but none is available; use 'cpu' or 'auto'")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise ValueError(f"device {spec!r} does not exist: this machine has {count} CUDA device(s)")
    return torch.device("cuda", int(index)) if index is not None else torch.device("cuda")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a host tensor to ``device``; on CUDA via pinned memory and an async copy.

    Pinned (page-locked) memory lets the copy run on the DMA engine without blocking
    the host, so the CPU can tokenize the next batch while this one uploads. The
    caching host allocator keeps the pinned buffer alive until the copy finishes.
    """
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """Bring a result back as numpy; floating types (bf16/fp16 under autocast) as float32.

    The device-to-host copy is blocking on purpose: numpy reads the memory at once,
    and a non_blocking copy would need an explicit synchronize to be safe.
    """
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = tensor.to(dtype=torch.float32)
    return tensor.cpu().numpy()


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error, however it surfaces.

    Inside TorchScript or cuBLAS an OOM can arrive as a plain RuntimeError that only
    says so in its message, not as torch.cuda.OutOfMemoryError.
    """
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )
