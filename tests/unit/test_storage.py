"""storage: URI normalisation, the allowed-prefix check, local and S3 stores, retries."""

from __future__ import annotations

import os

import botocore.exceptions
import pytest

from spotbatch import storage
from spotbatch.errors import JobError
from spotbatch.storage import (
    LocalStore,
    S3Store,
    check_under_prefix,
    join_uri,
    normalize_uri,
    parse_uri,
    store_for,
)
from spotbatch.testing.store import MemoryStore
from tests.fixtures_s3 import s3_bucket, s3_client, s3_endpoint  # noqa: F401


# -- URIs ---------------------------------------------------------------------------


def test_normalize_local_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_uri("a/b/../c.parquet") == str(tmp_path / "a" / "c.parquet")
    assert normalize_uri("file:///data/x/./y") == "/data/x/y"
    assert normalize_uri("file://localhost/data/%2e%2e/y") == "/y"


def test_normalize_s3_folds_dots_and_slashes():
    assert normalize_uri("s3://bkt/a/./b//c") == "s3://bkt/a/b/c"
    assert normalize_uri("s3://bkt/a/../c") == "s3://bkt/c"
    assert parse_uri("s3://bkt").path == ""


@pytest.mark.parametrize(
    "bad",
    ["gs://bkt/x", "s3:/bkt/x", "s3://Bad_Bucket/x", "s3://bkt/../x", "file://otherhost/x", ""],
)
def test_parse_rejects_unusable_uris(bad):
    with pytest.raises(ValueError):
        parse_uri(bad)


def test_join_uri():
    assert join_uri("s3://bkt/out/", "j.parquet") == "s3://bkt/out/j.parquet"
    assert join_uri("s3://bkt", "j.parquet") == "s3://bkt/j.parquet"
    assert join_uri("/out", "j.parquet") == "/out/j.parquet"


# -- check_under_prefix -------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "prefix", "expected"),
    [
        ("/out/a/j.parquet", "/out", "/out/a/j.parquet"),
        ("/out/j.parquet", "/out/", "/out/j.parquet"),
        ("file:///out/j.parquet", "/out", "/out/j.parquet"),
        ("/out/a/../j.parquet", "file:///out", "/out/j.parquet"),
        ("/out", "/out", "/out"),
        ("s3://bkt/out/j.parquet", "s3://bkt/out", "s3://bkt/out/j.parquet"),
        ("s3://bkt/out/x/../j.parquet", "s3://bkt/out/", "s3://bkt/out/j.parquet"),
        ("s3://bkt/anything/j.parquet", "s3://bkt", "s3://bkt/anything/j.parquet"),
    ],
)
def test_under_prefix_accepts_and_normalises(uri, prefix, expected):
    assert check_under_prefix(uri, prefix) == expected


@pytest.mark.parametrize(
    ("uri", "prefix"),
    [
        ("/out/../etc/passwd", "/out"),  # traversal
        ("/out/a/../../etc/x", "/out"),
        ("file:///out/%2e%2e/etc/x", "/out"),  # encoded traversal
        ("/outside/j.parquet", "/out"),  # string-prefix look-alike
        ("/out-2/j.parquet", "/out/"),
        ("/", "/out"),
        ("s3://bkt/outside/j.parquet", "s3://bkt/out"),  # look-alike key
        ("s3://bkt/out/../secret/j.parquet", "s3://bkt/out"),
        ("s3://bkt/../other/j.parquet", "s3://bkt/out"),  # climbs above the bucket
        ("s3://other/out/j.parquet", "s3://bkt/out"),  # other bucket
        ("s3://bkt-evil/out/j.parquet", "s3://bkt"),  # look-alike bucket
        ("s3://bkt/out/j.parquet", "/out"),  # scheme mismatch
        ("/out/j.parquet", "s3://bkt/out"),
        ("gs://bkt/out/j.parquet", "s3://bkt/out"),  # unsupported scheme
        ("file://evil.example/out/j", "/out"),
    ],
)
def test_under_prefix_rejects(uri, prefix):
    with pytest.raises(JobError) as info:
        check_under_prefix(uri, prefix)
    assert info.value.code == "output_outside_prefix"


def test_under_prefix_rejects_symlinked_parent_escaping(tmp_path):
    root, secret = tmp_path / "out", tmp_path / "secret"
    root.mkdir()
    secret.mkdir()
    (root / "link").symlink_to(secret)
    with pytest.raises(JobError) as info:
        check_under_prefix(str(root / "link" / "j.parquet"), str(root))
    assert info.value.code == "output_outside_prefix"
    # A symlinked root itself is fine: both sides resolve alike.
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    assert check_under_prefix(str(alias / "j.parquet"), str(alias)) == str(alias / "j.parquet")


def test_bad_allowed_prefix_is_a_config_error():
    with pytest.raises(ValueError):
        check_under_prefix("/out/x", "ftp://host/out")


# -- LocalStore ---------------------------------------------------------------------


def test_local_write_creates_folders_and_overwrites_without_leftovers(tmp_path):
    store = LocalStore()
    target = tmp_path / "deep" / "er" / "j.parquet"
    store.write_atomic(str(target), b"first")
    store.write_atomic(f"file://{target}", b"second")
    assert store.read_bytes(str(target)) == b"second"
    assert os.listdir(target.parent) == ["j.parquet"]  # no temp file left behind
    assert store.exists(str(target)) and not store.exists(str(tmp_path / "nope"))


