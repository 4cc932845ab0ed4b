"""Rollout controller on a real (embedded) broker, fed SYNTHETIC status and shadow records
shaped as the workers write them (status: model, model_version, route, rows, seconds,
source; shadow: ShadowRecord): promotion through every step, rollback at the first
failing gate, a controller restarted mid-rollout, and repair of a bad version's jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
from kafka import KafkaProducer

from spotbatch.kafka_admin import ensure_topics, read_all
from spotbatch.records import results_topic
from spotbatch.rollouts import Registry, RegistryError
from spotbatch.rollouts.controller import Controller
from spotbatch.rollouts.gates import Thresholds
from spotbatch.rollouts.records import ShadowRecord, shadow_topic
from spotbatch.rollouts.service import tick_all
from tests.integration.helpers import REPO_ROOT, make_topic, wait_until

NAME = "embedder"
GATES = Thresholds(min_jobs=5, min_shadow_jobs=3)


@pytest.fixture
def fleet(kafka_bootstrap):
    """(jobs topic with .results and .shadow, models topic with embedder v1 champion and v2)."""
    jobs = make_topic(kafka_bootstrap, 2)
    ensure_topics(kafka_bootstrap, {shadow_topic(jobs): 1})
    models = f"models-{uuid.uuid4().hex[:8]}"
    registry = Registry(kafka_bootstrap, models)
    registry.register(NAME, 1, "tiny")
    registry.register(NAME, 2, "tiny", notes="the challenger")
    return jobs, models


class Workers:
    """Writes what workers would: one status record per job, one shadow record per shadowed job."""

    def __init__(self, bootstrap: str, jobs: str) -> None:
        self.jobs, self._producer = jobs, KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        self._n = 0

    def finish(self, n: int, version: int, route: str, *, ok: bool = True, rows: int = 10,
               seconds: float = 0.1, source: list[tuple[int, int]] | None = None, job_ids: list[str] | None = None):
        for i in range(n):
            self._n += 1
            partition, offset = source[i] if source else (0, self._n)
            body = {"v": 1, "job_id": job_ids[i] if job_ids else f"job-{self._n}", "status": "ok" if ok else "failed",
                    "worker": "w-1", "at": time.time(), "rows": rows if ok else 0, "seconds": seconds,
                    "model": NAME, "model_version": version, "model_digest": f"sha256:{version}", "route": route,
                    "source": {"topic": self.jobs, "partition": partition, "offset": offset}}
            self._producer.send(results_topic(self.jobs), value=json.dumps(body).encode())
        self._producer.flush()

    def shadow(self, n: int, mean: float, *, champion: int = 1, challenger: int = 2) -> None:
        for _ in range(n):
            self._n += 1
            record = ShadowRecord(job_id=f"job-{self._n}", model=NAME, champion=champion, challenger=challenger,
                                  rows=10, mean=mean, low=mean - 0.01, min=mean - 0.02, worker="w-1", at=time.time())
            self._producer.send(shadow_topic(self.jobs), value=record.to_json())
        self._producer.flush()

    def close(self) -> None:
        self._producer.close()


@pytest.fixture
def workers(kafka_bootstrap, fleet):
    w = Workers(kafka_bootstrap, fleet[0])
    yield w
    w.close()


def _controller(bootstrap: str, fleet) -> Controller:
    return Controller(bootstrap, NAME, fleet[0], fleet[1], read_timeout_s=20)


def _good_step(workers: Workers, champion_jobs: int = 10) -> None:
    workers.finish(5, 2, "challenger")
    workers.finish(champion_jobs, 1, "champion")
    workers.shadow(3, 0.995)


def test_a_good_challenger_is_promoted_through_every_step(kafka_bootstrap, fleet, workers):
    controller = _controller(kafka_bootstrap, fleet)
    started = controller.start(2, steps=(0.1, 0.5, 1.0), bake_jobs=5, shadow=0.2, gates=GATES)
    assert (started.state, started.champion, started.challenger, started.fraction) == ("running", 1, 2, 0.1)

    idle = controller.tick()  # no jobs yet: every gate waits, nothing moves
    assert idle.step == 0 and {g["status"] for g in idle.gates} == {"waiting"}

    seen = []
    for step, fraction in enumerate((0.1, 0.5, 1.0)):
        assert controller.rollout().fraction == fraction
        _good_step(workers, champion_jobs=10 if step == 0 else 0)  # the champion gets no jobs at 100%
        seen.append(controller.tick())
    assert [(r.state, r.step) for r in seen] == [("running", 1), ("running", 2), ("promoted", 2)]
    assert all(g["status"] == "pass" for g in seen[-1].gates)

    state = Registry(kafka_bootstrap, fleet[1]).state()
    assert state.aliases[NAME]["champion"] == 2
    final = state.rollouts[NAME]
    assert final.state == "promoted" and final.fraction == 0.0 and "3 steps" in final.reason
    assert controller.status()["state"] == "promoted" and controller.tick().state == "promoted"  # final stays final


def test_a_bad_challenger_is_rolled_back_at_its_first_gate(kafka_bootstrap, fleet, workers):
    controller = _controller(kafka_bootstrap, fleet)
    controller.start(2, steps=(0.1, 0.5, 1.0), bake_jobs=5, shadow=0.2, gates=GATES)
    workers.finish(2, 2, "challenger")  # not baked yet: the failure alone decides
    workers.finish(10, 1, "champion")
    workers.shadow(3, 0.90)
    rolled = controller.tick()
    assert rolled.state == "rolled_back" and rolled.step == 0 and rolled.fraction == 0.0
    assert "agreement" in rolled.reason and "0.9000 < 0.98" in rolled.reason
    state = Registry(kafka_bootstrap, fleet[1]).state()
    assert state.aliases[NAME]["champion"] == 1  # the champion never moved
    summary = controller.status()
    assert summary["state"] == "rolled_back" and summary["reason"] == rolled.reason
    assert {g["name"]: g["status"] for g in summary["gates"]}["agreement"] == "fail"


def test_a_new_controller_continues_a_running_rollout(kafka_bootstrap, fleet, workers):
    first = _controller(kafka_bootstrap, fleet)
    first.start(2, steps=(0.1, 0.5, 1.0), bake_jobs=5, shadow=0.2, gates=GATES)
    _good_step(workers)
    assert first.tick().step == 1
    workers.finish(3, 2, "challenger")  # 3 of the 5 this step needs
    assert first.tick().step == 1
    del first  # the controller process dies here

    second = _controller(kafka_bootstrap, fleet)
    assert second.status()["step"] == 1 and second.status()["state"] == "running"
    workers.finish(2, 2, "challenger")  # counted with the 3 before: the step's start is in the record
    workers.shadow(3, 0.995)
    assert second.tick().step == 2
    with pytest.raises(RegistryError, match="has a rollout running .* spotbatch rollout abort embedder"):
        second.start(2)
    _good_step(workers, champion_jobs=0)
    # the service's pass: it finds the running rollout, and its jobs topic in the record
    assert tick_all(kafka_bootstrap, fleet[1], default_jobs_topic="not-this-one") == {NAME: "promoted"}
    assert Registry(kafka_bootstrap, fleet[1]).state().aliases[NAME]["champion"] == 2


def test_start_refuses_the_champion_an_unknown_version_and_bad_steps(kafka_bootstrap, fleet):
    controller = _controller(kafka_bootstrap, fleet)
    with pytest.raises(RegistryError, match="is the champion already"):
        controller.start(1)
    with pytest.raises(RegistryError, match=r"no version 7 \(versions: 1, 2\)"):
        controller.start(7)
    with pytest.raises(RegistryError, match="do not ascend"):
        controller.start(2, steps=(0.5, 0.1, 1.0))
    with pytest.raises(RegistryError, match="not in the registry"):
        Controller(kafka_bootstrap, "ghost", fleet[0], fleet[1]).start(1)
    assert controller.rollout() is None
    controller.start(2, bake_jobs=1)
    aborted = controller.abort()
    assert aborted.state == "aborted" and aborted.fraction == 0.0
    with pytest.raises(RegistryError, match="no rollout running"):
        controller.abort()


def test_repair_republishes_exactly_the_jobs_the_bad_version_wrote(kafka_bootstrap, fleet, workers):
    jobs = fleet[0]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    originals = []
    for i in range(6):
        value = json.dumps({"v": 1, "job_id": f"j{i}", "model": NAME, "rows": [{"id": str(i), "text": "x" * i}]})
        meta = producer.send(jobs, key=f"key-{i}".encode(), value=value.encode(),
                             headers=[("trace", f"t{i}".encode())]).get(timeout=30)
        originals.append((f"j{i}", meta.partition, meta.offset, f"key-{i}".encode(), value.encode()))
    producer.close()
    src = {job: (p, o) for job, p, o, _, _ in originals}

    def wrote(job: str, version: int, route: str, rows: int = 10) -> None:
        workers.finish(1, version, route, rows=rows, source=[src[job]], job_ids=[job])

    wrote("j0", 2, "challenger", rows=3)
    wrote("j1", 2, "challenger", rows=4)
    wrote("j1", 2, "challenger", rows=4)  # redelivered: two records, one job
    wrote("j2", 1, "champion")  # the good version's
    wrote("j3", 2, "challenger")
    wrote("j3", 1, "champion")  # rewritten by the champion since
    wrote("j4", 2, "pinned")  # asked for v2 by number
    workers.finish(1, 2, "challenger", ok=False, source=[src["j5"]], job_ids=["j5"])  # failed: the DLQ has it

    controller = _controller(kafka_bootstrap, fleet)
    controller.start(2, bake_jobs=1)
    with pytest.raises(RegistryError, match="stop it first"):
        controller.repair(2)
    controller.abort()
    assert controller.repair(2) == {"jobs": 2, "rows": 7, "missing": 0}

    after = read_all(kafka_bootstrap, jobs)
    assert len(after) == 8
    known = {(p, o) for _, p, o, _, _ in originals}
    again = sorted(((r.key, r.value, r.headers) for r in after if (r.partition, r.offset) not in known))
    want = sorted((k, v, [("trace", f"t{j[1]}".encode())]) for j, _, _, k, v in originals if j in ("j0", "j1"))
    assert again == want


def test_cli_start_rolls_back_with_json_and_repairs(kafka_bootstrap, fleet, workers):
    jobs, models = fleet
    env = {**os.environ, "COLUMNS": "200", "SPOTBATCH_KAFKA_BOOTSTRAP": kafka_bootstrap}
    proc = subprocess.Popen([sys.executable, "-m", "spotbatch", "rollout", "start", NAME, "--to", "2", "--steps",
                             "10,50,100", "--bake-jobs", "5", "--shadow", "0.2", "--json", "--repair", "--every",
                             "0.2s", "--topic", jobs, "--models-topic", models],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env)
    registry = Registry(kafka_bootstrap, models)
    wait_until(lambda: registry.rollout(NAME) is not None, 60, "the rollout record")
    feeder = threading.Thread(target=lambda: (workers.finish(10, 1, "champion"), workers.shadow(5, 0.9)))
    feeder.start()
    stdout, stderr = proc.communicate(timeout=120)
    feeder.join()
    assert proc.returncode == 1, stderr
    summary = json.loads(stdout)
    assert summary["state"] == "rolled_back" and "agreement" in summary["reason"]
    assert (summary["champion"], summary["challenger"], summary["steps"]) == (1, 2, [0.1, 0.5, 1.0])
    assert summary["repaired"] == {"jobs": 0, "rows": 0, "missing": 0}  # the challenger wrote nothing yet

    status = subprocess.run([sys.executable, "-m", "spotbatch", "rollout", "status", NAME, "--json", "--topic", jobs,
                             "--models-topic", models], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                            timeout=60)
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "rolled_back"
    service = subprocess.run([sys.executable, "-m", "spotbatch", "rollout", "controller", "--once", "--topic", jobs,
                              "--models-topic", models], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                             timeout=60)
    assert service.returncode == 0, service.stderr
