"""Two fleets on one jobs topic, each in its own consumer group: each runs its own
model's jobs and commits past the other's (--skip-model) without touching them; a job
for a known model neither serves is dead-lettered as ``model_not_served`` and redriven
to a topic that fleet would read; a name no handler takes stays ``unknown_model``.
Real broker, real worker processes, a real TorchScript file.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from spotbatch.dlq import dedupe, parse_dead_letter
from spotbatch.kafka_admin import read_all
from spotbatch.workers.streams import dlq_topic
from tests.integration.helpers import (  # noqa: F401 - worker_procs is an autouse fixture
    REPO_ROOT,
    assert_committed_to_end,
    list_outputs,
    make_topic,
    new_group,
    send_raw,
    spawn_worker,
    wait_ok,
    worker_procs,
)

pytestmark = pytest.mark.integration


class _Double(torch.nn.Module):
    input_dim: int = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


def _job(job_id: str, model: str, row: dict) -> tuple[bytes, bytes]:
    return job_id.encode(), json.dumps({"job_id": job_id, "model": model, "inputs": {"rows": [{"id": "r1", **row}]}}).encode()


def test_two_fleets_share_a_topic_and_destroy_nothing(kafka_bootstrap, tmp_path):
    model_path = tmp_path / "double.pt"
    torch.jit.script(_Double()).save(str(model_path))
    ts = f"torchscript:{model_path}"
    topic = make_topic(kafka_bootstrap, 2)
    tiny_jobs = [_job(f"t{i}", "tiny", {"text": f"hello {i}"}) for i in range(6)]
    ts_jobs = [_job(f"v{i}", ts, {"x": [1.0, 2.0, 3.0, float(i)]}) for i in range(6)]
    orphan, typo = _job("orphan", "minilm", {"text": "no fleet runs minilm"}), _job("typo", "bert", {"text": "x"})
    send_raw(kafka_bootstrap, topic, [*tiny_jobs, *ts_jobs, orphan, typo])

    groups = {"tiny": new_group(), "ts": new_group()}
    fleet_tiny = spawn_worker(kafka_bootstrap, topic, groups["tiny"], tmp_path / "out-tiny", tmp_path, name="tiny",
                              args=["--skip-model", ts])
    fleet_ts = spawn_worker(kafka_bootstrap, topic, groups["ts"], tmp_path / "out-ts", tmp_path, name="ts",
                            args=["--model", ts, "--skip-model", "tiny"])
    wait_ok(fleet_tiny, fleet_ts)

    assert list_outputs(tmp_path / "out-tiny") == {f"t{i}.parquet" for i in range(6)}
    assert list_outputs(tmp_path / "out-ts") == {f"v{i}.parquet" for i in range(6)}
    for group in groups.values():
        assert_committed_to_end(kafka_bootstrap, group, topic)
    # Both fleets dead-letter the orphan and the typo: keyed by source, one each remains.
    letters = dedupe(parse_dead_letter(r) for r in read_all(kafka_bootstrap, dlq_topic(topic)))
    assert sorted((d.job_id, d.code) for d in letters) == [("orphan", "model_not_served"), ("typo", "unknown_model")]

    moved = subprocess.run([sys.executable, "-m", "spotbatch", "dlq", "redrive", "--topic", topic, "--bootstrap",
                            kafka_bootstrap, "--code", "model_not_served", "--to-topic", f"{topic}.minilm", "--json"],
                           capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["redriven"] == 1
    (redriven,) = read_all(kafka_bootstrap, f"{topic}.minilm")
    assert redriven.value == orphan[1]
