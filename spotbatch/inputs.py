"""Read a job's input rows from Parquet or JSONL, on a local path or S3, part by part.

An input of any size is read in bounded memory. Rows are counted without being built
(the Parquet footer; one streaming pass over JSONL lines), then read in order, one
part at a time, as the worker has room: Parquet record batch by record batch, only the
two needed columns; JSONL line by line, each line at most ``max_line_bytes``. Only a
``.json`` file holding one JSON array is read whole, up to ``max_document_bytes``.
S3 objects are read through ranged GETs (spotbatch.s3_range), never downloaded whole.
A count or a part read that takes over ``read_timeout_s`` fails its job
(``input_timeout``), not the worker.

Every failure a user can fix becomes a JobError with a reason that names the file and,
for a missing column, the column asked for and the columns present. Infrastructure
faults (S3 down, throttling past the retry policy) propagate unchanged so the worker
retries the job instead of dead-lettering it.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import botocore.exceptions
import pyarrow as pa
import pyarrow.parquet as pq

from spotbatch.errors import Disposition, JobError, classify
from spotbatch.input_access import open_regular
from spotbatch.storage import S3Store, parse_uri, store_for

__all__ = ["InputLimits", "RowReader", "open_input", "read_rows", "count_rows", "iter_rows", "input_format"]

_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
_CHUNK = 4 * 1024 * 1024  # bytes per read while counting JSONL lines
_BATCH_ROWS = 1024  # Parquet rows decoded at a time
_CHECK_EVERY = 1024  # rows between deadline checks


@dataclass(frozen=True)
class InputLimits:
    """What one job's input may cost a worker (Settings: max_line_bytes, ...)."""

    max_line_bytes: int = 8 * 1024 * 1024  # one JSONL record
    max_document_bytes: int = 256 * 1024 * 1024  # a .json array, the one format read whole
    read_timeout_s: float = 120.0  # one count or one part read


def input_format(uri: str) -> str:
    """"parquet", "jsonl" or "json" (JSONL, or one JSON array of objects), by extension."""
    for ext, fmt in _FORMATS.items():
        if uri.lower().endswith(ext):
            return fmt
    raise JobError("input_invalid", f"{uri}: unknown input format; use one of {', '.join(_FORMATS)}")


class RowReader(ABC):
    """One job's input: ``count()`` its rows, then ``read(start, stop)`` parts in order.

    Reads are sequential (each part starts at or after the last one's end); reading
    backwards starts over from the top. Not thread-safe: one read at a time.
    """

    def __init__(self, uri: str, fh: BinaryIO, id_column: str, input_column: str, limits: InputLimits) -> None:
        self.uri, self._fh, self._limits = uri, fh, limits
        self._columns = (id_column, input_column)

    @abstractmethod
    def count(self) -> int:
        """Rows in the input."""

    @abstractmethod
    def read(self, start: int, stop: int) -> tuple[list[str], list]:
        """(ids as str, inputs) of rows [start, stop)."""

    @abstractmethod
    def rows(self) -> Iterator[dict]:
        """Every row from the top, with all its columns (the CLI's publish --raw)."""

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "RowReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _deadline(self, doing: str) -> "_Deadline":
        return _Deadline(self.uri, doing, self._limits.read_timeout_s)

    def _take(self, row: dict, n: int, ids: list[str], values: list) -> None:
        id_column, input_column = self._columns
        _require(self.uri, row.keys(), self._columns, where=f" (record {n})")
        ids.append(_id_str(self.uri, row[id_column], n))
        values.append(row[input_column])


def open_input(uri: str, id_column: str = "id", input_column: str = "text",
               limits: InputLimits = InputLimits()) -> RowReader:
    """Open ``uri`` for reading part by part. ``uri`` must already have passed the
    worker's InputPolicy."""
    fmt = input_format(uri)
    fh = _open(uri)
    try:
        if fmt == "parquet":
            return _ParquetReader(uri, fh, id_column, input_column, limits)
        if fmt == "json" and _starts_array(fh, limits.max_line_bytes):
            return _DocumentReader(uri, fh, id_column, input_column, limits)
        return _JsonlReader(uri, fh, id_column, input_column, limits)
    except BaseException:
        fh.close()
        raise


def read_rows(uri: str, id_column: str = "id", input_column: str = "text",
              limits: InputLimits = InputLimits()) -> tuple[list[str], list]:
    """Every row at once: for small inputs (tests, the CLI); the worker reads by part."""
    with open_input(uri, id_column, input_column, limits) as reader:
        return reader.read(0, reader.count())