def test_local_write_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    store = LocalStore()
    target = tmp_path / "j.parquet"
    store.write_atomic(str(target), b"old")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        store.write_atomic(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["j.parquet"]


def test_local_missing_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        LocalStore().read_bytes(str(tmp_path / "missing.bin"))


def test_local_store_refuses_s3_uris():
    with pytest.raises(ValueError):
        LocalStore().read_bytes("s3://bkt/x")


def test_memory_store_round_trip_and_missing():
    store = MemoryStore()
    store.write_atomic("s3://bkt/a/../b", b"x")
    assert store.read_bytes("s3://bkt/b") == b"x" and store.exists("s3://bkt/b")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("s3://bkt/c")


# -- S3Store against moto over HTTP ---------------------------------------------------


def test_s3_write_read_exists_overwrite(s3_bucket, s3_client):
    store = store_for(f"s3://{s3_bucket}/x")
    uri = f"s3://{s3_bucket}/out/j.bin"
    assert not store.exists(uri)
    store.write_atomic(uri, b"one")
    store.write_atomic(uri, b"two")
    assert store.read_bytes(uri) == b"two" and store.exists(uri)
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["out/j.bin"]


def test_s3_missing_key_and_bucket_raise_file_not_found(s3_bucket):
    store = store_for(f"s3://{s3_bucket}/x")
    with pytest.raises(FileNotFoundError):
        store.read_bytes(f"s3://{s3_bucket}/nope")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("s3://no-such-bucket-here/nope")


def test_store_for_caches_s3_client_and_picks_local(s3_endpoint, tmp_path):
    a, b = store_for("s3://bkt/a"), store_for("s3://other/b")
    assert a is b and isinstance(a, S3Store) and a.endpoint_url == s3_endpoint
    assert isinstance(store_for(str(tmp_path / "x")), LocalStore)
    assert isinstance(store_for("file:///tmp/x"), LocalStore)


def test_explicit_endpoint_wins_over_env(s3_endpoint, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens here
    store = S3Store(endpoint_url=s3_endpoint)
    store.write_atomic(f"s3://{s3_bucket}/e.bin", b"ok")
    assert store.read_bytes(f"s3://{s3_bucket}/e.bin") == b"ok"


# -- the retry policy -----------------------------------------------------------------


class _Body:
    def __init__(self, data):
        self._data = data

    def read(self):
        return self._data


class _FlakyClient:
    """Raises the queued errors in order, then succeeds."""

    def __init__(self, errors):
        self.errors = list(errors)
        self.calls = 0

    def get_object(self, Bucket, Key):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return {"Body": _Body(b"payload")}


def _client_error(code, status):
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


@pytest.fixture
def no_sleep(monkeypatch):
    monkeypatch.setattr(S3Store._get.retry, "sleep", lambda seconds: None)


def test_retry_on_connection_and_throttling_errors(no_sleep):
    client = _FlakyClient([
        botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"),
        _client_error("SlowDown", 503),
        botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"),
    ])
    assert S3Store(client=client).read_bytes("s3://bkt/k") == b"payload"
    assert client.calls == 4


def test_retry_gives_up_and_reraises_original(no_sleep):
    errors = [botocore.exceptions.EndpointConnectionError(endpoint_url="http://x")] * 20
    client = _FlakyClient(errors)
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        S3Store(client=client).read_bytes("s3://bkt/k")
    assert client.calls == 12  # S3_RETRY max_attempts


@pytest.mark.parametrize(("code", "status", "raised"), [
    ("NoSuchKey", 404, FileNotFoundError),
    ("AccessDenied", 403, botocore.exceptions.ClientError),
])
def test_no_retry_on_permanent_errors(no_sleep, code, status, raised):
    client = _FlakyClient([_client_error(code, status)])
    with pytest.raises(raised):
        S3Store(client=client).read_bytes("s3://bkt/k")
    assert client.calls == 1


def test_local_write_many_writes_every_file_atomically(tmp_path, monkeypatch):
    from spotbatch import storage

    synced = []
    real = storage._sync_all
    monkeypatch.setattr(storage, "_sync_all", lambda paths: synced.append(list(paths)) or real(paths))
    items = [(str(tmp_path / "a" / f"j{i}.parquet"), f"data {i}".encode()) for i in range(50)]
    items.append((str(tmp_path / "b" / "k.parquet"), b"other folder"))
    storage.LocalStore().write_many(items)
    for uri, data in items:
        assert open(uri, "rb").read() == data
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    # the group costs two sync rounds (data, then renames), not two fsyncs per file
    assert len(synced) == 2 and sorted(synced[1]) == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_local_write_many_leaves_no_temp_file_when_it_fails(tmp_path):
    from spotbatch.storage import LocalStore

    (tmp_path / "taken").write_text("a file where a folder is needed")
    with pytest.raises(OSError):
        LocalStore().write_many([(str(tmp_path / "ok.parquet"), b"x"), (str(tmp_path / "taken" / "f"), b"y")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
