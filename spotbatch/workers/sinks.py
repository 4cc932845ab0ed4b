"""Write a job's results as one Parquet object named after the job.

The name is a pure function of the job id (and part index), and the bytes go out in
one atomic write, so at-least-once delivery still yields exactly one output per job:
a redelivered job replaces its own file and never leaves a partial or second copy.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spotbatch.errors import JobError
from spotbatch.storage import ObjectStore, check_under_prefix, join_uri, normalize_uri, store_for

__all__ = ["ParquetSink", "build_table", "read_table", "MANIFEST_NAME"]

MANIFEST_NAME = "_manifest.json"


class ParquetSink:
    """Parquet outputs under ``root``; jobs may pick a sub-prefix, never leave ``root``."""

    def __init__(self, root: str, *, store: ObjectStore | None = None) -> None:
        self.root = normalize_uri(root)
        self._store = store  # None: pick per URI with store_for (tests inject MemoryStore)

    def output_uri(self, job_id: str, output_prefix: str | None = None) -> str:
        """``<prefix or root>/<job_id>.parquet``, checked to lie under root."""
        return self._under_root(self._prefix(output_prefix), _safe_name(job_id) + ".parquet")

    def part_uri(self, job_id: str, output_prefix: str | None, part: int) -> str:
        """A part of a job in parts: ``<prefix or root>/<job_id>/part-NNNNN.parquet``."""
        if part < 0:
            raise ValueError(f"part index must be >= 0, got {part}")
        return self._under_root(self._prefix(output_prefix), f"{_safe_name(job_id)}/part-{part:05d}.parquet")

    def folder_uri(self, job_id: str, output_prefix: str | None) -> str:
        """The folder of a job in parts: its part files and its manifest."""
        return self.manifest_uri(job_id, output_prefix).rsplit("/", 1)[0]

    def manifest_uri(self, job_id: str, output_prefix: str | None) -> str:
        """Written last, once every part is durable: its presence means the job is complete."""
        return self._under_root(self._prefix(output_prefix), f"{_safe_name(job_id)}/{MANIFEST_NAME}")

    def write_bytes(self, uri: str, data: bytes) -> None:
        self._store_for(uri).write_atomic(uri, data)

    def exists(self, uri: str) -> bool:
        return self._store_for(uri).exists(uri)

    def _prefix(self, output_prefix: str | None) -> str:
        return check_under_prefix(self._anchor(output_prefix), self.root) if output_prefix else self.root

    def under_root(self, name: str) -> str:
        """``<root>/<name>``, checked to stay under root."""
        return self._under_root(self.root, name)

    def _under_root(self, prefix: str, name: str) -> str:
        # Checked again after the join, in case an odd id still points somewhere else.
        return check_under_prefix(join_uri(prefix, name), self.root)

    def _anchor(self, prefix: str) -> str:
        """A relative prefix ("run-7/") means under root, wherever the worker was started."""
        if "://" in prefix or os.path.isabs(prefix):
            return prefix
        return join_uri(self.root, prefix)

    def write(self, uri: str, ids: list[str], columns: dict[str, np.ndarray],
              metadata: dict[str, str] | None = None) -> None:
        """Serialise in memory, then one atomic write: readers never see half a file.
        ``metadata`` goes into the Parquet schema (the model version that wrote it)."""
        data = _to_parquet_bytes(build_table(ids, columns, metadata))
        self._store_for(uri).write_atomic(uri, data)

    def write_many(self, outputs: list[tuple[str, list[str], dict[str, np.ndarray], dict[str, str] | None]]) -> None:
        """Several outputs (uri, ids, columns, metadata) made durable together (one sync for all)."""
        if outputs:
            items = [(uri, _to_parquet_bytes(build_table(ids, columns, meta))) for uri, ids, columns, meta in outputs]
            self._store_for(items[0][0]).write_many(items)  # outputs share root's store

    def metadata_of(self, uri: str) -> dict[str, str] | None:
        """An existing output's Parquet schema metadata (our keys only); None if there is none."""
        try:
            data = self._store_for(uri).read_bytes(uri)
        except FileNotFoundError:
            return None
        schema = pq.read_schema(pa.BufferReader(data))
        return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items() if k.startswith(b"spotbatch.")}

    def _store_for(self, uri: str) -> ObjectStore:
        return self._store if self._store is not None else store_for(uri)


def _safe_name(job_id: str) -> str:
    if not job_id or job_id in (".", "..") or any(c in job_id for c in "/\\\x00"):
        raise JobError("invalid_job", f"job id {job_id!r} cannot name an output object")
    return job_id


def build_table(ids: list[str], columns: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> pa.Table:
    """``id`` (string) first, then each column; a 2-D (n, d) array -> fixed_size_list[d]."""
    if "id" in columns:
        raise ValueError("'id' is reserved for the row ids; rename the output column")
    arrays = {"id": pa.array([str(i) for i in ids], type=pa.string())}
    for name, values in columns.items():
        arrays[name] = _column(name, np.asarray(values), len(ids))
    return pa.table(arrays, metadata=metadata)


def _column(name: str, values: np.ndarray, n: int) -> pa.Array:
    if values.shape[:1] != (n,):
        raise ValueError(f"column {name!r} has {values.shape[:1] or 'no'} rows, expected {n}")
    if values.ndim == 1:
        return pa.array(values)
    if values.ndim == 2:
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    raise ValueError(f"column {name!r} is {values.ndim}-D; only 1-D and 2-D arrays are supported")


def _to_parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    # No dictionary pages: ids are unique and embeddings are floats, so dictionaries only
    # cost time (a quarter of a small output's write).
    pq.write_table(table, sink, compression="zstd", use_dictionary=False)
    return sink.getvalue().to_pybytes()


def read_table(uri: str, *, store: ObjectStore | None = None) -> pa.Table:
    """Read a Parquet output back (tests, demo)."""
    data = (store or store_for(uri)).read_bytes(uri)
    return pq.read_table(pa.BufferReader(data))
