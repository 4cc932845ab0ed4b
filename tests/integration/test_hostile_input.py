"""Hostile messages on a shared jobs topic: each attack ends as a dead letter with a code,
the valid jobs around it complete, and one worker process survives them all.

Single partition, so an attack that crashed or wedged the worker would stall every
job behind it. Real broker, real files: a FIFO, a sparse 2 GB file, a symlink out of
the input prefix, a key file outside it.
"""

from __future__ import annotations

import json
import os

import pytest
from kafka import KafkaProducer

from spotbatch.kafka_admin import read_all
from spotbatch.workers.streams import dlq_topic
from tests.integration.helpers import (  # noqa: F401 - worker_procs is an autouse fixture
    assert_committed_to_end,
    make_jobs,
    make_topic,
    new_group,
    send_raw,
    spawn_worker,
    wait_ok,
    worker_procs,
)

pytestmark = pytest.mark.integration

SECRET = "-----BEGIN PRIVATE KEY-----MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"


def _job(job_id: str, **fields) -> bytes:
    body = {"job_id": job_id, "model": "tiny", "inputs": {"rows": [{"id": "r1", "text": "hi"}]}, **fields}
    return json.dumps(body).encode()


def _uri_job(job_id: str, uri: str) -> bytes:
    return _job(job_id, inputs={"uri": uri})


def _attacks(tmp_path, inputs) -> dict[bytes, tuple[bytes, str]]:
    """key -> (message value, expected dead-letter code)."""
    secret = tmp_path / "secrets" / "key.json"
    secret.parent.mkdir()
    secret.write_text(json.dumps({"id": SECRET, "text": "x"}) + "\n")
    (inputs / "link.jsonl").symlink_to(secret)
    fifos = []
    for i in range(5):  # more than the worker's four I/O threads
        fifo = inputs / f"fifo-{i}.jsonl"
        os.mkfifo(fifo)
        fifos.append((f"fifo-{i}".encode(), (_uri_job(f"fifo-{i}", str(fifo)), "input_unreadable")))
    sparse = inputs / "huge.jsonl"
    with open(sparse, "wb") as fh:
        fh.truncate(2 * 1024**3)
    deep = b'{"job_id": "deep", "model": "tiny", "inputs": {"rows": [{"id": "1", "text": ' + b"[" * 10_000 \
        + b"]" * 10_000 + b"}]}}"
    return {
        b"big-int": (_job("big-int", params={"n": 1}).replace(b'"n": 1', b'"n": ' + b"7" * 5000), "invalid_job"),
        b"deep": (deep, "invalid_job"),
        b"nul-output": (_job("nul-output", output="run\x00/x"), "invalid_job"),
        b"dev-zero": (_uri_job("dev-zero", "file:///dev/zero#.jsonl"), "input_invalid"),
        b"dev-zero-plain": (_uri_job("dev-zero-plain", "/dev/zero"), "input_outside_prefix"),
        b"etc-passwd": (_uri_job("etc-passwd", "/etc/passwd.json"), "input_outside_prefix"),
        b"secret": (_uri_job("secret", str(secret)), "input_outside_prefix"),
        b"symlink": (_uri_job("symlink", str(inputs / "link.jsonl")), "input_outside_prefix"),
        b"dotdot": (_uri_job("dotdot", f"file://{inputs}/%2e%2e/secrets/key.json"), "input_outside_prefix"),
        b"query": (_uri_job("query", f"file://{inputs}/x.json?.jsonl"), "input_invalid"),
        b"sparse": (_uri_job("sparse", str(sparse)), "input_too_large"),
        b"folder": (_uri_job("folder", str(inputs)), "input_invalid"),
        **dict(fifos),
    }


def test_each_attack_is_dead_lettered_and_valid_jobs_complete(kafka_bootstrap, tmp_path):
    topic, group, out = make_topic(kafka_bootstrap, 1), new_group(), tmp_path / "out"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    attacks = _attacks(tmp_path, inputs)
    good = make_jobs(len(attacks) + 1, 3, "good")
    messages = []
    for job, (key, (value, _)) in zip(good, attacks.items()):
        messages += [(job.job_id.encode(), job.to_bytes()), (key, value)]
    messages.append((good[-1].job_id.encode(), good[-1].to_bytes()))
    send_raw(kafka_bootstrap, topic, messages)

    worker = spawn_worker(kafka_bootstrap, topic, group, out, tmp_path, input_prefixes=[str(inputs)])
    wait_ok(worker)  # one process, exit 0: nothing crashed it, nothing wedged it

    assert {p.name for p in out.glob("*.parquet")} == {f"{j.job_id}.parquet" for j in good}
    dead = {dict(r.headers)["spotbatch.source.key"]: r for r in read_all(kafka_bootstrap, dlq_topic(topic))}
    assert set(dead) == set(attacks)
    for key, (_, code) in attacks.items():
        headers = {k: v.decode(errors="replace") for k, v in dead[key].headers}
        assert headers["spotbatch.error.code"] == code, (key, headers["spotbatch.error.reason"])
        assert SECRET not in headers["spotbatch.error.reason"]
    assert_committed_to_end(kafka_bootstrap, group, topic)


