"""A rollout end to end, as a user runs it: real broker, a real worker process serving
``embedder`` (MiniLM), the ``spotbatch rollout`` CLI as real processes, jobs arriving
all along.

1. Version 2 is MiniLM with every Linear layer dynamically quantised to int8: its
   embeddings agree with fp32 at a mean cosine near 0.94, below the 0.98 gate. It is
   rolled back at its first gate, and within the workers' registry re-read no more
   challenger outputs are written; ``--repair`` re-publishes what it wrote, and after
   the champion reruns them every output names version 1.
2. Version 3 (int8 with per-token activation scales, cosine ~0.997) is promoted through
   10, 50 and 100%, with its controller killed (SIGKILL) mid-rollout and resumed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spotbatch.demo import sample_corpus
from spotbatch.rollouts import Registry
from tests.integration.helpers import (  # noqa: F401 - worker_procs is an autouse fixture
    REPO_ROOT,
    make_topic,
    new_group,
    send_raw,
    spawn_worker,
    statuses,
    wait_until,
    worker_procs,
)

pytestmark = pytest.mark.integration

TEXTS = [row["text"] for row in sample_corpus(400)]


class Publisher:
    """Jobs of 4 rows, a few per second, until stopped: a fleet under steady work."""

    def __init__(self, bootstrap: str, topic: str, per_s: float = 6.0) -> None:
        self.bootstrap, self.topic, self.every_s = bootstrap, topic, 1.0 / per_s
        self.sent: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Publisher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(self.every_s):
            job_id = f"j{i:05d}"
            rows = [{"id": f"{job_id}-{r}", "text": TEXTS[(4 * i + r) % len(TEXTS)]} for r in range(4)]
            body = {"job_id": job_id, "model": "embedder", "inputs": {"rows": rows}}
            send_raw(self.bootstrap, self.topic, [(job_id.encode(), json.dumps(body).encode())])
            self.sent.append(job_id)
            i += 1


def _rollout_cli(bootstrap: str, topic: str, models: str, *args: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "spotbatch", "rollout", *args, "--bootstrap", bootstrap, "--topic", topic,
           "--models-topic", models]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "wb"), cwd=REPO_ROOT, text=True)


def _last_status(bootstrap: str, topic: str) -> dict[str, dict]:
    last: dict[str, dict] = {}
    for status in statuses(bootstrap, topic):
        if status["status"] == "ok":
            last[status["job_id"]] = status
    return last


def test_a_bad_version_is_rolled_back_and_repaired_then_a_good_one_promoted(kafka_bootstrap, tmp_path):
    models, topic, out = f"models-{new_group()}", make_topic(kafka_bootstrap, 2), tmp_path / "out"
    registry = Registry(kafka_bootstrap, models)
    registry.register("embedder", 1, "minilm")
    registry.register("embedder", 2, "minilm", precision="int8", notes="all Linear layers int8: too lossy")
    registry.register("embedder", 3, "minilm", precision="int8-token", notes="per-token activation scales")
    worker = spawn_worker(kafka_bootstrap, topic, new_group(), out, tmp_path, burst=False,
                          args=["--model", "embedder", "--max-wait-ms", "20"], env={"SPOTBATCH_MODELS_TOPIC": models})
    gates = ["--steps", "10,50,100", "--bake-jobs", "6", "--shadow", "0.5", "--every", "1s", "--min-agreement", "0.98",
             "--max-latency-ratio", "20"]  # int8 on a loaded CPU may be slower: agreement is the gate under test
    with Publisher(kafka_bootstrap, topic) as publisher:
        wait_until(lambda: len(_last_status(kafka_bootstrap, topic)) >= 10, 120, "the champion at work",
                   workers=[worker])

        # Half the jobs from the start, so that the bad version writes some before the
        # shadow gate has its five jobs: there is something to repair.
        bad = _rollout_cli(kafka_bootstrap, topic, models, "start", "embedder", "--to", "2", *gates, "--steps", "50,100",
                           "--repair", "--json", log=tmp_path / "rollout-2.log")
        stdout, _ = bad.communicate(timeout=240)
        assert bad.returncode == 1, (tmp_path / "rollout-2.log").read_text()
        summary = json.loads(stdout)
        assert (summary["state"], summary["step"]) == ("rolled_back", 0), summary
        assert "agreement" in summary["reason"], summary["reason"]
        assert summary["repaired"]["jobs"] >= 1
        breach_at = summary["updated_at"]
        time.sleep(6)  # past the workers' registry re-read and the batches already in flight
        challenger = [s for s in statuses(kafka_bootstrap, topic) if s.get("route") == "challenger"]
        assert {s["model_version"] for s in challenger} == {2}
        last_challenger = max(s["at"] for s in challenger)
        assert last_challenger - breach_at < 5.0, f"challenger outputs {last_challenger - breach_at:.1f}s after the breach"
        # The repaired jobs run again on the champion: every output names version 1.
        wait_until(lambda: all(s["model_version"] == 1 for s in _last_status(kafka_bootstrap, topic).values()),
                   120, "the repaired jobs rewritten by the champion", workers=[worker])
        for path in out.glob("*.parquet"):
            assert pq.read_schema(path).metadata[b"spotbatch.model_version"] == b"1", path.name

        good = _rollout_cli(kafka_bootstrap, topic, models, "start", "embedder", "--to", "3", *gates, "--json",
                            log=tmp_path / "rollout-3.log")
        wait_until(lambda: (r := registry.rollout("embedder")) is not None and r.challenger == 3 and r.step >= 1,
                   240, "the good version past its first step")
        good.send_signal(signal.SIGKILL)  # the controller dies mid-rollout; the record holds its place
        good.wait(10)
        resumed = _rollout_cli(kafka_bootstrap, topic, models, "resume", "embedder", "--every", "1s", "--json",
                               log=tmp_path / "resume-3.log")
        stdout, _ = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, (tmp_path / "resume-3.log").read_text()
        summary = json.loads(stdout)
        assert (summary["state"], summary["champion"], summary["challenger"]) == ("promoted", 1, 3), summary
        assert summary["step"] == 2 and all(g["status"] in ("pass", "off") for g in summary["gates"]), summary
        sent_before = len(publisher.sent)
        assert registry.state().resolve("embedder").version == 3
        wait_until(lambda: len(publisher.sent) >= sent_before + 12, 30, "jobs after the promotion")
    newest = sorted(_last_status(kafka_bootstrap, topic).items())[-5:]
    wait_until(lambda: len(_last_status(kafka_bootstrap, topic)) == len(publisher.sent), 120, "every job done",
               workers=[worker])
    final = _last_status(kafka_bootstrap, topic)
    assert {final[j]["model_version"] for j in publisher.sent[-5:]} == {3}, newest
