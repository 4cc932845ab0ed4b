"""InputPolicy and open_regular: what a job may read, decided before any byte is read."""

from __future__ import annotations

import os

import pytest

from spotbatch.errors import JobError
from spotbatch.input_access import InputPolicy, open_regular


@pytest.fixture
def tree(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (inside / "ok.jsonl").write_text("{}\n")
    (outside / "secret.jsonl").write_text("{}\n")
    (inside / "escape.jsonl").symlink_to(outside / "secret.jsonl")
    (inside / "sub").mkdir()
    (inside / "sub" / "inner.jsonl").write_text("{}\n")
    (outside / "back.jsonl").symlink_to(inside / "ok.jsonl")
    return tmp_path


def _code(policy: InputPolicy, uri: str) -> str:
    with pytest.raises(JobError) as info:
        policy.resolve(uri)
    return info.value.code


def test_inside_the_prefix_is_allowed(tree):
    policy = InputPolicy([str(tree / "in")])
    assert policy.resolve(str(tree / "in" / "ok.jsonl")) == str(tree / "in" / "ok.jsonl")
    assert policy.resolve(f"file://{tree}/in/sub/../ok.jsonl") == str(tree / "in" / "ok.jsonl")
    # A symlink from outside to a file inside resolves inside: allowed.
    assert policy.resolve(str(tree / "out" / "back.jsonl")) == str(tree / "in" / "ok.jsonl")


@pytest.mark.parametrize(("uri", "code"), [
    ("{t}/out/secret.jsonl", "input_outside_prefix"),
    ("{t}/in/escape.jsonl", "input_outside_prefix"),  # symlink out of the prefix
    ("{t}/in/../out/secret.jsonl", "input_outside_prefix"),
    ("file://{t}/in/%2e%2e/out/secret.jsonl", "input_outside_prefix"),
    ("{t}/inside/x.jsonl", "input_outside_prefix"),  # a look-alike sibling
    ("/proc/self/environ", "input_outside_prefix"),
    ("{t}/in/ok.jsonl#.parquet", "input_invalid"),
    ("file://{t}/in/ok.json?x=.jsonl", "input_invalid"),
    ("file://otherhost/{t}/in/ok.jsonl", "input_invalid"),
    ("s3://bucket/in/x.jsonl", "input_outside_prefix"),
])
def test_outside_or_odd_uris_are_refused(tree, uri, code):
    assert _code(InputPolicy([str(tree / "in")]), uri.format(t=tree)) == code


def test_no_prefix_refuses_every_uri_job(tree):
    assert _code(InputPolicy([]), str(tree / "in" / "ok.jsonl")) == "input_outside_prefix"


def test_system_roots_stay_refused_under_a_wide_prefix():
    assert _code(InputPolicy(["/"]), "/dev/zero") == "input_outside_prefix"
    assert _code(InputPolicy(["/"]), "/proc/1/cmdline") == "input_outside_prefix"


@pytest.mark.parametrize(("uri", "ok"), [
    ("s3://bkt/in/x.jsonl", True), ("s3://bkt/in", True), ("s3://bkt/inside/x.jsonl", False),
    ("s3://bkt/in/../x.jsonl", False), ("s3://other/in/x.jsonl", False),
])
def test_s3_prefixes(uri, ok):
    policy = InputPolicy(["s3://bkt/in/"])
    if ok:
        assert policy.resolve(uri) == uri.rstrip("/")
    else:
        assert _code(policy, uri) == "input_outside_prefix"


def test_open_regular_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(JobError) as info:
        open_regular(str(fifo))  # a plain open() would block here for ever
    assert info.value.code == "input_unreadable"


def test_open_regular_refuses_folders_and_devices_and_reads_files(tmp_path):
    for path in (str(tmp_path), "/dev/null"):
        with pytest.raises(JobError) as info:
            open_regular(path)
        assert info.value.code == "input_unreadable"
    (tmp_path / "f").write_bytes(b"data")
    with open_regular(str(tmp_path / "f")) as fh:
        assert fh.read() == b"data"
    with pytest.raises(JobError) as info:
        open_regular(str(tmp_path / "missing"))
    assert info.value.code == "input_missing"
