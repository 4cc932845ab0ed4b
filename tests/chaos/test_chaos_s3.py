"""Chaos, scenario 3: S3 fails for 10 s.

The workers reach moto through an HTTP proxy (their AWS_ENDPOINT_URL) that forwards
every request, except for 10 s in the middle of the run, when it answers every request
with ``503 SlowDown`` as S3 does when it sheds load. Two workers process a seeded mix
of inline, URI (inputs on S3) and bad jobs; more jobs are published as the outage
starts, so the workers have outputs to write while S3 is down.

The run happens once (fixture ``outage``); the tests check:

* the workers ride out the outage without a restart (retries), and exit 0 at the end;
* nothing is lost or duplicated: every good job has exactly one complete output equal
  to a clean run's, the DLQ holds exactly the bad jobs (none of them an S3 error),
  offsets are committed to the log end.

A worker that dies anyway is restarted once S3 is back (and recorded), so that the
second test still checks the data after the failure.
"""

from __future__ import annotations

import json
import random
import signal
import time
import uuid
from dataclasses import dataclass

import pytest

from spotbatch.kafka_admin import committed_offsets, read_all
from spotbatch.workers.streams import dlq_topic, results_topic
from tests.chaos.harness import (
    CHECKPOINT_ROWS,
    CHAOS_WORKER_ARGS as WORKER_ARGS,
    S3FaultProxy,
    Workload,
    build_workload,
    chaos_seed,
    is_ledger,
    log_ends_of,
    publish_all,
    reference_outputs,
    s3_objects,
    table,
    verify_dead_letters,
    verify_outputs,
    verify_statuses,
    wait_committed,
)
from tests.integration.helpers import WorkerProc, make_topic, new_group, spawn_worker, wait_until

pytestmark = pytest.mark.integration

OUTAGE_S = 10.0
PARTITIONS = 4
@dataclass
class OutageRun:
    workload: Workload
    root: str
    bucket: str
    bootstrap: str
    topic: str
    group: str
    coords: dict
    ends: dict[int, int]
    workers: list[WorkerProc]
    died: list[WorkerProc]
    rcs: dict[str, int]
    proxy: S3FaultProxy
    objects: dict[str, bytes]
    summary: str