def count_rows(uri: str, limits: InputLimits = InputLimits()) -> int:
    """Rows in ``uri`` without building them (the scaler's work mode)."""
    with open_input(uri, limits=limits) as reader:
        return reader.count()


class _ParquetReader(RowReader):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._pf = _open_parquet(self.uri, self._fh)
        self._batches: Iterator[pa.RecordBatch] | None = None
        self._row = 0  # the first row of self._rest, or of the next batch
        self._rest: pa.RecordBatch | None = None  # rows of the last batch not read yet

    def count(self) -> int:
        return self._pf.metadata.num_rows  # the footer: nothing else is read

    def read(self, start: int, stop: int) -> tuple[list[str], list]:
        _require(self.uri, self._pf.schema_arrow.names, self._columns)
        if self._batches is None or start < self._row:
            self._start_at(start)
        deadline = self._deadline("reading a part")
        ids: list[str] = []
        values: list[Any] = []
        while self._row < stop:
            batch = self._rest if self._rest is not None else self._next_batch()
            if batch is None:
                break
            lo, hi = max(0, start - self._row), min(batch.num_rows, stop - self._row)
            self._rest = batch.slice(hi) if hi < batch.num_rows else None
            self._append(batch.slice(lo, max(0, hi - lo)), self._row + lo, ids, values)
            self._row += hi
            deadline.check()
        _check_complete(self.uri, start, stop, len(ids))
        return ids, values

    def _start_at(self, start: int) -> None:
        """Begin at the row group holding ``start``: earlier groups are skipped unread."""
        meta, first = self._pf.metadata, 0
        groups: list[int] = []
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            if not groups and first + rows <= start:
                first += rows
                continue
            groups.append(g)
        self._batches = self._pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups,
                                              columns=list(dict.fromkeys(self._columns)), use_threads=False)
        self._row, self._rest = first, None

    def rows(self) -> Iterator[dict]:
        try:
            for batch in self._pf.iter_batches(batch_size=_BATCH_ROWS):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise JobError("input_invalid", f"{self.uri}: cannot read Parquet rows ({exc})") from None

    def _next_batch(self) -> pa.RecordBatch | None:
        if self._batches is None:
            raise RuntimeError(f"{self.uri}: Parquet batches read before a start row was set")
        try:
            return next(self._batches, None)
        except (pa.ArrowException, OSError) as exc:
            raise JobError("input_invalid", f"{self.uri}: cannot read Parquet rows ({exc})") from None

    def _append(self, batch: pa.RecordBatch, first_row: int, ids: list[str], values: list) -> None:
        id_column, input_column = self._columns
        raw_ids = batch.column(id_column).to_pylist()
        ids.extend(_id_str(self.uri, v, first_row + n) for n, v in enumerate(raw_ids, 1))
        values.extend(batch.column(input_column).to_pylist())


class _JsonlReader(RowReader):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._line = 0  # lines consumed
        self._row = 0  # records (non-blank lines) consumed

    def count(self) -> int:
        deadline, n, carry = self._deadline("counting rows"), 0, b""
        self._rewind()
        while chunk := self._fh.read(_CHUNK):
            lines = (carry + chunk).split(b"\n")
            carry = lines.pop()
            self._check_length(max(map(len, lines), default=0), len(carry))
            n += sum(1 for line in lines if line.strip())
            deadline.check()
        n += bool(carry.strip())
        self._rewind()
        return n

    def read(self, start: int, stop: int) -> tuple[list[str], list]:
        if start < self._row:
            self._rewind()
        deadline = self._deadline("reading a part")
        ids: list[str] = []
        values: list[Any] = []
        while self._row < stop and (line := self._next_record()) is not None:
            self._row += 1
            if self._row > start:  # skipped records (parts done before) are not parsed
                obj = _as_object(self.uri, _json_value(self.uri, line, self._line), self._row)
                self._take(obj, self._row, ids, values)
            if self._row % _CHECK_EVERY == 0:
                deadline.check()
        _check_complete(self.uri, start, stop, len(ids))
        return ids, values

    def rows(self) -> Iterator[dict]:
        self._rewind()
        while (line := self._next_record()) is not None:
            self._row += 1
            yield _as_object(self.uri, _json_value(self.uri, line, self._line), self._row)

    def _next_record(self) -> bytes | None:
        """The next non-blank line, at most max_line_bytes; None at the end."""
        limit = self._limits.max_line_bytes
        while line := self._fh.readline(limit + 1):
            self._line += 1
            if len(line) > limit and not line.endswith(b"\n"):
                self._check_length(len(line), 0)
            if line.strip():
                return line
        return None

    def _check_length(self, longest: int, unfinished: int) -> None:
        limit = self._limits.max_line_bytes
        if max(longest, unfinished) > limit:
            raise JobError("input_too_large", f"{self.uri}: a line is longer than max_line_bytes ({limit}); "
                           "one JSON object per line, or raise the limit")

    def _rewind(self) -> None:
        self._fh.seek(0)
        self._line = self._row = 0


