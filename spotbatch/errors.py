"""Job-level errors: each carries a stable machine code and a one-line reason.

A JobError means "this job cannot be done as written": the worker sends it to the
dead-letter topic with the code and reason in headers, commits its offset and moves
on. Anything else raised inside the worker is an infrastructure fault and is retried.
"""

from __future__ import annotations

__all__ = ["JobError", "ERROR_CODES"]

ERROR_CODES = {
    "malformed_json": "the message is not a JSON object",
    "unknown_version": "the job's schema version is not supported",
    "invalid_job": "a field of the job is missing or invalid",
    "unknown_model": "no model handler is registered under that name",
    "input_missing": "the input file could not be read",
    "input_invalid": "the input file lacks a needed column or is not Parquet/JSONL",
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
