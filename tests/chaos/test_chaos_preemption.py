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
* the DLQ holds exactly the bad jobs, each with its reason and original bytes (6),
  and the results stream reports every good job ok;
* offsets are committed to the log end, every interruption ended as it should
  (SIGKILL -> killed; SIGTERM / notice -> drained, exit 0, one usage record);
* recomputed rows per interruption stay within one checkpoint interval plus one
  batch (3), for a drain and for a SIGKILL: see RecomputeReport in harness.py for how
  they are counted.

``test_a_drain_does_not_redo_jobs_it_wrote`` (its own small run): jobs made durable
before a drain are not run again by the next owner, even when an unfinished job
earlier in the partition held their commit back.

Seeded: ``SPOTBATCH_CHAOS_SEED=<n>`` replays the same jobs, interruption kinds and
gaps (timing still varies: real processes). The summary table is printed (``-s``)
and written to ``chaos-summary.txt`` in the run's tmp folder.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from spotbatch.kafka_admin import committed_offsets, ensure_topics, read_all
from spotbatch.workers.startup import PROBE_PREFIX
from spotbatch.workers.streams import dlq_topic, results_topic
from tests.chaos.harness import (
    BATCH_ROWS,
    CHAOS_WORKER_ARGS,
    CHECKPOINT_ROWS,
    INFERENCE_LOG_ENV,
    INTERRUPTIONS,
    SHIM_DIR,
    Life,
    RecomputeReport,
    Supervisor,
    TricklePublisher,
    Workload,
    build_workload,
    chaos_seed,
    is_ledger,
    log_ends_of,
    publish_all,
    recompute_report,
    reference_outputs,
    table,
    verify_dead_letters,
    s3_objects,
    verify_outputs,
    verify_statuses,
    wait_committed,
)
from tests.integration.helpers import REPO_ROOT, WorkerProc, make_topic, new_group, spawn_worker, wait_until

pytestmark = pytest.mark.integration

PARTITIONS = 6
SLOTS = 3
N_INLINE, N_URI, URI_ROWS = 320, 10, (240, 480)
DRAIN_S = 10.0
PER_KIND = 3  # interruptions of each kind: 9 in all
GAP_S = (1.0, 3.0)  # at least this long between interruptions (one at a time: see may_interrupt)
ARM_S = 15.0  # after releasing a share, wait this long at most for its URI job to be under way
RUN_TIMEOUT_S = 180.0
WORKER_ARGS = [*CHAOS_WORKER_ARGS, "--drain-s", str(DRAIN_S)]


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
    versions: dict[str, list[str]]  # key -> the ids of every version written
    refs: dict[str, tuple[bytes, list[str], np.ndarray]]
    recompute: RecomputeReport
    summary: str

    def key_of(self, uri: str) -> str:
        return uri.removeprefix(f"s3://{self.bucket}/")

    def usage_of(self, life: Life) -> list[dict]:
        wid = f"{socket.gethostname()}-{life.pid}"
        return [u for u in self.usage if u.get("worker") == wid and u.get("kind") == "interruption"]


