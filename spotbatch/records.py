"""The records spotbatch writes beside its outputs, defined once for writer and readers.

- ``UsageRecord`` and ``InterruptionRecord``: the usage topic (``spotbatch.usage``).
  The worker's usage meter writes one ``usage`` record per interval (they tile the
  worker's life; ``record_id`` = ``<worker>-<seq>``), and one ``interruption`` record per
  stop; the cost report, the scaler's work mode and the pool splitter read them.
- ``StatusRecord``: one per job outcome on ``<topic>.results``.
- ``DeadLetterHeaders``: the ``spotbatch.*`` headers of a dead letter on ``<topic>.dlq``.

Every record carries a ``version`` (``"v"`` on the wire). Records written before the
field existed (interruption and status records) have none and read as version 1. A
reader skips a kind or a version it does not know (``NotOurs``) and reports a record of
its kind that does not validate as malformed (``ValueError``; ``KeyError`` for a
missing field). This module imports nothing heavy: the scheduler and the scaler read
these records without loading the workers (torch).
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal, Optional, Union, overload

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "RECORD_VERSION",
    "POOLS",
    "StopCause",
    "UsageRecord",
    "InterruptionRecord",
    "StatusRecord",
    "DeadLetterHeaders",
    "NotOurs",
    "decode",
    "parse_usage",
    "usage_or_none",
    "interruptions",
    "encode",
    "dlq_topic",
    "results_topic",
    "dead_letter_key",
    "HEADER_PREFIX",
]

RECORD_VERSION = 1
POOLS = ("spot", "on-demand", "unknown")  # unknown: a worker not told its pool; priced on-demand
HEADER_PREFIX = "spotbatch."


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


def results_topic(topic: str) -> str:
    return f"{topic}.results"


def dead_letter_key(topic: str, partition: int, offset: int) -> bytes:
    """The key a dead letter is written with: its source coordinates (a compacted DLQ
    then keeps one per source record)."""
    return f"{topic}:{partition}:{offset}".encode()


class NotOurs(Exception):
    """A record of another kind, or a version this reader does not know: skip it."""


class StopCause(str, enum.Enum):
    """Why a worker stopped, from the reason its stop was requested with.

    A spot interruption is a stop the cloud announced (the notice watchers' reasons start
    ``aws:``, ``gcp:``, ``azure:``). A bare SIGTERM is not: Kubernetes sends it on every
    scale-in and rollout too, and on a spot node the metadata notice reaches the worker
    before the node drain does.
    """

    AWS = "aws"
    GCP = "gcp"
    AZURE = "azure"
    SIGNAL = "signal"
    BURST = "burst"  # burst mode caught up: a planned stop
    OTHER = "other"  # asked to stop (tests, embedding code) or a reason we do not know

    @classmethod
    def of(cls, reason: str) -> StopCause:
        head, sep, _ = reason.partition(":")
        if not sep:
            return cls.OTHER
        try:
            return cls(head.strip())
        except ValueError:
            return cls.OTHER

    @property
    def interruption(self) -> bool:
        return self in (StopCause.AWS, StopCause.GCP, StopCause.AZURE)


# -- field types: the usage ledger's rules (finite, never negative, no bools as numbers) --

def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{value!r} is not a finite number >= 0")
    return float(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a whole number >= 0")
    return value


Seconds = Annotated[float, BeforeValidator(_number)]
Count = Annotated[int, BeforeValidator(_count)]
Text = Annotated[str, BeforeValidator(str)]
Flag = Annotated[bool, BeforeValidator(bool)]
Version = Annotated[int, Field(RECORD_VERSION, alias="v")]


class _Record(BaseModel):
    # Unknown keys are kept out of the model but tolerated: a newer writer may add fields.
    model_config = ConfigDict(populate_by_name=True, frozen=True, extra="ignore")

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True)).encode()

    @classmethod
    def parse(cls, body: Mapping[str, Any]):
        """Validate one body of this kind; KeyError names a missing field, ValueError a bad one."""
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            missing = [e["loc"][0] for e in exc.errors() if e["type"] == "missing" and e["loc"]]
            if missing:
                raise KeyError(missing[0]) from None
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or cls.__name__
            raise ValueError(f"{where}: {first['msg']}") from None


class UsageRecord(_Record):
    """One interval [start, end) of one worker's life (epoch seconds) and what it did."""

    version: Version
    kind: Literal["usage"] = "usage"
    record_id: Text
    worker: Text
    pool: Literal["spot", "on-demand", "unknown"]
    instance_type: Text
    gpus: Count
    start: Seconds
    end: Seconds
    seconds_alive: Seconds
    seconds_busy: Seconds
    rows: Count
    jobs: Count
    interruptions: Count
    rows_recomputed: Count
    final: Flag = False
    at: Optional[Seconds] = None

    @model_validator(mode="after")
    def _ordered(self) -> UsageRecord:
        if self.end < self.start:
            raise ValueError("end before start")
        return self


