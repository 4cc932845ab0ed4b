"""Usage ledger end to end: real workers publish usage records to the embedded broker,
and ``spotbatch scheduler report --json`` (a real process) reconciles with them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spotbatch.kafka_admin import ensure_topics, read_all
from spotbatch.scheduler.prices import InstancePrice, save_prices
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
