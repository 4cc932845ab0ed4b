"""Locations: parse, normalise and join local paths, file:// and s3:// URIs, and check
that one lies under a prefix. Pure string and path work, no boto3: settings and job
checks use it without loading the stores (spotbatch.storage re-exports all of it)."""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from spotbatch.errors import JobError

__all__ = ["Location", "parse_uri", "normalize_uri", "join_uri", "check_under_prefix", "path_under"]

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_SCHEME_ONE_SLASH_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:/")


@dataclass(frozen=True)
class Location:
    """A parsed, normalised location. ``bucket`` is empty for local paths."""

    scheme: str  # "file" or "s3"
    bucket: str
    path: str  # absolute local path, or the S3 key (may be "" for a whole bucket)

    @property
    def uri(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.path}"
        return self.path


def parse_uri(uri: str) -> Location:
    """Parse and normalise ``uri``; raise ValueError for anything we cannot store to."""
    if not isinstance(uri, str) or not uri or "\x00" in uri:
        raise ValueError(f"not a usable URI: {uri!r}")
    if _SCHEME_ONE_SLASH_RE.match(uri) and "://" not in uri:
        # "s3:/b/k" is a typo, not a relative folder named "s3:".
        raise ValueError(f"malformed URI {uri!r} (expected scheme://...)")
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "s3":
        return _parse_s3(uri)
    if scheme == "file":
        return _parse_file_uri(uri)
    if scheme:
        raise ValueError(f"unsupported URI scheme {scheme!r} in {uri!r} (use a path, file:// or s3://)")
    return Location("file", "", os.path.abspath(uri))  # abspath also normpaths


def _parse_s3(uri: str) -> Location:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise ValueError(f"invalid S3 bucket name {bucket!r} in {uri!r}")
    if _escapes_bucket(key):
        raise ValueError(f"S3 key climbs above the bucket in {uri!r}")
    # Fold "." and ".." so "s3://b/out/../x" cannot pass a check on "s3://b/out".
    key = posixpath.normpath("/" + key).lstrip("/") if key.strip("/") else ""
    return Location("s3", bucket, key)


def _escapes_bucket(raw_key: str) -> bool:
    depth = 0
    for part in raw_key.split("/"):
        depth += -1 if part == ".." else (0 if part in ("", ".") else 1)
        if depth < 0:
            return True
    return False


def _parse_file_uri(uri: str) -> Location:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file URI names a remote host {parts.netloc!r}: {uri!r}")
    # Decode before normalising, so "%2e%2e" cannot smuggle a ".." past normpath.
    path = unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise ValueError(f"file URI must hold an absolute path: {uri!r}")
    return Location("file", "", os.path.normpath(path))


def normalize_uri(uri: str) -> str:
    return parse_uri(uri).uri


def join_uri(base: str, name: str) -> str:
    """``base`` + "/" + ``name``, normalised (so a ``..`` in ``name`` is folded, not kept)."""
    loc = parse_uri(base)
    if loc.scheme == "s3":
        key = f"{loc.path.rstrip('/')}/{name}" if loc.path else name
        return normalize_uri(f"s3://{loc.bucket}/{key}")
    return normalize_uri(os.path.join(loc.path, name))


def check_under_prefix(uri: str, allowed_prefix: str) -> str:
    """Return the normalised ``uri`` if it lies at or under ``allowed_prefix``.

    Raises JobError("output_outside_prefix") otherwise: other scheme, other bucket,
    a ``..`` escape, a look-alike sibling ("/out" vs "/outside"), or a symlinked
    parent folder that points outside the prefix.
    """
    prefix = parse_uri(allowed_prefix)  # a bad prefix is a config error: ValueError
    try:
        loc = parse_uri(uri)
    except ValueError as exc:
        raise JobError("output_outside_prefix", str(exc)) from None
    if not _is_under(loc, prefix):
        raise JobError(
            "output_outside_prefix",
            f"{uri!r} is not under the allowed output prefix {prefix.uri!r}",
        )
    return loc.uri


def _is_under(loc: Location, prefix: Location) -> bool:
    if (loc.scheme, loc.bucket) != (prefix.scheme, prefix.bucket):
        return False
    if loc.scheme == "s3":
        return prefix.path == "" or path_under(loc.path, prefix.path, "/")
    if not path_under(loc.path, prefix.path, os.sep):
        return False
    if loc.path == prefix.path or os.path.dirname(loc.path) == prefix.path.rstrip(os.sep):
        return True  # the prefix itself, or a name right in it (the usual output): nothing to resolve
    # Resolve symlinks in the parent only: os.replace swaps the final name itself.
    real = os.path.join(os.path.realpath(os.path.dirname(loc.path)), os.path.basename(loc.path))
    return path_under(real, os.path.realpath(prefix.path), os.sep)


def path_under(path: str, prefix: str, sep: str) -> bool:
    # Compare whole segments: "/outside" must not count as under "/out".
    return path == prefix or path.startswith(prefix.rstrip(sep) + sep)
