"""One WebSocket connection as a :class:`~wsrelay.core.registry.Sink`, and the flusher.

:class:`Connection` is the fan-out's side of a connection: the outbox, the
flush and the start of the close. :class:`wsrelay.server.native.NativeConnection`,
the driver every WebSocket runs on, says how a close is sent.

Fan-out only appends frames to outboxes. Once per event-loop pass the
:class:`Flusher` writes each dirty connection's frames with one transport call,
so a burst of publications costs one system call per connection, not one per
message. Frames go straight to the connection's transport: they are complete
WebSocket frames built once per publication (no compression is negotiated, so
the bytes are the same for every client), and each driver's own writes are
whole frames too (pongs, pings, the close frame), so frames never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from websockets.frames import Frame, Opcode

from wsrelay import codes
from wsrelay.core.outbox import Outbox, OutboxOverflow
from wsrelay.server.logs import log_closed, log_opened

if TYPE_CHECKING:
    from wsrelay.core.registry import Client
    from wsrelay.core.session import Closed, Session
    from wsrelay.errors import RelayError
    from wsrelay.relay import Relay
    from wsrelay.server.metrics import Metrics

log = logging.getLogger("wsrelay.server")

CLOSE_TIMEOUT = 5.0
"""Seconds a closing connection gets to answer the close frame before it is dropped."""

EARLY_FLUSH_BYTES = 64 * 1024
"""Queued bytes past which a connection is written at once rather than at the end of
the event-loop pass. One pass can queue a lot for one client (32 batch publishes of
1000 messages landing together is 3 MB); written as it is made, most of it goes to
the kernel, and the outbox limit measures what the client has not read rather than
what one pass produced. 64 KiB per write keeps the system calls as few as ever."""


def frame_text(payload: bytes) -> bytes:
    """An unmasked, uncompressed WebSocket text frame carrying ``payload``."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False)


def unframe(frame: bytes) -> bytes:
    """The payload of a frame made by :func:`frame_text` (its inverse): for a transport
    that carries the fan-out's frames otherwise (SSE)."""
    size = frame[1] & 0x7F
    return frame[2 + (2 if size == 126 else 8 if size == 127 else 0) :]


def opened(metrics: Metrics, relay: Relay, client: Client, raw: bool, peer: str | None) -> None:
    """A connection is open (its 101, or its event stream's head, written), on any
    transport: logged, counted, and told to the relay (the ``connected`` webhook)."""
    log_opened(metrics, client, raw, peer)
    relay.connection_opened(client)


def closed(metrics: Metrics, relay: Relay, client: Client, record: Closed) -> None:
    """A connection :func:`opened` announced has ended: logged, counted, and told to the
    relay (the ``disconnected`` webhook, with the code)."""
    log_closed(metrics, client, record)
    relay.connection_closed(client, record.code, record.reason, record.by)


async def attach(connection: Connection, relay: Relay, session: Session) -> RelayError | None:
    """Attach ``connection`` to its session's client before the client is answered (the
    101, the SSE stream's head), so that a broker failure is still an HTTP answer (503
    with ``Retry-After``). What is published meanwhile waits in the outbox
    (:attr:`Connection.held`). Returns the error to refuse with, if any."""
    connection.raw = session.raw
    connection.held = True
    try:
        await relay.attach(session.client, connection, hold=session.recover)
    except Exception as exc:
        refusal = session.refusal(exc)
    else:
        if not connection.closing:
            return None
        refusal = session.closed_before_open()  # replaced or unregistered meanwhile
    with contextlib.suppress(Exception):  # its own failure is the one reported
        await relay.detach(session.client, connection)
    return refusal


MAX_FLUSH_PASSES = 4
"""Event-loop passes the :class:`Flusher` may wait, while publications keep coming,
before it writes what is queued."""


class Flusher:
    """Writes every connection that has queued frames, once the publications stop coming.

    It writes in the first event-loop pass that brought no new publication (``progress``
    unchanged), and at the latest :data:`MAX_FLUSH_PASSES` passes after the first frame was
    queued. Under a burst the publications of several passes then go out in one write per
    connection, and a write costs the kernel about the same for one frame or twenty: the
    burst's CPU per delivery falls by 40% (docs/decisions/0013). A lone publication waits
    one more pass, which comes at once: with callbacks ready, the loop's poll does not wait.
    """

    __slots__ = ("_dirty", "_loop", "_passes", "_progress", "_scheduled", "_seen")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, progress: Callable[[], int] | None = None
    ) -> None:
        """``progress``: a count that grows with every publication handed to connections
        (:attr:`wsrelay.relay.Relay.delivered`); without it, every pass is written."""
        self._loop = loop
        self._progress = progress
        self._dirty: list[Connection] = []
        self._scheduled = False
        self._passes = 0
        self._seen = 0

    def schedule(self, connection: Connection) -> None:
        self._dirty.append(connection)
        if not self._scheduled:
            self._scheduled = True
            self._passes = 0
            self._seen = -1
            self._loop.call_soon(self._pass)

    def _pass(self) -> None:
        progress = self._progress
        if progress is not None and self._passes < MAX_FLUSH_PASSES - 1:
            seen = progress()
            if seen != self._seen:  # publications came in the last pass: more may follow
                self._seen = seen
                self._passes += 1
                self._loop.call_soon(self._pass)
                return
        self._flush()

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        for connection in dirty:
            connection.flush()


