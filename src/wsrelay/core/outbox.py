"""The bounded per-connection outbox.

Frames for one connection wait here until the next flush, which writes them all
in one system call; that is where a relay's time goes under fan-out (about
60% of every peer's CPU measured here is the kernel's ``write``). What a
connection holds is bounded in bytes: what waits here plus what its transport
still buffers. A client that does not keep up passes the bound and is
disconnected (close code :data:`wsrelay.codes.SLOW_CONSUMER`); a publisher
never waits for a subscriber, and nobody else notices.

The transport's buffer is I/O state, so it is read through a callable passed
in, and only when the cheap check fails: the count from the last flush is an
upper bound, because a transport's buffer only shrinks between writes.
"""

from __future__ import annotations

from collections.abc import Callable


class OutboxOverflow(Exception):
    """Raised by :meth:`Outbox.push` when the frame would pass the limit."""


class Outbox:
    """Frames waiting for one connection, bounded by ``limit`` bytes in all."""

    __slots__ = ("_buffered", "_frames", "_measure", "_pending", "limit")

    def __init__(self, limit: int, measure_buffered: Callable[[], int]) -> None:
        self.limit = limit
        self._measure = measure_buffered
        self._frames: list[bytes] = []
        self._pending = 0
        self._buffered = 0  # transport's buffer at the last write: an upper bound since

    def push(self, frame: bytes) -> bool:
        """Queue ``frame``. Returns True if the outbox was empty (schedule a flush).

        Raises:
            OutboxOverflow: queued plus buffered bytes would pass the limit.
        """
        size = self._pending + len(frame)
        if size + self._buffered > self.limit:
            self._buffered = self._measure()
            if size + self._buffered > self.limit:
                raise OutboxOverflow
        self._frames.append(frame)
        self._pending = size
        return len(self._frames) == 1

    def take(self) -> list[bytes]:
        """Everything queued, oldest first; the outbox is empty afterwards."""
        frames = self._frames
        self._frames = []
        self._pending = 0
        return frames

    def written(self, buffered: int) -> None:
        """Record how much the transport still buffers after a write."""
        self._buffered = buffered

    @property
    def pending_bytes(self) -> int:
        return self._pending

    def __len__(self) -> int:
        return len(self._frames)
