"""Fuzz the real worker with mutated job bytes (hypothesis, derandomized: the same run
every time; bounded to one worker run of a few hundred messages).

Whatever a message holds, it ends as an ok status (its output written) or a dead letter
with a code: one worker process survives the lot, and offsets reach the log end.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotbatch.errors import ERROR_CODES
from spotbatch.kafka_admin import read_all
from spotbatch.workers.streams import dlq_topic
from tests.integration.helpers import (  # noqa: F401 - worker_procs is an autouse fixture
    assert_committed_to_end,
    make_jobs,
    make_topic,
    new_group,
    send_raw,
    spawn_worker,
    statuses,
    wait_ok,
    worker_procs,
)

pytestmark = pytest.mark.integration

N_MESSAGES = 800

_TEMPLATE = {"version": 1, "job_id": "fz", "model": "tiny",
             "inputs": {"rows": [{"id": "r1", "text": "hello"}, {"id": "r2", "text": "world"}]},
             "output": "sub/", "params": {}}
_HOSTILE = [b"[" * 5000, b"9" * 5000, b"\x00", b"\xff\xfe", b"\\u0000", b'"uri": "/dev/zero"', b"../../",
            b'"uri": "file:///proc/self/environ"', b"NaN", b"1e999999", b'{"$ref": 1}', b"\x1b[2J"]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
fields = st.sampled_from(["version", "job_id", "model", "inputs", "output", "params", "extra"])
inputs_paths = st.sampled_from(["rows", "uri", "id_column", "input_column"])


@st.composite
def mutated_job(draw, index: int = 0) -> bytes:
    body = json.loads(json.dumps(_TEMPLATE))
    body["job_id"] = f"fz-{draw(st.integers(0, 10**6))}"
    kind = draw(st.sampled_from(["field", "inputs", "bytes", "hostile", "truncate"]))
    if kind == "field":
        body[draw(fields)] = draw(json_values)
    elif kind == "inputs":
        body["inputs"][draw(inputs_paths)] = draw(json_values)
    raw = json.dumps(body).encode()
    if kind == "bytes":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=6)) + raw[at + draw(st.integers(0, 3)):]
    elif kind == "hostile":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from(_HOSTILE)) + raw[at:]
    elif kind == "truncate":
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    return raw


def _corpus(n: int) -> list[bytes]:
    """``n`` mutated messages, the same every run (hypothesis derandomized, in-process:
    one worker run takes them all, instead of a worker per example)."""
    found: list[bytes] = []

    @settings(max_examples=n, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutated_job())
    def collect(raw: bytes) -> None:
        found.append(raw)

    collect()
    return found


def test_fuzzed_messages_end_as_outputs_or_dead_letters(kafka_bootstrap, tmp_path):
    tmp, messages = tmp_path, _corpus(N_MESSAGES)
    topic, group, out = make_topic(kafka_bootstrap, 1), new_group(), tmp / "out"
    sentinels = make_jobs((len(messages) + 19) // 20, 2, "sentinel")
    sent = []
    for i, raw in enumerate(messages):
        if i % 20 == 0:  # valid jobs throughout: a wedge or a crash anywhere would strand them
            job = sentinels[i // 20]
            sent.append((job.job_id.encode(), job.to_bytes()))
        sent.append((f"m{i}".encode(), raw))
    coords = send_raw(kafka_bootstrap, topic, sent)

    worker = spawn_worker(kafka_bootstrap, topic, group, out, tmp)
    wait_ok(worker)  # the same process throughout, exit 0

    ok = {(s["source"]["partition"], s["source"]["offset"]) for s in statuses(kafka_bootstrap, topic)
          if s["status"] == "ok"}
    dead = {}
    for rec in read_all(kafka_bootstrap, dlq_topic(topic)):
        h = {k: v.decode() for k, v in rec.headers if k.startswith("spotbatch.")}
        dead[(int(h["spotbatch.source.partition"]), int(h["spotbatch.source.offset"]))] = h["spotbatch.error.code"]
    lost = [c for c in coords if c not in ok and c not in dead]
    assert not lost, f"{len(lost)} messages neither written nor dead-lettered: {lost[:5]}"
    assert set(dead.values()) <= set(ERROR_CODES)
    assert not ok & set(dead)
    for job in sentinels:
        assert (out / f"{job.job_id}.parquet").exists(), job.job_id
    assert_committed_to_end(kafka_bootstrap, group, topic)
    counts = {}
    for code in dead.values():
        counts[code] = counts.get(code, 0) + 1
    print(f"fuzz: sent {len(sent)}, ok {len(ok)}, dead-lettered {len(dead)} {dict(sorted(counts.items()))}, "
          f"lost {len(lost)}, restarts 0")
