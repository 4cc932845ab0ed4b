"""``spotbatch dlq list|show|redrive`` against the real broker and a real worker's dead letters."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from kafka import KafkaProducer

from spotbatch.errors import JobError
from spotbatch.kafka_admin import read_all
from spotbatch.workers.streams import SideStreams, dlq_topic
from tests.integration.helpers import (  # noqa: F401 - worker_procs is an autouse fixture
    REPO_ROOT,
    make_topic,
    new_group,
    send_raw,
    spawn_worker,
    wait_ok,
    worker_procs,
)

pytestmark = pytest.mark.integration


def _job(job_id: str, **overrides) -> bytes:
    data = {"version": 1, "job_id": job_id, "model": "tiny", "inputs": {"rows": [{"id": "r1", "text": "hello"}]}}
    data.update(overrides)
    return json.dumps(data).encode()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTBATCH_")}
    env.update({"PYTHONPATH": str(REPO_ROOT), "COLUMNS": "200"})
    return subprocess.run([sys.executable, "-m", "spotbatch", "dlq", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def _json(result: subprocess.CompletedProcess):
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def _repeat_dead_letters(bootstrap: str, records, reason: str) -> None:
    """What a crash between a dead letter's ack and the offset commit leaves: the same ones again."""
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        streams = SideStreams(producer, "replayed")
        for record in records:
            streams.dead_letter(record, JobError("unknown_model", reason)).get(30)
    finally:
        producer.close()


def test_list_dedupes_and_redrive_by_code_republishes_the_originals(kafka_bootstrap, tmp_path):
    topic, group, out = make_topic(kafka_bootstrap, 2), new_group(), tmp_path / "out"
    messages = [(b"bad-model-1", _job("bad-model-1", model="no-such-model")),
                (b"bad-model-2", _job("bad-model-2", model="no-such-model")),
                (b"bad-json", b'{"job_id": "bad-json", '),
                (None, _job("bad-model-3", model="no-such-model"))]  # no key at all
    coords = dict(zip((v for _, v in messages), send_raw(kafka_bootstrap, topic, messages)))
    wait_ok(spawn_worker(kafka_bootstrap, topic, group, out, tmp_path))
    dead = read_all(kafka_bootstrap, dlq_topic(topic))
    assert len(dead) == 4
    for rec in dead:  # keyed by source coordinates, the original key in a header
        partition, offset = coords[rec.value]
        assert rec.key == f"{topic}:{partition}:{offset}".encode()
    originals = [r for r in read_all(kafka_bootstrap, topic) if r.key in (b"bad-model-1", None)]
    _repeat_dead_letters(kafka_bootstrap, originals, "again")
    _repeat_dead_letters(kafka_bootstrap, originals[:1], "and again")
    assert len(read_all(kafka_bootstrap, dlq_topic(topic))) == 7

    listed = _json(_cli("list", "--topic", topic, "--bootstrap", kafka_bootstrap, "--json"))
    assert sorted((d["source"]["partition"], d["source"]["offset"]) for d in listed) == sorted(coords.values())
    by_id = {d["job_id"]: d for d in listed}
    assert set(by_id) == {"bad-model-1", "bad-model-2", "bad-model-3", None}  # bad-json: no id to read
    assert (by_id["bad-model-1"]["duplicates"], by_id["bad-model-1"]["reason"]) == (2, "and again")  # last wins
    assert (by_id["bad-model-3"]["duplicates"], by_id["bad-model-3"]["key"]) == (1, None)
    assert by_id["bad-model-2"]["duplicates"] == 0 and by_id["bad-model-2"]["key"] == "bad-model-2"
    assert by_id[None]["code"] == "malformed_json"
    only = _json(_cli("list", "--topic", topic, "--bootstrap", kafka_bootstrap, "--json", "--code", "malformed_json"))
    assert [d["code"] for d in only] == ["malformed_json"]

    table = _cli("list", "--topic", topic, "--bootstrap", kafka_bootstrap)
    assert table.returncode == 0, table.stderr
    assert "bad-model-1" in table.stdout and "malformed_json" in table.stdout and "4 dead letters" in table.stdout

    shown = _json(_cli("show", "--topic", topic, "--bootstrap", kafka_bootstrap, "bad-model-2", "--json"))
    assert [s["value"] for s in shown] == [_job("bad-model-2", model="no-such-model").decode()]
    p, o = coords[_job("bad-model-2", model="no-such-model")]
    assert _json(_cli("show", "--topic", topic, "--bootstrap", kafka_bootstrap, f"{p}:{o}", "--json")) == shown

    dry = _json(_cli("redrive", "--topic", topic, "--bootstrap", kafka_bootstrap, "--code", "unknown_model",
                     "--dry-run", "--json"))
    assert (dry["selected"], dry["would_redrive"], dry["redriven"]) == (3, 3, 0)
    assert len(read_all(kafka_bootstrap, topic)) == 4

    done = _json(_cli("redrive", "--topic", topic, "--bootstrap", kafka_bootstrap, "--code", "unknown_model", "--json"))
    assert (done["selected"], done["redriven"], done["refused"], done["failed"]) == (3, 3, [], [])
    after = read_all(kafka_bootstrap, topic)
    new = [r for r in after if (r.partition, r.offset) not in set(coords.values())]
    assert sorted((r.key or b"", r.value) for r in new) == sorted(
        (k or b"", v) for k, v in messages if k != b"bad-json")  # original key and bytes, once each
    text = _cli("redrive", "--topic", topic, "--bootstrap", kafka_bootstrap, "--job-id", "bad-model-2")
    assert text.returncode == 0 and "redrove 1 of 1" in text.stdout, text.stderr


