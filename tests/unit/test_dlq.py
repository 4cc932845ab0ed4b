"""Dead letters: parsing, de-duplication by source coordinates, selection, truncated originals."""

from __future__ import annotations

import hashlib
import json
import os
from collections import namedtuple

import pytest
from typer.testing import CliRunner

from spotbatch.cli import app
from spotbatch.dlq import (
    RedriveRefused,
    dead_letter_key,
    dedupe,
    find,
    original_bytes,
    parse_dead_letter,
    parse_offset,
    select,
)
from spotbatch.errors import JobError

Rec = namedtuple("Rec", "topic partition offset key value headers timestamp")


def _letter(src_offset, *, code="invalid_job", job_id=None, dlq_offset=0, dlq_partition=0, src_partition=0,
            key=b"k", value=None, extra=(), coords_key=True, ts=0, topic="jobs"):
    if value is None:
        value = json.dumps({"job_id": job_id or f"job-{src_offset}"}).encode()
    headers = [("trace", b"t1"), ("spotbatch.error.code", code.encode()), ("spotbatch.error.reason", b"bad"),
               ("spotbatch.source.topic", topic.encode()), ("spotbatch.source.partition", str(src_partition).encode()),
               ("spotbatch.source.offset", str(src_offset).encode()), ("spotbatch.worker", b"w1")]
    if key is not None and coords_key:
        headers.append(("spotbatch.source.key", key))
    headers += list(extra)
    dlq_key = dead_letter_key(topic, src_partition, src_offset) if coords_key else key
    return parse_dead_letter(Rec(f"{topic}.dlq", dlq_partition, dlq_offset, dlq_key, value, headers, ts))


class _Producer:
    def __init__(self):
        self.sent = []

    def send(self, topic, key=None, value=None, headers=None):
        self.sent.append((topic, key, value, headers))
        return None


def test_side_stream_keys_the_dead_letter_by_source_coordinates():
    from spotbatch.workers.streams import SideStreams  # the workers package loads torch

    producer = _Producer()
    streams = SideStreams(producer, "w1")
    streams.dead_letter(Rec("jobs", 3, 17, b"job-a", b"{}", [("trace", b"x")], 0), JobError("invalid_job", "nope"))
    streams.dead_letter(Rec("jobs", 1, 2, None, b"{}", None, 0), JobError("invalid_job", "nope"))
    (topic, key, value, headers), (_, key2, _, headers2) = producer.sent
    assert (topic, key, value) == ("jobs.dlq", b"jobs:3:17", b"{}")
    assert headers[0] == ("trace", b"x") and ("spotbatch.source.key", b"job-a") in headers
    assert key2 == b"jobs:1:2" and "spotbatch.source.key" not in dict(headers2)
    # ...and reads back as the original
    letter = parse_dead_letter(Rec("jobs.dlq", 0, 0, key, value, headers, 0))
    assert (letter.key, letter.headers, letter.coords, letter.code) == (b"job-a", [("trace", b"x")], ("jobs", 3, 17), "invalid_job")
    assert parse_dead_letter(Rec("jobs.dlq", 0, 1, key2, b"{}", headers2, 0)).key is None


def test_parse_reads_job_id_best_effort_and_legacy_keys():
    assert _letter(1, job_id="a").job_id == "a"
    assert _letter(1, value=b"not json").job_id is None
    assert _letter(1, value=b"[1]").job_id is None
    legacy = _letter(1, key=b"orig", coords_key=False)  # written before coordinate keys
    assert legacy.key == b"orig"


def test_dedupe_keeps_one_per_source_record_the_last_written():
    first = _letter(5, dlq_offset=0, code="invalid_job")
    other = _letter(6, dlq_offset=1)
    again = _letter(5, dlq_offset=2, code="too_many_attempts")
    elsewhere = _letter(5, src_partition=1, dlq_offset=3)  # same offset, other source partition
    kept = dedupe([first, other, again, elsewhere])
    assert [(d.source_partition, d.source_offset, d.dlq_offset) for d in kept] == [(0, 5, 2), (0, 6, 1), (1, 5, 3)]
    assert kept[0].code == "too_many_attempts" and kept[0].duplicates == 1
    assert dedupe([again, first])[0].dlq_offset == 2  # order of arrival does not matter on one partition


