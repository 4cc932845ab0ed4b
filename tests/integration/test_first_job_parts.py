"""A fresh worker (nothing measured yet) must not cut its first big URI job into one
part per batch: 20,000 rows used to become 313 parts and 321 checkpoint writes."""

from __future__ import annotations

import json

import pytest

from spotbatch.checkpointing.interval import FIRST_PART_BATCHES
from tests.integration.helpers import (  # noqa: F401 - worker_procs is an autouse fixture
    assert_committed_to_end,
    make_topic,
    new_group,
    send_raw,
    spawn_worker,
    wait_ok,
    worker_procs,
)

pytestmark = pytest.mark.integration

ROWS = 20_000


def test_first_uri_job_on_a_fresh_worker_uses_the_part_floor(kafka_bootstrap, tmp_path):
    topic, group, out = make_topic(kafka_bootstrap, 1), new_group(), tmp_path / "out"
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": f"row {i}"}) + "\n" for i in range(ROWS)))
    job = json.dumps({"job_id": "first", "model": "tiny", "inputs": {"uri": str(path)}}).encode()
    send_raw(kafka_bootstrap, topic, [(b"first", job)])

    wait_ok(spawn_worker(kafka_bootstrap, topic, group, out, tmp_path, args=["--max-batch-rows", "64"]))

    manifest = json.loads((out / "first" / "_manifest.json").read_text())
    assert manifest["rows"] == ROWS
    assert len(manifest["parts"]) == -(-ROWS // (64 * FIRST_PART_BATCHES))  # 20, not 313
    print(f"first 20,000-row URI job on a fresh worker: {len(manifest['parts'])} parts")
    assert_committed_to_end(kafka_bootstrap, group, topic)
