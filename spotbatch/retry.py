"""The project's retry policies, defined once (tenacity).

Each policy is a ``tenacity.retry`` decorator: use it as ``@kafka_retry`` or wrap a
call, ``kafka_retry(consumer.commit)(offsets)``. Every policy has both an attempt
bound and a hard time budget (``stop_before_delay`` never starts a sleep that would
cross it, unlike ``stop_after_delay``), jittered exponential backoff, re-raises the
original exception when it gives up, and logs one WARNING line before each sleep.

Only transient faults are retried. A JobError (the job itself is bad) and a CUDA
out-of-memory error (the runner splits the batch instead) never are.

The S3 policy is built with :func:`retry_policy` where S3 lives: storage.S3_RETRY.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

import kafka.errors
import tenacity

from spotbatch.errors import JobError

__all__ = [
    "kafka_retry",
    "model_retry",
    "retry_policy",
    "TransientModelError",
    "is_transient_kafka",
    "is_transient_model",
]

log = logging.getLogger(__name__)

Predicate = Callable[[BaseException], bool]


class TransientModelError(RuntimeError):
    """Raise (or chain) from a model handler to say "this may work if tried again",
    e.g. a weights download that timed out or a remote model server that hiccuped."""


def retry_policy(
    name: str,
    *,
    retry_if: Predicate,
    max_attempts: int,
    budget_s: float,
    multiplier: float,
    max_wait_s: float,
) -> Callable[..., Any]:
    """A tenacity decorator with the project's shape; ``name`` labels its log lines."""
    return tenacity.retry(
        stop=tenacity.stop_after_attempt(max_attempts) | tenacity.stop_before_delay(budget_s),
        wait=tenacity.wait_exponential_jitter(multiplier=multiplier, max=max_wait_s, jitter=multiplier),
        retry=tenacity.retry_if_exception(retry_if),
        before_sleep=_log_before_sleep(name),
        reraise=True,
    )


def _log_before_sleep(name: str) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        sleep_s = state.next_action.sleep if state.next_action else 0.0
        log.warning("retry %s: attempt %d of %s failed (%s); next try in %.2fs",
                    name, state.attempt_number, _fn_name(state), _one_line(exc), sleep_s)

    return before_sleep


def _fn_name(state: tenacity.RetryCallState) -> str:
    return getattr(state.fn, "__qualname__", repr(state.fn))


def _one_line(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
    kind = type(exc).__name__
    return f"{kind}: {text}" if text and not text.startswith(kind) else (text or kind)


def is_transient_kafka(exc: BaseException) -> bool:
    """kafka-python marks what is worth retrying: ``KafkaError.retriable`` (connection
    loss, timeouts, node not ready, leader moved, coordinator loading, ...)."""
    return isinstance(exc, kafka.errors.KafkaError) and bool(getattr(exc, "retriable", False))


def is_transient_model(exc: BaseException) -> bool:
    """Network-ish failures and explicit TransientModelError; never a JobError or OOM."""
    if isinstance(exc, JobError) or _is_oom(exc):
        return False
    return isinstance(exc, (TransientModelError, ConnectionError, TimeoutError))


def _is_oom(exc: BaseException) -> bool:
    # Only ask torch when it is already loaded: importing it here would cost seconds
    # in processes (scaler, CLI) that never run a model, and without torch no OOM exists.
    if "torch" not in sys.modules:
        return False
    from spotbatch.models.devices import is_oom

    return is_oom(exc)


# A commit or fetch that fails for longer than ~20 s is not a blip; the budget also
# stays inside the 25 s preemption window the shutdown path is designed for.
kafka_retry = retry_policy(
    "kafka", retry_if=is_transient_kafka, max_attempts=6, budget_s=20.0, multiplier=0.5, max_wait_s=5.0,
)

# Few tries: a model that failed three times in half a minute will fail a fourth, and
# the job's attempt count (checkpointing.Progress.attempts) takes over from there.
model_retry = retry_policy(
    "model", retry_if=is_transient_model, max_attempts=3, budget_s=30.0, multiplier=1.0, max_wait_s=10.0,
)
