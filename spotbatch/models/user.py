"""Users' own models: a TorchScript file, a ``torch.export`` file, or a sentence-transformers folder.

Tensor models (TorchScript / torch.export) read ``x``: each row a flat list of
numbers; the batch goes in as one float32 tensor (n, d) and the model's tensor
(n, ...) comes out as column ``output``. The row length d is checked when it is
known: the ``input_dim`` option, an int ``self.input_dim`` set in a TorchScript
module's ``__init__``, or the static second dimension of a torch.export program's input.

A torch.export program exported with a dynamic batch dimension takes any batch;
one exported with a fixed batch size B is run in chunks of B (the last padded with
zeros, and its padding rows dropped from the output).

Pickles are never loaded: TorchScript and torch.export archives hold code and
tensors, not arbitrary Python objects.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import JobError
from ._params import reject_unknown_params
from .base import Outputs
from .devices import is_oom, to_device, to_host
from .minilm import SentenceEncoder

__all__ = ["TensorModelHandler", "sentence_folder", "MAX_ROW_LEN"]

MAX_ROW_LEN = 1_000_000


def _check_vector(value: Any, dim: int | None) -> None:
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ValueError(f"expected a flat list of numbers, got an array of shape {value.shape}")
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of numbers, got {type(value).__name__}")
    if not value or len(value) > MAX_ROW_LEN:
        raise ValueError(f"expected 1..{MAX_ROW_LEN} numbers, got {len(value)}")
    for item in value:
        # bool is an int subclass; True as a feature value is almost surely a mistake.
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ValueError(f"expected numbers only, found {type(item).__name__} {item!r}")
    if dim is not None and len(value) != dim:
        raise ValueError(f"expected {dim} numbers per row, got {len(value)}")


def _export_input_shape(program: Any) -> tuple[int | None, int | None]:
    """(static batch size or None, static row length or None) of the first user input."""
    first = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == first)
    shape = node.meta["val"].shape
    static = [d if isinstance(d, int) else None for d in shape]
    return static[0], (static[1] if len(static) == 2 else None)


class TensorModelHandler:
    """A TorchScript (``kind="torchscript"``) or torch.export (``kind="export"``) file."""

    input_column = "x"

    def __init__(self, kind: str, path: str | Path, *, input_dim: int | None = None) -> None:
        if kind not in ("torchscript", "export"):
            raise ValueError(f"kind must be 'torchscript' or 'export', got {kind!r}")
        self.kind = kind
        self.path = Path(path)
        self.name = f"{kind}:{self.path}"
        self.input_dim = input_dim
        self._batch_size: int | None = None
        self._forward: Callable[[torch.Tensor], Any] | None = None
        self._device = torch.device("cpu")

    def load(self, device: torch.device) -> None:
        self._device = torch.device(device)
        try:
            self._forward = self._load_torchscript() if self.kind == "torchscript" else self._load_export()
        except Exception as exc:  # any failure to read the user's file is the job's problem
            raise JobError("unknown_model", f"cannot load {self.kind} model {self.path}: {exc}") from exc

    def _load_torchscript(self) -> Callable[[torch.Tensor], Any]:
        module = torch.jit.load(str(self.path), map_location=self._device).eval()
        declared = getattr(module, "input_dim", None)
        if self.input_dim is None and isinstance(declared, int):
            self.input_dim = declared
        return module

    def _load_export(self) -> Callable[[torch.Tensor], Any]:
        program = torch.export.load(str(self.path))
        batch, dim = _export_input_shape(program)
        self._batch_size = batch
        self.input_dim = self.input_dim if self.input_dim is not None else dim
        return program.module().to(self._device)

    def check_row(self, value: Any) -> None:
        _check_vector(value, self.input_dim)

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        reject_unknown_params(self.name, params, ())
        return {}

    def predict(self, values: Sequence[Any], params: Mapping[str, Any]) -> Outputs:
        if self._forward is None:
            raise RuntimeError(f"{self.name}: call load() before predict()")
        lengths = sorted({len(v) for v in values})
        if len(lengths) > 1:
            # Only reachable when the model declares no input_dim for check_row to use.
            raise JobError("row_rejected", f"rows of 'x' must all have one length, got lengths {lengths}")
        width = lengths[0] if values else self.input_dim or 0
        rows = np.asarray(values, dtype=np.float32).reshape(len(values), width)
        try:
            out = self._run(torch.from_numpy(rows))
        except JobError:
            raise
        except Exception as exc:
            if is_oom(exc):  # the runner splits the batch and retries
                raise
            raise JobError("inference_failed", f"{self.name} failed: {exc}") from exc
        return {"output": to_host(out)}

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        n, step = x.shape[0], self._batch_size
        if step is None or step == n:
            return self._call(x)
        padded = torch.zeros((math.ceil(n / step) * step, *x.shape[1:]), dtype=x.dtype)
        padded[:n] = x
        return torch.cat([self._call(chunk) for chunk in padded.split(step)])[:n]

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        forward = self._forward
        if forward is None:
            raise RuntimeError(f"{self.name}: call load() before predict()")
        out = forward(to_device(x, self._device))
        if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != x.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            expected = f"a tensor ({x.shape[0]}, ...)"
            raise JobError("inference_failed", f"{self.name} must return {expected}, got {got}")
        return out


class _UserSentenceEncoder(SentenceEncoder):
    """A user's folder: failing to load it is the job's fault, not the worker's."""

    def load(self, device: torch.device) -> None:
        try:
            super().load(device)
        except Exception as exc:
            reason = f"cannot load sentence-transformers folder {self.folder}: {exc}"
            raise JobError("unknown_model", reason) from exc


def sentence_folder(path: str | Path) -> SentenceEncoder:
    """A sentence-transformers folder, served by the same code as ``minilm``."""
    try:
        return _UserSentenceEncoder(f"st:{path}", path)
    except (OSError, ValueError) as exc:
        raise JobError("unknown_model", f"bad sentence-transformers folder {path}: {exc}") from exc
