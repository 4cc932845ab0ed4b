"""Dead letters of a jobs topic: parse, de-duplicate, select, and read back the original
bytes for a redrive (``spotbatch dlq list|show|redrive``, in spotbatch.cli.dlq).

Dead letters are at-least-once (a crash between a dead letter's ack and the offset
commit writes it again), so every view here is de-duplicated by the dead letter's
source coordinates (topic, partition, offset): the last one written wins. The DLQ is
read whole (every partition, from the start to the log end as it was when the read
began) by a reader with no consumer group.

Redrive re-publishes the original bytes (value, original key, original headers) to the
jobs topic. A dead letter of an oversized job may hold a truncated value
(``spotbatch.original.truncated`` = ``1``); its full bytes are read back from
``spotbatch.original.uri`` (checked against ``spotbatch.original.sha256`` / ``.size``
when given), and without a URI it is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from spotbatch.records import HEADER_PREFIX as PREFIX
from spotbatch.records import DeadLetterHeaders, dead_letter_key, dlq_topic

__all__ = [
    "DeadLetter",
    "parse_dead_letter",
    "dedupe",
    "select",
    "find",
    "original_bytes",
    "RedriveRefused",
    "dead_letter_key",
    "SOURCE_KEY_HEADER",
    "dlq_topic_of",
    "parse_offset",
]

SOURCE_KEY_HEADER = PREFIX + "source.key"
URI_HEADER = PREFIX + "original.uri"
SHA256_HEADER = PREFIX + "original.sha256"


def dlq_topic_of(topic: str) -> str:
    """``<topic>.dlq`` (spotbatch.records.dlq_topic, the name the workers write to)."""
    return dlq_topic(topic)


class RedriveRefused(Exception):
    """This dead letter cannot be redriven as it is; the message says why and the fix."""


@dataclass
class DeadLetter:
    dlq_partition: int
    dlq_offset: int
    timestamp: int
    source_topic: Optional[str]
    source_partition: Optional[int]
    source_offset: Optional[int]
    code: Optional[str]
    reason: str
    key: Optional[bytes]  # the original record's key
    value: Optional[bytes]  # as stored in the DLQ (truncated if ``truncated``)
    headers: list[tuple[str, bytes]]  # the original record's headers (ours removed)
    worker: Optional[str] = None
    truncated: bool = False
    original_size: Optional[int] = None
    original_sha256: Optional[str] = None
    original_uri: Optional[str] = None
    duplicates: int = 0  # other dead letters for the same source record, dropped
    job_id: Optional[str] = field(default=None)

    @property
    def coords(self) -> tuple:
        """What identifies the source record (the DLQ's own position for a letter without one)."""
        if self.source_partition is None or self.source_offset is None:
            return ("<dlq>", self.dlq_partition, self.dlq_offset)
        return (self.source_topic or "", self.source_partition, self.source_offset)

    @property
    def size(self) -> int:
        """Bytes of the original value (its recorded size when truncated here)."""
        if self.truncated and self.original_size is not None:
            return self.original_size
        return len(self.value or b"")

    def summary(self) -> dict[str, Any]:
        return {
            "source": {"topic": self.source_topic, "partition": self.source_partition, "offset": self.source_offset},
            "dlq": {"partition": self.dlq_partition, "offset": self.dlq_offset},
            "job_id": self.job_id, "code": self.code, "reason": self.reason, "size": self.size,
            "key": _text(self.key), "worker": self.worker, "truncated": self.truncated,
            "original_uri": self.original_uri, "duplicates": self.duplicates, "timestamp_ms": self.timestamp,
        }

    def detail(self) -> dict[str, Any]:
        return {**self.summary(), "original_sha256": self.original_sha256,
                "value": _text(self.value), "headers": {k: _text(v) for k, v in self.headers}}


def _text(data: Optional[bytes]) -> Optional[str]:
    """UTF-8 text where it decodes, else ``hex:...``."""
    if data is None:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "hex:" + data.hex()


_JOB_ID_RE = re.compile(rb'"job_id"\s*:\s*"([A-Za-z0-9][A-Za-z0-9._-]{0,127})"')


def _job_id(value: Optional[bytes], *, truncated: bool = False) -> Optional[str]:
    """The job id of a JSON job; of a truncated one, the first ``"job_id"`` in its preview."""
    if truncated:
        found = _JOB_ID_RE.search(value or b"")
        return found.group(1).decode() if found else None
    try:
        body = json.loads(value) if value else None
    except ValueError:
        return None
    job_id = body.get("job_id") if isinstance(body, dict) else None
    return job_id if isinstance(job_id, str) else None


def parse_dead_letter(record: Any) -> DeadLetter:
    """A DLQ record (kafka-python ConsumerRecord or alike) as a DeadLetter."""
    ours, original = DeadLetterHeaders.split(record.headers)
    topic, partition, offset = ours.source_topic, ours.source_partition, ours.source_offset
    if ours.source_key is not None:
        key = ours.source_key
    elif partition is not None and offset is not None and record.key == dead_letter_key(topic or "", partition, offset):
        key = None  # keyed by coordinates, and the original had no key
    else:
        key = record.key  # written before dead letters were keyed by coordinates
    value = record.value
    return DeadLetter(
        dlq_partition=record.partition, dlq_offset=record.offset, timestamp=getattr(record, "timestamp", 0) or 0,
        source_topic=topic, source_partition=partition, source_offset=offset, code=ours.code, reason=ours.reason,
        key=key, value=value, headers=original, worker=ours.worker, truncated=ours.truncated,
        original_size=ours.original_size, original_sha256=ours.original_sha256, original_uri=ours.original_uri,
        job_id=_job_id(value, truncated=ours.truncated),
    )


def dedupe(letters: Iterable[DeadLetter]) -> list[DeadLetter]:
    """One dead letter per source record, the last one written; sorted by source coordinates.

    "Last": the higher offset on the same DLQ partition (a keyed DLQ puts repeats on one
    partition); across partitions (letters keyed by the original key), the later timestamp.
    """
    kept: dict[tuple, DeadLetter] = {}
    for letter in letters:
        seen = kept.get(letter.coords)
        if seen is None:
            kept[letter.coords] = letter
            continue
        if letter.dlq_partition == seen.dlq_partition:
            later = letter.dlq_offset > seen.dlq_offset
        else:
            later = (letter.timestamp, letter.dlq_partition) > (seen.timestamp, seen.dlq_partition)
        winner = letter if later else seen
        winner.duplicates = seen.duplicates + letter.duplicates + 1
        kept[letter.coords] = winner
    return sorted(kept.values(), key=lambda d: (str(d.coords[0]), d.coords[1], d.coords[2]))


def parse_offset(text: str) -> tuple[Optional[int], int]:
    """``N`` (any partition) or ``P:N`` -> (partition or None, offset); ValueError otherwise."""
    part, sep, off = text.strip().rpartition(":")
    if sep:
        partition, offset = int(part), int(off)
    else:
        partition, offset = None, int(off)
    if offset < 0 or (partition is not None and partition < 0):
        raise ValueError(text)
    return partition, offset


def _at(letter: DeadLetter, partition: Optional[int], offset: int) -> bool:
    return letter.source_offset == offset and (partition is None or letter.source_partition == partition)


def select(letters: Iterable[DeadLetter], *, codes: Iterable[str] = (), job_ids: Iterable[str] = (),
           offsets: Iterable[tuple[Optional[int], int]] = ()) -> list[DeadLetter]:
    """Letters matching every kind of selector given (any value within a kind).

    No selector at all selects nothing (redrive must be asked for something).
    """
    codes, job_ids, offsets = set(codes), set(job_ids), list(offsets)
    if not (codes or job_ids or offsets):
        return []
    return [d for d in letters
            if (not codes or d.code in codes) and (not job_ids or d.job_id in job_ids)
            and (not offsets or any(_at(d, p, o) for p, o in offsets))]


def find(letters: Iterable[DeadLetter], which: str) -> list[DeadLetter]:
    """``show``'s argument: a source offset (``N`` or ``P:N``), else a job id."""
    letters = list(letters)
    try:
        partition, offset = parse_offset(which)
    except ValueError:
        pass
    else:
        hits = [d for d in letters if _at(d, partition, offset)]
        if hits:
            return hits
    return [d for d in letters if d.job_id == which]


def original_bytes(letter: DeadLetter, read=None) -> Optional[bytes]:
    """The full original value: the DLQ's value, or for a truncated one the bytes at its URI.

    ``read(uri) -> bytes`` defaults to ``spotbatch.storage.store_for(uri).read_bytes``.
    RedriveRefused when a truncated letter has no URI, or the bytes there do not match.
    """
    if not letter.truncated:
        return letter.value
    where = f"source {letter.source_partition}:{letter.source_offset}"
    if not letter.original_uri:
        raise RedriveRefused(f"{where}: dead letter holds a truncated value ({letter.size} bytes originally) "
                             f"and no {URI_HEADER}; republish the full job yourself")
    if read is None:
        from spotbatch.storage import store_for

        read = lambda uri: store_for(uri).read_bytes(uri)  # noqa: E731
    try:
        data = read(letter.original_uri)
    except Exception as exc:  # noqa: BLE001 - missing object, no access: same answer
        raise RedriveRefused(f"{where}: cannot read the original from {letter.original_uri} ({exc}); "
                             "restore it there or republish the job yourself") from None
    if letter.original_size is not None and len(data) != letter.original_size:
        raise RedriveRefused(f"{where}: {letter.original_uri} holds {len(data)} bytes, the dead letter says "
                             f"{letter.original_size}; restore the original there")
    if letter.original_sha256 and hashlib.sha256(data).hexdigest() != letter.original_sha256.lower():
        raise RedriveRefused(f"{where}: {letter.original_uri} does not match {SHA256_HEADER}; restore the original there")
    return data
