"""The model handler protocol: what the worker needs from any model."""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

__all__ = ["ModelHandler", "Outputs"]

# Output columns of one predict() call: name -> array whose first axis is the row.
Outputs = dict[str, np.ndarray]


@runtime_checkable
class ModelHandler(Protocol):
    """A loaded-on-demand model.

    ``input_column`` names the row field the model reads (``text`` for minilm).
    ``check_row`` raises ValueError with a one-line reason for a value the model
    cannot take, so a bad row fails only its own job and never a shared batch.
    A handler may add ``rows_ok(values) -> bool``: a fast check of a whole job's rows
    (True: all pass ``check_row``), so the worker calls ``check_row`` only to find the
    first bad row when it says False.
    ``predict`` takes a batch of already-checked values and returns output columns
    with one entry per value, in order, as float32/int numpy arrays on the host.
    ``params`` are the job's validated params (see ``check_params``).
    """

    name: str
    input_column: str

    def load(self, device: torch.device) -> None: ...

    def check_row(self, value: Any) -> None: ...

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]: ...

    def predict(self, values: Sequence[Any], params: Mapping[str, Any]) -> Outputs: ...
