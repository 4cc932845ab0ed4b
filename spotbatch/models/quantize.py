"""Reduced-precision variants of a model handler: ``quantized(handler, scheme)``.

The variant is built on load, on the CPU, from the handler's own fp32 model: the wrapped
handler loads as usual, then every ``torch.nn.Linear`` in the torch modules it holds is
swapped for a reduced-precision one. Everything else (tokenizer, pooling, checks,
params) is the wrapped handler's, so the variant serves the same jobs under the same
name; ``precision`` says which scheme it runs.

Schemes (figures: all-MiniLM-L6-v2, one torch thread, see bench/quantize.py):

- ``int8``: ``torch.ao.quantization.quantize_dynamic`` on every Linear: int8 weights with
  one scale per tensor, activations quantised with one scale per call. The fastest, and
  far from fp32 (mean cosine about 0.94): an agreement gate of 0.98 refuses it.
- ``int8-token``: int8 weights with one scale per output channel, activations with one
  scale per token (per row of the Linear's input), exact int32 accumulation
  (``torch._int_mm``). About as fast, and close to fp32 (mean cosine about 0.997).
  A per-token scale depends on that token alone, so a row's result does not change with
  the rows it is batched with; one scale per call lets a long, loud row crush the others.
- ``bf16``: Linear weights in bfloat16, inputs cast to bfloat16 and results back. Nearly
  exact; fast only on CPUs with bf16 instructions (AVX512-BF16, AMX), slow elsewhere.

TorchScript and ``torch.export`` programs hold no ``nn.Linear`` modules to swap: quantise
those before saving them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .base import ModelHandler, Outputs

__all__ = ["SCHEMES", "QuantizeError", "QuantizedHandler", "Int8TokenLinear", "BF16Linear",
           "quantized", "quantize_module", "check_scheme", "Agreement", "agreement"]

SCHEMES = ("int8", "int8-token", "bf16")


class QuantizeError(ValueError):
    """A scheme that does not exist, or a model it cannot apply to (one-line reason)."""


class Int8TokenLinear(torch.nn.Module):
    """``Linear`` with int8 weights (per output channel) and int8 activations (per token)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        if not hasattr(torch, "_int_mm"):
            raise QuantizeError(f"scheme 'int8-token' needs torch._int_mm, missing in torch {torch.__version__}; "
                                "use scheme 'int8' or 'bf16'")
        weight = linear.weight.detach().to(torch.float32)
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        qweight = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        # (in, out) contiguous: the layout torch._int_mm runs fastest with on CPU.
        self.register_buffer("weight_int8", qweight.t().contiguous())
        self.register_buffer("weight_scale", scale)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.float32).clone()
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    weight_int8: torch.Tensor  # buffers, registered in __init__
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(torch.float32)
        scale = flat.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
        # |flat / scale| <= 127 by construction: rounding needs no clamp.
        qx = (flat / scale).round_().to(torch.int8)
        out = torch._int_mm(qx, self.weight_int8).to(torch.float32)
        out.mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-token"


