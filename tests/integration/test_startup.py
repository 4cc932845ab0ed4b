"""A worker's start (and a broker lost mid-run), as real processes: no broker, an
output that cannot be written, /healthz while waiting for Kafka."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from spotbatch.embedded import EmbeddedBroker
from tests.integration.helpers import (REPO_ROOT, free_port, make_jobs, make_topic, new_group, publish, spawn_worker,
                                       wait_until)

pytestmark = pytest.mark.integration


def _start(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "spotbatch", "worker", "--topic", "t", "--group", "g", "--model", "tiny",
           "--torch-threads", "1", *args]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTBATCH_")}
    child_env.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})})
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env,
                            cwd=tmp_path, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout_s: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"worker still running after {timeout_s:.0f}s\nstderr:\n{err}") from None
    return proc.returncode, out, err


def _closed_port() -> str:
    return f"127.0.0.1:{free_port()}"  # bound, released, and nothing listens there


def _lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def test_no_broker_exits_within_broker_wait_with_one_line(tmp_path):
    address = _closed_port()
    started = time.monotonic()
    proc = _start(tmp_path, "--output", str(tmp_path / "out"),
                  env={"SPOTBATCH_KAFKA_BOOTSTRAP": address, "SPOTBATCH_BROKER_WAIT_S": "3"})
    rc, out, err = _finish(proc, timeout_s=60)
    elapsed = time.monotonic() - started
    assert rc == 1, err
    named = _lines_with(out + err, address)
    assert len(named) == 1, err
    assert "cannot reach Kafka" in named[0] and "SPOTBATCH_KAFKA_BOOTSTRAP" in named[0] and "--bootstrap" in named[0]
    assert "Traceback" not in out + err
    assert "model tiny loaded" not in err  # the wait comes before the model load
    assert elapsed < 3 + 20, f"took {elapsed:.1f}s with broker_wait_s=3"  # 3 s wait + interpreter/torch import


def test_broker_wait_flag(tmp_path):
    address = _closed_port()
    proc = _start(tmp_path, "--output", str(tmp_path / "out"), "--bootstrap", address, "--broker-wait-s", "1")
    rc, _, err = _finish(proc, timeout_s=60)
    assert rc == 1 and "Traceback" not in err
    assert len(_lines_with(err, f"cannot reach Kafka at {address} after 1s")) == 1, err


def test_healthz_says_broker_unreachable_while_waiting(tmp_path):
    port = free_port()
    proc = _start(tmp_path, "--output", str(tmp_path / "out"), "--metrics-port", str(port),
                  env={"SPOTBATCH_KAFKA_BOOTSTRAP": _closed_port(), "SPOTBATCH_BROKER_WAIT_S": "60"})
    try:
        def healthz():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
            except OSError:
                return None

        status = wait_until(lambda: (r := healthz()) and "broker unreachable" in r[1] and r, 30,
                            "/healthz to say broker unreachable")
        assert status[0] == 503
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            assert resp.status == 200
        assert proc.poll() is None  # still waiting (broker_wait_s=60)
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("flag", ["--output", "--checkpoint-uri"])
def test_unwritable_location_exits_2_before_the_model_loads(tmp_path, flag):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = str(blocker / "sub")
    args = ["--output", str(tmp_path / "out")] if flag == "--checkpoint-uri" else []
    proc = _start(tmp_path, *args, flag, bad,
                  env={"SPOTBATCH_KAFKA_BOOTSTRAP": _closed_port(), "SPOTBATCH_BROKER_WAIT_S": "60"})
    rc, out, err = _finish(proc, timeout_s=60)
    assert rc == 2, err
    named = _lines_with(err, bad)
    assert len(named) == 1 and "not writable" in named[0] and flag in named[0], err
    assert "Traceback" not in out + err
    assert "model tiny loaded" not in err and "Kafka" not in err  # checked before the broker wait and the model


def test_probe_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    proc = _start(tmp_path, "--output", str(out), "--broker-wait-s", "1", env={"SPOTBATCH_KAFKA_BOOTSTRAP": _closed_port()})
    rc, _, err = _finish(proc, timeout_s=60)
    assert rc == 1, err
    assert not out.exists()  # no probe file, and not the folders the probe made either


def test_broker_lost_mid_run_exits_1_with_one_line(tmp_path):
    broker = EmbeddedBroker().start()
    address = broker.bootstrap
    try:
        topic = make_topic(broker.bootstrap, 1)
        publish(broker.bootstrap, topic, make_jobs(3, 4))
        out = tmp_path / "out"
        w = spawn_worker(broker.bootstrap, topic, new_group(), out, tmp_path / "logs", burst=False,
                         env={"SPOTBATCH_BROKER_WAIT_S": "3"})
        wait_until(lambda: len(list(out.rglob("*.parquet"))) >= 3, 60, "3 outputs", workers=[w])
    finally:
        broker.stop()
    lost_at = time.monotonic()
    rc = w.wait(60)
    elapsed = time.monotonic() - lost_at
    log = w.log_path.read_text()
    assert rc == 1, w.describe()
    named = _lines_with(log, "lost Kafka at")
    assert len(named) == 1 and address in named[0] and "SPOTBATCH_KAFKA_BOOTSTRAP" in named[0], w.describe()
    assert "Traceback" not in log, w.describe()
    assert len(list(out.rglob("*.parquet"))) >= 3  # what was durable stays
    print(f"worker exited {elapsed:.1f}s after the broker stopped")
    assert elapsed < 3 + 2 + 10 + 10, f"exit took {elapsed:.1f}s after the broker stopped"


def test_s3_probe_writes_and_deletes_an_object(s3_bucket, s3_client):
    from spotbatch.workers.startup import StartupError, check_writable

    check_writable(f"s3://{s3_bucket}/out", "output", "fix it")
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", []) == []
    with pytest.raises(StartupError) as info:
        check_writable(f"s3://{s3_bucket}-missing/out", "output", "pass a writable s3://bucket/prefix")
    assert info.value.code == 2
    message = str(info.value)
    assert "\n" not in message and f"s3://{s3_bucket}-missing/out" in message and "not writable" in message


def test_broker_wait_gives_up_after_its_budget():
    from kafka.errors import KafkaTimeoutError

    from spotbatch.config import Settings
    from spotbatch.workers.startup import StartupError, wait_for_broker

    calls = []

    def probe(settings, timeout_s):
        calls.append(timeout_s)
        time.sleep(min(timeout_s, 0.05))
        raise KafkaTimeoutError("Unable to bootstrap")

    flagged = []
    started = time.monotonic()
    with pytest.raises(StartupError) as info:
        wait_for_broker(Settings(kafka_bootstrap="h:1", broker_wait_s=0.5), probe=probe,
                        on_unreachable=lambda: flagged.append(1))
    assert time.monotonic() - started < 1.5 and len(calls) >= 2 and flagged
    assert info.value.code == 1 and str(info.value).startswith("cannot reach Kafka at h:1 after ")

    seen = []
    assert wait_for_broker(Settings(broker_wait_s=5), probe=lambda s, t: seen.append(t)) < 1 and len(seen) == 1
