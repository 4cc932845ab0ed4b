"""Side streams: dead letters to ``<topic>.dlq``, per-job status to ``<topic>.results``."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Callable

from kafka import KafkaProducer

from spotbatch.errors import JobError

__all__ = ["SideStreams", "dlq_topic", "results_topic", "HEADER_PREFIX"]

HEADER_PREFIX = "spotbatch."
PREVIEW_BYTES = 4096  # what an oversized dead letter keeps of the original value
_HEADROOM_BYTES = 64 * 1024  # our headers and the record framing, within max_request_size

log = logging.getLogger("spotbatch.worker")


def _size(record: Any) -> int:
    headers = sum(len(k) + len(v or b"") for k, v in (record.headers or []))
    return len(record.value or b"") + len(record.key or b"") + headers


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


def results_topic(topic: str) -> str:
    return f"{topic}.results"


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
        ours = {
            "error.code": error.code,
            "error.reason": error.reason[:1000],
            "source.topic": record.topic,
            "source.partition": str(record.partition),
            "source.offset": str(record.offset),
            "worker": self._worker_id,
        }
        value, headers = record.value, list(record.headers or [])
        if _size(record) > self._max_record_bytes - _HEADROOM_BYTES:
            value, headers = value[:PREVIEW_BYTES] if value else value, []
            ours.update(self._oversized(record))
        headers += [(HEADER_PREFIX + k, v.encode()) for k, v in ours.items()]
        if record.key is not None:
            headers.append((HEADER_PREFIX + "source.key", bytes(record.key)[:PREVIEW_BYTES]))
        key = f"{record.topic}:{record.partition}:{record.offset}".encode()
        return self._producer.send(dlq_topic(record.topic), key=key, value=value, headers=headers)

    def _oversized(self, record: Any) -> dict[str, str]:
        """Too big to re-publish: a preview plus the size and SHA-256, and the whole
        original (value only) stored beside the outputs where the store takes it."""
        value = record.value or b""
        info = {"original.truncated": "1", "original.size": str(len(value)),
                "original.sha256": hashlib.sha256(value).hexdigest()}
        if self._archive is not None:
            try:
                info["original.uri"] = self._archive(f"{record.topic}-{record.partition}-{record.offset}.bin", value)
            except Exception as exc:  # noqa: BLE001 - the preview and digest still go out
                log.warning("could not store the oversized original of offset %d: %s", record.offset, exc)
        return info

    def status(self, topic: str, job_id: str | None, *, status: str, key: bytes | None, **fields: Any):
        body = {"job_id": job_id, "status": status, "worker": self._worker_id, "at": time.time(), **fields}
        return self._producer.send(results_topic(topic), key=key, value=json.dumps(body).encode())

    def usage(self, topic: str, **fields: Any):
        """A usage record (interruptions, later pool seconds) for the scheduler's cost report."""
        body = {"worker": self._worker_id, "at": time.time(), **fields}
        return self._producer.send(topic, key=self._worker_id.encode(), value=json.dumps(body).encode())

    def flush(self, timeout_s: float) -> None:
        self._producer.flush(timeout=timeout_s)
