"""Which input files a job may read, and opening them without trusting the job.

The jobs topic is shared, so a job's ``inputs.uri`` is hostile until proven otherwise:
it could name a key file, another team's bucket, a FIFO that blocks ``open()`` for
ever, or ``/dev/zero``. A worker reads URI inputs only under the operator's
``input_prefixes``; the URI is resolved first (``..``, percent-escapes, symlinks: the
target must lie inside too) and a local input must be a regular file. No byte of a
refused input is read, and no reason echoes anything from it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import BinaryIO

from spotbatch.errors import JobError
from spotbatch.storage import Location, parse_uri, path_under

__all__ = ["InputPolicy", "open_regular"]

# Never inputs, whatever the prefixes say: kernel and device files are not data.
_SYSTEM_ROOTS = [Location("file", "", root) for root in ("/proc", "/sys", "/dev")]


class InputPolicy:
    """The allowed input prefixes (local folders and/or ``s3://bucket/prefix/``)."""

    def __init__(self, prefixes: Sequence[str]) -> None:
        self._prefixes = [_resolved(parse_uri(p)) for p in prefixes]  # a bad prefix is a config error

    @property
    def prefixes(self) -> list[str]:
        return [p.uri for p in self._prefixes]

    def resolve(self, uri: str) -> str:
        """The resolved URI to read, or JobError; touches only metadata (realpath)."""
        if not self._prefixes:
            raise JobError("input_outside_prefix",
                           "this worker reads no URI inputs (its operator set no --input-prefix)")
        if any(c in uri for c in "?#"):  # a suffix like "#.jsonl" must not pass the format check
            raise JobError("input_invalid", "input URIs may not have a query or fragment part ('?' or '#')")
        try:
            loc = _resolved(parse_uri(uri))
        except ValueError as exc:
            raise JobError("input_invalid", str(exc)[:300]) from None
        if loc.scheme == "file" and _under_any(loc, _SYSTEM_ROOTS):
            raise JobError("input_outside_prefix", f"{_short(uri)}: system files are never inputs")
        if not _under_any(loc, self._prefixes):
            raise JobError("input_outside_prefix",
                           f"{_short(uri)} is not under an allowed input prefix ({', '.join(self.prefixes)})")
        return loc.uri


def open_regular(path: str) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file.

    ``O_NONBLOCK`` keeps a FIFO from blocking the open itself, and ``O_NOFOLLOW``
    refuses a final symlink swapped in after :meth:`InputPolicy.resolve` checked it.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise JobError("input_missing", f"{path}: no such file") from None
    except OSError as exc:
        raise JobError("input_unreadable", f"{path}: {exc.strerror or type(exc).__name__}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise JobError("input_unreadable", f"{path}: not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _resolved(loc: Location) -> Location:
    """Local paths with every symlink resolved; S3 keys are already folded by parse_uri."""
    if loc.scheme != "file":
        return loc
    return Location("file", "", os.path.realpath(loc.path))


def _under_any(loc: Location, prefixes: list[Location]) -> bool:
    sep = "/" if loc.scheme == "s3" else os.sep
    return any((loc.scheme, loc.bucket) == (p.scheme, p.bucket) and (p.path == "" or path_under(loc.path, p.path, sep))
               for p in prefixes)


def _short(uri: str, limit: int = 200) -> str:
    return uri if len(uri) <= limit else uri[:limit] + "..."
