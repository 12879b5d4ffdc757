"""The bounded per-connection outbox.

Frames for one connection wait here until the next flush, which writes them all
in one system call; that is where a relay's time goes under fan-out (about
60% of every peer's CPU measured here is the kernel's ``write``). What a
connection holds is bounded in bytes: what waits here plus what its transport
still buffers. A client that does not keep up passes the bound and is
disconnected (close code :data:`wsrelay.codes.SLOW_CONSUMER`); a publisher
never waits for a subscriber, and nobody else notices.

The common case is one frame per flush (a steady trickle of publications), so
an idle or lightly used outbox holds no list at all: the first frame waits in a
slot of its own, and a list is made only when a second one joins it.

The transport's buffer is I/O state, so it is read through
:meth:`Outbox.measure_buffered` (a callable passed in, or a subclass's
override), and only when the cheap check fails. The cheap check uses an upper
bound kept without asking the transport: the buffer measured last, plus every
byte handed to the transport since (:meth:`Outbox.sent`); a transport's buffer
only shrinks between writes. With a 1 MiB limit and 100-byte frames, the
transport is asked about once every 10,000 frames instead of after every write.
"""

from __future__ import annotations

from collections.abc import Callable


class OutboxOverflow(Exception):
    """Raised by :meth:`Outbox.push` when the frame would pass the limit."""


class Outbox:
    """Frames waiting for one connection, bounded by ``limit`` bytes in all."""

    __slots__ = ("_buffered", "_first", "_frames", "_measure", "_pending", "limit")

    def __init__(self, limit: int, measure_buffered: Callable[[], int] | None = None) -> None:
        self.limit = limit
        self._measure = measure_buffered
        self._first: bytes | None = None  # the oldest frame queued, or None if empty
        self._frames: list[bytes] | None = None  # every frame queued, once there are two
        self._pending = 0
        self._buffered = 0  # upper bound of the transport's buffer; see the module doc

    def measure_buffered(self) -> int:
        """Bytes the transport holds now (not yet taken by the kernel)."""
        return self._measure() if self._measure is not None else 0

    def push(self, frame: bytes) -> bool:
        """Queue ``frame``. Returns True if the outbox was empty (schedule a flush).

        Raises:
            OutboxOverflow: queued plus buffered bytes would pass the limit.
        """
        size = self._pending + len(frame)
        if size + self._buffered > self.limit:
            self._buffered = self.measure_buffered()
            if size + self._buffered > self.limit:
                raise OutboxOverflow
        self._pending = size
        first = self._first
        if first is None:
            self._first = frame
            return True
        frames = self._frames
        if frames is None:
            self._frames = [first, frame]
        else:
            frames.append(frame)
        return False

    def take(self) -> list[bytes]:
        """Everything queued, oldest first; the outbox is empty afterwards."""
        first, frames = self.take_raw()
        if frames is not None:
            return frames
        return [] if first is None else [first]

    def take_raw(self) -> tuple[bytes | None, list[bytes] | None]:
        """Like :meth:`take`, without making a list: ``(None, None)`` if empty,
        ``(frame, None)`` for one frame, ``(first, all_frames)`` for several."""
        first, frames = self._first, self._frames
        self._first = self._frames = None
        self._pending = 0
        return first, frames

    def sent(self, size: int) -> None:
        """Record that ``size`` more bytes were handed to the transport: the
        bound on its buffer grows by as much, without asking it."""
        self._buffered += size

    def written(self, buffered: int) -> None:
        """Record how much the transport buffers, measured after a write."""
        self._buffered = buffered

    @property
    def pending_bytes(self) -> int:
        return self._pending

    def __len__(self) -> int:
        if self._frames is not None:
            return len(self._frames)
        return 0 if self._first is None else 1