def _shares(workload: Workload, n: int) -> list[list[tuple[bytes, bytes]]]:
    """The publish order cut into ``n`` shares, each led by one URI job where there is one."""
    uri = {j.value for j in workload.uri}
    big = [m for m in workload.order if m[1] in uri]
    small = [m for m in workload.order if m[1] not in uri]
    per = -(-len(small) // n)
    return [big[i::n] + small[i * per:(i + 1) * per] for i in range(n)]


def _drive(sup: Supervisor, publisher: TricklePublisher, workload: Workload, rng: random.Random, bootstrap: str,
           topic: str, group: str) -> dict:
    """The supervisor loop, until every offset is committed. For each planned
    interruption: wait a random gap and until the previous victim has exited,
    release the next share of jobs, wait until a worker is inferring, then interrupt a
    busy worker after a random delay. Exited workers are restarted throughout."""
    plan = [kind for kind in INTERRUPTIONS for _ in range(PER_KIND)]
    rng.shuffle(plan)
    shares = _shares(workload, len(plan) + 1)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not all(life.ready for life in sup.current.values()):
        sup.tick()
        if time.monotonic() > deadline:
            raise AssertionError(f"workers never joined\n{sup.describe()}")
        time.sleep(0.1)
    publisher.release(shares.pop(0))
    next_at, armed_at, fire_at = time.monotonic() + rng.uniform(*GAP_S), None, None
    ends, next_check = None, 0.0
    while True:
        now = time.monotonic()
        sup.tick()
        publisher.step(now)
        if plan and armed_at is None and now >= next_at and sup.may_interrupt():
            publisher.release(shares.pop(0))
            armed_at = now
        if armed_at is not None and fire_at is None and (
                any("-u" in k for life in sup.current.values() for k in life.recent_keys(0.2)) or now - armed_at > ARM_S):
            fire_at = now + rng.uniform(0.0, 0.3)  # a random moment while a URI job is under way
        if fire_at is not None and now >= fire_at and sup.may_interrupt() \
                and sup.interrupt(plan[0], rng):
            plan.pop(0)
            next_at, armed_at, fire_at = now + rng.uniform(*GAP_S), None, None
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
        time.sleep(0.02)


def _objects(s3_client, bucket: str) -> tuple[dict[str, bytes], dict[str, list[str]]]:
    latest, versions = {}, {}
    # Start-up write checks, and bookkeeping rewritten or deleted by design: the attempt
    # ledgers, and the checkpoints of dead-lettered URI jobs (a fixed republish starts afresh).
    probe = lambda key: (key.rsplit("/", 1)[-1].startswith(PROBE_PREFIX)  # noqa: E731
                         or "/_checkpoints/" in f"/{key}")
    for page in s3_client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix="out/"):
        for v in page.get("Versions", []):
            if not probe(v["Key"]):
                versions.setdefault(v["Key"], []).append((v["LastModified"], v["VersionId"]))
        deleted = [m for m in page.get("DeleteMarkers", []) if not probe(m["Key"])]
        assert not deleted, f"outputs were deleted: {deleted[:3]}"
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/"):
        for obj in page.get("Contents", []):
            if not is_ledger(f"/{obj['Key']}"):
                latest[obj["Key"]] = s3_client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return latest, {k: [vid for _, vid in sorted(v)] for k, v in versions.items()}


def _no_ok(run: ChaosRun) -> set[str]:
    ok = {s["job_id"] for s in run.statuses if s["status"] == "ok"}
    return {j.job_id for j in run.workload.good} - ok


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
        ("statuses", f"{len(_no_ok(run))} good jobs without an ok status"),
        ("runtime", f"{elapsed_s:.1f} s"),
    ])
    rows = []
    for life in interrupted:
        u = usage[life.name]
        rows.append((life.name, life.pid, life.interrupt, life.interrupted_while,
                     f"{life.interrupted_at - run.lives[0].started:.1f}",
                     life.rc, f"{life.stop_s:.2f}" if life.stop_s is not None else "-",
                     u[0]["drain_s"] if u else "-", u[0]["rows_lost"] if u else "-", rc.per_life.get(life.name, 0),
                     rc.per_life_uri.get(life.name, 0)))
    detail = table(rows, header=("worker", "pid", "kind", "while", "at s", "rc", "stop s", "drain s", "rows_lost",
                                 "recomputed", "of them uri"))
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
                     env={"SPOTBATCH_USAGE_TOPIC": usage_topic, "SPOTBATCH_INPUT_PREFIXES": f"s3://{bucket}/in"})
    publisher = TricklePublisher(kafka_bootstrap, topic, workload.order)
    werkzeug = logging.getLogger("werkzeug")  # moto's request log: thousands of lines
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)
    try:
        sup.start()
        coords = _drive(sup, publisher, workload, rng, kafka_bootstrap, topic, group)
        sup.stop_all(timeout_s=DRAIN_S + 20)
    finally:
        sup.close()
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
    for key, data in objects.items():  # kept for a post-mortem, with the worker logs
        path = tmp / "objects" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    run.summary = _summary(run, elapsed)
    print(run.summary)
    (tmp / "chaos-summary.txt").write_text(run.summary)
    yield run
    _delete_bucket(s3_client, bucket)
    werkzeug.setLevel(level)


