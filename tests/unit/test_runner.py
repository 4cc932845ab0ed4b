"""Unit tests for BatchRunner (OOM splitting, precision, host outputs) and device helpers."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pytest
import torch

from spotbatch.errors import JobError
from spotbatch.models import get_handler
from spotbatch.models.devices import is_oom, to_host
from spotbatch.models.runner import BatchRunner, pick_device, resolve_precision, to_device


class FakeHandler:
    """Doubles its inputs; runs out of "memory" above ``max_rows`` rows."""

    name = "fake"
    input_column = "x"

    def __init__(self, max_rows: int = 10**9, oom: type[BaseException] | None = None) -> None:
        self.max_rows = max_rows
        self.oom = oom or (lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
        self.calls: list[int] = []
        self.loads = 0
        self.seen: dict[str, Any] = {}

    def load(self, device: torch.device) -> None:
        self.loads += 1

    def check_row(self, value: Any) -> None: ...

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return dict(params)

    def predict(self, values: Sequence[Any], params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        self.calls.append(len(values))
        self.seen = {
            "inference": torch.is_inference_mode_enabled(),
            "autocast": torch.is_autocast_enabled("cpu"),
            "dtype": torch.get_autocast_dtype("cpu"),
        }
        if len(values) > self.max_rows:
            raise self.oom()
        x = torch.tensor(values, dtype=torch.float32)
        return {"y": (x * 2).numpy(), "index": np.asarray(values, dtype=np.int64)}


VALUES = list(range(23))


def test_oom_splits_in_halves_and_keeps_order():
    unsplit = BatchRunner(FakeHandler(), device="cpu").run(VALUES, {})
    handler = FakeHandler(max_rows=3)
    split = BatchRunner(handler, device="cpu").run(VALUES, {})
    assert set(split) == {"y", "index"}
    np.testing.assert_array_equal(split["y"], unsplit["y"])
    np.testing.assert_array_equal(split["index"], VALUES)
    assert max(n for n in handler.calls if n <= 3) <= 3
    assert handler.calls[:3] == [23, 11, 5]  # 23 -> 11 + 12, 11 -> 5 + 6, ...
    assert sum(n for n in handler.calls if n <= 3) == len(VALUES)  # every row ran exactly once


def test_oom_reported_as_plain_runtime_error_also_splits():
    handler = FakeHandler(max_rows=4, oom=lambda: RuntimeError("CUDA out of memory (from TorchScript)"))
    out = BatchRunner(handler, device="cpu").run(VALUES, {})
    np.testing.assert_array_equal(out["index"], VALUES)


def test_oom_on_a_single_row_is_inference_failed():
    handler = FakeHandler(max_rows=0)
    with pytest.raises(JobError) as info:
        BatchRunner(handler, device="cpu").run([1, 2, 3], {})
    assert info.value.code == "inference_failed"
    assert "single row" in info.value.reason and "out of memory" in info.value.reason
    assert handler.calls[0] == 3 and handler.calls[-1] == 1


def test_other_errors_are_not_split_or_wrapped():
    handler = FakeHandler(max_rows=1, oom=lambda: KeyError("bug"))
    with pytest.raises(KeyError):
        BatchRunner(handler, device="cpu").run([1, 2, 3], {})
    assert handler.calls == [3]


def test_wrong_row_count_is_inference_failed():
    class Short(FakeHandler):
        def predict(self, values, params):
            return {"y": np.zeros(len(values) - 1, dtype=np.float32)}

    with pytest.raises(JobError, match="inference_failed"):
        BatchRunner(Short(), device="cpu").run([1, 2], {})


def test_runs_under_inference_mode_loads_once_and_returns_float32():
    class Half(FakeHandler):
        def predict(self, values, params):
            out = super().predict(values, params)
            return {"y": out["y"].astype(np.float16), "index": out["index"]}

    handler = Half()
    runner = BatchRunner(handler, device="cpu")
    first = runner.run([1, 2], {})
    runner.run([3], {})
    assert handler.loads == 1 and handler.seen["inference"] is True
    assert first["y"].dtype == np.float32 and first["index"].dtype == np.int64
    assert not handler.seen["autocast"]  # auto on CPU means plain fp32


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_explicit_precision_autocasts(precision, dtype):
    handler = FakeHandler()
    BatchRunner(handler, device="cpu", precision=precision).run([1], {})
    assert handler.seen["autocast"] is True and handler.seen["dtype"] == dtype


def test_tiny_under_bf16_autocast_returns_close_float32():
    texts = ["alpha", "beta gamma"]
    exact = BatchRunner(get_handler("tiny"), device="cpu").run(texts, {})["embedding"]
    fast = BatchRunner(get_handler("tiny"), device="cpu", precision="bf16").run(texts, {})["embedding"]
    assert fast.dtype == np.float32
    np.testing.assert_allclose(fast, exact, atol=3e-2)
    assert not np.array_equal(fast, exact)  # autocast really changed the arithmetic


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        resolve_precision("int8", cpu)
    with pytest.raises(ValueError, match="bad precision"):
        BatchRunner(FakeHandler(), device="cpu", precision="float32")


# --- devices --------------------------------------------------------------------


def test_pick_device_good_specs():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "cpu:0", "auto:0", "", "cuda:0:1", None, 0])
def test_pick_device_bad_specs(spec):
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda' or 'cuda:N'"):
        pick_device(spec)


def test_pick_device_cuda_that_is_not_there():
    spec = "cuda:99" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ValueError, match="CUDA"):
        pick_device(spec)


def test_runner_rejects_bad_device():
    with pytest.raises(ValueError, match="bad device"):
        BatchRunner(FakeHandler(), device="tpu")


def test_to_device_and_to_host_on_cpu():
    t = torch.arange(4, dtype=torch.float32)
    assert to_device(t, torch.device("cpu")) is t  # no copy when it is already there
    host = to_host(torch.ones(2, 3, dtype=torch.bfloat16, requires_grad=True) * 3)
    assert host.dtype == np.float32 and host.tolist() == [[3.0] * 3] * 2
    assert to_host(torch.tensor([1, 2])).dtype == np.int64


def test_is_oom():
    assert is_oom(torch.cuda.OutOfMemoryError("boom"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("CUDA out of memory"))