class ConnectionStats:
    """Counters every connection of one app adds to; read by ``GET /metrics``.

    Plain integers, bumped once per flush (not per frame) on the hot path.
    """

    __slots__ = ("bytes_sent", "frames_sent", "slow_consumers")

    def __init__(self) -> None:
        self.frames_sent = 0
        self.bytes_sent = 0
        self.slow_consumers = 0


class Connection(Outbox):
    """The server side of one client's WebSocket, and its outbox.

    It *is* its :class:`~wsrelay.core.outbox.Outbox` (a subclass, not a member):
    one object per connection instead of three (outbox, bound method, list), and
    one attribute lookup less per frame. A driver subclasses it to say how a
    close is sent (:meth:`_send_close`), and calls :meth:`_ended` when it is over.
    """

    __slots__ = ("_closed", "_flusher", "_stats", "_transport", "_waiter", "closing", "held", "raw")

    def __init__(
        self,
        transport: asyncio.Transport,
        *,
        raw: bool,
        outbox_limit: int,
        flusher: Flusher,
        stats: ConnectionStats | None = None,
    ) -> None:
        super().__init__(outbox_limit)
        self.raw = raw
        self.closing = False
        self.held = False
        """Frames wait in the outbox, unwritten: the handshake is not answered yet."""
        self._transport = transport
        self._flusher = flusher
        self._stats = stats if stats is not None else ConnectionStats()
        self._closed = False  # everything after the connection ended is done
        self._waiter: asyncio.Future[None] | None = None

    def measure_buffered(self) -> int:
        return self._transport.get_write_buffer_size()

    def send(self, frame: bytes) -> bool:
        if self.closing:
            return False
        try:
            first = self.push(frame)
        except OutboxOverflow:
            self._stats.slow_consumers += 1
            self.close(codes.SLOW_CONSUMER, "slow consumer: outbox limit exceeded", flush=False)
            return False
        if first:
            self._flusher.schedule(self)
        elif self._pending >= EARLY_FLUSH_BYTES:
            self.flush()  # still scheduled: that flush finds nothing, or what came since
        return True

    def flush(self) -> None:
        if self.held:  # written once the 101 is (nothing may precede it on the wire)
            return
        # Outbox.take_raw() inlined: this runs once per connection per publication.
        first, frames, size = self._first, self._frames, self._pending
        self._first = self._frames = None
        self._pending = 0
        transport = self._transport
        if first is None or self.closing or transport.is_closing():
            return
        if frames is None:
            transport.write(first)
            count = 1
        else:
            transport.writelines(frames)
            count = len(frames)
        self._buffered += size  # an upper bound; measured only when it nears the limit
        stats = self._stats
        stats.frames_sent += count
        stats.bytes_sent += size

    def buffered_bytes(self) -> int:
        """Bytes waiting for this client: queued here plus held by the transport."""
        if self._transport.is_closing():
            return self._pending
        return self._pending + self._transport.get_write_buffer_size()

    def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Close with ``code`` in the background. What is queued is written
        first if ``flush`` (a client that keeps up then misses nothing that was
        accepted before the close), else dropped (a slow consumer's)."""
        if self.closing:
            return
        if flush:
            self.flush()
        self.closing = True
        self.take_raw()
        self._send_close(code, reason)

    def heartbeat(self, ping: bool) -> None:
        """Called by the keep-alive sweep (``native.keep_alive``) every half ping interval:
        send a ping (``ping``), or drop the connection if nothing came since the
        last one. Nothing here: a driver without keep-alive of its own overrides it."""

    def _send_close(self, code: int, reason: str) -> None:
        """Send the close frame (``reason`` may need cutting to fit) and see it through."""
        raise NotImplementedError

    async def wait_closed(self) -> None:
        """Return once the connection has closed (after :meth:`close`) and the driver has
        done everything that follows (:meth:`_ended`)."""
        if self._closed:
            return
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._waiter)

    def _ended(self) -> None:
        """Called by the driver once the connection is over and accounted for."""
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
