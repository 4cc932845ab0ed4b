"""A worker serving a registry name: real broker, real worker process, the tiny model.

It serves the champion; sees a rollout written to the models topic without a restart
and routes the challenger's slice to it; honours pins; refuses a version whose digest
does not match its files (its jobs dead-letter with the reason; the champion goes on);
every output's Parquet metadata and status name the version that wrote it.
"""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest

from spotbatch.dlq import parse_dead_letter
from spotbatch.kafka_admin import read_all
from spotbatch.rollouts import Registry
from spotbatch.rollouts.records import Rollout, rollout_key
from spotbatch.rollouts.routing import routes_to_challenger
from spotbatch.workers.streams import dlq_topic
from tests.integration.helpers import (  # noqa: F401 - worker_procs is an autouse fixture
    make_topic,
    new_group,
    send_raw,
    spawn_worker,
    statuses,
    wait_until,
    worker_procs,
)

pytestmark = pytest.mark.integration


def _job(job_id: str, model: str = "embedder") -> tuple[bytes, bytes]:
    body = {"job_id": job_id, "model": model, "inputs": {"rows": [{"id": f"{job_id}-{r}", "text": f"{job_id} {r}"}
                                                                   for r in range(3)]}}
    return job_id.encode(), json.dumps(body).encode()


def _by_job(bootstrap: str, topic: str) -> dict[str, dict]:
    return {s["job_id"]: s for s in statuses(bootstrap, topic)}


def test_a_worker_serves_versions_and_follows_the_registry_live(kafka_bootstrap, tmp_path):
    models = f"models-{new_group()}"
    registry = Registry(kafka_bootstrap, models)
    registry.register("embedder", 1, "tiny")
    registry.register("embedder", 2, "tiny", notes="same weights: routing is what is under test")
    registry.register("embedder", 3, "tiny", digest="sha256:" + "0" * 64)  # not what tiny hashes to
    topic, out = make_topic(kafka_bootstrap, 2), tmp_path / "out"
    send_raw(kafka_bootstrap, topic, [_job(f"a{i}") for i in range(10)])
    worker = spawn_worker(kafka_bootstrap, topic, new_group(), out, tmp_path, burst=False,
                          args=["--model", "embedder"], env={"SPOTBATCH_MODELS_TOPIC": models})
    wait_until(lambda: len(_by_job(kafka_bootstrap, topic)) == 10, 90, "the champion's statuses", workers=[worker])
    assert {s["model_version"] for s in _by_job(kafka_bootstrap, topic).values()} == {1}

    # A rollout written while the worker runs: half the jobs go to version 2.
    rollout = Rollout("embedder", champion=1, challenger=2, steps=(0.5, 1.0), started_at=time.time())
    registry._send({rollout_key("embedder"): json.dumps(rollout.to_json()).encode()})  # noqa: SLF001 - as the controller does
    time.sleep(5)  # the worker re-reads the registry every 2 s
    jobs = [f"b{i}" for i in range(40)]
    send_raw(kafka_bootstrap, topic, [_job(j) for j in jobs] + [_job("pinned", "embedder@1"), _job("bad", "embedder@3")])
    wait_until(lambda: len(_by_job(kafka_bootstrap, topic)) == 52, 90, "every status", workers=[worker])
    got = _by_job(kafka_bootstrap, topic)
    for job_id in jobs:
        expected = 2 if routes_to_challenger(job_id, 0.5) else 1
        assert got[job_id]["model_version"] == expected, job_id
        assert got[job_id]["route"] == ("challenger" if expected == 2 else "champion")
        meta = pq.read_schema(out / f"{job_id}.parquet").metadata
        assert meta[b"spotbatch.model_version"] == str(expected).encode()
        assert meta[b"spotbatch.model_digest"].decode() == got[job_id]["model_digest"]
    assert {got[j]["model_version"] for j in jobs} == {1, 2}
    assert (got["pinned"]["model_version"], got["pinned"]["route"]) == (1, "pinned")
    assert got["bad"]["status"] == "failed" and got["bad"]["error"] == "model_version_refused"
    (letter,) = [parse_dead_letter(r) for r in read_all(kafka_bootstrap, dlq_topic(topic))]
    assert letter.code == "model_version_refused"
    assert "digest mismatch" in letter.reason and "registered as sha256:000" in letter.reason
