"""A seekable, read-only file over one S3 object, fetched block by block in ranged GETs.

pyarrow reads a Parquet footer and single row groups through it, and the JSONL reader
streams lines through it, so a job's input is never downloaded whole: memory holds one
block. Every GET names the ETag seen when the file was opened, so an object replaced
while a job reads it fails that job instead of mixing two versions' rows.
"""

from __future__ import annotations

import io
from typing import Callable

__all__ = ["RangeFile", "open_range_file", "BLOCK_BYTES"]

BLOCK_BYTES = 4 * 1024 * 1024  # one GET; a few open inputs hold a few blocks

# fetch(start, stop) -> the object's bytes [start, stop); retried and mapped by the caller.
Fetch = Callable[[int, int], bytes]


class RangeFile(io.RawIOBase):
    """Raw file over ``size`` bytes served by ``fetch``; wrap in io.BufferedReader."""

    def __init__(self, fetch: Fetch, size: int) -> None:
        super().__init__()
        self._fetch, self._size, self._pos = fetch, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        stop = min(self._size, self._pos + len(buffer))
        if stop <= self._pos:
            return 0
        data = self._fetch(self._pos, stop)
        n = len(data)
        memoryview(buffer)[:n] = data
        self._pos += n
        return n


def open_range_file(fetch: Fetch, size: int) -> io.BufferedReader:
    return io.BufferedReader(RangeFile(fetch, size), buffer_size=BLOCK_BYTES)
