"""BatchRunner: run one handler on a batch for the worker, on any device, surviving OOM.

It owns the device-level policy the handlers should not repeat: inference_mode,
autocast precision, float32 results on the host, and splitting a batch that runs
out of GPU memory into halves until the pieces fit (down to a single row).

For handlers with a prepare stage (see base.py), ``run`` takes the ``Prepared`` rows
the batcher formed, and ``stage`` does a batch's host work ahead of ``run`` on the
inference thread's stage thread: collate to padded tensors, then start their copy to
the device from reused pinned buffers on a side stream (``Uploader``), so the copy of
batch N+1 overlaps the compute of batch N.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import JobError
from .base import ModelHandler, Outputs, Prepared, PreparingHandler
from .devices import Uploaded, Uploader, is_oom, pick_device, to_device

__all__ = ["BatchRunner", "Staged", "PRECISIONS", "resolve_precision", "pick_device", "to_device"]

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    ``auto`` is bf16 on GPUs that support it (same range as fp32, so no overflow),
    fp16 on older GPUs, and fp32 on CPU, where autocast is slower than it saves.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"bad precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return _DTYPES[precision]
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Staged:
    """A batch whose tensors are on (or on their way to) the device: ``stage``'s result."""

    def __init__(self, prepared: Prepared, tensors: Uploaded) -> None:
        self.prepared, self.tensors = prepared, tensors

    def __len__(self) -> int:
        return len(self.prepared)

    def __getitem__(self, index: slice) -> "Staged":
        """Rows ``index`` (a slice), trimmed to their own longest row (an OOM half)."""
        part = self.prepared[index]
        width = int(part.lengths.max(initial=1))
        return Staged(part, Uploaded({k: v[index, :width] if v.ndim == 2 else v[index]
                                      for k, v in self.tensors.ready().items()}))


class BatchRunner:
    """Wraps a handler: ``run(values, params)`` returns float32 host outputs, in order."""

    def __init__(
        self, handler: ModelHandler, *, device: torch.device | str = "auto", precision: str = "auto"
    ) -> None:
        self.handler = handler
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self._loaded = False
        self._uploader: Uploader | None = None

    def load(self) -> None:
        """Load the handler onto the device (run() does it on first use)."""
        if not self._loaded:
            self.handler.load(self.device)
            self._loaded = True

    def run(self, values: Sequence[Any] | Prepared | Staged, params: Mapping[str, Any]) -> Outputs:
        """Predict ``values`` (already checked; raw, Prepared or Staged) and return one
        output row per value."""
        self.load()
        if not isinstance(values, (Prepared, Staged)):
            values = list(values)
        with torch.inference_mode(), self._autocast():
            outputs = self._run_split(values, params)
        return {name: _host_float32(array) for name, array in outputs.items()}

    @property
    def can_stage(self) -> bool:
        return isinstance(self.handler, PreparingHandler)

    def stage(self, values: Any) -> Any:
        """Host work for a batch before ``run``: Prepared rows -> padded tensors whose
        copy to the device has started. Anything else comes back as it is."""
        handler = self.handler
        if not (isinstance(values, Prepared) and isinstance(handler, PreparingHandler) and len(values)):
            return values
        self.load()
        if self._uploader is None:
            self._uploader = Uploader(self.device)
        return Staged(values, self._uploader.upload(handler.collate(values)))

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _predict(self, values: Any, params: Mapping[str, Any]) -> Outputs:
        handler = self.handler
        if isinstance(values, (Staged, Prepared)) and isinstance(handler, PreparingHandler):
            if isinstance(values, Staged):
                return handler.forward(values.tensors.ready(), params)
            return handler.predict_prepared(values, params)
        return handler.predict(values, params)

    def _run_split(self, values: Any, params: Mapping[str, Any]) -> Outputs:
        try:
            return _checked(self._predict(values, params), len(values), self.handler.name)
        except Exception as exc:
            if not is_oom(exc):
                raise
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # Out of the except block: the traceback holds the failed attempt's tensors,
        # and they must be released before the cache is emptied and the halves run.
        self._free_memory()
        if len(values) <= 1:
            name = self.handler.name
            raise JobError("inference_failed", f"{name}: out of memory on a single row: {reason}")
        half = len(values) // 2
        log.warning("%s: out of memory on %d rows, retrying as %d + %d", self.handler.name,
                    len(values), half, len(values) - half)
        return _concat(self._run_split(values[:half], params), self._run_split(values[half:], params))

    def _free_memory(self) -> None:
        # Only a GPU has anything to give back. gc first: reference cycles can keep
        # the failed attempt's CUDA tensors alive past the except block.
        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()


def _checked(outputs: Outputs, n: int, name: str) -> Outputs:
    """A handler must return one row per value; anything else would misalign rows."""
    for column, array in outputs.items():
        if np.ndim(array) == 0 or len(array) != n:
            shape = np.shape(array)
            raise JobError("inference_failed", f"{name}: column {column!r} has shape {shape} for {n} inputs")
    return outputs


def _concat(first: Outputs, second: Outputs) -> Outputs:
    return {name: np.concatenate([first[name], second[name]]) for name in first}


def _host_float32(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array.astype(np.float32, copy=False) if np.issubdtype(array.dtype, np.floating) else array
