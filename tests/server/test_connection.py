"""Unit tests of the connection's write path (server/connection.py) with a
transport that records writes; the real sockets are in test_ws.py and
test_slow_consumer.py."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from wsrelay import codes
from wsrelay.server.connection import EARLY_FLUSH_BYTES, MAX_FLUSH_PASSES, Connection, Flusher


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.buffered = 0

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def writelines(self, frames: list[bytes]) -> None:
        self.writes.append(b"".join(frames))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered


class RecordingConnection(Connection):
    __slots__ = ("closes",)

    def __init__(self, transport: RecordingTransport, flusher: Flusher, limit: int) -> None:
        super().__init__(cast(Any, transport), raw=True, outbox_limit=limit, flusher=flusher)
        self.closes: list[int] = []

    def _send_close(self, code: int, reason: str) -> None:
        self.closes.append(code)


async def test_frames_of_one_pass_go_out_in_one_write() -> None:
    transport = RecordingTransport()
    connection = RecordingConnection(transport, Flusher(asyncio.get_running_loop()), 1 << 20)
    for i in range(10):
        assert connection.send(b"frame %d;" % i)
    assert transport.writes == []  # nothing before the end of the pass
    await asyncio.sleep(0)  # one event-loop pass
    assert transport.writes == [b"".join(b"frame %d;" % i for i in range(10))]


async def passes_until_written(transport: RecordingTransport, each_pass: Any = None) -> int:
    passes = 0
    while not transport.writes:
        assert passes < 100
        if each_pass is not None:
            each_pass()
        await asyncio.sleep(0)  # one event-loop pass
        passes += 1
    return passes


async def test_a_lone_publication_is_written_one_pass_later() -> None:
    """With nothing more coming, the flusher waits one pass (which the loop runs at once)."""
    delivered = [1]
    transport = RecordingTransport()
    flusher = Flusher(asyncio.get_running_loop(), lambda: delivered[0])
    connection = RecordingConnection(transport, flusher, 1 << 20)
    assert connection.send(b"one")
    assert await passes_until_written(transport) == 2
    assert transport.writes == [b"one"]


async def test_a_burst_is_joined_over_passes_then_written_within_the_bound() -> None:
    """While every pass brings a publication, frames wait, up to MAX_FLUSH_PASSES passes;
    what those passes queued goes out in one write."""
    delivered = [0]
    transport = RecordingTransport()
    flusher = Flusher(asyncio.get_running_loop(), lambda: delivered[0])
    connection = RecordingConnection(transport, flusher, 1 << 20)

    def publish() -> None:
        delivered[0] += 1
        assert connection.send(b"m%d;" % delivered[0])

    publish()
    assert await passes_until_written(transport, publish) == MAX_FLUSH_PASSES
    assert len(transport.writes) == 1
    # The first publication, and one before each pass.
    assert transport.writes[0] == b"".join(b"m%d;" % i for i in range(1, MAX_FLUSH_PASSES + 2))


async def test_a_pass_that_queues_more_than_the_early_flush_size_writes_as_it_goes() -> None:
    """A burst larger than the outbox limit, made in one pass, is not a slow consumer:
    it is written in EARLY_FLUSH_BYTES pieces, and the limit counts what stays unread."""
    transport = RecordingTransport()
    limit = 4 * EARLY_FLUSH_BYTES
    connection = RecordingConnection(transport, Flusher(asyncio.get_running_loop()), limit)
    frame = b"x" * 1000
    total = 3 * limit  # three times the limit, in one pass, to a client that reads it all
    for _ in range(total // len(frame)):
        assert connection.send(frame)
    assert connection.closes == []
    assert all(len(write) <= EARLY_FLUSH_BYTES + len(frame) for write in transport.writes)
    await asyncio.sleep(0)
    assert sum(map(len, transport.writes)) == total - total % len(frame)


async def test_a_client_whose_transport_fills_is_still_a_slow_consumer() -> None:
    transport = RecordingTransport()
    limit = 4 * EARLY_FLUSH_BYTES
    connection = RecordingConnection(transport, Flusher(asyncio.get_running_loop()), limit)
    transport.buffered = limit  # the kernel took nothing: everything waits in the transport
    sent = [connection.send(b"x" * 1000) for _ in range(3 * limit // 1000)]
    assert False in sent
    assert connection.closes == [codes.SLOW_CONSUMER]


async def test_a_close_writes_what_was_accepted_before_it() -> None:
    """Frames wait for a later pass (the flusher joins a burst's passes); a close in the
    meantime (unregistered, replaced, banned, shutting down) writes them first."""
    transport = RecordingTransport()
    connection = RecordingConnection(transport, Flusher(asyncio.get_running_loop()), 1 << 20)
    assert connection.send(b"accepted;")
    connection.close(codes.NORMAL, "unregistered")
    assert transport.writes == [b"accepted;"]
    assert connection.closes == [codes.NORMAL]
    assert not connection.send(b"after the close")
    await asyncio.sleep(0)
    assert transport.writes == [b"accepted;"]
