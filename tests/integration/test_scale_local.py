"""``spotbatch scale-local`` with real parts: the embedded broker, real worker processes
(model ``tiny``), real signals. A backlog makes it scale out past one worker; once the
backlog is done it scales in, and to zero after the cooldown."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from spotbatch.kafka_admin import committed_offsets
from spotbatch.logevents import parse_events
from tests.integration.helpers import (
    REPO_ROOT,
    SESSION_TIMEOUT_MS,
    assert_committed_to_end,
    list_outputs,
    make_jobs,
    make_topic,
    new_group,
    publish,
    statuses,
    wait_until,
)

pytestmark = pytest.mark.integration

COOLDOWN_S = 2.5


def _scale_local(bootstrap: str, topic: str, group: str, out, logs, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "spotbatch", "scale-local", "--bootstrap", bootstrap, "--topic", topic,
           "--group", group, "--min", "0", "--max", "3", "--lag-threshold", "5", "--cooldown-s", str(COOLDOWN_S),
           "--poll-s", "0.3", "--model", "tiny", "--output", str(out), "--torch-threads", "1",
           "--session-timeout-ms", str(SESSION_TIMEOUT_MS), "--drain-s", "5", "--log-dir", str(logs), *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTBATCH_")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, logs, timeout_s: float) -> tuple[str, str]:
    """Wait for the autoscaler; on a hang, stop it and every worker it named (by pid)."""
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        for pid in {pid for e in parse_events(stderr) for pid in e.get("pids", [])}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(logs.glob("*.log")))
        raise AssertionError(f"scale-local still running after {timeout_s:.0f}s\n{stderr[-4000:]}\n{tails}") from None


def test_scales_out_on_backlog_then_in_and_to_zero_after_the_cooldown(kafka_bootstrap, tmp_path):
    topic, group = make_topic(kafka_bootstrap, 4), new_group()
    out, logs = tmp_path / "out", tmp_path / "logs"
    jobs = make_jobs(60, 10)
    publish(kafka_bootstrap, topic, jobs)

    proc = _scale_local(kafka_bootstrap, topic, group, out, logs, "--once", "--json")
    stdout, stderr = _finish(proc, logs, timeout_s=90)
    where = f"rc={proc.returncode}\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-5000:]}"
    assert proc.returncode == 0, where
    report = json.loads(stdout)
    events = report["scale_events"]
    kinds = [e["event"] for e in events]

    # scaled out past one worker on the backlog ...
    assert report["max_replicas"] >= 2, where
    assert kinds[0] == "scale_out" and events[0]["unconsumed"] == 60, where
    # ... and, once it was done, to zero after the cooldown, with every worker gone
    zero = [e for e in events if e["event"] == "scale_to_zero"]
    assert len(zero) == 1 and report["replicas"][-1][1] == 0, where
    assert zero[0]["unconsumed"] == 0 and set(zero[0]["unconsumed_by_partition"].values()) == {0}, where
    exits = [e for e in events if e["event"] in ("exited", "killed")]
    assert len(exits) == report["workers_started"], where
    for e in exits:  # drained cleanly; or stopped while still starting, before it owned a partition
        log = (logs / f"worker-{e['workers'][0]}.log").read_text(errors="replace")
        assert e["returncode"] == 0 or not re.search(r"assigned \[\d", log), f"{e}\n{log[-3000:]}"
    # no SIGTERM while records were unconsumed and no worker was left to consume them
    for e in events:
        if e["event"] in ("scale_in", "scale_to_zero"):
            assert e["unconsumed"] == 0 or e["replicas_to"] > 0, e
    # the scale events were logged as they happened, one JSON line each
    logged = parse_events(stderr)
    for kind in ("scale_out", "scale_to_zero"):
        assert any(e["event"] == kind and all(isinstance(e[k], int) for k in ("from", "to", "lag", "unconsumed"))
                   for e in logged), where

    # every job done once: one output each, an ok status each, offsets committed to the end
    assert list_outputs(out) == {f"{j.job_id}.parquet" for j in jobs}, where
    ok = {s["job_id"] for s in statuses(kafka_bootstrap, topic) if s["status"] == "ok"}
    assert ok == {j.job_id for j in jobs}
    assert sum(assert_committed_to_end(kafka_bootstrap, group, topic).values()) == 60
    assert sum(committed_offsets(kafka_bootstrap, group, topic).values()) == 60


def test_ctrl_c_stops_every_worker_gracefully(kafka_bootstrap, tmp_path):
    topic, group = make_topic(kafka_bootstrap, 2), new_group()
    out, logs = tmp_path / "out", tmp_path / "logs"
    publish(kafka_bootstrap, topic, make_jobs(4, 5))
    proc = _scale_local(kafka_bootstrap, topic, group, out, logs, "--min", "1", "--json")
    # wait for the worker to have done the backlog, then Ctrl-C (SIGINT to the autoscaler only)
    done = lambda: sum(committed_offsets(kafka_bootstrap, group, topic).values()) == 4  # noqa: E731
    wait_until(done, 60, "the backlog to be done")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = _finish(proc, logs, timeout_s=30)
    assert proc.returncode == 0, stderr[-3000:]
    report = json.loads(stdout)
    kinds = [e["event"] for e in report["scale_events"]]
    assert "shutdown" in kinds and "scale_to_zero" not in kinds, kinds  # min 1: only Ctrl-C stops it
    exits = [e for e in report["scale_events"] if e["event"] in ("exited", "killed")]
    assert [e["returncode"] for e in exits] == [0] * report["workers_started"], stderr[-3000:]
    assert report["replicas"][-1][1] == 0
    assert "left the group" in (logs / "worker-0.log").read_text()  # drained, not killed


def test_unknown_topic_is_a_one_line_error(kafka_bootstrap, tmp_path):
    proc = _scale_local(kafka_bootstrap, "no-such-topic", new_group(), tmp_path / "out", tmp_path / "logs", "--once")
    _, stderr = _finish(proc, tmp_path / "logs", timeout_s=60)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, stderr
    assert "no-such-topic" in errors[0] and "--bootstrap" in errors[0]
    assert not (tmp_path / "logs").exists()  # no worker was started