def test_redrive_reads_a_truncated_original_from_its_uri_or_refuses(kafka_bootstrap, tmp_path):
    topic = make_topic(kafka_bootstrap, 1)
    full = _job("big", pad="x" * 5000)
    (tmp_path / "big.json").write_bytes(full)
    truncated = [("spotbatch.original.truncated", b"1"), ("spotbatch.original.size", str(len(full)).encode()),
                 ("spotbatch.original.sha256", hashlib.sha256(full).hexdigest().encode())]
    letters = [  # (source offset, job key, extra headers)
        (10, b"big", truncated + [("spotbatch.original.uri", str(tmp_path / "big.json").encode())]),
        (11, b"lost", truncated),
    ]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    try:
        for offset, key, extra in letters:
            headers = [("spotbatch.error.code", b"too_large"), ("spotbatch.error.reason", b"over the limit"),
                       ("spotbatch.source.topic", topic.encode()), ("spotbatch.source.partition", b"0"),
                       ("spotbatch.source.offset", str(offset).encode()), ("spotbatch.source.key", key), *extra]
            producer.send(dlq_topic(topic), key=f"{topic}:0:{offset}".encode(), value=full[:100],
                          headers=headers).get(30)
    finally:
        producer.close()

    listed = _json(_cli("list", "--topic", topic, "--bootstrap", kafka_bootstrap, "--json"))
    assert [(d["size"], d["truncated"], d["job_id"]) for d in listed] == [(len(full), True, "big")] * 2
    result = _cli("redrive", "--topic", topic, "--bootstrap", kafka_bootstrap, "--code", "too_large", "--json")
    assert result.returncode == 1  # one refused
    report = json.loads(result.stdout)
    assert report["redriven"] == 1 and [r["source"]["offset"] for r in report["refused"]] == [11]
    assert "no spotbatch.original.uri" in report["refused"][0]["why"]
    (back,) = read_all(kafka_bootstrap, topic)
    assert (back.key, back.value) == (b"big", full)


def test_bad_input_exits_2_with_a_fix(kafka_bootstrap):
    missing = _cli("list", "--topic", "no-such-topic-here", "--bootstrap", kafka_bootstrap, "--timeout-s", "5")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "--topic" in missing.stderr
    no_selector = _cli("redrive", "--topic", "x", "--bootstrap", kafka_bootstrap)
    assert no_selector.returncode == 2 and "needs a selector" in no_selector.stderr
