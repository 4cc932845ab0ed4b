"""Crash-loop breaker: an inline job that kills its worker beyond any exception boundary
(SIGKILL from inside the model call: a native crash, the OOM killer) costs
``max_attempts`` restarts, then goes to the DLQ as ``too_many_attempts``; the jobs that
shared its batch and the ones behind it complete. Single partition, real broker, real
processes; the kill comes from tests/chaos/shim (SPOTBATCH_TEST_KILL_ON).
"""

from __future__ import annotations

import json
import signal

import pytest

from spotbatch.kafka_admin import read_all
from spotbatch.workers.streams import dlq_topic
from tests.chaos.harness import SHIM_DIR
from tests.integration.helpers import (  # noqa: F401 - worker_procs is an autouse fixture
    REPO_ROOT,
    assert_committed_to_end,
    list_outputs,
    make_topic,
    new_group,
    send_raw,
    spawn_worker,
    worker_procs,
)

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 2


def _job(job_id: str, text: str) -> bytes:
    return json.dumps({"job_id": job_id, "model": "tiny", "inputs": {"rows": [{"id": "r1", "text": text}]}}).encode()


def test_a_job_that_kills_its_worker_costs_max_attempts_restarts(kafka_bootstrap, tmp_path):
    topic, group, out = make_topic(kafka_bootstrap, 1), new_group(), tmp_path / "out"
    names = ["before-1", "before-2", "poison", "after-1", "after-2"]
    send_raw(kafka_bootstrap, topic, [(n.encode(), _job(n, "POISON pill" if n == "poison" else f"text {n}"))
                                      for n in names])
    env = {"PYTHONPATH": f"{SHIM_DIR}:{REPO_ROOT}", "SPOTBATCH_TEST_KILL_ON": "POISON"}

    exits = []
    for life in range(MAX_ATTEMPTS + 2):  # one more than the breaker may need: a loop fails here
        worker = spawn_worker(kafka_bootstrap, topic, group, out, tmp_path, name=f"worker-{life}", env=env,
                              args=["--max-attempts", str(MAX_ATTEMPTS)])
        exits.append(worker.wait(120))
        if exits[-1] == 0:
            break

    assert exits == [-signal.SIGKILL] * MAX_ATTEMPTS + [0], exits
    assert list_outputs(out) == {f"{n}.parquet" for n in names if n != "poison"}
    (dead,) = read_all(kafka_bootstrap, dlq_topic(topic))
    headers = {k: v.decode() for k, v in dead.headers}
    assert headers["spotbatch.source.key"] == "poison"
    assert headers["spotbatch.error.code"] == "too_many_attempts"
    assert headers["spotbatch.error.reason"].count(" worker") >= 1 and "limit 2" in headers["spotbatch.error.reason"]
    assert_committed_to_end(kafka_bootstrap, group, topic)
