"""The job message: a versioned JSON object published to the jobs topic.

Version 1::

    {"version": 1, "job_id": "docs-000001", "model": "minilm",
     "inputs": {"rows": [{"id": "a1", "text": "hello"}]},
     "output": "s3://bucket/runs/7/",            # optional, under the worker's prefix
     "params": {}}                                # optional, model-specific

``inputs`` holds either inline ``rows`` or a ``uri`` (file://, s3://, or a local
path) to a Parquet/JSONL file plus ``id_column`` / ``input_column`` naming the
columns to use. Any producer that writes this JSON works; ``parse_job`` turns bytes
into a validated :class:`Job` or raises a :class:`JobError` naming the field.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, TypeAdapter,
                      ValidationError)

from spotbatch.errors import JobError

__all__ = ["Job", "InlineInputs", "UriInputs", "Row", "parse_job", "job_key", "SCHEMA_VERSIONS", "MAX_JOB_BYTES"]

SCHEMA_VERSIONS = (1,)
# Inline jobs are meant to be small; bigger inputs go in a file referenced by URI.
MAX_JOB_BYTES = 8 * 1024 * 1024
MAX_INLINE_ROWS = 100_000
# Bounds checked on the raw bytes before json builds any object: a hostile message must
# not reach json's own limits (RecursionError, int digit limit) or build huge values.
# A legitimate job nests 4 deep ({inputs: {rows: [{...}]}}); its numbers are a few digits.
MAX_DEPTH = 32
MAX_NUMBER_DIGITS = 100
MAX_STRING_BYTES = 1024 * 1024
_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: no alternation per byte
_NOT_SYNTAX = bytes(range(256)).translate(None, b'[]{}"')  # every byte but brackets and quotes: deleted
# Digits -> "0", every other byte -> " ": a long number is then a plain substring search.
_DIGITS_AS_ZERO = bytes(ord("0") if chr(c).isdigit() and c < 128 else ord(" ") for c in range(256))
_DIGIT_RUN = b"0" * (MAX_NUMBER_DIGITS + 1)

# Job ids name output files, so they must be safe in a path or an S3 key.
JobId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
ColumnName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
# Locations become paths and keys: no NUL or other control characters.
Location = Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=r"^[^\x00-\x1f\x7f]+$")]
ParamValue = Union[bool, int, float, str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MAX_ROW_ID_CHARS = 256


class Row(_Strict):
    """One inline row: an ``id`` plus the model's input column (any other key).

    Rows travel as plain dicts (a model instance per row was most of a job's parse
    cost); this model only words the error for a row that fails the fast check.
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    id: Annotated[str, StringConstraints(min_length=1, max_length=MAX_ROW_ID_CHARS)]


_ROWS = TypeAdapter(list[Row])


def _rows_checked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row has a string ``id`` of 1..256 characters: one plain pass; on the first
    row that has not, the Row model validates them all and its error names that row."""
    for row in rows:
        row_id = row.get("id")
        if type(row_id) is not str or not 0 < len(row_id) <= MAX_ROW_ID_CHARS:
            _ROWS.validate_python(rows)  # raises: inputs.rows.<i>.id: <what is wrong>
    return rows


class InlineInputs(_Strict):
    """``rows``: dicts, each with ``id`` and the model's input column."""

    rows: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_INLINE_ROWS),
                    AfterValidator(_rows_checked)]


class UriInputs(_Strict):
    uri: Location
    id_column: ColumnName = "id"
    input_column: ColumnName | None = None  # default: the model's input column


def _inputs_kind(value: Any) -> str:
    # Pick the branch from the key present so errors name one branch's fields only.
    data = value if isinstance(value, dict) else getattr(value, "__dict__", {})
    return "uri" if "uri" in data else "rows"


class Job(_Strict):
    version: Literal[1] = 1
    job_id: JobId
    model: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    inputs: Annotated[
        Annotated[InlineInputs, Tag("rows")] | Annotated[UriInputs, Tag("uri")],
        Discriminator(_inputs_kind),
    ]
    output: Location | None = None
    # default_factory: a literal {} default is deep-copied on every validation (pydantic).
    params: Annotated[dict[ColumnName, ParamValue], Field(default_factory=dict, max_length=64)]

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def parse_job(raw: bytes | None) -> Job:
    """Decode and validate one message value; raise JobError naming what is wrong."""
    if raw is None:
        raise JobError("malformed_json", "the message has no value (tombstone)")
    if len(raw) > MAX_JOB_BYTES:
        raise JobError("message_too_large", f"message is {len(raw)} bytes; the limit is {MAX_JOB_BYTES} "
                       "(put big inputs in a file and send its uri)")
    _check_shape(raw)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise JobError("malformed_json", f"not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise JobError("malformed_json", f"expected a JSON object, got {type(data).__name__}")
    version = data.get("version", 1)
    if type(version) is not int or version not in SCHEMA_VERSIONS:  # noqa: E721 - True is not 1 here
        raise JobError("unknown_version", f"version {version!r} is not supported (supported: {list(SCHEMA_VERSIONS)})")
    try:
        return Job.model_validate(data)
    except ValidationError as exc:
        raise JobError("invalid_job", _first_error(exc)) from None


def _check_shape(raw: bytes) -> None:
    """Reject what json would choke on, from the bytes alone (strings set aside first)."""
    if len(raw) > MAX_STRING_BYTES + 2:  # else no string can be too long
        strings = _STRING_RE.findall(raw)
        if strings and (longest := max(map(len, strings))) > MAX_STRING_BYTES + 2:
            raise JobError("invalid_job", f"a string of {longest - 2} bytes; the limit is {MAX_STRING_BYTES}")
    # Long digit runs inside strings are fine; only then is the slow string-aware look needed.
    if _has_digit_run(raw) and _has_digit_run(_STRING_RE.sub(b'""', raw)):
        raise JobError("invalid_job", f"a number of more than {MAX_NUMBER_DIGITS} digits")
    brackets = np.frombuffer(_brackets_outside_strings(raw), dtype=np.uint8)
    if brackets.size:
        opens = (brackets == ord("[")) | (brackets == ord("{"))
        depth = int(np.cumsum(np.where(opens, 1, -1)).max())
        if depth > MAX_DEPTH:
            raise JobError("invalid_job", f"JSON nested {depth} deep; the limit is {MAX_DEPTH}")


def _has_digit_run(raw: bytes) -> bool:
    return raw.translate(_DIGITS_AS_ZERO).find(_DIGIT_RUN) >= 0


def _brackets_outside_strings(raw: bytes) -> bytes:
    """The brackets of ``raw`` that are JSON syntax, in order, with C-speed byte passes.

    Escapes go first: every escaped backslash (pairs, read left to right as JSON does),
    then every escaped quote. What is left keeps only quotes and brackets, and the
    quotes then alternate open/close, so every other piece is outside a string.
    """
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in raw else raw
    return b"".join(unescaped.translate(None, _NOT_SYNTAX).split(b'"')[::2])


def _first_error(exc: ValidationError) -> str:
    """One line: the dotted field path and pydantic's message for the first error."""
    err = exc.errors()[0]
    # The tagged union reports the tag as a path element; drop it.
    loc = [str(p) for p in err["loc"]]
    if loc[:1] == ["inputs"] and loc[1:2] in (["rows"], ["uri"]):
        del loc[1]
    where = ".".join(loc) or "<job>"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


def job_key(job_id: str) -> bytes:
    """Partition key: spreads jobs over partitions and keeps a job's redeliveries together."""
    return job_id.encode()

