"""Side streams: dead letters to ``<topic>.dlq``, per-job status to ``<topic>.results``,
usage records to the usage topic; each record built from its schema in spotbatch.records."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Callable, Literal

from kafka import KafkaProducer

from spotbatch.errors import JobError
from spotbatch.rollouts.records import ShadowRecord, shadow_topic
from spotbatch.records import HEADER_PREFIX, DeadLetterHeaders, StatusRecord, dead_letter_key, dlq_topic, encode, results_topic

__all__ = ["SideStreams", "dlq_topic", "results_topic", "HEADER_PREFIX"]

PREVIEW_BYTES = 4096  # what an oversized dead letter keeps of the original value
_HEADROOM_BYTES = 64 * 1024  # our headers and the record framing, within max_request_size

log = logging.getLogger("spotbatch.worker")


def _size(record: Any) -> int:
    headers = sum(len(k) + len(v or b"") for k, v in (record.headers or []))
    return len(record.value or b"") + len(record.key or b"") + headers


class SideStreams:
    """Writes dead letters and status records; returns kafka futures to wait on."""

    def __init__(self, producer: KafkaProducer, worker_id: str, *, max_record_bytes: int = 1024 * 1024,
                 archive: Callable[[str, bytes], str] | None = None) -> None:
        self._producer = producer
        self._worker_id = worker_id
        self._max_record_bytes = max_record_bytes  # the producer's max_request_size
        self._archive = archive  # (name, bytes) -> URI of the stored original

    def dead_letter(self, record: Any, error: JobError):
        """Original value and headers, plus headers naming the error and source.

        Keyed by the source coordinates (``b"<topic>:<partition>:<offset>"``), not the
        original key: dead letters are at-least-once (a crash between their ack and the
        offset commit repeats one), and a compacted DLQ then keeps one per source record.
        The original key travels in the ``spotbatch.source.key`` header (raw bytes).
        """
        value, headers = record.value, list(record.headers or [])
        oversized: dict[str, Any] = {}
        if _size(record) > self._max_record_bytes - _HEADROOM_BYTES:
            value, headers = value[:PREVIEW_BYTES] if value else value, []
            oversized = self._oversized(record)
        ours = DeadLetterHeaders(code=error.code, reason=error.reason[:1000], source_topic=record.topic,
                                 source_partition=record.partition, source_offset=record.offset,
                                 worker=self._worker_id, **oversized,
                                 source_key=None if record.key is None else bytes(record.key)[:PREVIEW_BYTES])
        key = dead_letter_key(record.topic, record.partition, record.offset)
        return self._producer.send(dlq_topic(record.topic), key=key, value=value, headers=headers + ours.to_headers())

    def _oversized(self, record: Any) -> dict[str, Any]:
        """Too big to re-publish: a preview plus the size and SHA-256, and the whole
        original (value only) stored beside the outputs where the store takes it."""
        value = record.value or b""
        info: dict[str, Any] = {"truncated": True, "original_size": len(value),
                                "original_sha256": hashlib.sha256(value).hexdigest()}
        if self._archive is not None:
            try:
                info["original_uri"] = self._archive(f"{record.topic}-{record.partition}-{record.offset}.bin", value)
            except Exception as exc:  # noqa: BLE001 - the preview and digest still go out
                log.warning("could not store the oversized original of offset %d: %s", record.offset, exc)
        return info

    def shadow(self, topic: str, record: ShadowRecord) -> Any:
        """A shadow comparison to ``<topic>.shadow``: best effort, no offset waits for it."""
        return self._producer.send(shadow_topic(topic), key=record.job_id.encode(), value=record.to_json())

    def status(self, topic: str, job_id: str | None, *, status: Literal["ok", "failed"], key: bytes | None,
               **fields: Any) -> Any:
        body = StatusRecord(job_id=job_id, status=status, worker=self._worker_id, at=time.time(), **fields)
        return self._producer.send(results_topic(topic), key=key, value=body.to_json())

    def usage(self, topic: str, *, kind: str, **fields: Any):
        """A usage-topic record (``kind`` "usage" from the meter, or "interruption") for
        the scheduler's cost report and the scaler; validated by its schema."""
        body = encode(kind, **{"worker": self._worker_id, "at": time.time(), **fields})
        return self._producer.send(topic, key=self._worker_id.encode(), value=body)

    def flush(self, timeout_s: float) -> None:
        self._producer.flush(timeout=timeout_s)
