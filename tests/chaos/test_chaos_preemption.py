"""Chaos, scenario 1: three workers over 300+ jobs while a supervisor interrupts them.

On the embedded broker and a moto S3 server, a supervisor keeps three ``spotbatch
worker`` processes running over a seeded mix of small inline jobs, large URI jobs cut
into checkpointed parts, and one job per kind of bad input. For the whole run it
interrupts a random worker at random moments, with SIGKILL, SIGTERM or a fake AWS
spot notice (each worker polls its own fake IMDS), and restarts every worker that
exits. Jobs trickle in meanwhile, so interruptions land on busy workers.

The run happens once per module (fixture ``chaos``); each test checks one promise:

* every good job has exactly one complete output, byte-for-byte what a clean run
  writes, and nothing else is under the output prefix (DESIGN invariants 1, 2);
* the DLQ holds exactly the bad jobs, each with its reason and original bytes (6);
* offsets are committed to the log end, every interruption ended as it should
  (SIGKILL -> killed; SIGTERM / notice -> drained, exit 0, one usage record);
* recomputed rows per interruption stay within one checkpoint interval plus one
  batch (3): see RecomputeReport in harness.py for how they are counted.

Seeded: ``SPOTBATCH_CHAOS_SEED=<n>`` replays the same jobs, interruption kinds and
gaps (timing still varies: real processes). The summary table is printed (``-s``)
and written to ``chaos-summary.txt`` in the run's tmp folder.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spotbatch.kafka_admin import committed_offsets, ensure_topics, read_all
from spotbatch.workers.streams import dlq_topic, results_topic
from tests.chaos.harness import (
    INTERRUPTIONS,
    BadJob,
    GoodJob,
    Life,
    RecomputeReport,
    Supervisor,
    TricklePublisher,
    Workload,
    build_workload,
    chaos_seed,
    log_ends_of,
    recompute_report,
    reference_outputs,
    table,
    wait_committed,
)
from tests.integration.helpers import SESSION_TIMEOUT_MS, make_topic, new_group

pytestmark = pytest.mark.integration

PARTITIONS = 6
SLOTS = 3
N_INLINE, N_URI, URI_ROWS = 320, 8, (100, 240)
CHECKPOINT_ROWS, BATCH_ROWS = 20, 10
DRAIN_S = 10.0
PER_KIND = 3  # interruptions of each kind: 9 in all
GAP_S = (1.0, 3.0)  # at least this long between interruptions (then: when allowed, see may_interrupt)
SESSION_S = SESSION_TIMEOUT_MS / 1000
RUN_TIMEOUT_S = 180.0
WORKER_ARGS = ["--checkpoint-interval", f"{CHECKPOINT_ROWS}rows", "--max-batch-rows", str(BATCH_ROWS),
               "--drain-s", str(DRAIN_S)]


@dataclass
class ChaosRun:
    seed: int
    workload: Workload
    root: str
    bucket: str
    coords: dict[tuple[bytes, bytes], tuple[int, int]]
    ends: dict[int, int]
    committed: dict[int, int]
    lives: list[Life]
    usage: list[dict]
    dead: list
    statuses: list[dict]
    objects: dict[str, bytes]  # key -> latest bytes, everything under the bucket's out/
    versions: dict[str, list[str]]  # key -> version ids, oldest first
    refs: dict[str, tuple[bytes, list[str], np.ndarray]]
    recompute: RecomputeReport
    summary: str

    def key_of(self, uri: str) -> str:
        return uri.removeprefix(f"s3://{self.bucket}/")

    def usage_of(self, life: Life) -> list[dict]:
        wid = f"{socket.gethostname()}-{life.pid}"
        return [u for u in self.usage if u.get("worker") == wid and u.get("kind") == "interruption"]


def _drive(sup: Supervisor, publisher: TricklePublisher, rng: random.Random, bootstrap: str, topic: str,
           group: str) -> dict:
    """The supervisor loop: interrupt on schedule, restart, release a share of the jobs
    after each interruption; until every offset is committed."""
    plan = [kind for kind in INTERRUPTIONS for _ in range(PER_KIND)]
    rng.shuffle(plan)
    share = -(-len(publisher._reserve) // (len(plan) + 1))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not all(life.ready for life in sup.current.values()):
        sup.tick()
        if time.monotonic() > deadline:
            raise AssertionError(f"workers never joined\n{sup.describe()}")
        time.sleep(0.1)
    publisher.release(share)
    next_at = time.monotonic() + rng.uniform(*GAP_S)
    ends, next_check = None, 0.0
    while True:
        now = time.monotonic()
        sup.tick()
        publisher.step(now)
        if plan and now >= next_at and sup.may_interrupt(plan[0], session_s=SESSION_S) \
                and sup.interrupt(plan[0], rng):
            plan.pop(0)
            publisher.release(share)
            next_at = now + rng.uniform(*GAP_S)
        if not plan and ends is None:
            coords = publisher.finish()
            ends = log_ends_of(coords.values(), PARTITIONS)
        if ends is not None and now >= next_check:
            next_check = now + 1.0
            got = committed_offsets(bootstrap, group, topic)
            if {p: got.get(p, 0) for p in ends} == ends:
                return coords
        if now > deadline:
            raise AssertionError(f"chaos run not done after {RUN_TIMEOUT_S:.0f}s (plan left: {plan}, "
                                 f"ends {ends})\n{sup.describe()}")
        time.sleep(0.05)


def _objects(s3_client, bucket: str) -> tuple[dict[str, bytes], dict[str, list[str]]]:
    latest, versions = {}, {}
    for page in s3_client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix="out/"):
        for v in page.get("Versions", []):
            versions.setdefault(v["Key"], []).append((v["LastModified"], v["VersionId"]))
        assert not page.get("DeleteMarkers"), f"outputs were deleted: {page['DeleteMarkers'][:3]}"
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/"):
        for obj in page.get("Contents", []):
            latest[obj["Key"]] = s3_client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return latest, {k: [vid for _, vid in sorted(v)] for k, v in versions.items()}


def _summary(run: ChaosRun, elapsed_s: float) -> str:
    w, rc = run.workload, run.recompute
    interrupted = [life for life in run.lives if life.interrupt in INTERRUPTIONS]
    kinds = {k: sum(1 for life in interrupted if life.interrupt == k) for k in INTERRUPTIONS}
    usage = {life.name: run.usage_of(life) for life in run.lives}
    drains = [u["drain_s"] for life in interrupted for u in usage[life.name]]
    stops = [life.stop_s for life in interrupted if life.interrupt != "sigkill" and life.stop_s is not None]
    rewritten = sum(1 for k, v in run.versions.items() if "/_checkpoints/" not in k and len(v) > 1)
    dlq_dupes = len(run.dead) - len({(dict(r.headers)["spotbatch.source.partition"],
                                      dict(r.headers)["spotbatch.source.offset"]) for r in run.dead})
    bound = CHECKPOINT_ROWS + BATCH_ROWS
    head = table([
        ("seed", f"{run.seed}  (replay: SPOTBATCH_CHAOS_SEED={run.seed})"),
        ("jobs", w.summary()),
        ("workers", f"{SLOTS} slots, {len(run.lives)} processes ({len(run.lives) - SLOTS} restarts)"),
        ("interruptions", f"{len(interrupted)}: " + ", ".join(f"{k} {n}" for k, n in kinds.items())),
        ("notices", f"{kinds['notice']} AWS spot instance-action (one fake IMDS per worker)"),
        ("rows recomputed", f"{rc.total} of {rc.inferences} inferences ({rc.rows} rows needed): "
                            f"{sum(rc.per_life.values())} charged to interruptions, {rc.rebalance} to rebalances"),
        ("max per interruption", f"{max(rc.per_life.values(), default=0)} rows (bound {bound} = "
                                 f"{CHECKPOINT_ROWS} checkpoint rows + {BATCH_ROWS} batch rows)"),
        ("max drain seconds", f"{max(drains, default=0):.2f} s in usage records; signal-to-exit "
                              f"{max(stops, default=0):.2f} s (deadline {DRAIN_S:g} s)"),
        ("outputs", f"{len([k for k in run.objects if '/_checkpoints/' not in k])} objects, "
                    f"{rewritten} written more than once (same bytes each time)"),
        ("dlq", f"{len(run.dead)} records for {len(w.bad)} bad jobs ({dlq_dupes} redelivered duplicates)"),
        ("runtime", f"{elapsed_s:.1f} s"),
    ])
    rows = []
    for life in interrupted:
        u = usage[life.name]
        rows.append((life.name, life.pid, life.interrupt, f"{life.interrupted_at - run.lives[0].started:.1f}",
                     life.rc, f"{life.stop_s:.2f}" if life.stop_s is not None else "-",
                     u[0]["drain_s"] if u else "-", u[0]["rows_lost"] if u else "-", rc.per_life.get(life.name, 0)))
    detail = table(rows, header=("worker", "pid", "kind", "at s", "rc", "stop s", "drain s", "rows_lost",
                                 "recomputed"))
    return f"chaos summary: scenario 1 (interruptions)\n{head}\n\n{detail}\n"


@pytest.fixture(scope="module")
def chaos(kafka_bootstrap, s3_endpoint, s3_client, tmp_path_factory):
    seed = chaos_seed()
    print(f"\nchaos seed {seed} (set SPOTBATCH_CHAOS_SEED to replay)")
    rng = random.Random(f"{seed}/interruptions")
    tmp = tmp_path_factory.mktemp("chaos-main")
    bucket = f"chaos-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    # Versioning keeps every PUT: the test can check each write, not only the last one.
    s3_client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    root = f"s3://{bucket}/out"
    workload = build_workload(rng, name="m", n_inline=N_INLINE, n_uri=N_URI, uri_rows=URI_ROWS,
                              checkpoint_rows=CHECKPOINT_ROWS, input_prefix=f"s3://{bucket}/in", output_root=root)
    for uri, data in workload.inputs.items():
        s3_client.put_object(Bucket=bucket, Key=uri.split("/", 3)[3], Body=data)
    topic, group = make_topic(kafka_bootstrap, PARTITIONS), new_group()
    usage_topic = f"{topic}.usage"
    ensure_topics(kafka_bootstrap, {usage_topic: 1})

    started = time.monotonic()
    sup = Supervisor(kafka_bootstrap, topic, group, root, tmp, slots=SLOTS, args=WORKER_ARGS,
                     env={"SPOTBATCH_USAGE_TOPIC": usage_topic})
    publisher = TricklePublisher(kafka_bootstrap, topic, workload.order)
    werkzeug = logging.getLogger("werkzeug")  # moto's request log: thousands of lines
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)
    try:
        sup.start()
        coords = _drive(sup, publisher, rng, kafka_bootstrap, topic, group)
        sup.stop_all(timeout_s=DRAIN_S + 20)
    finally:
        sup.close()
        werkzeug.setLevel(level)
    elapsed = time.monotonic() - started

    objects, versions = _objects(s3_client, bucket)
    run = ChaosRun(
        seed=seed, workload=workload, root=root, bucket=bucket, coords=coords,
        ends=log_ends_of(coords.values(), PARTITIONS), committed=committed_offsets(kafka_bootstrap, group, topic),
        lives=sup.lives, usage=[json.loads(r.value) for r in read_all(kafka_bootstrap, usage_topic)],
        dead=read_all(kafka_bootstrap, dlq_topic(topic)),
        statuses=[json.loads(r.value) for r in read_all(kafka_bootstrap, results_topic(topic))],
        objects=objects, versions=versions, refs=reference_outputs(workload, root),
        recompute=recompute_report(sup.lives, workload.good), summary="",
    )
    run.summary = _summary(run, elapsed)
    print(run.summary)
    (tmp / "chaos-summary.txt").write_text(run.summary)
    yield run
    for page in s3_client.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
            s3_client.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
    s3_client.delete_bucket(Bucket=bucket)


def _expected_keys(run: ChaosRun) -> set[str]:
    keys = {run.key_of(uri) for uri in run.refs}
    for job in run.workload.uri:
        keys |= {f"out/{job.job_id}/_manifest.json", f"out/_checkpoints/{job.job_id}.json"}
    return keys


def test_the_run_interrupted_every_way(chaos):
    kinds = [life.interrupt for life in chaos.lives if life.interrupt in INTERRUPTIONS]
    assert sorted(kinds) == sorted(k for k in INTERRUPTIONS for _ in range(PER_KIND)), chaos.summary
    assert len(chaos.workload.good) + len(chaos.workload.bad) >= 300


def test_every_good_job_has_exactly_one_complete_output_equal_to_a_clean_run(chaos, s3_client):
    # Nothing missing, nothing extra (no second copy, no temp object, no bad job's output).
    assert set(chaos.objects) == _expected_keys(chaos), (
        f"missing {sorted(_expected_keys(chaos) - set(chaos.objects))[:10]}, "
        f"extra {sorted(set(chaos.objects) - _expected_keys(chaos))[:10]}")
    for uri, (ref_bytes, ids, emb) in chaos.refs.items():
        key = chaos.key_of(uri)
        got = chaos.objects[key]
        table_ = pq.read_table(pa.BufferReader(got))
        assert table_.column("id").to_pylist() == ids, key
        np.testing.assert_array_equal(np.asarray(table_.column("embedding").to_pylist(), dtype=np.float32), emb,
                                      err_msg=key)
        assert got == ref_bytes, f"{key}: Parquet bytes differ from the clean run's"
        # A redelivered job or a redone part overwrites its object: every write, not just
        # the last one, must have been the complete, identical output.
        for vid in chaos.versions[key][:-1]:
            old = s3_client.get_object(Bucket=chaos.bucket, Key=key, VersionId=vid)["Body"].read()
            assert old == ref_bytes, f"{key} version {vid} differs from the clean run's bytes"
    for job in chaos.workload.uri:
        manifest = json.loads(chaos.objects[f"out/{job.job_id}/_manifest.json"])
        assert (manifest["job_id"], manifest["model"], manifest["rows"]) == (job.job_id, "tiny", len(job.ids))
        assert manifest["parts"] == [f"part-{i:05d}.parquet" for i in range(job.parts_total)]
        cp = json.loads(chaos.objects[f"out/_checkpoints/{job.job_id}.json"])
        assert cp["complete"] and cp["parts_total"] == job.parts_total, cp
        assert cp["parts_done"] == list(range(job.parts_total)) and cp["rows_done"] == len(job.ids), cp


def test_the_dlq_holds_exactly_the_bad_jobs(chaos):
    bad_at = {chaos.coords[(b.key, b.value)]: b for b in chaos.workload.bad}
    seen = set()
    for record in chaos.dead:
        h = dict(record.headers)
        at = (int(h["spotbatch.source.partition"]), int(h["spotbatch.source.offset"]))
        assert at in bad_at, f"a good job was dead-lettered: {record.key} {h['spotbatch.error.code']}: " \
                             f"{h['spotbatch.error.reason'][:300]}"
        bad: BadJob = bad_at[at]
        assert (record.key, record.value) == (bad.key, bad.value), bad.name
        assert h["spotbatch.error.code"].decode() == bad.code, (bad.name, h["spotbatch.error.reason"])
        seen.add(at)
    assert seen == set(bad_at), f"bad jobs missing from the DLQ: {[bad_at[a].name for a in set(bad_at) - seen]}"
    # The results stream agrees: every good job reported ok, none failed.
    ok = {s["job_id"] for s in chaos.statuses if s["status"] == "ok"}
    failed = {s["job_id"] for s in chaos.statuses if s["status"] == "failed"}
    good = {j.job_id for j in chaos.workload.good}
    assert good <= ok, f"no ok status for {sorted(good - ok)[:10]}"
    assert not good & failed, f"good jobs reported failed: {sorted(good & failed)[:10]}"


def test_offsets_committed_to_the_end_and_every_interruption_ended_as_it_should(chaos):
    assert {p: chaos.committed.get(p, 0) for p in chaos.ends} == chaos.ends
    for life in chaos.lives:
        log = life.proc.log_path.read_text(errors="replace")
        assert life.interrupt is not None, f"{life.name} exited on its own\n{life.proc.describe()}"
        if life.interrupt == "sigkill":
            assert life.rc == -9, life.proc.describe()
            continue
        # A drain: exit 0, one usage record of the interruption, inside the deadline.
        assert life.rc == 0, life.proc.describe()
        reason = {"notice": "aws: spot instance-action terminate", "sigterm": "signal: SIGTERM",
                  "final": "signal: SIGTERM"}[life.interrupt]
        records = chaos.usage_of(life)
        assert len(records) == 1 and records[0]["reason"].startswith(reason), (life.name, records)
        assert 0 <= records[0]["drain_s"] <= DRAIN_S, (life.name, records)
        assert life.stop_s is not None and life.stop_s < DRAIN_S + 15, (life.name, life.stop_s)
        if life.interrupt == "notice":
            assert "terminate notice from aws" in log, life.proc.describe()


def test_recomputed_rows_per_interruption_within_one_checkpoint_interval_plus_one_batch(chaos):
    rc = chaos.recompute
    assert not rc.missing and not rc.unexpected, (rc.missing[:5], rc.unexpected[:5])
    bound = CHECKPOINT_ROWS + BATCH_ROWS
    over = {name: n for name, n in rc.per_life.items() if n > bound}
    assert not over, f"interruptions that cost more than {bound} rows: {over}\n{chaos.summary}"