def test_oversized_message_is_dead_lettered_with_its_digest(kafka_bootstrap, tmp_path):
    """A message too large to re-publish keeps a preview, its size and SHA-256; the whole
    original goes under the output prefix's _dlq/ folder."""
    import hashlib

    topic, group, out = make_topic(kafka_bootstrap, 1), new_group(), tmp_path / "out"
    huge = _job("huge", params={"pad": "x" * 100}).replace(b'"x', b'"' + b"y" * (3 * 1024 * 1024) + b"x")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=8 * 1024 * 1024)
    producer.send(topic, key=b"huge", value=huge).get(timeout=30)
    after = make_jobs(1, 2, "after")[0]
    producer.send(topic, key=b"after", value=after.to_bytes()).get(timeout=30)
    producer.close()

    # A 1 MiB record limit makes the 3 MiB message "too large to re-publish".
    worker = spawn_worker(kafka_bootstrap, topic, group, out, tmp_path,
                          env={"SPOTBATCH_MAX_PARTITION_FETCH_BYTES": str(1024 * 1024)})
    wait_ok(worker)

    [letter] = read_all(kafka_bootstrap, dlq_topic(topic))
    headers = {k: v.decode() for k, v in letter.headers}
    assert headers["spotbatch.error.code"] == "invalid_job"  # its string is over MAX_STRING_BYTES
    assert headers["spotbatch.original.truncated"] == "1"
    assert int(headers["spotbatch.original.size"]) == len(huge)
    assert headers["spotbatch.original.sha256"] == hashlib.sha256(huge).hexdigest()
    assert len(letter.value) < 8192 and huge.startswith(letter.value)
    archived = headers["spotbatch.original.uri"]
    assert archived.startswith(str(out / "_dlq")) and open(archived, "rb").read() == huge
    assert (out / "after-000000.parquet").exists()
    assert_committed_to_end(kafka_bootstrap, group, topic)


def test_s3_inputs_outside_the_prefix_or_unreadable_are_dead_lettered(kafka_bootstrap, tmp_path, s3_bucket,
                                                                      s3_client):
    """Another bucket (readable with the worker's credentials) is never read; an archived
    object fails its job (InvalidObjectState), not the worker."""
    other = f"{s3_bucket}-other"
    s3_client.create_bucket(Bucket=other)
    row = json.dumps({"id": SECRET, "text": "x"}).encode() + b"\n"
    s3_client.put_object(Bucket=other, Key="in/x.jsonl", Body=row)
    s3_client.put_object(Bucket=s3_bucket, Key="in/cold.jsonl", Body=row, StorageClass="GLACIER")
    s3_client.put_object(Bucket=s3_bucket, Key="in/ok.jsonl", Body=b'{"id": "a", "text": "fine"}\n')
    s3_client.put_object(Bucket=s3_bucket, Key="elsewhere/x.jsonl", Body=row)
    topic, group = make_topic(kafka_bootstrap, 1), new_group()
    attacks = {
        b"other-bucket": (_uri_job("other-bucket", f"s3://{other}/in/x.jsonl"), "input_outside_prefix"),
        b"other-key": (_uri_job("other-key", f"s3://{s3_bucket}/elsewhere/x.jsonl"), "input_outside_prefix"),
        b"climb": (_uri_job("climb", f"s3://{s3_bucket}/in/../elsewhere/x.jsonl"), "input_outside_prefix"),
        b"cold": (_uri_job("cold", f"s3://{s3_bucket}/in/cold.jsonl"), "input_unreadable"),
    }
    messages = [(key, value) for key, (value, _) in attacks.items()]
    send_raw(kafka_bootstrap, topic, [*messages, (b"ok", _uri_job("ok", f"s3://{s3_bucket}/in/ok.jsonl"))])

    worker = spawn_worker(kafka_bootstrap, topic, group, f"s3://{s3_bucket}/out", tmp_path,
                          input_prefixes=[f"s3://{s3_bucket}/in/"])
    wait_ok(worker)

    dead = {dict(r.headers)["spotbatch.source.key"]: r for r in read_all(kafka_bootstrap, dlq_topic(topic))}
    assert set(dead) == set(attacks)
    for key, (_, code) in attacks.items():
        headers = {k: v.decode(errors="replace") for k, v in dead[key].headers}
        assert headers["spotbatch.error.code"] == code, (key, headers["spotbatch.error.reason"])
    listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="out/ok/")
    assert any(o["Key"].endswith("_manifest.json") for o in listed.get("Contents", []))
    assert_committed_to_end(kafka_bootstrap, group, topic)
