"""Where bytes live: URIs, the allowed-prefix check, and object stores.

Three URI forms are accepted: a local path, a ``file://`` URI and ``s3://bucket/key``.
Local locations normalise to an absolute path without a scheme; S3 locations to
``s3://bucket/key`` with ``.``/``..`` segments folded. Writes are atomic in both stores
(temp file + ``os.replace`` locally, one ``PutObject`` on S3), which is what lets a
redelivered job overwrite its own output and never leave a partial or second copy.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import sys
from typing import BinaryIO, Callable, Protocol

import boto3
import botocore.config
import botocore.exceptions

from spotbatch.config import Environment
from spotbatch.errors import Disposition, classify
from spotbatch.retry import S3_RETRY
from spotbatch.s3_range import open_range_file
from spotbatch.uris import Location, check_under_prefix, join_uri, normalize_uri, parse_uri, path_under

__all__ = [
    "Location",
    "parse_uri",
    "normalize_uri",
    "join_uri",
    "check_under_prefix",
    "ObjectStore",
    "LocalStore",
    "S3Store",
    "store_for",
    "path_under",
]

class ObjectStore(Protocol):
    """The one seam for bytes at rest. Missing objects raise FileNotFoundError."""

    def read_bytes(self, uri: str) -> bytes: ...

    def write_atomic(self, uri: str, data: bytes, *, sync: bool = True) -> None:
        """Readers see the old object or the new one. ``sync=False``: durable against a
        process crash only, not a power cut (local files skip their fsyncs)."""
        ...

    def write_many(self, items: list[tuple[str, bytes]]) -> None:
        """Several atomic writes, all durable when it returns (stores may group the cost)."""
        ...

    def exists(self, uri: str) -> bool: ...


def _expect(uri: str, scheme: str) -> Location:
    loc = parse_uri(uri)
    if loc.scheme != scheme:
        raise ValueError(f"{uri!r} is not a {scheme} location")
    if not loc.path:
        raise ValueError(f"{uri!r} names a bucket, not an object")
    return loc


class LocalStore:
    """Local folders. Readers see the old file or the new one, never half of either."""

    def read_bytes(self, uri: str) -> bytes:
        with open(_expect(uri, "file").path, "rb") as fh:
            return fh.read()

    def exists(self, uri: str) -> bool:
        return os.path.isfile(_expect(uri, "file").path)

    def write_atomic(self, uri: str, data: bytes, *, sync: bool = True) -> None:
        path = _expect(uri, "file").path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _stage(path, data, fsync=sync)
        try:
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise
        if sync:
            _fsync_dir(os.path.dirname(path))  # makes the rename itself survive a power cut

    def write_many(self, items: list[tuple[str, bytes]]) -> None:
        """Atomic writes made durable together: small outputs are fsync-bound (a file
        fsync plus a folder fsync, ~5 ms here, per file), so a group of files is synced
        with one syncfs before its renames and one after (Linux; else fsync each)."""
        paths = [_expect(uri, "file").path for uri, _ in items]
        for folder in {os.path.dirname(path) for path in paths}:
            os.makedirs(folder, exist_ok=True)
        staged = []
        try:
            for path, (_, data) in zip(paths, items):
                staged.append((_stage(path, data, fsync=False), path))
            _sync_all([tmp for tmp, _ in staged])  # the data first: a rename must never expose an empty file
            for tmp, path in staged:
                os.replace(tmp, path)
        except BaseException:
            for tmp, _ in staged:
                _remove_quietly(tmp)
            raise
        _sync_all(sorted({os.path.dirname(path) for _, path in staged}))  # then the renames


_TEMP_SEQ = itertools.count()


def _stage(path: str, data: bytes, *, fsync: bool) -> str:
    """Write ``data`` to a new hidden temp file beside ``path`` (same folder: the rename
    stays on one file system) and return its name. The name is unique to this process
    (cheaper than mkstemp's random ones, as safe with O_EXCL); 0o600 as mkstemp makes."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{next(_TEMP_SEQ)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _remove_quietly(tmp)
        raise
    os.close(fd)
    return tmp


def _sync_all(paths: list[str]) -> None:
    """Make these files' (or folders') contents durable: one syncfs per file system
    they lie on where Linux has it, else one fsync each."""
    if _SYNCFS is not None:
        paths = list({os.stat(path).st_dev: path for path in paths}.values())
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            if _SYNCFS is None:
                os.fsync(fd)
            elif _SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
        finally:
            os.close(fd)


def _load_syncfs():
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    except OSError:
        return None


_SYNCFS = _load_syncfs() if sys.platform.startswith("linux") else None


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})


