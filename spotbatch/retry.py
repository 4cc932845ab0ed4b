"""The project's retry policies, defined once (tenacity).

Each policy is a ``tenacity.retry`` decorator: use it as ``@kafka_retry`` or wrap a
call, ``kafka_retry(consumer.commit)(offsets)``. Every policy has both an attempt
bound and a hard time budget (``stop_before_delay`` never starts a sleep that would
cross it, unlike ``stop_after_delay``), jittered exponential backoff, re-raises the
original exception when it gives up, and logs one WARNING line before each sleep.

Only transient faults are retried (the predicates and the one classifier,
``classify``, live in spotbatch.errors). A JobError (the job itself is bad) and a CUDA
out-of-memory error (the runner splits the batch instead) never are.

Besides the fault policies: ``reload_retry`` for optimistic-concurrency races (a
checkpoint saved under us, a metadata token gone stale: refresh, try again at once),
``attempts`` for a bounded number of fresh starts, and ``poll_until`` for waiting on a
condition with a deadline.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

import tenacity

from spotbatch.errors import TransientModelError, is_transient_kafka, is_transient_model, is_transient_s3

__all__ = [
    "kafka_retry",
    "model_retry",
    "S3_RETRY",
    "reload_retry",
    "attempts",
    "poll_until",
    "retry_policy",
    "TryAgain",
    "TransientModelError",
    "is_transient_kafka",
    "is_transient_model",
    "is_transient_s3",
    "is_stale",
]

log = logging.getLogger(__name__)

Predicate = Callable[[BaseException], bool]


class TryAgain(Exception):
    """Raised by a call that found its state stale and refreshed it (a token, a
    generation): the same call may succeed at once (``reload_retry``)."""


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


def is_stale(exc: BaseException) -> bool:
    """A race lost to another writer or an expired credential: reload and try again."""
    if isinstance(exc, TryAgain):
        return True
    # Only look when the checkpoint stores are loaded (without them no StaleCheckpoint
    # exists); importing them here would make storage -> retry -> checkpointing -> storage.
    store = sys.modules.get("spotbatch.checkpointing.store")
    return store is not None and isinstance(exc, store.StaleCheckpoint)


def attempts(name: str, *, retry_on: type[BaseException] | tuple[type[BaseException], ...],
             max_attempts: int) -> Callable[..., Any]:
    """Up to ``max_attempts`` fresh starts, at once, while ``retry_on`` is raised
    (e.g. a child process that lost its port); then the last one re-raises."""
    return tenacity.retry(stop=tenacity.stop_after_attempt(max_attempts),
                          retry=tenacity.retry_if_exception_type(retry_on),
                          before_sleep=_log_before_sleep(name), reraise=True)


def poll_until(check: Callable[[], bool], *, budget_s: float, interval_s: float) -> bool:
    """Call ``check`` every ``interval_s`` until it returns True (True) or ``budget_s``
    has passed (False). What ``check`` raises propagates at once."""
    poller = tenacity.Retrying(stop=tenacity.stop_after_delay(budget_s), wait=tenacity.wait_fixed(interval_s),
                               retry=tenacity.retry_if_result(lambda ok: not ok),
                               retry_error_callback=lambda state: False)
    return bool(poller(check))


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

# The one S3 policy. botocore's own retries are switched off (storage._make_client) so
# attempts do not multiply; everything else (NoSuchKey, AccessDenied) fails at once.
# The budget rides out a ~25 s S3 brownout without restarting the worker.
S3_RETRY = retry_policy(
    "s3", retry_if=is_transient_s3, max_attempts=12, budget_s=30.0, multiplier=0.2, max_wait_s=5.0,
)

# Races are short: two workers on one job during a rebalance overlap, or an IMDS token
# that expired between two calls. Each try reloads first, so no wait; a race lost ten
# times running means something is stuck, and the caller says so.
reload_retry = retry_policy(
    "reload", retry_if=is_stale, max_attempts=10, budget_s=30.0, multiplier=0.0, max_wait_s=0.0,
)
