"""Job-level errors: each carries a stable machine code and a one-line reason.

A JobError means "this job cannot be done as written": the worker sends it to the
dead-letter topic with the code and reason in headers, commits its offset and moves
on. Anything else raised inside the worker is an infrastructure fault and is retried.
"""

from __future__ import annotations

__all__ = ["JobError", "ERROR_CODES", "job_error_from", "is_infrastructure_fault"]

ERROR_CODES = {
    "malformed_json": "the message is not a JSON object",
    "unknown_version": "the job's schema version is not supported",
    "invalid_job": "a field of the job is missing or invalid",
    "unknown_model": "no model handler is registered under that name",
    "model_not_served": "a known model this worker does not serve (redrive it to the fleet that does)",
    "input_missing": "the input file could not be read",
    "input_invalid": "the input file lacks a needed column or is not Parquet/JSONL",
    "input_unreadable": "the input is not a regular file, or the store refused to read it",
    "input_outside_prefix": "the input URI is outside the worker's allowed input prefixes",
    "input_too_large": "a JSONL line over max_line_bytes, or a .json array over max_document_bytes",
    "input_timeout": "reading the input took longer than the worker's input_read_timeout_s",
    "message_too_large": "the message is larger than the worker accepts",
    "output_outside_prefix": "the output URI is outside the worker's allowed output prefix",
    "row_rejected": "the model rejected an input row",
    "inference_failed": "the model failed on the job's rows (after splitting on OOM)",
    "too_many_attempts": "workers took the job up repeatedly without finishing any part (poison job)",
}


class JobError(Exception):
    """A job that can never succeed as written. ``code`` is one of ERROR_CODES."""

    def __init__(self, code: str, reason: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown job error code {code!r}")
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def is_infrastructure_fault(exc: BaseException) -> bool:
    """A fault of the broker or a store, not of the job: retried, then the worker exits.

    S3 errors that are not transient (AccessDenied, InvalidObjectState) are turned into
    JobErrors where the input is read; what reaches here from botocore is the store itself.
    """
    import botocore.exceptions  # noqa: PLC0415 - keep this module import-light
    from kafka.errors import KafkaError  # noqa: PLC0415

    return isinstance(exc, (OSError, KafkaError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError))


def job_error_from(exc: BaseException, default: str = "invalid_job") -> JobError:
    """The one exception boundary per message: a JobError stays itself, an infrastructure
    fault re-raises, and anything else (a parser's RecursionError, a MemoryError, a bug
    tripped by odd input) becomes this job's dead letter instead of a worker crash."""
    if isinstance(exc, JobError):
        return exc
    if is_infrastructure_fault(exc):
        raise exc
    return JobError(default, f"{type(exc).__name__}: {str(exc)[:200]}")
