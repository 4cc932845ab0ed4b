"""The model handler protocol: what the worker needs from any model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

__all__ = ["ModelHandler", "PreparingHandler", "Outputs", "Prepared"]

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

    A text handler may add a prepare stage, which the worker runs off the inference
    thread and uses to batch by tokens: ``prepare(values) -> Prepared`` (tokenise;
    ``lengths`` are the rows' token counts), ``collate(prepared) -> dict`` of padded
    host tensors, ``forward(tensors, params) -> Outputs`` on tensors already on the
    device, and ``predict_prepared(prepared, params)`` (collate + move + forward).
    """

    name: str
    input_column: str

    def load(self, device: torch.device) -> None: ...

    def check_row(self, value: Any) -> None: ...

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]: ...

    def predict(self, values: Sequence[Any], params: Mapping[str, Any]) -> Outputs: ...


@runtime_checkable
class PreparingHandler(ModelHandler, Protocol):
    """A handler with the prepare stage described in ModelHandler's docstring."""

    def prepare(self, values: Sequence[Any]) -> "Prepared": ...

    def collate(self, prepared: "Prepared") -> dict[str, torch.Tensor]: ...

    def forward(self, tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> Outputs: ...

    def predict_prepared(self, prepared: "Prepared", params: Mapping[str, Any]) -> Outputs: ...


@dataclass(frozen=True)
class Prepared(Sequence[Any]):
    """Rows a handler's ``prepare`` made ready: raw values, per-row items, per-row cost.

    A Sequence of the raw values, so code that only needs the values (a failed
    batch retried job by job) treats it as a list; slicing keeps the items aligned.
    """

    values: list[Any]
    items: list[Any]  # e.g. one token-id list per row
    lengths: np.ndarray  # int, one per row: the row's cost in tokens

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return Prepared(self.values[index], self.items[index], self.lengths[index])
        return self.values[index]

    @staticmethod
    def concat(parts: Sequence["Prepared"]) -> "Prepared":
        if len(parts) == 1:
            return parts[0]
        return Prepared([v for p in parts for v in p.values], [i for p in parts for i in p.items],
                        np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, np.int64))
