"""Issue 13 against real parts: lag before any commit, fast failures on a wrong bootstrap,
and a demo whose worker cannot start says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.integration.helpers import REPO_ROOT, free_port, make_jobs, new_group, publish

pytestmark = pytest.mark.integration


def _cli(*args: str, timeout: float = 120, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTBATCH_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "spotbatch", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_lag_before_any_commit_shows_the_backlog_by_kedas_rule(kafka_bootstrap, topic):
    publish(kafka_bootstrap, topic, make_jobs(12, 2))
    group = new_group()  # no worker has joined or committed yet
    earliest = _cli("lag", "--bootstrap", kafka_bootstrap, "--group", group, "--topic", topic,
                    "--offset-reset-policy", "earliest", "--json")
    assert earliest.returncode == 0, earliest.stderr
    report = json.loads(earliest.stdout)
    assert report["group_known"] is False and report["total_lag"] == 12 and report["replicas"] == 2
    assert all(p["committed"] == -1 for p in report["partitions"])
    latest = _cli("lag", "--bootstrap", kafka_bootstrap, "--group", group, "--topic", topic)
    assert latest.returncode == 0, latest.stderr
    text = " ".join(latest.stdout.split())
    assert "total lag 4" in text  # latest: 1 per partition (4 partitions), as KEDA answers
    assert (f"group {group} has committed nothing yet: KEDA's no-commit rule for offsetResetPolicy latest: "
            "each partition counts 1 (--offset-reset-policy earliest counts the whole log)") in text


def test_a_wrong_bootstrap_fails_in_seconds():
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    for argv in (["lag", "--group", "g", "--topic", "t"], ["scheduler", "report"]):
        started = time.monotonic()
        result = _cli(*argv, "--bootstrap", dead, timeout=60)
        took = time.monotonic() - started
        assert result.returncode == 2 and dead in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert took < 20, f"{' '.join(argv)} took {took:.0f}s to say Kafka is unreachable (was ~30 s)"


def test_demo_with_a_bad_model_ends_with_the_workers_error(tmp_path):
    out = tmp_path / "out"
    result = _cli("demo", "--model", "bert", "--rows", "20", "--output", str(out), "--timeout-s", "60",
                  timeout=120, cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a worker exited 2: unknown_model: field 'model' is 'bert'; choose one of:"), \
        result.stderr[-2000:]
    assert f"(log: {out / 'logs' / 'worker-0.log'})" in last
