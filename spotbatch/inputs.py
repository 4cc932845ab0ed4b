"""Read a job's input rows from Parquet or JSONL, on a local path or S3.

Every failure a user can fix becomes a JobError with a reason that names the file and,
for a missing column, the column asked for and the columns present. Infrastructure
faults (S3 down, throttling past the retry policy) propagate unchanged so the worker
retries the job instead of dead-lettering it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import botocore.exceptions
import pyarrow as pa
import pyarrow.parquet as pq

from spotbatch.errors import JobError
from spotbatch.input_access import open_regular
from spotbatch.storage import is_transient, parse_uri, store_for

__all__ = ["read_rows", "iter_rows", "input_format", "DEFAULT_MAX_INPUT_BYTES"]

# Inputs are read whole for now, so a size limit is what keeps one job from taking the
# worker's memory; bigger inputs are split into several jobs.
DEFAULT_MAX_INPUT_BYTES = 256 * 1024 * 1024

_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}


def input_format(uri: str) -> str:
    """"parquet", "jsonl" or "json" (JSONL, or one JSON array of objects), by extension."""
    for ext, fmt in _FORMATS.items():
        if uri.lower().endswith(ext):
            return fmt
    raise JobError("input_invalid", f"{uri}: unknown input format; use one of {', '.join(_FORMATS)}")


def read_rows(uri: str, id_column: str = "id", input_column: str = "text", *,
              max_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> tuple[list[str], list]:
    """Return (ids as str, inputs) from ``uri``, reading only the two needed columns.

    ``uri`` must already have passed the worker's InputPolicy.
    """
    fmt = input_format(uri)
    data = _read(uri, max_bytes)
    if fmt == "parquet":
        return _parquet_rows(uri, data, id_column, input_column)
    ids, inputs = [], []
    for n, row in _json_rows(uri, io.BytesIO(data), fmt):
        _require(uri, row.keys(), (id_column, input_column), where=f" (record {n})")
        ids.append(_id_str(uri, row[id_column], n))
        inputs.append(row[input_column])
    return ids, inputs


def iter_rows(path: str) -> Iterator[dict]:
    """Yield each row of a JSONL/Parquet file as a dict, streaming.

    Local files are read incrementally; S3 objects are fetched once into memory and
    parsed from that buffer (Parquet row group by row group), never copied whole
    into a second form.
    """
    fmt = input_format(path)
    loc = _parse(path)
    if loc.scheme == "file":
        yield from _iter_local(path, loc.path, fmt)
        return
    data = _read(path, DEFAULT_MAX_INPUT_BYTES)
    if fmt == "parquet":
        yield from _parquet_dicts(path, pa.BufferReader(data))
    else:
        yield from (row for _, row in _json_rows(path, io.BytesIO(data), fmt))


def _iter_local(uri: str, local_path: str, fmt: str) -> Iterator[dict]:
    with open_regular(local_path) as fh:
        if fmt == "parquet":
            yield from _parquet_dicts(uri, fh)
        else:
            yield from (row for _, row in _json_rows(uri, fh, fmt))


def _parse(uri: str):
    try:
        return parse_uri(uri)
    except ValueError as exc:
        raise JobError("input_invalid", str(exc)) from None


def _read(uri: str, max_bytes: int) -> bytes:
    loc = _parse(uri)
    if loc.scheme == "file":
        with open_regular(loc.path) as fh:
            return _read_bounded(uri, fh, max_bytes)
    try:
        data = store_for(uri).read_bytes(uri)
    except FileNotFoundError as exc:
        raise JobError("input_missing", f"{uri}: no such file or object") from exc
    except botocore.exceptions.ClientError as exc:
        if is_transient(exc):  # S3 itself is in trouble: an infrastructure fault, retried
            raise
        code = exc.response.get("Error", {}).get("Code", "error")
        raise JobError("input_unreadable", f"{uri}: S3 refused the read ({code})") from None
    _check_size(uri, len(data), max_bytes)
    return data


def _read_bounded(uri: str, fh: BinaryIO, max_bytes: int) -> bytes:
    _check_size(uri, os.fstat(fh.fileno()).st_size, max_bytes)
    data = fh.read(max_bytes + 1)  # the file may grow after the fstat
    _check_size(uri, len(data), max_bytes)
    return data


def _check_size(uri: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise JobError("input_too_large",
                       f"{uri}: {size} bytes, over this worker's max_input_bytes ({max_bytes}); split the input")


def _require(uri: str, present: Iterable[str], needed: Iterable[str], where: str = "") -> None:
    present = list(present)
    for column in needed:
        if column not in present:
            raise JobError(
                "input_invalid",
                f"{uri}{where}: no column {column!r}; columns present: {', '.join(map(repr, present)) or 'none'}",
            )


def _id_str(uri: str, value, n: int) -> str:
    # A null id cannot name an output row; "None" would silently collide.
    if value is None:
        raise JobError("input_invalid", f"{uri}: record {n} has a null id")
    return str(value)


def _open_parquet(uri: str, source) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as exc:
        raise JobError("input_invalid", f"{uri}: not a readable Parquet file ({exc})") from None


def _parquet_rows(uri: str, data: bytes, id_column: str, input_column: str) -> tuple[list[str], list]:
    pf = _open_parquet(uri, pa.BufferReader(data))
    _require(uri, pf.schema_arrow.names, (id_column, input_column))
    try:
        table = pf.read(columns=[id_column, input_column])
    except (pa.ArrowException, OSError) as exc:
        raise JobError("input_invalid", f"{uri}: cannot read Parquet columns ({exc})") from None
    raw_ids = table.column(id_column).to_pylist()
    ids = [_id_str(uri, v, n) for n, v in enumerate(raw_ids, 1)]
    return ids, table.column(input_column).to_pylist()


def _parquet_dicts(uri: str, source) -> Iterator[dict]:
    pf = _open_parquet(uri, source)
    try:
        for group in range(pf.num_row_groups):
            yield from pf.read_row_group(group).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise JobError("input_invalid", f"{uri}: cannot read Parquet rows ({exc})") from None


def _json_rows(uri: str, fh: BinaryIO, fmt: str) -> Iterator[tuple[int, dict]]:
    """Yield (record number, object). JSONL streams line by line; a ".json" file may
    instead be one JSON document (an array of objects, or a single object)."""
    if fmt == "json":
        data = fh.read()
        doc = _whole_document(data)
        if doc is not None:
            items = doc if isinstance(doc, list) else [doc]
            yield from ((n, _as_object(uri, v, n)) for n, v in enumerate(items, 1))
            return
        fh = io.BytesIO(data)  # not one document: read it as JSONL below
    n = 0
    for lineno, line in enumerate(fh, 1):
        if line.strip():
            n += 1
            yield n, _as_object(uri, _json_value(uri, line, lineno), n)


def _whole_document(data: bytes):
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None


def _json_value(uri: str, line: bytes, lineno: int):
    try:
        return json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise JobError("input_invalid", f"{uri}: line {lineno} is not valid JSON ({exc})") from None


def _as_object(uri: str, value, n: int) -> dict:
    if not isinstance(value, dict):
        raise JobError("input_invalid", f"{uri}: record {n} is {type(value).__name__}, not a JSON object")
    return value