def _delete_bucket(s3_client, bucket: str) -> None:
    for page in s3_client.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
            s3_client.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
    s3_client.delete_bucket(Bucket=bucket)


def test_the_run_interrupted_every_way(chaos):
    interrupted = [life for life in chaos.lives if life.interrupt in INTERRUPTIONS]
    assert sorted(life.interrupt for life in interrupted) == sorted(k for k in INTERRUPTIONS for _ in range(PER_KIND))
    # Each kind hit at least once a worker in the middle of a URI job: the case that
    # checkpoints exist for. Otherwise the bounds below would hold vacuously.
    assert {life.interrupt for life in interrupted if life.interrupted_while == "uri"} == set(INTERRUPTIONS), \
        chaos.summary
    assert len(chaos.workload.good) + len(chaos.workload.bad) >= 300


def test_every_good_job_has_exactly_one_complete_output_equal_to_a_clean_run(chaos, s3_client):
    verify_outputs({f"s3://{chaos.bucket}/{k}": v for k, v in chaos.objects.items()}, chaos.workload,
                   chaos.refs, chaos.root)
    # A redelivered job or a redone part overwrites its object: every write (the bucket
    # keeps them all), not just the last one, must have been the complete, identical output.
    for uri, (ref_bytes, _, _) in chaos.refs.items():
        key = chaos.key_of(uri)
        for vid in chaos.versions[key]:
            old = s3_client.get_object(Bucket=chaos.bucket, Key=key, VersionId=vid)["Body"].read()
            assert old == ref_bytes, f"{key} version {vid} differs from the clean run's bytes"


def test_the_dlq_holds_exactly_the_bad_jobs(chaos):
    verify_dead_letters(chaos.dead, chaos.workload, chaos.coords)
    verify_statuses(chaos.statuses, chaos.workload)


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


def _over_bound(chaos: ChaosRun, kinds: set[str], charged: dict[str, int]) -> dict[str, int]:
    rc = chaos.recompute
    assert not rc.missing and not rc.unexpected, (rc.missing[:5], rc.unexpected[:5])
    kind_of = {life.name: life.interrupt for life in chaos.lives}
    bound = CHECKPOINT_ROWS + BATCH_ROWS
    return {name: n for name, n in charged.items() if kind_of[name] in kinds and n > bound}


def test_a_drain_loses_at_most_one_checkpoint_interval_plus_one_batch(chaos):
    """SIGTERM and spot notices (DESIGN invariant 3): the drain finishes the inline jobs
    it holds and checkpoints every part it completes, so what is redone is at most a
    part cut mid-way plus what the worker itself reports lost (rows_lost: inferred,
    never written). Jobs it wrote but could not commit (an unfinished URI job earlier in
    the partition held the commit back) are found complete by the next owner."""
    lost = chaos.recompute.per_life
    over = _over_bound(chaos, {"sigterm", "notice"}, lost)
    assert not over, f"drains that lost more than {CHECKPOINT_ROWS + BATCH_ROWS} rows: {over}\n{chaos.summary}"
    for life in chaos.lives:  # the worker's own count of lost rows never under-reports... nor over-reports
        for record in chaos.usage_of(life) if life.interrupt in ("sigterm", "notice") else []:
            assert record["rows_lost"] <= chaos.recompute.per_life[life.name], (life.name, record)


def test_a_sigkill_recomputes_at_most_one_checkpoint_interval_plus_one_batch(chaos):
    over = _over_bound(chaos, {"sigkill"}, chaos.recompute.per_life)
    assert not over, f"SIGKILLs that cost more than {CHECKPOINT_ROWS + BATCH_ROWS} rows: {over}\n{chaos.summary}"


