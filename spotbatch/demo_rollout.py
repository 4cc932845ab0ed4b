"""``spotbatch demo --rollout``: two rollouts over a steady stream of jobs, on the demo's broker.

The demo model is registered as ``embedder`` version 1. Version 2 is the same files with
every Linear layer dynamically quantised to int8: measured here, its embeddings agree
with fp32 at a mean cosine near 0.94, so the 0.98 agreement gate must refuse it; it is
rolled back and the jobs it wrote are repaired (re-published, rewritten by the
champion). Version 3 is int8 with per-token activation scales (cosine ~0.997): it is
promoted through every step. One worker serves both sides, jobs keep arriving all along.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from spotbatch.jobs import job_key
from spotbatch.kafka_admin import ensure_topics, read_all
from spotbatch.records import dlq_topic, results_topic
from spotbatch.rollouts.controller import Controller
from spotbatch.rollouts.gates import Thresholds
from spotbatch.rollouts.records import shadow_topic
from spotbatch.rollouts.registry import Registry

__all__ = ["run_rollout_demo"]

NAME = "embedder"
_ROWS_PER_JOB = 4


class _Stream:
    """Jobs of a few rows at a steady rate until stopped."""

    def __init__(self, bootstrap: str, topic: str, texts: list[str], per_s: float = 6.0) -> None:
        from kafka import KafkaProducer

        self._producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        self.topic, self.every_s, self.sent = topic, 1.0 / per_s, 0
        self._rows = texts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-jobs", daemon=True)

    def __enter__(self) -> "_Stream":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)
        self._producer.flush(10)
        self._producer.close(5)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            job_id = f"rollout-{self.sent:05d}"
            rows = [{"id": f"{job_id}-{r}", "text": self._rows[(self.sent * _ROWS_PER_JOB + r) % len(self._rows)]}
                    for r in range(_ROWS_PER_JOB)]
            self._producer.send(self.topic, key=job_key(job_id), value=json.dumps(
                {"job_id": job_id, "model": NAME, "inputs": {"rows": rows}}).encode())
            self.sent += 1


def _worker(bootstrap: str, topic: str, models: str, model_output: Path, logs: Path, torch_threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "spotbatch", "worker", "--bootstrap", bootstrap, "--topic", topic,
           "--group", f"{topic}-workers", "--model", NAME, "--output", str(model_output), "--torch-threads",
           str(torch_threads), "--session-timeout-ms", "6000", "--max-wait-ms", "20"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SPOTBATCH_MODELS_TOPIC": models}
    with open(logs / "worker-rollout.log", "wb") as log_file:
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)


def _statuses(bootstrap: str, topic: str) -> list[dict]:
    return [json.loads(r.value) for r in read_all(bootstrap, results_topic(topic), timeout_s=30)]


def _one_rollout(controller: Controller, to: int, steps: tuple[float, ...], log: Callable[[str], None]) -> dict:
    """Start it and drive it to its end; the outcome, with ``updated_at`` (when it ended)."""
    gates = Thresholds(min_agreement=0.98, max_latency_ratio=20.0)  # a loaded CPU: agreement is the point here
    started = controller.start(to, steps=steps, bake_jobs=6, shadow=0.5, gates=gates)
    log(f"rollout {NAME} v{started.champion} -> v{to}: steps {', '.join(f'{s:.0%}' for s in steps)}")
    seen = {"step": -1}

    def on_tick(rollout) -> None:
        if rollout.state == "running" and rollout.step != seen["step"]:
            seen["step"] = rollout.step
            log(f"  step {rollout.step + 1}/{len(rollout.steps)}: the challenger takes {rollout.fraction:.0%} of jobs")

    final = controller.run(every_s=1.0, on_tick=on_tick)
    result = {"to": to, "state": final.state, "reason": final.reason, "steps": list(final.steps),
              "step": final.step, "gates": final.gates, "updated_at": final.updated_at}
    log(f"  {final.state}: {final.reason}")
    return result


def run_rollout_demo(bootstrap: str, output: Path, texts: list[str], *, model: str = "minilm", torch_threads: int = 1,
                     timeout_s: float = 600.0, log: Callable[[str], None] = print) -> dict:
    """Run both rollouts over jobs of ``texts``; the summary the demo's JSON gains."""
    stamp = int(time.time())
    topic, models = f"spotbatch.demo.rollout.{stamp}", f"spotbatch.demo.models.{stamp}"
    ensure_topics(bootstrap, {topic: 2, results_topic(topic): 1, dlq_topic(topic): 1, shadow_topic(topic): 1})
    registry = Registry(bootstrap, models)
    registry.register(NAME, 1, model, notes="fp32")
    registry.register(NAME, 2, model, precision="int8", notes="every Linear int8: expected to fail agreement")
    registry.register(NAME, 3, model, precision="int8-token", notes="per-token activation scales")
    worker = _worker(bootstrap, topic, models, output / "rollout", output / "logs", torch_threads)
    controller = Controller(bootstrap, NAME, topic, models)
    deadline = time.monotonic() + timeout_s
    try:
        with _Stream(bootstrap, topic, texts) as stream:
            while len(_statuses(bootstrap, topic)) < 10:  # the champion at work first
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the rollout worker did not start (see {output / 'logs' / 'worker-rollout.log'})")
                time.sleep(1)
            bad = _one_rollout(controller, 2, (0.5, 1.0), log)
            if bad["state"] == "rolled_back":
                breach = bad["updated_at"]  # the controller wrote the rollback as the gate broke
                bad["repaired"] = controller.repair(2)
                written = [s["at"] for s in _statuses(bootstrap, topic) if s.get("route") == "challenger"]
                bad["breach_to_last_challenger_job_s"] = round(max(written, default=breach) - breach, 2)
                log(f"  repaired {bad['repaired']['jobs']} jobs ({bad['repaired']['rows']} rows); last challenger "
                    f"output {bad['breach_to_last_challenger_job_s']}s after the breach")
            good = _one_rollout(controller, 3, (0.1, 0.5, 1.0), log)
            sent = stream.sent
        while len({s["job_id"] for s in _statuses(bootstrap, topic)}) < sent and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
    last: dict[str, int] = {}
    for status in _statuses(bootstrap, topic):
        if status["status"] == "ok":
            last[status["job_id"]] = status["model_version"]
    champion = registry.state().resolve(NAME).version
    return {"rollouts": [bad, good], "champion": champion, "jobs": sent,
            "outputs_by_version": {str(v): sum(1 for x in last.values() if x == v) for v in sorted(set(last.values()))}}
