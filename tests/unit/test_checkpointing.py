"""checkpointing: the Progress record, compare-and-swap stores (local folder, S3 on a
real moto endpoint), and the checkpoint interval policy (Young's formula)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import threading

import boto3
import botocore.exceptions
import pytest
from pydantic import ValidationError

from spotbatch.checkpointing.interval import FIRST_PART_BATCHES
from spotbatch.checkpointing import (
    MAX_ATTEMPT_HISTORY,
    CheckpointInterval,
    CorruptCheckpoint,
    LocalCheckpointStore,
    Progress,
    S3CheckpointStore,
    StaleCheckpoint,
    store_for_checkpoints,
    wasted_fraction,
    young_interval_s,
)
from tests.fixtures_s3 import s3_bucket, s3_client, s3_endpoint  # noqa: F401

JOB = "docs-000001"


def _new(owner: str = "w1", parts: int = 10) -> Progress:
    return Progress.new(JOB, parts_total=parts, owner=owner)


# -- the record ------------------------------------------------------------------------


def test_progress_json_round_trip():
    p = _new()
    p.mark_part_done(3, rows=50)
    p.mark_part_done(0, rows=40)
    p.record_attempt("w1", "preempted\nTraceback ...")
    back = Progress.from_json(p.to_json())
    assert back == p
    assert back.parts_done == [0, 3] and back.rows_done == 90
    assert back.attempt_history[0].error == "preempted"  # first line only
    assert json.loads(p.to_json())["job_id"] == JOB


def test_mark_part_done_counts_each_part_once_and_completes():
    p = _new(parts=2)
    assert p.mark_part_done(1, rows=5)
    assert not p.mark_part_done(1, rows=5)  # a redone part is not counted twice
    assert p.rows_done == 5 and not p.complete and p.pending_parts() == [0]
    p.mark_part_done(0, rows=7)
    assert p.complete and p.pending_parts() == [] and p.rows_done == 12


def test_part_index_out_of_range_is_rejected():
    p = _new(parts=2)
    with pytest.raises(ValidationError):
        p.mark_part_done(2, rows=1)
    with pytest.raises(ValidationError):
        Progress(job_id=JOB, parts_total=3, parts_done=[2, 1], owner="w")


def test_attempt_history_is_bounded():
    p = _new()
    for i in range(MAX_ATTEMPT_HISTORY + 15):
        p.record_attempt(f"w{i}", None if i % 2 else f"error {i}")
    assert p.attempts == MAX_ATTEMPT_HISTORY + 15
    assert len(p.attempt_history) == MAX_ATTEMPT_HISTORY
    assert p.attempt_history[-1].owner == f"w{MAX_ATTEMPT_HISTORY + 14}"
    assert p.attempt_history[0].owner == "w15"  # the oldest ones fell off
    assert p.owner == p.attempt_history[-1].owner


def test_bad_job_id_is_rejected():
    with pytest.raises(ValidationError):
        Progress.new("../etc/passwd", parts_total=1, owner="w")


# -- stores: the same contract, local and S3 -------------------------------------------


@pytest.fixture(params=["local", "s3"])
def make_store(request, tmp_path):
    """A factory: each call is a separate store object (a separate "worker") on one place."""
    if request.param == "local":
        return lambda: LocalCheckpointStore(tmp_path / "ckpt")
    bucket = request.getfixturevalue("s3_bucket")
    return lambda: S3CheckpointStore(f"s3://{bucket}/checkpoints/run-1")


def _save_n(store, n: int) -> Progress:
    saved, expected = _new(), None
    for _ in range(n):
        saved = store.save(saved, expected_generation=expected)
        expected = saved.generation
    return saved


def test_load_missing_is_none(make_store):
    assert make_store().load(JOB) is None


def test_save_load_round_trip_and_generation_bumps(make_store):
    store = make_store()
    p = _new()
    p.mark_part_done(4, rows=100)
    p.record_attempt("w1")
    first = store.save(p, expected_generation=None)
    assert first.generation == 1 and p.generation == 0  # the caller's record is untouched
    assert store.load(JOB) == first
    first.mark_part_done(5, rows=100)
    second = store.save(first, expected_generation=1)
    assert second.generation == 2 and second.updated_at >= first.updated_at
    loaded = store.load(JOB)
    assert loaded == second and loaded.parts_done == [4, 5] and loaded.rows_done == 200
    assert loaded.created_at == first.created_at


def test_stale_worker_cannot_overwrite_newer_checkpoint(make_store):
    _save_n(make_store(), 3)
    a, b = make_store(), make_store()
    pa, pb = a.load(JOB), b.load(JOB)
    assert pa.generation == pb.generation == 3
    pa.mark_part_done(1, rows=10)
    pb.mark_part_done(2, rows=20)
    a.save(pa, expected_generation=3)
    with pytest.raises(StaleCheckpoint) as info:
        b.save(pb, expected_generation=3)
    assert (info.value.expected, info.value.found) == (3, 4)
    stored = a.load(JOB)
    assert stored.generation == 4 and stored.parts_done == [1]


def test_first_save_race(make_store):
    a, b = make_store(), make_store()
    a.save(_new("a"), expected_generation=None)
    with pytest.raises(StaleCheckpoint) as info:
        b.save(_new("b"), expected_generation=None)
    assert (info.value.expected, info.value.found) == (None, 1)
    assert b.load(JOB).owner == "a"


def test_expected_generation_on_missing_record_is_stale(make_store):
    with pytest.raises(StaleCheckpoint) as info:
        make_store().save(_new(), expected_generation=2)
    assert info.value.found is None


def test_delete(make_store):
    store = make_store()
    _save_n(store, 2)
    store.delete(JOB)
    assert store.load(JOB) is None
    store.delete(JOB)  # idempotent
    assert store.save(_new(), expected_generation=None).generation == 1


def test_bad_job_id_never_reaches_the_store(make_store):
    with pytest.raises(ValueError):
        make_store().load("../../escape")


# -- local specifics -------------------------------------------------------------------


def test_local_layout_and_corrupt_file(tmp_path):
    store = LocalCheckpointStore(f"file://{tmp_path}")
    store.save(_new(), expected_generation=None)
    path = tmp_path / f"{JOB}.json"
    assert json.loads(path.read_text())["generation"] == 1
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    path.write_text('{"job_id": "docs-000001", "generation": "many"}')
    with pytest.raises(CorruptCheckpoint, match=str(path)):
        store.load(JOB)


def test_local_file_for_another_job_is_corrupt(tmp_path):
    store = LocalCheckpointStore(tmp_path)
    other = Progress.new("other-job", parts_total=1, owner="w")
    (tmp_path / f"{JOB}.json").write_bytes(other.to_json())
    with pytest.raises(CorruptCheckpoint, match="other-job"):
        store.load(JOB)


ROUNDS = 20


def _race_worker(root: str, name: str, barrier, results) -> None:
    store = LocalCheckpointStore(root)
    for rnd in range(ROUNDS):
        expected = None if rnd == 0 else rnd
        progress = Progress.new(JOB, parts_total=ROUNDS, owner=name)
        barrier.wait()  # both start the round together
        try:
            store.save(progress, expected_generation=expected)
            results.put((rnd, name, "won"))
        except StaleCheckpoint:
            results.put((rnd, name, "stale"))
        barrier.wait()  # the round's winner has moved the generation on


def test_local_two_processes_never_both_win(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded test process
    barrier, results = ctx.Barrier(2, timeout=60), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(str(tmp_path), n, barrier, results)) for n in ("a", "b")]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=60) for _ in range(2 * ROUNDS)]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    for rnd in range(ROUNDS):
        got = sorted(o for r, _, o in outcomes if r == rnd)
        assert got == ["stale", "won"], f"round {rnd}: {got}"
    final = LocalCheckpointStore(tmp_path).load(JOB)
    assert final.generation == ROUNDS


def test_local_threads_never_both_win(tmp_path):
    """Same property inside one process: each save opens its own lock descriptor."""
    _threads_race(lambda: LocalCheckpointStore(tmp_path))


def _threads_race(make, rounds: int = ROUNDS, workers: int = 4) -> None:
    stores = [make() for _ in range(workers)]
    for rnd in range(rounds):
        expected = None if rnd == 0 else rnd
        wins: list[str] = []
        barrier = threading.Barrier(workers)

        def attempt(i: int, barrier=barrier, expected=expected, wins=wins) -> None:
            barrier.wait()
            try:
                stores[i].save(Progress.new(JOB, parts_total=1, owner=f"w{i}"), expected_generation=expected)
                wins.append(f"w{i}")
            except StaleCheckpoint:
                pass

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1, f"round {rnd}: winners {wins}"
    assert stores[0].load(JOB).generation == rounds


# -- S3 specifics ----------------------------------------------------------------------


def test_moto_honours_conditional_puts(s3_client, s3_bucket):
    """The store relies on these; if moto ever ignores them, this says so first."""
    etag = s3_client.put_object(Bucket=s3_bucket, Key="k", Body=b"1", IfNoneMatch="*")["ETag"]
    for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"0123456789abcdef0123456789abcdef"'}):
        with pytest.raises(botocore.exceptions.ClientError) as info:
            s3_client.put_object(Bucket=s3_bucket, Key="k", Body=b"2", **condition)
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    s3_client.put_object(Bucket=s3_bucket, Key="k", Body=b"3", IfMatch=etag)
    with pytest.raises(botocore.exceptions.ClientError):
        s3_client.put_object(Bucket=s3_bucket, Key="k", Body=b"4", IfMatch=etag)  # etag moved on


def test_s3_layout(s3_client, s3_bucket):
    store = S3CheckpointStore(f"s3://{s3_bucket}/ckpt/")
    store.save(_new(), expected_generation=None)
    body = s3_client.get_object(Bucket=s3_bucket, Key=f"ckpt/{JOB}.json")["Body"].read()
    assert json.loads(body)["generation"] == 1


def test_s3_write_between_read_and_put_is_caught(s3_client, s3_bucket):
    """If-Match, not just the generation check: a write after our GET still fails our PUT."""
    store = S3CheckpointStore(f"s3://{s3_bucket}")
    saved = store.save(_new(), expected_generation=None)
    real_put = store._put

    def put_after_intruder(key, body, condition):
        intruder = saved.model_copy(update={"owner": "intruder", "generation": 2})
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=intruder.to_json())
        return real_put(key, body, condition)

    store._put = put_after_intruder
    with pytest.raises(StaleCheckpoint) as info:
        store.save(saved, expected_generation=1)
    assert info.value.found == 2


class _LostReplyClient:
    """A boto3 client whose first PutObject lands but whose reply is "lost"."""

    def __init__(self, client) -> None:
        self._client, self.puts = client, 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    def put_object(self, **kwargs):
        self.puts += 1
        reply = self._client.put_object(**kwargs)
        if self.puts == 1:
            raise botocore.exceptions.ConnectionClosedError(endpoint_url="http://moto")
        return reply


@pytest.mark.parametrize("expected", [None, 1])
def test_s3_resent_put_that_had_landed_counts_as_saved(s3_endpoint, s3_bucket, expected):
    plain = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    if expected is not None:
        S3CheckpointStore(f"s3://{s3_bucket}", client=plain).save(_new(), expected_generation=None)
    client = _LostReplyClient(plain)
    store = S3CheckpointStore(f"s3://{s3_bucket}", client=client)
    saved = store.save(_new("w2"), expected_generation=expected)
    assert client.puts == 2  # S3_RETRY resent it; the resend failed its precondition
    assert store.load(JOB) == saved


def test_s3_corrupt_object(s3_client, s3_bucket):
    s3_client.put_object(Bucket=s3_bucket, Key=f"{JOB}.json", Body=b"not json")
    with pytest.raises(CorruptCheckpoint, match=f"s3://{s3_bucket}/{JOB}.json"):
        S3CheckpointStore(f"s3://{s3_bucket}").load(JOB)


# No concurrent-writers race against moto: moto checks If-Match/If-None-Match and then
# stores in two steps without a lock, so two threads can both pass (real S3 decides
# atomically). The sequential tests above pin the S3 store's side of the contract.


# -- store_for_checkpoints -------------------------------------------------------------


def test_store_for_checkpoints_local(tmp_path):
    for uri in (str(tmp_path), f"file://{tmp_path}"):
        store = store_for_checkpoints(uri)
        assert isinstance(store, LocalCheckpointStore) and store.root == str(tmp_path)


def test_store_for_checkpoints_s3(s3_bucket):
    store = store_for_checkpoints(f"s3://{s3_bucket}/p")
    assert isinstance(store, S3CheckpointStore) and (store.bucket, store.prefix) == (s3_bucket, "p")
    assert store.save(_new(), expected_generation=None).generation == 1


def test_store_for_checkpoints_rejects_other_schemes():
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        store_for_checkpoints("gs://bucket/x")


# -- interval --------------------------------------------------------------------------


def test_young_facts_example():
    tau = young_interval_s(2.0, 6 * 3600)
    assert tau == pytest.approx(293.9, abs=0.1)
    best = wasted_fraction(tau, 2.0, 6 * 3600)
    assert best == pytest.approx(2.0 / tau + tau / (2 * 6 * 3600))
    # Young's tau is the minimum: half or double it wastes more.
    assert wasted_fraction(tau / 2, 2.0, 6 * 3600) > best < wasted_fraction(tau * 2, 2.0, 6 * 3600)


def test_young_rejects_nonsense():
    with pytest.raises(ValueError):
        young_interval_s(-1, 10)
    with pytest.raises(ValueError):
        wasted_fraction(0, 1, 10)


@pytest.mark.parametrize("setting, rows", [("500rows", 500), ("1row", 1), (" 500 ROWS ", 500)])
def test_interval_rows_setting(setting, rows):
    assert CheckpointInterval(setting).rows(rows_per_s=1234.0) == rows


def test_interval_seconds_setting():
    interval = CheckpointInterval("30s", batch_rows=64)
    assert interval.interval_s() == 30.0
    assert interval.rows(100.0) == 3000
    assert interval.rows(None) == 64 * FIRST_PART_BATCHES  # no throughput yet: a floor of batches
    assert interval.rows(1.0) == 64  # at least one batch
    assert interval.rows(1e9) == 1_000_000  # at most a million rows
    assert CheckpointInterval("1.5s").rows(10.0) == 15


def test_interval_auto_uses_young_with_measured_cost():
    interval = CheckpointInterval("auto", batch_rows=32)
    assert interval.interval_s() is None and interval.rows(350.0) == 32 * FIRST_PART_BATCHES  # cost not measured yet
    interval.observe_cost(2.0)
    assert interval.interval_s() == pytest.approx(293.9, abs=0.1)
    assert interval.rows(350.0) == math.ceil(young_interval_s(2.0, 6 * 3600) * 350.0)


def test_interval_auto_cost_is_an_ewma():
    interval = CheckpointInterval("auto", cost_alpha=0.5)
    interval.observe_cost(2.0)
    interval.observe_cost(4.0)
    assert interval.cost_s == pytest.approx(3.0)


def test_interval_auto_prefers_observed_interruptions():
    interval = CheckpointInterval("auto", mtbi_s=3600)
    interval.observe_cost(2.0)
    assert interval.interval_s() == pytest.approx(math.sqrt(2 * 2 * 3600))
    interval.observe_interruption_gap(600)
    interval.observe_interruption_gap(1200)
    assert interval.mtbi_s == 900
    assert interval.interval_s() == pytest.approx(math.sqrt(2 * 2 * 900))


@pytest.mark.parametrize("bad", ["", "fast", "500", "-5s", "0s", "0rows", "10m", "2000000rows", "auto5", "5 sec"])
def test_interval_bad_settings_name_the_accepted_forms(bad):
    with pytest.raises(ValueError) as info:
        CheckpointInterval(bad)
    text = str(info.value)
    assert repr(bad) in text
    assert "500rows" in text and "30s" in text and "'auto'" in text


def test_an_attempt_released_by_a_drain_does_not_count_toward_poison():
    progress = Progress.new("j", parts_total=4, owner="a")
    for owner in ("a", "b", "c"):
        progress.record_attempt(owner)
    assert progress.attempts_without_progress() == 3
    progress.release_attempt("b")
    assert progress.attempts_without_progress() == 2
    assert [a.released for a in progress.attempt_history] == [False, True, False]
    progress.mark_part_done(0, 5)  # progress since: earlier attempts stop counting at all
    progress.record_attempt("d")
    assert progress.attempts_without_progress() == 1
    assert Progress.from_json(progress.to_json()).attempt_history[1].released
