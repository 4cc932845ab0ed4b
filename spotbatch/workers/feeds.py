"""URI jobs whose parts are read as the backlog has room.

One read per job is in flight at a time, oldest job first, so a job of any size holds
a few parts in memory. Owner thread only; the reads and the closes run on the I/O pool
(a read may still be running when its job is dropped).
"""

from __future__ import annotations

from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from kafka.structs import TopicPartition

from spotbatch.workers.parts import PartFeed

__all__ = ["Feed", "Feeds"]


@dataclass(eq=False)
class Feed:
    """A URI job's feed of parts; ``read``: the one in flight and the ``rows`` it brings."""

    feed: PartFeed
    read: Future | None = None
    rows: int = 0

    @property
    def tp(self) -> TopicPartition:
        record = self.feed.parent.record
        return TopicPartition(record.topic, record.partition)


class Feeds:
    def __init__(self, io: Executor, *, max_pending_rows: int) -> None:
        self._io, self._max_pending_rows = io, max_pending_rows
        self._feeds: list[Feed] = []

    def __len__(self) -> int:
        return len(self._feeds)

    @property
    def reading(self) -> bool:
        return any(f.read is not None for f in self._feeds)

    @property
    def rows(self) -> int:
        """Rows the reads in flight bring (they count toward the backlog already)."""
        return sum(f.rows for f in self._feeds)

    def add(self, feed: PartFeed) -> None:
        self._feeds.append(Feed(feed))

    def pull(self, backlog_rows: Callable[[], int]) -> None:
        """Start the next reads while the backlog has room for their rows."""
        for feed in self._feeds:
            if feed.read is not None or feed.feed.parent.failed or not feed.feed.parts_left:
                continue
            backlog, rows = backlog_rows(), feed.feed.next_rows
            if backlog and backlog + rows > self._max_pending_rows:
                return
            feed.rows, feed.read = rows, self._io.submit(feed.feed.read_next)

    def finished(self) -> Iterator[tuple[Feed, Future]]:
        """The feeds whose read is done, each with that read (taken off the feed)."""
        done: list[tuple[Feed, Future]] = []
        for feed in self._feeds:
            if feed.read is not None and feed.read.done():
                done.append((feed, feed.read))
        for feed, read in done:  # a list first: the caller may remove feeds as it goes
            feed.read, feed.rows = None, 0
            yield feed, read

    def remove(self, feed: Feed) -> None:
        self.drop(lambda f: f is feed)

    def drop(self, which: Callable[[Feed], bool]) -> None:
        """Stop reading these jobs' inputs."""
        dropped = [feed for feed in self._feeds if which(feed)]
        self._feeds = [feed for feed in self._feeds if feed not in dropped]
        for feed in dropped:
            self._io.submit(feed.feed.close)

    def parents(self) -> list[tuple[Any, TopicPartition]]:
        """(parted job, its partition) of every feed."""
        return [(feed.feed.parent, feed.tp) for feed in self._feeds]