def _is_missing(exc: botocore.exceptions.ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in _MISSING_CODES


class S3Store:
    """S3 (or anything speaking its API, e.g. moto, MinIO). One PUT per object is atomic."""

    def __init__(self, endpoint_url: str | None = None, *, client=None) -> None:
        self.endpoint_url = endpoint_url or _env_endpoint()
        self._client = client if client is not None else _make_client(self.endpoint_url)

    def read_bytes(self, uri: str) -> bytes:
        loc = _expect(uri, "s3")
        try:
            return self._get(loc.bucket, loc.path)
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                raise FileNotFoundError(f"no such object: {uri}") from exc
            raise

    def exists(self, uri: str) -> bool:
        loc = _expect(uri, "s3")
        try:
            self._head(loc.bucket, loc.path)
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                return False
            raise
        return True

    def write_atomic(self, uri: str, data: bytes, *, sync: bool = True) -> None:
        loc = _expect(uri, "s3")  # a PUT is durable once acknowledged: sync changes nothing
        self._put(loc.bucket, loc.path, data)

    def write_many(self, items: list[tuple[str, bytes]]) -> None:
        for uri, data in items:  # each PUT is durable when acknowledged
            self.write_atomic(uri, data)

    def delete(self, uri: str) -> None:
        """Remove an object (the start-up probe's); a missing one is not an error on S3."""
        loc = _expect(uri, "s3")
        self._client.delete_object(Bucket=loc.bucket, Key=loc.path)

    def open_read(self, uri: str, *, refused: Callable[[Exception], Exception] | None = None) -> BinaryIO:
        """A seekable reader of the object that fetches it block by block (ranged GETs).

        Raises FileNotFoundError if it is missing. A GET that S3 refuses for good
        (PreconditionFailed once the object is replaced, AccessDenied, ...) raises
        ``refused(error)`` when given; transient faults raise as themselves.
        """
        loc = _expect(uri, "s3")
        try:
            head = self._head(loc.bucket, loc.path)
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                raise FileNotFoundError(f"no such object: {uri}") from exc
            raise
        etag = head.get("ETag")

        def fetch(start: int, stop: int) -> bytes:
            try:
                return self._get_range(loc.bucket, loc.path, etag, start, stop)
            except botocore.exceptions.ClientError as exc:
                if refused is None or classify(exc) is Disposition.RETRY:
                    raise
                raise refused(exc) from None

        return open_range_file(fetch, head["ContentLength"])

    @S3_RETRY
    def _get(self, bucket: str, key: str) -> bytes:
        # The body is read inside the retried call: a stream cut mid-way retries too.
        return self._client.get_object(Bucket=bucket, Key=key)["Body"].read()

    @S3_RETRY
    def _get_range(self, bucket: str, key: str, etag: str | None, start: int, stop: int) -> bytes:
        extra = {"IfMatch": etag} if etag else {}
        return self._client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}", **extra)["Body"].read()

    @S3_RETRY
    def _head(self, bucket: str, key: str) -> dict:
        return self._client.head_object(Bucket=bucket, Key=key)

    @S3_RETRY
    def _put(self, bucket: str, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=bucket, Key=key, Body=data)


def _env_endpoint() -> str | None:
    return Environment().aws_endpoint_url  # read per call: tests and moto set it late


def _make_client(endpoint_url: str | None):
    config = botocore.config.Config(
        retries={"mode": "standard", "max_attempts": 1},  # S3_RETRY is the only retry layer
        connect_timeout=10,
        read_timeout=60,
        # Custom endpoints (moto, MinIO) rarely resolve bucket subdomains.
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


_LOCAL = LocalStore()


def store_for(uri: str) -> ObjectStore:
    """The store for ``uri``'s scheme; S3 clients are built once per endpoint."""
    if parse_uri(uri).scheme == "s3":
        return _s3_store(_env_endpoint())
    return _LOCAL


@functools.lru_cache(maxsize=None)
def _s3_store(endpoint_url: str | None) -> S3Store:
    return S3Store(endpoint_url)
