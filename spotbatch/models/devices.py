"""Device helpers shared by handlers and the runner: pick, move, bring back, detect OOM."""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
import torch

from spotbatch.errors import is_oom  # one test for an OOM; re-exported for the handlers

__all__ = ["pick_device", "to_device", "to_host", "is_oom", "Uploader", "Uploaded"]

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


class Uploaded(dict):
    """Device tensors from ``Uploader.upload``; ``ready()`` makes the current stream wait
    for their copy (a no-op on CPU). A dict, so handlers index it like collate's."""

    event: Any = None

    def ready(self) -> "Uploaded":
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
            for tensor in self.values():  # the caching allocator must not reuse them early
                tensor.record_stream(torch.cuda.current_stream())
            self.event = None
        return self


class Uploader:
    """Host -> device copies for the stage thread: reused pinned buffers, async copies.

    On CUDA each batch's tensors are written into page-locked host buffers kept from
    batch to batch (``slots`` sets of them, grown when a batch is bigger, never freed),
    then copied with ``non_blocking=True`` on a side stream, so batch N+1 uploads
    while batch N computes. A slot is rewritten only after its last copy finished.
    Without CUDA, pinned memory does not exist: tensors go to the device as they are.
    """

    def __init__(self, device: torch.device, *, slots: int = 2, pin: bool | None = None) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pin = self.cuda if pin is None else pin
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._slots: list[dict[str, torch.Tensor]] = [{} for _ in range(max(1, slots))]
        self._events: list[Any] = [None] * len(self._slots)
        self._next = 0

    def host_buffer(self, slot: int, name: str, like: torch.Tensor) -> torch.Tensor:
        """A reused host buffer of ``like``'s shape and dtype (a view of a flat one)."""
        flat = self._slots[slot].get(name)
        if flat is None or flat.dtype != like.dtype or flat.numel() < like.numel():
            flat = torch.empty(max(like.numel(), 1), dtype=like.dtype, pin_memory=self.pin)
            self._slots[slot][name] = flat
        return flat[: like.numel()].view(like.shape)

    def upload(self, tensors: Mapping[str, torch.Tensor]) -> Uploaded:
        if not self.cuda:
            return Uploaded({k: v.to(self.device) for k, v in tensors.items()})
        slot, self._next = self._next, (self._next + 1) % len(self._slots)
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # its previous copy still reads the buffer
        out = Uploaded()
        with torch.cuda.stream(self._stream):
            for name, tensor in tensors.items():
                host = self.host_buffer(slot, name, tensor)
                host.copy_(tensor)
                out[name] = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._events[slot] = out.event = event
        return out
