"""Shared helpers for the integration tests that run real worker processes.

Workers are started as ``python -m spotbatch worker ...`` subprocesses, each logging to
a file under the test's tmp_path; every wait that fails raises an AssertionError that
carries the tail of that log, so a red test says why the worker misbehaved.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pytest
from kafka import KafkaProducer

from spotbatch.demo import sample_corpus
from spotbatch.jobs import Job
from spotbatch.kafka_admin import committed_offsets, ensure_topics, log_end_offsets, read_all
from spotbatch.publish import publish_jobs, rows_to_jobs
from spotbatch.workers.streams import dlq_topic, results_topic

__all__ = [
    "REPO_ROOT",
    "WorkerProc",
    "spawn_worker",
    "worker_procs",
    "wait_ok",
    "wait_until",
    "make_topic",
    "ensure_side_topics",
    "make_jobs",
    "publish",
    "send_raw",
    "job_offsets",
    "expected_embeddings",
    "job_rows",
    "list_outputs",
    "assert_job_output",
    "assert_committed_to_end",
    "statuses",
    "free_port",
    "new_group",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
SESSION_TIMEOUT_MS = 6000
WORKER_TIMEOUT_S = 90.0


# ---- worker processes ------------------------------------------------------------


@dataclass
class WorkerProc:
    proc: subprocess.Popen
    log_path: Path
    name: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        return f"--- {self.name} (pid {self.pid}, rc {self.proc.poll()}) log tail: {self.log_path}\n{self.tail()}"

    def wait(self, timeout_s: float = WORKER_TIMEOUT_S) -> int:
        """The exit status; AssertionError with the log tail if it is still running."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} still running after {timeout_s:.0f}s\n{self.describe()}") from None

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


_LIVE: list[WorkerProc] = []


@pytest.fixture(autouse=True)
def worker_procs():
    """Kills (by pid) any worker a test started and left running, even on failure."""
    start = len(_LIVE)
    yield
    for w in _LIVE[start:]:
        w.kill()
    del _LIVE[start:]


def _input_prefix_args(prefixes: Iterable[str] | None, log_dir: Path, env: dict[str, str] | None) -> list[str]:
    if prefixes is None and "SPOTBATCH_INPUT_PREFIXES" in (env or {}):
        return []  # the caller's env names them (flags would override it)
    return [arg for prefix in (prefixes or [str(log_dir)]) for arg in ("--input-prefix", prefix)]


def spawn_worker(
    bootstrap: str, topic: str, group: str, output: str | Path, log_dir: Path, *,
    name: str = "worker", burst: bool = True, args: Iterable[str] = (), env: dict[str, str] | None = None,
    input_prefixes: Iterable[str] | None = None,
) -> WorkerProc:
    """Start ``python -m spotbatch worker`` (tiny model, 1 torch thread, 6 s session).

    URI jobs may read under ``input_prefixes`` (default: ``log_dir``, the test's tmp_path).
    """
    cmd = [
        sys.executable, "-m", "spotbatch", "worker",
        "--bootstrap", bootstrap, "--topic", topic, "--group", group,
        "--model", "tiny", "--output", str(output),
        "--torch-threads", "1", "--session-timeout-ms", str(SESSION_TIMEOUT_MS),
        *_input_prefix_args(input_prefixes, log_dir, env),
        *(["--burst"] if burst else []), *args,
    ]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTBATCH_")}
    # The chaos shim installs the fault hooks a test asks for in env (SPOTBATCH_CHAOS=...);
    # without those variables it does nothing.
    shim = REPO_ROOT / "tests" / "chaos" / "shim"
    child_env.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(shim), str(REPO_ROOT)])})
    child_env.update(env or {})
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=child_env,
                                cwd=log_dir, start_new_session=True)
    w = WorkerProc(proc, log_path, name)
    _LIVE.append(w)
    return w