class BF16Linear(torch.nn.Module):
    """``Linear`` with bfloat16 weights; takes and returns the caller's dtype."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16).clone())
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16).clone()
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    weight: torch.Tensor  # buffers, registered in __init__
    bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


def _swap_linears(module: torch.nn.Module, make: Callable[[torch.nn.Linear], torch.nn.Module]) -> torch.nn.Module:
    """Replace every nn.Linear in ``module`` (itself included) with ``make(linear)``."""
    if isinstance(module, torch.nn.Linear):
        return make(module)
    for name, child in list(module.named_modules()):
        if isinstance(child, torch.nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent), leaf, make(child))
    return module


def _ao_dynamic(module: torch.nn.Module) -> torch.nn.Module:
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as exc:
        raise QuantizeError(f"scheme 'int8' needs torch.ao.quantization.quantize_dynamic, missing in torch "
                            f"{torch.__version__} ({exc}); use scheme 'int8-token'") from None
    # torch 2.13 warns that torch.ao.quantization is deprecated (for torchao, not
    # installed here); the call still works, and the warning would repeat per load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        if isinstance(module, torch.nn.Linear):  # quantize_dynamic swaps children only
            return quantize_dynamic(torch.nn.Sequential(module), {torch.nn.Linear}, dtype=torch.qint8)[0]
        return quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


_BUILDERS: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "int8": _ao_dynamic,
    "int8-token": lambda m: _swap_linears(m, Int8TokenLinear),
    "bf16": lambda m: _swap_linears(m, BF16Linear),
}


def check_scheme(scheme: str) -> str:
    """``scheme`` if it is one of SCHEMES, else QuantizeError naming the choices."""
    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown quantisation scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    return scheme


def _count_linears(module: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Linear) for m in module.modules())


def quantize_module(module: torch.nn.Module, scheme: str, *, label: str = "model") -> torch.nn.Module:
    """``module`` with its Linear layers in ``scheme`` (modified in place where it can be)."""
    check_scheme(scheme)
    if _count_linears(module) == 0:
        raise QuantizeError(f"{label} has no torch.nn.Linear layers to quantise (TorchScript and torch.export "
                            "programs have none: quantise the model before saving it)")
    return _BUILDERS[scheme](module).eval()


class QuantizedHandler:
    """Wraps a handler; ``load`` loads it on the CPU, then swaps its Linear layers.

    Every other attribute (``check_row``, ``rows_ok``, ``predict``, ...) is the wrapped
    handler's, so the variant takes the same rows and params and gives the same columns.
    """

    def __init__(self, inner: ModelHandler, scheme: str) -> None:
        self.inner = inner
        self.precision = check_scheme(scheme)
        self.name = inner.name
        self.input_column = inner.input_column

    def load(self, device: torch.device) -> None:
        device = torch.device(device)
        if device.type != "cpu" and self.precision != "bf16":
            raise QuantizeError(f"{self.name}: precision {self.precision!r} runs on the CPU only; "
                                "pass --device cpu, or use bf16/fp16 on a GPU")
        self.inner.load(device)
        modules = {id(v): (k, v) for k, v in vars(self.inner).items() if isinstance(v, torch.nn.Module)}
        if not any(_count_linears(m) for _, m in modules.values()):
            kind = ", ".join(sorted(type(m).__name__ for _, m in modules.values())) or "no torch module"
            raise QuantizeError(f"{self.name} ({kind}) has no torch.nn.Linear layers to quantise "
                                "(TorchScript and torch.export programs have none: quantise before saving)")
        for attr, module in modules.values():
            if _count_linears(module):
                setattr(self.inner, attr, quantize_module(module, self.precision, label=self.name))

    def check_row(self, value: Any) -> None:
        self.inner.check_row(value)

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return self.inner.check_params(params)

    def predict(self, values: Sequence[Any], params: Mapping[str, Any]) -> Outputs:
        return self.inner.predict(values, params)

    def __getattr__(self, attr: str) -> Any:
        # Optional handler extras (rows_ok, batching hints): only those the inner one has.
        if attr == "inner":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(attr)
        return getattr(self.inner, attr)


def quantized(handler: ModelHandler, scheme: str) -> QuantizedHandler:
    """A not-yet-loaded ``scheme`` variant of ``handler`` (see SCHEMES); QuantizeError
    at once for an unknown scheme, and on load for a model with no Linear layers."""
    return QuantizedHandler(handler, scheme)


@dataclass(frozen=True)
class Agreement:
    """How far a variant's embeddings agree with the reference's, row by row."""

    rows: int
    mean_cosine: float
    min_cosine: float
    p01_cosine: float  # 1st percentile: a gate's "low percentile"
    nn_overlap: float  # mean share of each row's top-k neighbours both agree on
    k: int

    def passes(self, threshold: float) -> bool:
        """Mean and 1st-percentile cosine both at least ``threshold``."""
        return self.mean_cosine >= threshold and self.p01_cosine >= threshold


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.clip(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12, None)


def _neighbours(unit: np.ndarray, k: int) -> np.ndarray:
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)  # a row is not its own neighbour
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def agreement(reference: np.ndarray, candidate: np.ndarray, *, k: int = 10) -> Agreement:
    """Per-row cosine and top-``k`` nearest-neighbour overlap (cosine, within the rows)."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape or reference.ndim != 2:
        raise ValueError(f"need two (rows, dim) arrays of one shape, got {reference.shape} and {candidate.shape}")
    if reference.shape[0] <= k:
        raise ValueError(f"need more than k={k} rows for a top-{k} neighbour overlap, got {reference.shape[0]}")
    ref, cand = _unit(reference), _unit(candidate)
    cosine = (ref * cand).sum(axis=1)
    ours, theirs = _neighbours(ref, k), _neighbours(cand, k)
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(ours.tolist(), theirs.tolist())])
    return Agreement(rows=len(cosine), mean_cosine=float(cosine.mean()), min_cosine=float(cosine.min()),
                     p01_cosine=float(np.percentile(cosine, 1)), nn_overlap=float(overlap), k=k)
