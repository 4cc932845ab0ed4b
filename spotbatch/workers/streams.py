"""Side streams: dead letters to ``<topic>.dlq``, per-job status to ``<topic>.results``."""

from __future__ import annotations

import json
import time
from typing import Any

from kafka import KafkaProducer

from spotbatch.errors import JobError

__all__ = ["SideStreams", "dlq_topic", "results_topic", "HEADER_PREFIX"]

HEADER_PREFIX = "spotbatch."


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


def results_topic(topic: str) -> str:
    return f"{topic}.results"


class SideStreams:
    """Writes dead letters and status records; returns kafka futures to wait on."""

    def __init__(self, producer: KafkaProducer, worker_id: str) -> None:
        self._producer = producer
        self._worker_id = worker_id

    def dead_letter(self, record: Any, error: JobError):
        """Original key, value and headers, plus headers naming the error and source."""
        ours = {
            "error.code": error.code,
            "error.reason": error.reason[:1000],
            "source.topic": record.topic,
            "source.partition": str(record.partition),
            "source.offset": str(record.offset),
            "worker": self._worker_id,
        }
        headers = list(record.headers or []) + [(HEADER_PREFIX + k, v.encode()) for k, v in ours.items()]
        return self._producer.send(dlq_topic(record.topic), key=record.key, value=record.value, headers=headers)

    def status(self, topic: str, job_id: str | None, *, status: str, key: bytes | None, **fields: Any):
        body = {"job_id": job_id, "status": status, "worker": self._worker_id, "at": time.time(), **fields}
        return self._producer.send(results_topic(topic), key=key, value=json.dumps(body).encode())

    def usage(self, topic: str, **fields: Any):
        """A usage record (interruptions, later pool seconds) for the scheduler's cost report."""
        body = {"worker": self._worker_id, "at": time.time(), **fields}
        return self._producer.send(topic, key=self._worker_id.encode(), value=json.dumps(body).encode())

    def flush(self, timeout_s: float) -> None:
        self._producer.flush(timeout=timeout_s)
