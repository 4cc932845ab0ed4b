"""``tiny``: a seeded, deterministic toy model for fast tests and the demo's smoke runs.

text -> UTF-8 bytes -> 256-bin byte histogram (sums to 1) -> seeded Linear(256, 8)
-> tanh -> ``embedding`` float32 (n, 8). Loads instantly and needs no files.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ._params import check_text, reject_unknown_params, texts_ok
from .base import Outputs
from .devices import to_device, to_host

__all__ = ["TinyHandler", "TINY_DIM", "MAX_CHARS"]

TINY_DIM = 8
MAX_CHARS = 10_000


def _histogram(text: str) -> np.ndarray:
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    counts = np.bincount(data, minlength=256).astype(np.float32)
    return counts / np.float32(len(data))


class TinyHandler:
    """The ``tiny`` model. Same text -> bitwise-same vector, whatever the batch."""

    name = "tiny"
    input_column = "text"

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed
        self._linear: torch.nn.Linear | None = None
        self._device = torch.device("cpu")

    def load(self, device: torch.device) -> None:
        # A private generator: the weights never depend on the global RNG state.
        gen = torch.Generator().manual_seed(self.seed)
        linear = torch.nn.Linear(256, TINY_DIM)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(TINY_DIM, 256, generator=gen))
            linear.bias.copy_(torch.randn(TINY_DIM, generator=gen) * 0.1)
        self._device = torch.device(device)
        self._linear = linear.to(self._device).eval()

    def check_row(self, value: Any) -> None:
        check_text(value, MAX_CHARS)

    def rows_ok(self, values: Sequence[Any]) -> bool:
        return texts_ok(values, MAX_CHARS)

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        reject_unknown_params(self.name, params, ())
        return {}

    def predict(self, values: Sequence[Any], params: Mapping[str, Any]) -> Outputs:
        if self._linear is None:
            raise RuntimeError("tiny: call load() before predict()")
        if not values:
            return {"embedding": np.zeros((0, TINY_DIM), dtype=np.float32)}
        hist = torch.from_numpy(np.stack([_histogram(v) for v in values]))
        hist = to_device(hist, self._device)
        # One row at a time on purpose: a GEMM's summation order can change with the
        # batch size, and tests demand identical bits whatever rows share the batch.
        rows = [torch.tanh(self._linear(hist[i : i + 1])) for i in range(len(values))]
        return {"embedding": to_host(torch.cat(rows))}
