"""What an exception means: job errors, transient faults, and the one classifier.

A JobError means "this job cannot be done as written": the worker sends it to the
dead-letter topic with the code and reason in headers, commits its offset and moves
on. ``classify`` maps any exception to what is done about it (``Disposition``):
retry it (a transient fault of the broker or a store: the policies in spotbatch.retry),
dead-letter the job, or stop the worker (a store or broker fault that will not pass).
The policies (spotbatch.retry) use the ``is_transient_*`` predicates defined here.
"""

from __future__ import annotations

import enum
import sys

__all__ = ["JobError", "ERROR_CODES", "job_error_from", "is_infrastructure_fault", "is_oom", "Disposition", "classify",
           "TransientModelError", "is_transient_kafka", "is_transient_s3", "is_transient_model"]

ERROR_CODES = {
    "malformed_json": "the message is not a JSON object",
    "unknown_version": "the job's schema version is not supported",
    "invalid_job": "a field of the job is missing or invalid",
    "unknown_model": "no model handler is registered under that name",
    "model_not_served": "a known model this worker does not serve (redrive it to the fleet that does)",
    "model_version_refused": "the registry version the job routes to failed its digest check or to load (redrivable)",
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


class TransientModelError(RuntimeError):
    """Raise (or chain) from a model handler to say "this may work if tried again",
    e.g. a weights download that timed out or a remote model server that hiccuped."""


class Disposition(str, enum.Enum):
    RETRY = "retry"  # transient: a policy in spotbatch.retry tries again
    DEAD_LETTER = "dead_letter"  # the job's fault: to <topic>.dlq with a code, offset committed
    FATAL = "fatal"  # the infrastructure's fault and not passing: the worker stops, the job stays


def is_infrastructure_fault(exc: BaseException) -> bool:
    """A fault of the broker or a store, not of the job: retried, then the worker exits.

    S3 errors that are not transient (AccessDenied, InvalidObjectState) are turned into
    JobErrors where the input is read; what reaches here from botocore is the store itself.
    """
    import botocore.exceptions  # noqa: PLC0415 - keep this module import-light
    from kafka.errors import KafkaError  # noqa: PLC0415

    return isinstance(exc, (OSError, KafkaError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError))


def is_transient_kafka(exc: BaseException) -> bool:
    """kafka-python marks what is worth retrying: ``KafkaError.retriable`` (connection
    loss, timeouts, node not ready, leader moved, coordinator loading, ...)."""
    from kafka.errors import KafkaError  # noqa: PLC0415

    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


_THROTTLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "SlowDown", "TooManyRequestsException", "RequestLimitExceeded",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
})


def is_transient_s3(exc: BaseException) -> bool:
    """Connection trouble, throttling and S3's own 5xx: worth another try."""
    if "botocore" not in sys.modules:  # no botocore loaded: no botocore error exists
        return False
    import botocore.exceptions  # noqa: PLC0415

    if isinstance(exc, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in _THROTTLE_CODES or status in (500, 502, 503, 504)
    return False


def is_transient_model(exc: BaseException) -> bool:
    """Network-ish failures and explicit TransientModelError; never a JobError or OOM."""
    if isinstance(exc, JobError) or is_oom(exc):
        return False
    return isinstance(exc, (TransientModelError, ConnectionError, TimeoutError))


def is_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, however it surfaces (inside TorchScript or cuBLAS as
    a plain RuntimeError that only says so in its message). Only asked of torch when it
    is loaded: importing it would cost seconds in processes (scaler, CLI) that never run
    a model, and without torch no OOM exists. Not imported from spotbatch.models: the
    scaler reads this module, and it must not load the models (import-linter)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def classify(exc: BaseException) -> Disposition:
    """Retry a transient broker or store fault, stop on any other of theirs, and
    dead-letter the rest: a JobError, and a bug tripped by odd input (a parser's
    RecursionError, a MemoryError, a model error that outlived model_retry)."""
    if isinstance(exc, JobError):
        return Disposition.DEAD_LETTER
    if is_infrastructure_fault(exc):
        transient = is_transient_kafka(exc) or is_transient_s3(exc) or isinstance(exc, (ConnectionError, TimeoutError))
        return Disposition.RETRY if transient else Disposition.FATAL
    return Disposition.DEAD_LETTER


def job_error_from(exc: BaseException, default: str = "invalid_job") -> JobError:
    """The one exception boundary per message: a JobError stays itself, an infrastructure
    fault re-raises (``classify``: retry or fatal), and anything else becomes this job's
    dead letter instead of a worker crash."""
    if classify(exc) is not Disposition.DEAD_LETTER:
        raise exc
    if isinstance(exc, JobError):
        return exc
    return JobError(default, f"{type(exc).__name__}: {str(exc)[:200]}")
