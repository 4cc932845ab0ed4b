"""Usage ledger end to end: real workers publish usage records to the embedded broker,
and ``spotbatch scheduler report --json`` (a real process) reconciles with them."""

from __future__ import annotations

import json
import subprocess
import time
import sys

import pytest

from spotbatch.kafka_admin import ensure_topics, read_all
from spotbatch.scheduler.prices import InstancePrice, save_prices
from spotbatch.scheduler.report import report_json
from tests.fake_metadata import FakeAws
from tests.integration.helpers import (  # noqa: F401 - worker_procs is an autouse fixture
    REPO_ROOT,
    assert_committed_to_end,
    make_jobs,
    make_topic,
    new_group,
    publish,
    spawn_worker,
    wait_ok,
    wait_until,
    worker_procs,
)

pytestmark = pytest.mark.integration

PRICES = {"g5.xlarge": InstancePrice("g5.xlarge", 1.006, 0.3622, 1, "us-east-1"),
          "p4d.24xlarge": InstancePrice("p4d.24xlarge", 21.9576, 8.783, 8, "us-east-1")}


def _pool_env(usage_topic: str, pool: str, itype: str, gpus: int) -> dict[str, str]:
    return {"SPOTBATCH_USAGE_TOPIC": usage_topic, "SPOTBATCH_POOL": pool, "SPOTBATCH_INSTANCE_TYPE": itype,
            "SPOTBATCH_GPU_COUNT": str(gpus), "SPOTBATCH_USAGE_INTERVAL_S": "0.5"}


def _committed_to_end(bootstrap: str, group: str, topic: str) -> bool:
    try:
        assert_committed_to_end(bootstrap, group, topic)
    except AssertionError:
        return False
    return True


