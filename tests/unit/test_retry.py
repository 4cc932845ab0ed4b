"""retry: each policy retries transient faults, gives up on its bound with the original
exception, leaves non-transient ones alone, and logs one line before each sleep."""

from __future__ import annotations

import logging
import time

import botocore.exceptions
import kafka.errors as ke
import pytest
import tenacity
import torch

from spotbatch import retry
from spotbatch.errors import JobError
from spotbatch.retry import TransientModelError, kafka_retry, model_retry
from spotbatch.retry import S3_RETRY as storage_retry

TINY_WAIT = tenacity.wait_exponential_jitter(multiplier=0.001, max=0.01, jitter=0.001)


class Flaky:
    """Raises the queued exceptions in order, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.raised: list[BaseException] = []

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            exc = self.errors.pop(0)
            self.raised.append(exc)
            raise exc
        return "ok"


def fast(policy, fn):
    """The real policy (retry predicate, stop, logging) with a tiny backoff."""
    return policy(fn).retry_with(wait=TINY_WAIT)


def _s3_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


def _conn_error() -> botocore.exceptions.EndpointConnectionError:
    return botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")


# (policy, a transient error factory, its attempt bound)
POLICIES = {
    "kafka": (kafka_retry, lambda: ke.KafkaConnectionError("broker went away"), 6),
    "model": (model_retry, lambda: TransientModelError("weights download timed out"), 3),
    "storage": (storage_retry, _conn_error, 12),
}


@pytest.mark.parametrize("name", POLICIES)
def test_retries_transient_then_succeeds(name):
    policy, transient, _ = POLICIES[name]
    fn = Flaky(transient(), transient())
    assert fast(policy, fn)() == "ok"
    assert fn.calls == 3


@pytest.mark.parametrize("name", POLICIES)
def test_gives_up_after_bound_with_original_exception(name):
    policy, transient, bound = POLICIES[name]
    fn = Flaky(*(transient() for _ in range(bound + 3)))
    with pytest.raises(type(fn.errors[0])) as info:
        fast(policy, fn)()
    assert fn.calls == bound
    assert info.value is fn.raised[-1]  # the original object, not a tenacity.RetryError


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("error", [ValueError("bad"), JobError("invalid_job", "no rows")], ids=["ValueError", "JobError"])
def test_does_not_retry_non_transient(name, error):
    policy, _, _ = POLICIES[name]
    fn = Flaky(error)
    with pytest.raises(type(error)):
        fast(policy, fn)()
    assert fn.calls == 1


@pytest.mark.parametrize("name", ["kafka", "model"])
def test_time_budget_refuses_a_sleep_past_it(name):
    policy, transient, _ = POLICIES[name]
    fn = Flaky(transient(), transient())
    # A backoff longer than the budget: stop_before_delay gives up instead of sleeping.
    slow = policy(fn).retry_with(wait=tenacity.wait_fixed(3600))
    started = time.monotonic()
    with pytest.raises(type(fn.errors[0])):
        slow()
    assert fn.calls == 1
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("name", ["kafka", "model"])
def test_logs_one_warning_before_each_sleep(name, caplog):
    policy, transient, _ = POLICIES[name]
    fn = Flaky(transient(), transient())
    with caplog.at_level(logging.WARNING, logger="spotbatch.retry"):
        fast(policy, fn)()
    lines = [r.getMessage() for r in caplog.records if r.name == "spotbatch.retry"]
    assert len(lines) == 2
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "spotbatch.retry")
    first = lines[0]
    assert f"retry {name}:" in first and "attempt 1 " in first and "next try in" in first
    assert type(fn.raised[0]).__name__ in first and "\n" not in first
    assert "attempt 2 " in lines[1]


# -- kafka: what counts as transient --------------------------------------------------


@pytest.mark.parametrize("cls", [
    ke.KafkaConnectionError, ke.KafkaTimeoutError, ke.NodeNotReadyError, ke.RequestTimedOutError,
    ke.NotLeaderForPartitionError, ke.LeaderNotAvailableError, ke.CoordinatorNotAvailableError,
    ke.NotCoordinatorError, ke.CoordinatorLoadInProgressError,
])
def test_kafka_retriable_errors_are_transient(cls):
    assert retry.is_transient_kafka(cls())


@pytest.mark.parametrize("exc", [
    ke.CommitFailedError(), ke.IllegalStateError("x"), ke.TopicAuthorizationFailedError(),
    ke.RebalanceInProgressError(), ValueError("x"), ConnectionError("plain socket error"),
])
def test_kafka_non_retriable_errors_are_not_transient(exc):
    assert not retry.is_transient_kafka(exc)


# -- model: OOM and job errors are not ours to retry -----------------------------------


@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
    RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"),
    JobError("row_rejected", "bad row"),
    RuntimeError("shape mismatch"),
])
def test_model_does_not_retry_oom_or_job_errors(exc):
    assert not retry.is_transient_model(exc)
    fn = Flaky(exc)
    with pytest.raises(type(exc)):
        fast(model_retry, fn)()
    assert fn.calls == 1


@pytest.mark.parametrize("exc", [TransientModelError("x"), ConnectionResetError("x"), TimeoutError("x")])
def test_model_transient_errors(exc):
    assert retry.is_transient_model(exc)


# -- storage: the one S3 policy, shared with storage.py --------------------------------


@pytest.mark.parametrize("exc, transient", [
    (_s3_error("SlowDown", 503), True),
    (_s3_error("InternalError", 500), True),
    (_s3_error("NoSuchKey", 404), False),
    (_s3_error("PreconditionFailed", 412), False),
])
def test_storage_retry_client_errors(exc, transient):
    fn = Flaky(exc)
    if transient:
        assert fast(storage_retry, fn)() == "ok"
    else:
        with pytest.raises(botocore.exceptions.ClientError):
            fast(storage_retry, fn)()
    assert fn.calls == (2 if transient else 1)


def test_unknown_attribute_still_raises():
    with pytest.raises(AttributeError):
        retry.no_such_policy  # noqa: B018