class _DocumentReader(RowReader):
    """A .json file holding one array of objects: parsed whole, within max_document_bytes."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        limit = self._limits.max_document_bytes
        data = self._fh.read(limit + 1)
        if len(data) > limit:
            raise JobError("input_too_large", f"{self.uri}: a JSON array over max_document_bytes ({limit}); "
                           "write the rows as JSONL (one object per line) to stream them")
        try:
            items = json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise JobError("input_invalid", f"{self.uri}: not valid JSON ({type(exc).__name__})") from None
        self._items = [_as_object(self.uri, v, n) for n, v in enumerate(items, 1)]

    def count(self) -> int:
        return len(self._items)

    def read(self, start: int, stop: int) -> tuple[list[str], list]:
        ids: list[str] = []
        values: list[Any] = []
        for n, row in enumerate(self._items[start:stop], start + 1):
            self._take(row, n, ids, values)
        _check_complete(self.uri, start, stop, len(ids))
        return ids, values

    def rows(self) -> Iterator[dict]:
        return iter(self._items)


class _Deadline:
    def __init__(self, uri: str, doing: str, timeout_s: float) -> None:
        self._uri, self._doing, self._timeout_s = uri, doing, timeout_s
        self._at = time.monotonic() + timeout_s

    def check(self) -> None:
        if time.monotonic() > self._at:
            raise JobError("input_timeout", f"{self._uri}: {self._doing} took over {self._timeout_s:g}s "
                           "(input_read_timeout_s); the source is too slow")


def iter_rows(path: str, limits: InputLimits = InputLimits()) -> Iterator[dict]:
    """Yield each row of a JSONL/JSON/Parquet file as a dict with all its columns, streaming."""
    with open_input(path, limits=limits) as reader:
        yield from reader.rows()


def _open(uri: str) -> BinaryIO:
    """A seekable binary reader: a regular local file, or an S3 object by ranged GETs."""
    try:
        loc = parse_uri(uri)
    except ValueError as exc:
        raise JobError("input_invalid", str(exc)) from None
    if loc.scheme == "file":
        return open_regular(loc.path)
    try:
        store = store_for(uri)
        if not isinstance(store, S3Store):  # parse_uri admits only file and s3
            raise RuntimeError(f"{uri}: no streaming reader for {type(store).__name__}")
        return store.open_read(uri, refused=lambda exc: _s3_refusal(uri, exc))
    except FileNotFoundError as exc:
        raise JobError("input_missing", f"{uri}: no such file or object") from exc
    except botocore.exceptions.ClientError as exc:
        raise _s3_refusal(uri, exc) from None


def _s3_refusal(uri: str, exc: botocore.exceptions.ClientError) -> Exception:
    if classify(exc) is Disposition.RETRY:  # S3 itself is in trouble: an infrastructure fault, retried
        return exc
    code = exc.response.get("Error", {}).get("Code", "error")
    if code == "PreconditionFailed":  # the ETag seen at open no longer matches
        return JobError("input_unreadable", f"{uri}: the object was replaced while the job read it")
    return JobError("input_unreadable", f"{uri}: S3 refused the read ({code})")


def _starts_array(fh: BinaryIO, limit: int) -> bool:
    """Whether the file's first non-blank byte is "[" (looks at most ``limit`` bytes)."""
    head = fh.read(min(limit, 64 * 1024)).lstrip()
    fh.seek(0)
    return head.startswith(b"[")


def _check_complete(uri: str, start: int, stop: int, got: int) -> None:
    if got < stop - start:
        raise JobError("input_invalid", f"{uri}: ended after {start + got} rows, {stop} expected; "
                       "was it changed while the job ran?")


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
        # buffer_size: column chunks are streamed page by page, never read whole.
        return pq.ParquetFile(source, buffer_size=1024 * 1024, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise JobError("input_invalid", f"{uri}: not a readable Parquet file ({exc})") from None


def _json_value(uri: str, line: bytes, lineno: int):
    try:
        return json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise JobError("input_invalid", f"{uri}: line {lineno} is not valid JSON ({type(exc).__name__})") from None


def _as_object(uri: str, value, n: int) -> dict:
    if not isinstance(value, dict):
        raise JobError("input_invalid", f"{uri}: record {n} is {type(value).__name__}, not a JSON object")
    return value
