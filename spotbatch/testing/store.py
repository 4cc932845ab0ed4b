"""An in-memory ObjectStore, for unit tests of code that takes one (sinks, attempts)."""

from __future__ import annotations

import threading

from spotbatch.storage import normalize_uri

__all__ = ["MemoryStore"]


class MemoryStore:
    """In-memory store for unit tests of code that takes an ObjectStore."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def read_bytes(self, uri: str) -> bytes:
        try:
            return self.objects[normalize_uri(uri)]
        except KeyError:
            raise FileNotFoundError(f"no such object: {uri}") from None

    def write_atomic(self, uri: str, data: bytes, *, sync: bool = True) -> None:
        with self._lock:
            self.objects[normalize_uri(uri)] = bytes(data)

    def write_many(self, items: list[tuple[str, bytes]]) -> None:
        for uri, data in items:
            self.write_atomic(uri, data)

    def exists(self, uri: str) -> bool:
        return normalize_uri(uri) in self.objects