def test_report_reconciles_with_usage_records_of_real_workers(kafka_bootstrap, tmp_path):
    topic, group, out = make_topic(kafka_bootstrap, 2), new_group(), tmp_path / "out"
    usage_topic = f"{topic}.usage"
    ensure_topics(kafka_bootstrap, {usage_topic: 2})
    jobs = make_jobs(40, 5, "usage")
    publish(kafka_bootstrap, topic, jobs)

    spot = spawn_worker(kafka_bootstrap, topic, group, out, tmp_path, name="spot",
                        env=_pool_env(usage_topic, "spot", "g5.xlarge", 1))
    with FakeAws() as aws:  # the on-demand worker gets a spot notice: one interruption on its final record
        env = {**_pool_env(usage_topic, "on-demand", "p4d.24xlarge", 8), "SPOTBATCH_AWS_METADATA_URL": aws.url,
               "SPOTBATCH_NOTICE_POLL_S": "0.1"}
        ondemand = spawn_worker(kafka_bootstrap, topic, group, out, tmp_path, name="ondemand", burst=False,
                                env=env, args=["--notice-source", "aws"])
        wait_until(lambda: _committed_to_end(kafka_bootstrap, group, topic), 90, "all jobs committed",
                   every_s=0.5, workers=[spot, ondemand])
        aws.notice(action="terminate", in_s=120)
        wait_ok(spot, ondemand)

    records = [json.loads(r.value) for r in read_all(kafka_bootstrap, usage_topic)]
    usage = [r for r in records if r.get("kind") == "usage"]
    by_worker: dict[str, list[dict]] = {}
    for r in usage:
        by_worker.setdefault(r["worker"], []).append(r)
    assert len(by_worker) == 2, records
    for mine in by_worker.values():
        mine.sort(key=lambda r: r["start"])
        assert [r["final"] for r in mine] == [False] * (len(mine) - 1) + [True]
        assert all(a["end"] == b["start"] for a, b in zip(mine, mine[1:]))  # they tile the life
        assert len({r["record_id"] for r in mine}) == len(mine)
    assert {(r["pool"], r["instance_type"], r["gpus"]) for r in usage} == {("spot", "g5.xlarge", 1),
                                                                          ("on-demand", "p4d.24xlarge", 8)}
    assert sum(r["rows"] for r in usage) == 200 and sum(r["jobs"] for r in usage) == 40
    assert sum(r["interruptions"] for r in usage if r["pool"] == "on-demand") == 1
    assert sum(r["interruptions"] for r in usage if r["pool"] == "spot") == 0
    assert len(by_worker[usage[0]["worker"]]) >= 2 or len(usage) >= 3  # the 0.5 s interval really ticked

    # A redelivered record must not count twice.
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    producer.send(usage_topic, key=usage[0]["worker"].encode(), value=json.dumps(usage[0]).encode()).get(30)
    producer.close()

    prices_file = tmp_path / "prices.yaml"
    save_prices(prices_file, PRICES)
    cmd = [sys.executable, "-m", "spotbatch", "scheduler", "report", "--json", "--bootstrap", kafka_bootstrap,
           "--usage-topic", usage_topic, "--prices", str(prices_file), "--since", "-1h",
           "--plot", str(tmp_path / "cost.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)

    def priced(pool: str) -> float:
        return sum(r["seconds_alive"] / 3600 * PRICES[r["instance_type"]].per_h(pool) for r in usage if r["pool"] == pool)

    assert report["pools"]["spot"]["cost"] == pytest.approx(priced("spot"), rel=1e-9)
    assert report["pools"]["on-demand"]["cost"] == pytest.approx(priced("on-demand"), rel=1e-9)
    assert report["pools"]["on-demand"]["gpu_hours"] == pytest.approx(
        sum(r["seconds_alive"] * 8 / 3600 for r in usage if r["pool"] == "on-demand"), rel=1e-9)
    assert report["total"]["rows"] == pytest.approx(200) and report["total"]["interruptions"] == 1
    assert report["duplicates"] == 1 and report["total"]["workers"] == 2
    assert report["total"]["savings"] == pytest.approx(
        sum(r["seconds_alive"] / 3600 * (1.006 - 0.3622) for r in usage if r["pool"] == "spot"), rel=1e-9)
    assert (tmp_path / "cost.png").read_bytes()[:4] == b"\x89PNG"


def test_windowed_read_skips_old_records_and_matches_the_full_read(kafka_bootstrap):
    """Usage records stamped over 5 days: a read for a window reads (decodes) only the
    records stamped from since - LOOKBACK_MARGIN_S on, and prices the window exactly as
    the full read does; whether or not the broker can look offsets up by timestamp."""
    from kafka import KafkaProducer

    from spotbatch.scheduler.ledger import LOOKBACK_MARGIN_S, Window, read_ledger
    from spotbatch.scheduler.report import compute_report

    usage_topic = f"usage-window-{new_group()}"
    ensure_topics(kafka_bootstrap, {usage_topic: 2})
    t_end = float(int(time.time()) // 3600 * 3600)
    t0, hour = t_end - 5 * 86400, 3600.0
    skew = {"a": 0.0, "b": -300.0}  # b's clock runs 5 minutes behind: Kafka stamps it early
    sent: list[tuple[dict, int]] = []
    for worker, pool in (("a", "spot"), ("b", "on-demand")):
        for i in range(120):
            start = t0 + i * hour + (1234.5 if worker == "b" else 0.0)
            body = {"v": 1, "kind": "usage", "record_id": f"{worker}-{i}", "worker": worker, "pool": pool,
                    "instance_type": "g5.xlarge", "gpus": 1, "start": start, "end": start + hour,
                    "seconds_alive": hour, "seconds_busy": hour * 0.4, "rows": 100 + i, "jobs": 3,
                    "interruptions": int(i % 7 == 0), "rows_recomputed": i % 5, "final": False, "at": start + hour}
            sent.append((body, int((start + hour + skew[worker]) * 1000)))
    sent.append((sent[3][0], sent[3][1]))  # an old redelivery
    sent.append((sent[200][0], sent[200][1] + 60_000))  # a recent one
    sent.append(({"v": 1, "kind": "interruption", "worker": "a"}, int((t_end - 7200) * 1000)))
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=20)
    for body, ts in sent:
        producer.send(usage_topic, key=body["worker"].encode(), value=json.dumps(body).encode(), timestamp_ms=ts)
    producer.flush(30)
    producer.close()

    full = read_ledger(kafka_bootstrap, usage_topic)
    assert full.decoded == len(sent) and len(full.records) == 240 and full.duplicates == 2
    for since, until in ((t_end - 30 * hour, t_end - 6 * hour), (t_end - 86400 - 1800.25, None),
                         (t_end - 2 * hour, t_end + hour)):
        window = Window(since, until)
        part = read_ledger(kafka_bootstrap, usage_topic, window=window)
        cutoff_ms = (since - LOOKBACK_MARGIN_S) * 1000
        assert part.decoded == sum(ts >= cutoff_ms for _, ts in sent) < len(sent) / 3  # the old ones were skipped
        assert part.totals(window) == full.totals(window) != {}
        assert part.span(window) == full.span(window)
        assert part.timeline(window, 1800) == full.timeline(window, 1800)
        a, b = (report_json(compute_report(led, PRICES, window)) for led in (part, full))
        for counter in ("duplicates", "skipped", "malformed"):  # of the records read
            a.pop(counter), b.pop(counter)
        assert a == b