def wait_ok(*workers: WorkerProc, timeout_s: float = WORKER_TIMEOUT_S) -> None:
    """Every worker exits 0 before one shared deadline."""
    deadline = time.monotonic() + timeout_s
    for w in workers:
        rc = w.wait(max(1.0, deadline - time.monotonic()))
        assert rc == 0, f"{w.name} exited {rc}, expected 0\n" + "\n".join(x.describe() for x in workers)


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, *, every_s: float = 0.1,
               workers: Iterable[WorkerProc] = ()) -> Any:
    """Poll ``check`` until it returns something truthy; AssertionError (with logs) on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(w.describe() for w in workers)
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{logs}")
        time.sleep(every_s)


# ---- topics, jobs and publishing -------------------------------------------------


def new_group() -> str:
    return f"g-{uuid.uuid4().hex[:12]}"


def make_topic(bootstrap: str, partitions: int) -> str:
    """A fresh jobs topic plus its one-partition ``.results`` and ``.dlq`` side topics."""
    name = f"test-{uuid.uuid4().hex}"
    ensure_side_topics(bootstrap, name, partitions)
    return name


def ensure_side_topics(bootstrap: str, topic: str, partitions: int) -> None:
    ensure_topics(bootstrap, {topic: partitions, results_topic(topic): 1, dlq_topic(topic): 1})


def make_jobs(n_jobs: int, rows_per_job: int, prefix: str = "job", *, start: int = 0, output: str | None = None) -> list[Job]:
    rows = list(sample_corpus(start + n_jobs * rows_per_job))[start:]
    return list(rows_to_jobs(rows, model="tiny", input_column="text", rows_per_job=rows_per_job,
                             prefix=prefix, output=output))


def _producer(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, request_timeout_ms=30_000)


def publish(bootstrap: str, topic: str, jobs: list[Job]) -> None:
    producer = _producer(bootstrap)
    try:
        report = publish_jobs(producer, topic, jobs)
    finally:
        producer.close()
    assert report.ok and report.jobs == len(jobs), report


def send_raw(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> list[tuple[int, int]]:
    """Send (key, value) pairs as they are; returns each one's (partition, offset)."""
    producer = _producer(bootstrap)
    try:
        futures = [producer.send(topic, key=k, value=v) for k, v in messages]
        producer.flush()
        metas = [f.get(timeout=30) for f in futures]
    finally:
        producer.close()
    return [(m.partition, m.offset) for m in metas]


def job_offsets(bootstrap: str, topic: str) -> dict[tuple[int, int], str]:
    """{(partition, offset): job_id} of every record on the jobs topic."""
    return {(r.partition, r.offset): json.loads(r.value)["job_id"] for r in read_all(bootstrap, topic)}


# ---- expectations ----------------------------------------------------------------


@lru_cache(maxsize=1)
def _tiny_runner():
    from spotbatch.models import get_handler
    from spotbatch.models.runner import BatchRunner

    return BatchRunner(get_handler("tiny"), device="cpu")


def expected_embeddings(values: list[str]) -> np.ndarray:
    """What the tiny model gives for ``values``, computed in this process."""
    return _tiny_runner().run(list(values), {})["embedding"]


def job_rows(job: Job) -> tuple[list[str], list[str]]:
    rows = job.inputs.rows
    return [r["id"] for r in rows], [r["text"] for r in rows]


def list_outputs(folder: Path) -> set[str]:
    """Every entry in ``folder``, hidden temp files included ("" set if missing), but the
    checkpoint store's folder (checkpoints, attempt ledgers): not outputs."""
    return set(os.listdir(folder)) - {"_checkpoints"} if folder.exists() else set()


def assert_job_output(table, ids: list[str], values: list[str]) -> None:
    assert table.column_names == ["id", "embedding"], table.schema
    assert table.column("id").to_pylist() == ids
    got = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, expected_embeddings(values), rtol=1e-6, atol=1e-7)


def assert_committed_to_end(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    ends = log_end_offsets(bootstrap, topic)
    committed = committed_offsets(bootstrap, group, topic)
    # A partition that never held a record needs no commit (its end is 0).
    assert {p: committed.get(p, 0) for p in ends} == ends, f"committed {committed} != log ends {ends}"
    assert sum(ends.values()) > 0
    return ends


def statuses(bootstrap: str, topic: str) -> list[dict]:
    return [json.loads(r.value) for r in read_all(bootstrap, results_topic(topic))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
