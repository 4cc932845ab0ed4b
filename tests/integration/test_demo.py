"""``spotbatch demo`` end to end, as a user runs it: its own broker, its own workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spotbatch.demo import sample_corpus
from spotbatch.embedded import BOOTSTRAP_ENV
from tests.integration.helpers import REPO_ROOT, assert_job_output

pytestmark = pytest.mark.integration


def _run_demo(tmp_path, out, *args: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTBATCH_")}
    assert BOOTSTRAP_ENV not in env  # so the demo starts its own broker
    env["PYTHONPATH"] = str(REPO_ROOT)
    cmd = [sys.executable, "-m", "spotbatch", "demo", "--model", "tiny", *args,
           "--json", "--output", str(out), "--timeout-s", "120"]
    # Own session: if the demo hangs, its workers and broker go down with it (by its pgid).
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(out.glob("logs/*.log")))
    where = f"rc={proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr[-3000:]}\n{logs}"
    assert proc.returncode == 0, where
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, where  # exactly one JSON object, nothing else on stdout
    return json.loads(lines[0]), where


def test_demo_runs_the_whole_loop_and_prints_json(tmp_path):
    out = tmp_path / "demo-out"
    summary, _ = _run_demo(tmp_path, out, "--rows", "120", "--rows-per-job", "10")
    assert (summary["jobs"], summary["rows"], summary["failed"], summary["dlq"]) == (12, 120, 0, 0), summary
    assert summary["output"] == str(Path(out).resolve())
    assert summary["model"] == "tiny" and summary["workers"] == 2
    assert summary["seconds"] > 0 and summary["rows_per_s"] > 0
    # the autoscaler ran the workers: out from zero on the backlog (12 jobs, lag threshold 10:
    # 2 workers), and back to zero once every job was done and the cooldown passed
    events = [(e["event"], e["from"], e["to"]) for e in summary["scale_events"]]
    assert summary["max_replicas"] == 2 and events[:2] == [("scale_out", 0, 1), ("scale_out", 1, 2)], events
    assert events[-1][0] == "scale_to_zero" and summary["scale_events"][-1]["unconsumed"] == 0, events

    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert files == [f"demo-{i:06d}.parquet" for i in range(12)], files
    corpus = list(sample_corpus(120))
    for i, name in enumerate(files):
        rows = corpus[i * 10 : (i + 1) * 10]
        assert_job_output(pq.read_table(out / name), [r["id"] for r in rows], [r["text"] for r in rows])


def test_demo_with_spot_interruptions_still_does_every_job_once(tmp_path):
    out = tmp_path / "demo-out"
    summary, where = _run_demo(tmp_path, out, "--rows", "4000", "--rows-per-job", "10", "--interruptions", "2")
    assert (summary["jobs"], summary["rows"], summary["failed"], summary["dlq"]) == (400, 4000, 0, 0), where
    assert summary["interruptions"] >= 1, where  # notices reached workers through fake IMDS
    assert summary["rows_recomputed"] >= 0 and summary["max_drain_s"] >= 0
    logs = "".join(p.read_text() for p in out.glob("logs/*.log"))
    assert logs.count("terminate notice from aws") == summary["interruptions"], where
    # A drained worker is restarted unless the run ended first.
    assert 2 <= len(list(out.glob("logs/*.log"))) <= 2 + summary["interruptions"]
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert files == [f"demo-{i:06d}.parquet" for i in range(400)]