class InterruptionRecord(_Record):
    """What one stop cost: the drain, and the inferred rows it will redo elsewhere."""

    version: Version
    kind: Literal["interruption"] = "interruption"
    worker: Text
    at: Seconds
    reason: Text
    cause: StopCause = StopCause.OTHER  # records from before the field: derived from reason
    drain_s: Seconds = 0.0
    rows_lost: Count = 0
    units_abandoned: Count = 0
    rows: Count = 0
    jobs_ok: Count = 0
    jobs_failed: Count = 0

    @model_validator(mode="before")
    @classmethod
    def _cause_from_reason(cls, body: Any) -> Any:
        if isinstance(body, Mapping) and "cause" not in body and "reason" in body:
            return {**body, "cause": StopCause.of(str(body["reason"]))}
        return body


class StatusRecord(_Record):
    """A job's outcome: ``ok`` (rows, seconds, output) or ``failed`` (error, reason).

    ``source`` is the job record's coordinates ({topic, partition, offset}); fields a
    newer worker adds are kept (``extra``) so a reader can pass them on."""

    model_config = ConfigDict(populate_by_name=True, frozen=True, extra="allow")

    version: Version
    job_id: Optional[str]
    status: Literal["ok", "failed"]
    worker: Text
    at: Seconds
    source: Optional[dict[str, Any]] = None
    rows: int = 0
    seconds: Optional[float] = None
    output: Optional[str] = None
    already_done: bool = False
    error: Optional[str] = None
    reason: Optional[str] = None

    def to_json(self) -> bytes:  # the defaults stay off the wire, as before the model
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_unset=True) |
                          {"v": self.version}).encode()


UsageTopicRecord = Union[UsageRecord, InterruptionRecord]
_USAGE_KINDS: dict[str, type[_Record]] = {"usage": UsageRecord, "interruption": InterruptionRecord}