@pytest.fixture(scope="module")
def outage(kafka_bootstrap, s3_endpoint, s3_client, tmp_path_factory):
    seed = chaos_seed()
    print(f"\nchaos seed {seed} (set SPOTBATCH_CHAOS_SEED to replay)")
    rng = random.Random(f"{seed}/s3")
    tmp = tmp_path_factory.mktemp("chaos-s3")
    bucket = f"chaos-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/out"
    before = build_workload(rng, name="s", n_inline=240, n_uri=2, uri_rows=(240, 320), checkpoint_rows=CHECKPOINT_ROWS,
                            input_prefix=f"s3://{bucket}/in", output_root=root)
    during = build_workload(rng, name="sd", n_inline=80, n_uri=1, uri_rows=(120, 160),
                            checkpoint_rows=CHECKPOINT_ROWS, input_prefix=f"s3://{bucket}/in", output_root=root,
                            bad=False)
    for uri, data in (before + during).inputs.items():
        s3_client.put_object(Bucket=bucket, Key=uri.split("/", 3)[3], Body=data)
    topic, group = make_topic(kafka_bootstrap, PARTITIONS), new_group()
    coords = publish_all(kafka_bootstrap, topic, before.order)

    proxy = S3FaultProxy(s3_endpoint).__enter__()
    env = {"AWS_ENDPOINT_URL": proxy.url, "SPOTBATCH_INPUT_PREFIXES": f"s3://{bucket}/in"}
    workers: list[WorkerProc] = []
    restarted: list[WorkerProc] = []
    try:
        started = time.monotonic()
        workers = [spawn_worker(kafka_bootstrap, topic, group, root, tmp, name=f"s3w{i}", burst=False,
                                args=WORKER_ARGS, env=env) for i in range(2)]

        def outputs() -> int:
            return len(s3_objects_keys(s3_client, bucket))

        wait_until(lambda: outputs() >= 10, 60, "the first outputs", workers=workers)
        at_outage = outputs()
        proxy.down = True
        outage_at = time.monotonic()
        coords |= publish_all(kafka_bootstrap, topic, during.order)
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_at)))
        proxy.down = False
        refused = proxy.refused
        died = [w for w in workers if w.proc.poll() is not None]
        restarted = [spawn_worker(kafka_bootstrap, topic, group, root, tmp, name=f"{w.name}-restarted", burst=False,
                                  args=WORKER_ARGS, env=env) for w in died]
        ends = log_ends_of(coords.values(), PARTITIONS)
        everyone = workers + restarted
        wait_committed(kafka_bootstrap, group, topic, ends, timeout_s=120, workers=everyone)
        elapsed = time.monotonic() - started
        for w in everyone:
            w.signal(signal.SIGTERM)
        rcs = {w.name: w.wait(30) for w in everyone}
        summary = "chaos summary: scenario 3 (S3 outage)\n" + table([
            ("seed", f"{seed}  (replay: SPOTBATCH_CHAOS_SEED={seed})"),
            ("jobs", f"before the outage {before.summary()}; published as it began {during.summary()}"),
            ("outage", f"{OUTAGE_S:g} s of 503 SlowDown: {refused} requests refused, {proxy.forwarded} forwarded "
                       f"in all"),
            ("outputs", f"{at_outage} objects when S3 went down"),
            ("died", ", ".join(f"{w.name} (rc {w.proc.returncode})" for w in died) or "none"),
            ("workers", ", ".join(f"{n} rc {rc}" for n, rc in rcs.items())),
            ("runtime", f"{elapsed:.1f} s"),
        ])
        print(summary)
        (tmp / "chaos-summary.txt").write_text(summary + "\n")
        yield OutageRun(before + during, root, bucket, kafka_bootstrap, topic, group, coords, ends, workers, died,
                        rcs, proxy, s3_objects(s3_client, bucket, "out/"), summary)
    finally:
        for w in workers + restarted:
            w.kill()
        proxy.__exit__(None, None, None)


def s3_objects_keys(s3_client, bucket: str) -> list[str]:
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="out/", MaxKeys=1000).get("Contents", [])
    return [o["Key"] for o in listed if not is_ledger(f"/{o['Key']}")]


def test_workers_ride_out_the_outage_without_a_restart(outage):
    # The S3 retry policy (spotbatch.retry.S3_RETRY) must outlast the outage: a write
    # that gives up is fatal to the worker (an infrastructure fault, worker.run).
    assert not outage.died, "workers died during the S3 outage:\n" + "\n".join(w.describe() for w in outage.died)
    assert all(outage.rcs[w.name] == 0 for w in outage.workers), outage.summary
    retried = [w.name for w in outage.workers if "retry s3: attempt" in w.log_path.read_text(errors="replace")]
    assert retried, f"no worker had to retry an S3 call: the outage missed them\n{outage.summary}"


def test_nothing_lost_or_duplicated_across_the_outage(outage):
    # The workers went through the proxy, and S3 really was down while they worked.
    assert outage.proxy.forwarded > 0 and outage.proxy.refused > 0, outage.summary
    verify_outputs(outage.objects, outage.workload, reference_outputs(outage.workload, outage.root), outage.root)
    verify_dead_letters(read_all(outage.bootstrap, dlq_topic(outage.topic)), outage.workload, outage.coords)
    statuses = [json.loads(r.value) for r in read_all(outage.bootstrap, results_topic(outage.topic))]
    verify_statuses(statuses, outage.workload)
    committed = committed_offsets(outage.bootstrap, outage.group, outage.topic)
    assert {p: committed.get(p, 0) for p in outage.ends} == outage.ends