def test_dedupe_across_dlq_partitions_takes_the_later_timestamp():
    a = _letter(5, dlq_partition=1, dlq_offset=9, ts=100, code="a")
    b = _letter(5, dlq_partition=0, dlq_offset=1, ts=200, code="b")
    assert [d.code for d in dedupe([a, b])] == ["b"] == [d.code for d in dedupe([b, a])]


def test_letters_without_coordinates_stay_apart():
    rec = lambda off: parse_dead_letter(Rec("jobs.dlq", 0, off, None, b"x", [], 0))  # noqa: E731
    assert len(dedupe([rec(0), rec(1)])) == 2


def test_select_and_find():
    letters = dedupe([_letter(1, code="x", job_id="a"), _letter(2, code="y", job_id="b"),
                      _letter(2, src_partition=1, code="x", job_id="c", dlq_offset=5)])
    ids = lambda ds: [d.job_id for d in ds]  # noqa: E731
    assert select(letters) == []  # no selector, nothing
    assert ids(select(letters, codes=["x"])) == ["a", "c"]
    assert ids(select(letters, codes=["x", "y"])) == ["a", "b", "c"]
    assert ids(select(letters, codes=["x"], job_ids=["c", "b"])) == ["c"]  # kinds must all match
    assert ids(select(letters, offsets=[(None, 2)])) == ["b", "c"]
    assert ids(select(letters, offsets=[(1, 2)])) == ["c"]
    assert ids(find(letters, "2")) == ["b", "c"]
    assert ids(find(letters, "1:2")) == ["c"]
    assert ids(find(letters, "a")) == ["a"]
    assert find(letters, "99") == []


@pytest.mark.parametrize("text,expected", [("7", (None, 7)), ("2:7", (2, 7)), (" 0:0 ", (0, 0))])
def test_parse_offset(text, expected):
    assert parse_offset(text) == expected


@pytest.mark.parametrize("text", ["x", "-1", "1:-2", "a:1", ""])
def test_parse_offset_rejects(text):
    with pytest.raises(ValueError):
        parse_offset(text)


def _truncated(full: bytes, uri=None, sha=None):
    extra = [("spotbatch.original.truncated", b"1"), ("spotbatch.original.size", str(len(full)).encode()),
             ("spotbatch.original.sha256", (sha or hashlib.sha256(full).hexdigest()).encode())]
    if uri:
        extra.append(("spotbatch.original.uri", uri.encode()))
    return _letter(1, value=full[:30], extra=extra)


def test_truncated_originals_are_read_from_their_uri_and_checked(tmp_path):
    full = json.dumps({"job_id": "big", "pad": "x" * 100}).encode()
    path = tmp_path / "orig.json"
    path.write_bytes(full)
    letter = _truncated(full, uri=str(path))
    assert letter.truncated and letter.size == len(full) and letter.headers == [("trace", b"t1")]
    assert letter.job_id == "big"  # read from the preview, best effort
    assert original_bytes(letter) == full
    assert original_bytes(_letter(1, value=b"plain")) == b"plain"
    with pytest.raises(RedriveRefused, match="no spotbatch.original.uri"):
        original_bytes(_truncated(full))
    with pytest.raises(RedriveRefused, match="sha256"):
        original_bytes(_truncated(full, uri=str(path), sha="00" * 32))
    with pytest.raises(RedriveRefused, match="cannot read"):
        original_bytes(_truncated(full, uri=str(tmp_path / "gone")))
    path.write_bytes(full + b"!")
    with pytest.raises(RedriveRefused, match="bytes"):
        original_bytes(letter)


# ---- CLI error paths (no broker) ------------------------------------------------------


@pytest.fixture
def runner(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SPOTBATCH_"):
            monkeypatch.delenv(key)
    return CliRunner()


def test_redrive_without_a_selector_exits_2(runner):
    result = runner.invoke(app, ["dlq", "redrive", "--topic", "jobs"])
    assert result.exit_code == 2
    assert "needs a selector" in result.output and len(result.output.strip().splitlines()) == 1


def test_redrive_bad_offset_exits_2(runner):
    result = runner.invoke(app, ["dlq", "redrive", "--topic", "jobs", "--offset", "x"])
    assert result.exit_code == 2 and "PARTITION:N" in result.output


def test_list_unreachable_broker_exits_2(runner):
    result = runner.invoke(app, ["dlq", "list", "--topic", "jobs", "--bootstrap", "127.0.0.1:1", "--timeout-s", "2"])
    assert result.exit_code == 2, result.output
    assert "--bootstrap" in result.output