def test_a_drain_does_not_redo_jobs_it_wrote(kafka_bootstrap, s3_endpoint, s3_client, tmp_path):
    """One partition: a large URI job, then 40 inline jobs. The inline jobs are written
    while the URI job's file loads (slowly: the shim delays the read by 3 s), then its
    parts are written (every part is a PUT plus a checkpoint); a SIGTERM (short drain) comes once all the inline outputs
    exist and the URI job is under way. A second worker then finishes the partition.
    Durable work must not be redone: none of the inline jobs may go through the model
    again."""
    rng = random.Random(f"{chaos_seed()}/hol")
    bucket = f"chaos-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/out"
    workload = build_workload(rng, name="h", n_inline=40, n_uri=1, uri_rows=(3000, 3000), bad=False,
                              checkpoint_rows=CHECKPOINT_ROWS, input_prefix=f"s3://{bucket}/in", output_root=root)
    for uri, data in workload.inputs.items():
        s3_client.put_object(Bucket=bucket, Key=uri.split("/", 3)[3], Body=data)
    (big,), inline = workload.uri, workload.inline
    topic, group = make_topic(kafka_bootstrap, 1), new_group()
    publish_all(kafka_bootstrap, topic, [(big.key, big.value)] + [(j.key, j.value) for j in inline])

    def spawn(name: str, drain_s: str) -> tuple[WorkerProc, Path]:
        log = tmp_path / f"{name}.inferred"
        env = {"PYTHONPATH": f"{SHIM_DIR}{os.pathsep}{REPO_ROOT}", INFERENCE_LOG_ENV: str(log),
               "SPOTBATCH_TEST_SLOW_READ": "3"}
        return spawn_worker(kafka_bootstrap, topic, group, root, tmp_path, name=name, burst=False, env=env,
                            args=WORKER_ARGS[:-2] + ["--drain-s", drain_s],
                            input_prefixes=[f"s3://{bucket}/in"]), log

    inline_keys = {f"out/{j.job_id}.parquet" for j in inline}
    first, _ = spawn("first", "3.5")
    try:
        state = wait_until(lambda: _hol_state(s3_client, bucket, big.job_id, inline_keys), 60,
                           "every inline output while the URI job is under way", every_s=0.02, workers=[first])
        if state == "too late":
            pytest.fail(f"precondition: the URI job finished before the inline outputs were all written\n"
                        f"{first.describe()}")
        first.signal(signal.SIGTERM)
        second, second_log = spawn("second", "10")  # starts up (seconds) while the first drains
        if first.wait(30) != 0:
            pytest.fail(f"the drained worker did not exit 0\n{first.describe()}")
        if s3_client.list_objects_v2(Bucket=bucket, Prefix=f"out/{big.job_id}/_manifest.json").get("KeyCount"):
            pytest.fail("precondition: the drain finished the URI job, so nothing was held back")
        ends = {0: 1 + len(inline)}
        try:
            wait_committed(kafka_bootstrap, group, topic, ends, timeout_s=90, workers=[second])
        except AssertionError as exc:
            pytest.fail(str(exc))
        second.signal(signal.SIGTERM)
        second.wait(30)
        try:
            verify_outputs(s3_objects(s3_client, bucket, "out/"), workload, reference_outputs(workload, root), root)
        except AssertionError as exc:
            pytest.fail(f"outputs: {exc}")
    finally:
        first.kill()
        if "second" in locals():
            second.kill()
        _delete_bucket(s3_client, bucket)
    redone = sorted({line.split(" ", 1)[1].split("|")[0] for line in second_log.read_text().splitlines()}
                    & {j.job_id for j in inline})
    assert not redone, f"{len(redone)} of {len(inline)} inline jobs written before the drain were run again: {redone[:5]}"


def _hol_state(s3_client, bucket: str, big: str, inline_keys: set[str]) -> str | None:
    keys = {o["Key"] for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/")
            for o in page.get("Contents", [])}
    if f"out/{big}/_manifest.json" in keys:
        return "too late"
    if inline_keys <= keys and any(k.startswith(f"out/{big}/part-") for k in keys):
        return "now"
    return None