def decode(value: bytes | str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A record's JSON object (None: not JSON, or not an object)."""
    if isinstance(value, Mapping):
        return dict(value)
    try:
        body = json.loads(value or b"")
    except (ValueError, TypeError):
        return None
    return body if isinstance(body, dict) else None


_Value = Union[bytes, str, Mapping[str, Any], None]


@overload
def parse_usage(value: _Value, *, kinds: tuple[Literal["usage"]] = ...) -> UsageRecord: ...
@overload
def parse_usage(value: _Value, *, kinds: tuple[Literal["interruption"]]) -> InterruptionRecord: ...
@overload
def parse_usage(value: _Value, *, kinds: tuple[str, ...]) -> UsageTopicRecord: ...


def parse_usage(value: bytes | str | Mapping[str, Any] | None, *,
                kinds: tuple[str, ...] = ("usage",)) -> UsageTopicRecord:
    """One usage-topic record of ``kinds``; NotOurs for another kind or version,
    ValueError (KeyError: a missing field) for one that does not validate."""
    body = decode(value)
    if body is None:
        raise ValueError("not a JSON object")
    kind = body.get("kind")
    if kind not in kinds or kind not in _USAGE_KINDS or body.get("v", RECORD_VERSION) != RECORD_VERSION:
        raise NotOurs(f"kind={kind!r} v={body.get('v')!r}")
    return _USAGE_KINDS[kind].parse(body)


def usage_or_none(value: bytes | str | Mapping[str, Any] | None) -> UsageRecord | None:
    """A valid usage record, or None for anything else (followers that only sum)."""
    try:
        return parse_usage(value)
    except (NotOurs, KeyError, ValueError):
        return None


def interruptions(values: Iterable[bytes | str | Mapping[str, Any] | None]) -> list[InterruptionRecord]:
    """The valid interruption records among ``values``."""
    out: list[InterruptionRecord] = []
    for value in values:
        try:
            out.append(parse_usage(value, kinds=("interruption",)))
        except (NotOurs, KeyError, ValueError):
            continue
    return out


def encode(kind: str, **fields: Any) -> bytes:
    """A usage-topic record of ``kind`` from its fields, validated (ValueError if not)."""
    if kind not in _USAGE_KINDS:
        raise ValueError(f"unknown usage record kind {kind!r}; use one of {sorted(_USAGE_KINDS)}")
    return _USAGE_KINDS[kind].parse({**fields, "kind": kind}).to_json()


# -- dead-letter headers -----------------------------------------------------------

@dataclass(frozen=True)
class DeadLetterHeaders:
    """The ``spotbatch.*`` headers a dead letter carries beside the original's own.

    ``truncated``: the value is a preview of an original too big to re-publish; its size
    and SHA-256 follow, and ``original_uri`` where the whole original was stored."""

    code: Optional[str] = None
    reason: str = ""
    source_topic: Optional[str] = None
    source_partition: Optional[int] = None
    source_offset: Optional[int] = None
    worker: Optional[str] = None
    source_key: Optional[bytes] = None  # the original record's key, raw
    truncated: bool = False
    original_size: Optional[int] = None
    original_sha256: Optional[str] = None
    original_uri: Optional[str] = None

    # wire name of each field, in the order the writer puts them
    NAMES = {"code": "error.code", "reason": "error.reason", "source_topic": "source.topic",
             "source_partition": "source.partition", "source_offset": "source.offset", "worker": "worker",
             "truncated": "original.truncated", "original_size": "original.size",
             "original_sha256": "original.sha256", "original_uri": "original.uri", "source_key": "source.key"}

    def to_headers(self) -> list[tuple[str, bytes]]:
        out = []
        for name, wire in self.NAMES.items():
            value = getattr(self, name)
            if value is None or (name == "truncated" and not value):
                continue
            raw = value if isinstance(value, bytes) else b"1" if value is True else str(value).encode()
            out.append((HEADER_PREFIX + wire, raw))
        return out

    @classmethod
    def split(cls, headers: Iterable[tuple[str, bytes | None]] | None) -> tuple[DeadLetterHeaders, list[tuple[str, bytes]]]:
        """(ours, the original record's headers); of a header repeated, the last wins."""
        wire = {HEADER_PREFIX + w: n for n, w in cls.NAMES.items()}
        ours: dict[str, bytes] = {}
        original = []
        for key, value in headers or []:
            value = value if value is not None else b""
            if key in wire or key.startswith(HEADER_PREFIX + "original."):
                ours[key] = value
            else:
                original.append((key, value))
        found = {wire[k]: v for k, v in ours.items() if k in wire}
        return cls(**{f.name: _header_value(f.name, found.get(f.name)) for f in fields(cls)
                      if f.name in found}), original


def _header_value(name: str, raw: bytes | None) -> Any:
    if name == "source_key":
        return raw
    if name == "truncated":
        return (raw or b"").strip() in (b"1", b"true")
    if name in ("source_partition", "source_offset", "original_size"):
        try:
            return int(raw) if raw is not None else None
        except ValueError:
            return None
    text = raw.decode(errors="replace") if raw is not None else None
    if name == "reason":
        return text or ""
    if name == "original_uri":
        return text or None  # an empty URI is no URI
    return text
