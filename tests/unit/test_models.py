"""Unit tests for the model registry and handlers (tiny, minilm, user models)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from spotbatch.errors import JobError
from spotbatch.models import ModelHandler, available, get_handler, register
from spotbatch.models.runner import BatchRunner

CPU = torch.device("cpu")
SENTENCES = [
    "The cat sits on the mat.",
    "Spot instances are cheap but can vanish with two minutes' notice.",
    "Ünïcödé and emoji 🚀 survive tokenization.",
    "short",
]


def loaded(name: str, **options):
    handler = get_handler(name, **options)
    handler.load(CPU)
    return handler


# --- registry -------------------------------------------------------------------


def test_builtins_are_registered_and_satisfy_the_protocol():
    assert available() == sorted(available())
    assert {"tiny", "minilm"} <= set(available())
    for name in ("tiny", "minilm"):
        handler = get_handler(name)
        assert isinstance(handler, ModelHandler)
        assert handler.name == name and handler.input_column == "text"


def test_unknown_model_names_the_field_and_the_choices():
    with pytest.raises(JobError) as info:
        get_handler("gpt-17")
    err = info.value
    assert err.code == "unknown_model"
    assert "'model'" in err.reason and "'gpt-17'" in err.reason
    for choice in ("tiny", "minilm", "torchscript:PATH", "export:PATH", "st:PATH"):
        assert choice in err.reason


@pytest.mark.parametrize("name", ["torchscript:", "torchscript:/no/such/model.pt", "st:/no/such/dir"])
def test_user_model_with_missing_path_is_a_job_error(name):
    with pytest.raises(JobError) as info:
        get_handler(name)
    assert info.value.code == "unknown_model"


def test_model_dirs_confines_user_paths(tmp_path):
    model = tmp_path / "inside" / "m.pt"
    model.parent.mkdir()
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(model))
    assert get_handler(f"torchscript:{model}", model_dirs=[tmp_path / "inside"]).name.endswith("m.pt")
    with pytest.raises(JobError, match="outside the allowed model folders"):
        get_handler(f"torchscript:{model}", model_dirs=[tmp_path / "elsewhere"])
    # ".." must not walk out of an allowed folder.
    sneaky = tmp_path / "elsewhere" / ".." / "inside" / "m.pt"
    with pytest.raises(JobError, match="outside"):
        get_handler(f"torchscript:{sneaky}", model_dirs=[tmp_path / "elsewhere"])


def test_register_rejects_bad_and_duplicate_names():
    with pytest.raises(ValueError, match="colon"):
        register("my:model", lambda: None)
    with pytest.raises(ValueError, match="already registered"):
        register("tiny", lambda: None)


def test_register_adds_a_name_with_options():
    from spotbatch.models.tiny import TinyHandler

    register("tiny-seed7", TinyHandler, replace=True)
    handler = get_handler("tiny-seed7", seed=7)
    assert "tiny-seed7" in available() and handler.seed == 7


# --- tiny -----------------------------------------------------------------------


def test_tiny_is_deterministic_across_instances_and_global_rng():
    first = loaded("tiny").predict(SENTENCES, {})["embedding"]
    torch.manual_seed(12345)  # the global RNG must not leak into the weights
    second = loaded("tiny").predict(SENTENCES, {})["embedding"]
    assert first.dtype == np.float32 and first.shape == (len(SENTENCES), 8)
    np.testing.assert_array_equal(first, second)
    assert np.all(np.abs(first) < 1)  # tanh range
    assert not np.allclose(first[0], first[1])  # different texts, different vectors


def test_tiny_seed_changes_the_weights():
    a = loaded("tiny").predict(["x"], {})["embedding"]
    b = loaded("tiny", seed=1).predict(["x"], {})["embedding"]
    assert not np.allclose(a, b)


def test_tiny_output_does_not_depend_on_batch_composition():
    handler = loaded("tiny")
    rng = np.random.default_rng(0)
    texts = ["".join(chr(c) for c in rng.integers(32, 0x3000, size=rng.integers(1, 300))) for _ in range(70)]
    alone = np.concatenate([handler.predict([t], {})["embedding"] for t in texts])
    together = handler.predict(texts, {})["embedding"]
    shuffled_order = rng.permutation(len(texts))
    shuffled = handler.predict([texts[i] for i in shuffled_order], {})["embedding"]
    np.testing.assert_array_equal(alone, together)
    np.testing.assert_array_equal(shuffled, together[shuffled_order])


@pytest.mark.parametrize(
    ("value", "reason"),
    [("", "non-empty"), (None, "string"), (42, "string"), (b"bytes", "string"), ("x" * 10_001, "limit is 10000")],
)
def test_tiny_check_row_rejects(value, reason):
    with pytest.raises(ValueError, match=reason) as info:
        get_handler("tiny").check_row(value)
    assert "\n" not in str(info.value)


def test_tiny_check_row_accepts_the_limit():
    get_handler("tiny").check_row("x" * 10_000)
    get_handler("tiny").check_row("é")


def test_tiny_takes_no_params():
    assert get_handler("tiny").check_params({}) == {}
    with pytest.raises(ValueError, match="unknown param 'normalize'"):
        get_handler("tiny").check_params({"normalize": True})


def test_predict_before_load_is_a_clear_error():
    with pytest.raises(RuntimeError, match="load"):
        get_handler("tiny").predict(["a"], {})


# --- minilm ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_handler():
    handler = get_handler("minilm")
    handler.load(CPU)
    return handler


def test_minilm_matches_sentence_transformers(minilm_handler):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_handler.folder), device="cpu").encode(
        SENTENCES, normalize_embeddings=True, convert_to_numpy=True
    )
    ours = BatchRunner(minilm_handler, device="cpu").run(SENTENCES, {})["embedding"]
    assert ours.dtype == np.float32 and ours.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_minilm_truncates_at_256_tokens(minilm_handler):
    assert minilm_handler.max_seq_length == 256
    long_text = "word " * 2000
    tokens = minilm_handler._tokenizer([long_text], truncation=True, max_length=256)["input_ids"][0]
    assert len(tokens) == 256
    # Past the limit, extra text cannot change the embedding.
    more = minilm_handler.predict([long_text + "different ending"], {})["embedding"]
    base = minilm_handler.predict([long_text], {})["embedding"]
    np.testing.assert_allclose(more, base, atol=1e-6)


def test_minilm_normalize_param(minilm_handler):
    params = minilm_handler.check_params({"normalize": False})
    assert params == {"normalize": False}
    raw = minilm_handler.predict(SENTENCES[:2], params)["embedding"]
    unit = minilm_handler.predict(SENTENCES[:2], minilm_handler.check_params({}))["embedding"]
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), unit, atol=1e-6)


@pytest.mark.parametrize(("params", "match"), [({"normalize": 1}, "true or false"), ({"pool": "max"}, "unknown param 'pool'")])
def test_minilm_check_params_rejects(params, match):
    with pytest.raises(ValueError, match=match):
        get_handler("minilm").check_params(params)


@pytest.mark.parametrize("value", ["", None, ["a"]])
def test_minilm_check_row_rejects(value):
    with pytest.raises(ValueError):
        get_handler("minilm").check_row(value)


def test_st_folder_uses_the_same_encoder(minilm_handler):
    handler = loaded(f"st:{minilm_handler.folder}")
    assert handler.input_column == "text" and handler.normalize is True
    np.testing.assert_array_equal(
        handler.predict(SENTENCES, {})["embedding"], minilm_handler.predict(SENTENCES, {})["embedding"]
    )


def test_st_folder_with_other_pooling_is_refused(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    with pytest.raises(JobError, match="only mean pooling") as info:
        get_handler(f"st:{tmp_path}")
    assert info.value.code == "unknown_model"


def test_st_folder_without_weights_fails_on_load_as_job_error(tmp_path):
    handler = get_handler(f"st:{tmp_path}")
    with pytest.raises(JobError) as info:
        handler.load(CPU)
    assert info.value.code == "unknown_model"


# --- user tensor models ---------------------------------------------------------


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DeclaredNet(Net):
    def __init__(self) -> None:
        super().__init__()
        self.input_dim = 5  # an int set in __init__ survives torch.jit.save/load


ROWS = np.random.default_rng(1).normal(size=(9, 5)).astype(np.float32)


def direct(net: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(ROWS)).numpy()


def test_torchscript_round_trip(tmp_path):
    net, path = Net().eval(), tmp_path / "net.pt"
    torch.jit.script(net).save(str(path))
    handler = loaded(f"torchscript:{path}")
    assert handler.input_column == "x" and handler.input_dim is None
    out = BatchRunner(handler, device="cpu").run(ROWS.tolist(), handler.check_params({}))
    assert set(out) == {"output"} and out["output"].dtype == np.float32
    np.testing.assert_allclose(out["output"], direct(net), rtol=1e-6, atol=1e-6)


def test_torchscript_declared_input_dim_is_checked(tmp_path):
    path = tmp_path / "declared.pt"
    torch.jit.script(DeclaredNet().eval()).save(str(path))
    handler = loaded(f"torchscript:{path}")
    assert handler.input_dim == 5
    handler.check_row([0.0, 1, 2, 3, 4.5])
    with pytest.raises(ValueError, match="expected 5 numbers per row, got 4"):
        handler.check_row([0.0, 1, 2, 3])


@pytest.mark.parametrize("dynamic", [True, False])
def test_export_round_trip(tmp_path, dynamic):
    net, path = Net().eval(), tmp_path / "net.pt2"
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    example = torch.from_numpy(ROWS[:4])
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=shapes), str(path))
    handler = loaded(f"export:{path}")
    assert handler.input_dim == 5  # read from the exported program's input
    # 9 rows: a fixed-batch (4) export runs as 4 + 4 + 1 padded; a dynamic one at once.
    out = handler.predict(ROWS.tolist(), {})["output"]
    np.testing.assert_allclose(out, direct(net), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("1,2,3", "list of numbers"),
        ([], "1..1000000"),
        ([1.0, "2"], "numbers only"),
        ([1.0, True], "numbers only"),
        ([[1.0, 2.0]], "numbers only"),
        (np.zeros((2, 2)), "flat list"),
    ],
)
def test_tensor_check_row_rejects(tmp_path, value, match):
    path = tmp_path / "net.pt"
    torch.jit.script(Net()).save(str(path))
    with pytest.raises(ValueError, match=match):
        get_handler(f"torchscript:{path}").check_row(value)


def test_tensor_model_errors_become_job_errors(tmp_path):
    path = tmp_path / "net.pt"
    torch.jit.script(Net()).save(str(path))
    handler = loaded(f"torchscript:{path}")
    with pytest.raises(JobError) as info:
        handler.predict([[1.0, 2.0]], {})  # wrong width for Linear(5, 7)
    assert info.value.code == "inference_failed"


def test_tensor_rows_of_mixed_length_are_rejected(tmp_path):
    path = tmp_path / "net.pt"
    torch.jit.script(Net()).save(str(path))
    with pytest.raises(JobError) as info:
        loaded(f"torchscript:{path}").predict([[1.0] * 5, [1.0] * 4], {})
    assert info.value.code == "row_rejected"


def test_corrupt_model_file_is_a_job_error(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a model")
    for prefix in ("torchscript", "export"):
        with pytest.raises(JobError) as info:
            loaded(f"{prefix}:{path}")
        assert info.value.code == "unknown_model"


@pytest.mark.parametrize("values,ok", [
    (["a", "bb"], True),
    ([], False),  # nothing to vouch for: the row-by-row path decides
    (["a", ""], False),
    (["a", 3], False),
    (["a", "x" * 10_001], False),
    (["a", "x" * 10_000], True),
])
def test_rows_ok_agrees_with_check_row(values, ok):
    from spotbatch.models.tiny import TinyHandler

    handler = TinyHandler()
    assert handler.rows_ok(values) is ok
    if ok:
        for value in values:
            handler.check_row(value)  # never vouches for a row check_row refuses
