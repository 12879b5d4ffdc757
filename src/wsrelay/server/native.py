"""The WebSocket driver for connections that ``wsrelay serve`` accepts itself.

Why it exists: with aiohttp serving a WebSocket, every idle connection keeps
aiohttp's whole HTTP request alive (the request handler, the parsed request,
two tasks and the coroutine frames of the middleware chain), about 15 KiB per
connection before the relay adds anything (docs/decisions/0003). Here a
connection is one :class:`NativeConnection`: an ``asyncio.Protocol`` that is
also its outbox, plus the ``websockets`` library's sans-I/O
:class:`~websockets.server.ServerProtocol`, which parses the handshake and every
frame, answers pings and runs the closing handshake. No task or coroutine lives
as long as the connection; the transport calls back, and a task exists only
while a handshake or a command waits for the relay (docs/decisions/0004).

:mod:`wsrelay.server.front` decides which connections come here: fresh ones
whose first request line is ``GET /ws...``. The rules (who may connect, what a
command does) are shared with the aiohttp driver in :mod:`wsrelay.server.ws`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from http import HTTPStatus
from typing import cast
from urllib.parse import parse_qsl, unquote, urlsplit

from aiohttp import web
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from wsrelay import codes
from wsrelay.core.schema import encode
from wsrelay.errors import (
    BadRequest,
    ClientError,
    NotFound,
    RelayError,
    ServerError,
    UnsupportedFrame,
    UpgradeRequired,
)
from wsrelay.server import ws
from wsrelay.server.connection import (
    CLOSE_TIMEOUT,
    MAX_CLOSE_REASON,
    Connection,
    ConnectionStats,
    Flusher,
)
from wsrelay.server.errors import error_headers, log_refused
from wsrelay.server.keys import CONNECTIONS, FLUSHER, RELAY, SETTINGS
from wsrelay.server.limits import SLOTS
from wsrelay.server.logs import redact
from wsrelay.server.metrics import METRICS

log = logging.getLogger("wsrelay.server")

_protocol_log = logging.getLogger("wsrelay.protocol")
# websockets logs "connection open/closed" at INFO for every connection; the
# relay's own lines (wsrelay.connections) say more. Its warnings still show.
_protocol_log.setLevel(logging.WARNING)

PING = Frame(Opcode.PING, b"").serialize(mask=False)
"""The keep-alive ping, built once for every connection."""

ROUTE_BY_ID = "/ws/{client_id}"
ROUTE_BY_TOKEN = "/ws"

Data = bytes | bytearray | memoryview
"""What websockets hands over as a frame's payload."""

_BINARY: list[Data] = []
"""Stands for a binary message arriving in pieces: refused once it is whole, never kept."""


class Shared:
    """What every native connection of one app uses: one reference each."""

    __slots__ = ("app", "connections", "flusher", "loop", "metrics", "relay", "settings", "stats")

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.relay = app[RELAY]
        self.settings = app[SETTINGS]
        self.metrics = app[METRICS]
        self.stats: ConnectionStats = self.metrics.stats
        self.flusher: Flusher = app[FLUSHER]
        self.connections: set[Connection] = app[CONNECTIONS]
        self.loop = asyncio.get_running_loop()

    def connection(self, transport: asyncio.Transport) -> NativeConnection:
        return NativeConnection(self, transport)


class NativeConnection(Connection, asyncio.Protocol):
    """One WebSocket, from its handshake to its close.

    Phases: the handshake (a task runs :func:`wsrelay.server.ws.admit`, reading
    paused), open (frames arrive through :meth:`data_received`; a command that
    waits on the relay runs in a task, reading paused until it is done, so
    commands keep their order and a flood waits in the kernel), and closed
    (:meth:`connection_lost` starts the task that detaches the client).
    """

    __slots__ = (
        "_admission",
        "_closed",
        "_deadline",
        "_fragments",
        "_heard",
        "_lost",
        "_opened",
        "_shared",
        "_task",
        "_waiter",
        "_ws",
    )

    def __init__(self, shared: Shared, transport: asyncio.Transport) -> None:
        super().__init__(
            transport,
            raw=False,
            outbox_limit=shared.settings.outbox_limit,
            flusher=shared.flusher,
            stats=shared.stats,
        )
        self._shared = shared
        self._ws = ServerProtocol(max_size=shared.settings.max_message_size, logger=_protocol_log)
        self._admission: ws.Admission | None = None
        self._task: asyncio.Task[None] | None = None
        self._fragments: list[Data] | None = None  # a text message arriving in pieces
        self._heard = True  # anything received since the last ping
        self._lost = False
        self._closed = False  # everything after the connection ended is done
        self._waiter: asyncio.Future[None] | None = None
        self._opened = 0.0
        # Until the handshake is answered, the request timeout applies, as on HTTP.
        self._deadline: asyncio.TimerHandle | None = shared.loop.call_later(
            shared.settings.request_timeout, transport.abort
        )

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Given by :class:`~wsrelay.server.front.FrontDoor` at construction already."""

    def data_received(self, data: bytes) -> None:
        self._heard = True
        wsp = self._ws
        wsp.receive_data(data)
        events = wsp.events_received()
        if self._admission is None and self._task is None:
            for index, event in enumerate(events):
                if isinstance(event, Request):
                    # Frames may not precede the answer (RFC 6455 4.1), but keep any.
                    later = cast(list[Frame], events[index + 1 :])
                    self._transport.pause_reading()
                    self._task = self._shared.loop.create_task(self._handshake(event, later))
                    return
        elif events:
            self._on_frames(cast(list[Frame], events))
        self._write_pending()

    def eof_received(self) -> bool | None:
        self._ws.receive_eof()
        self._write_pending()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._lost = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._task is None:  # else the running task ends the connection
            self._task = self._shared.loop.create_task(self._end())

    # -- the handshake ------------------------------------------------------------------------

    async def _handshake(self, request: Request, later: list[Frame]) -> None:
        shared = self._shared
        started = time.perf_counter()
        wsp = self._ws
        route = ROUTE_BY_ID
        accepted: list[Response] = []
        try:
            client_id, query, route = _target(request.path)

            def check_upgrade() -> None:
                response = wsp.accept(request)
                if response.status_code == HTTPStatus.UPGRADE_REQUIRED:
                    raise UpgradeRequired(
                        "this endpoint only speaks WebSocket; send an Upgrade request"
                    )
                if response.status_code != HTTPStatus.SWITCHING_PROTOCOLS:
                    raise BadRequest(f"invalid WebSocket handshake: {wsp.handshake_exc}")
                accepted.append(response)

            # Lower-cased names, the first of repeated headers, as ws.admit expects.
            headers = {k.lower(): v for k, v in reversed(list(request.headers.raw_items()))}
            admission = await ws.admit(shared.app, client_id, query, headers, check_upgrade)
        except RelayError as exc:
            self._refuse(exc, route, started)
            return
        except Exception:
            log.exception("unexpected error in GET %s", route)
            self._refuse(ServerError("internal error; see the server log"), route, started)
            return
        try:
            shared.app[SLOTS].acquire()  # 503 past --max-connections
        except RelayError as exc:
            self._refuse(exc, route, started)
            await ws.release(shared.relay, admission)
            return
        self._admission = admission
        if self._lost:  # the peer left while we were deciding
            await self._end()
            return
        await self._open(accepted[0], later)

    def _refuse(self, error: RelayError, route: str, started: float) -> None:
        """Answer the handshake with ``error`` as JSON, as every HTTP error is."""
        shared = self._shared
        body = encode(error.to_dict())
        headers = Headers(
            {
                "Content-Type": "application/json",
                "Content-Length": str(len(body)),
                "Connection": "close",
                **error_headers(error),
            }
        )
        status = HTTPStatus(error.http_status)
        peer = self._peer()
        log_refused("GET", route, error, peer)
        shared.metrics.request_latency("GET", route, error.http_status).observe(
            time.perf_counter() - started
        )
        if not self._lost:
            self._ws.send_response(Response(status.value, status.phrase, headers, body))
            self._write_pending()
        self._task = None
        if self._lost:
            self._task = shared.loop.create_task(self._end())

    async def _open(self, response: Response, later: list[Frame]) -> None:
        shared, admission = self._shared, self._admission
        assert admission is not None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.raw = admission.raw
        self._ws.send_response(response)
        self._write_pending()
        self._opened = time.monotonic()
        ws.log_opened(shared.metrics, admission.client, admission.raw, self._peer())
        shared.connections.add(self)
        try:
            await shared.relay.attach(admission.client, self)
        except ClientError as exc:  # unregistered while the handshake ran
            self.close(exc.close_code if admission.raw else codes.NORMAL, "unregistered")
        except Exception:
            log.exception("could not attach a connection")
            self.close(codes.INTERNAL_ERROR, "internal error")
        if later and not self.closing:
            self._on_frames(later)
            self._write_pending()
        await self._commands_done()

    # -- frames -------------------------------------------------------------------------------

    def _on_frames(self, frames: list[Frame]) -> None:
        for frame in frames:
            opcode = frame.opcode
            if opcode is Opcode.TEXT:
                if frame.fin:
                    self._on_text(frame.data)
                else:
                    self._fragments = [frame.data]
            elif opcode is Opcode.CONT:  # websockets checked that a message is open
                fragments = self._fragments
                if fragments is _BINARY:
                    if frame.fin:
                        self._fragments = None
                        self._refuse_binary()
                elif fragments is not None:
                    fragments.append(frame.data)
                    if frame.fin:
                        self._fragments = None
                        self._on_text(b"".join(fragments))
            elif opcode is Opcode.BINARY:
                if frame.fin:
                    self._refuse_binary()
                else:
                    self._fragments = _BINARY
            # PING: websockets queued the pong. PONG: _heard is set. CLOSE: answered.

    def _refuse_binary(self) -> None:
        if not self.closing and self._admission is not None:
            ws.report(self, UnsupportedFrame(ws.BINARY_REFUSED))

    def _on_text(self, data: Data) -> None:
        if self.closing or self._admission is None:
            return
        try:
            text = bytes(data).decode() if not isinstance(data, bytes) else data.decode()
        except UnicodeDecodeError as exc:
            # RFC 6455 8.1: invalid UTF-8 in a text message fails the connection.
            self._ws.fail(codes.INVALID_PAYLOAD, f"invalid UTF-8 at position {exc.start}")
            self.closed_with = (codes.INVALID_PAYLOAD, "invalid UTF-8 in a text message")
            return
        task = self._task
        if task is not None:  # a command is still running: this one waits its turn
            self._task = self._shared.loop.create_task(self._after(task, text))
            return
        self._transport.pause_reading()
        self._task = self._shared.loop.create_task(self._command(text))

    async def _command(self, text: str) -> None:
        admission = self._admission
        assert admission is not None
        try:
            await ws.on_text(self._shared.relay, admission.client, self, text)
        except ServerError as exc:  # the broker went away: this command failed, not the server
            ws.report(self, ClientError(exc.message, code=exc.code))
        except Exception:
            log.exception("unexpected error in a WebSocket command")
            self.close(codes.INTERNAL_ERROR, "internal error")
        await self._commands_done()

    async def _after(self, previous: asyncio.Task[None], text: str) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(previous)
        await self._command(text)

    async def _commands_done(self) -> None:
        if asyncio.current_task() is not self._task:
            return  # another command was queued behind this one; it finishes up
        self._task = None
        if self._lost:
            await self._end()
        else:  # also when closing: the client's answer to our close must be read
            self._transport.resume_reading()

    def _write_pending(self) -> None:
        transport = self._transport
        for data in self._ws.data_to_send():
            if data:
                transport.write(data)
            else:  # websockets' end of stream: a server closes the TCP connection first
                transport.close()
        if self._ws.close_sent is not None and not self.closing:
            # websockets failed the connection (1002, 1009...) or answered a client's close.
            self.closing = True
            self._drop_later()

    # -- closing ------------------------------------------------------------------------------

    def _send_close(self, code: int, reason: str) -> None:
        wsp = self._ws
        if wsp.state is State.OPEN:
            wsp.send_close(code, reason.encode()[:MAX_CLOSE_REASON].decode(errors="ignore"))
            self._write_pending()
        self._drop_later()

    def _drop_later(self) -> None:
        # A peer that never reads (a slow consumer) or never answers the close
        # would hold the transport open; past the deadline it is dropped.
        if self._deadline is None and not self._lost:
            self._deadline = self._shared.loop.call_later(CLOSE_TIMEOUT, self._transport.abort)

    def heartbeat(self, ping: bool) -> None:
        if self.closing or self._ws.state is not State.OPEN:
            return
        if ping:
            self._heard = False  # any frame from now on proves the client is there
            self._transport.write(PING)
        elif not self._heard:
            self.closing = True
            self.closed_with = (ws.ABNORMAL_CLOSURE, "no pong within half the ping interval")
            self._transport.abort()

    async def wait_closed(self) -> None:
        if self._closed:
            return
        if self._waiter is None:
            self._waiter = self._shared.loop.create_future()
        await asyncio.shield(self._waiter)

    async def _end(self) -> None:
        """After the connection is gone: detach the client and account for it."""
        shared, admission = self._shared, self._admission
        try:
            if admission is not None:
                client = admission.client
                try:
                    if self._opened:
                        shared.connections.discard(self)
                        await shared.relay.detach(client, self)
                        code, reason, by = self._close_record()
                        seconds = time.monotonic() - self._opened
                        ws.log_closed(shared.metrics, client, code, reason, by, seconds)
                finally:
                    shared.app[SLOTS].release()
                    await ws.release(shared.relay, admission)
        except Exception:
            log.exception("could not detach a closed connection")
        finally:
            self._closed = True
            self._task = None
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    def _close_record(self) -> tuple[int, str, str]:
        """Close code, reason, and who closed: for the log line and the metric."""
        if self.closed_with is not None:
            return (*self.closed_with, "server")
        wsp = self._ws
        if wsp.close_rcvd is not None and wsp.close_rcvd_then_sent is not False:
            return wsp.close_rcvd.code, wsp.close_rcvd.reason, "client"
        if wsp.close_sent is not None:  # websockets failed the connection
            return wsp.close_sent.code, wsp.close_sent.reason, "server"
        return ws.ABNORMAL_CLOSURE, "", "client"

    def _peer(self) -> str | None:
        peer = self._transport.get_extra_info("peername")
        return str(peer[0]) if isinstance(peer, tuple) and peer else None


def _target(path: str) -> tuple[str | None, dict[str, str], str]:
    """``(client_id or None, query, route)`` of a handshake's request target.

    Raises:
        NotFound: the path is neither ``/ws`` nor ``/ws/<id>``.
    """
    parts = urlsplit(path)
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        query.setdefault(key, value)  # the first one counts, as in aiohttp
    if parts.path == ROUTE_BY_TOKEN:
        return None, query, ROUTE_BY_TOKEN
    client_id = unquote(parts.path[len("/ws/") :]) if parts.path.startswith("/ws/") else ""
    if not client_id or "/" in client_id:
        raise NotFound(f"no route for GET {redact(parts.path)[:200]}")
    return client_id, query, ROUTE_BY_ID


HEARTBEAT_SLICES_PER_SECOND = 2
"""The sweep's steps per second: connections are pinged a slice at a time, so that
15,000 pings (and their pongs) are not one stall of the event loop."""


async def keep_alive(connections: set[Connection], interval: float) -> None:
    """The native connections' pings: one timer for the whole app rather than one per
    connection (a ``TimerHandle`` and a libuv timer each; aiohttp's connections keep
    their own, and their :meth:`~Connection.heartbeat` does nothing). Every interval
    each connection is pinged; half an interval later, one that has sent nothing since
    is dropped. :class:`~wsrelay.server.front.RelaySite` runs it while it listens.

    Each half interval is cut into steps, and a connection belongs to the step its
    hash gives, in the ping half and in the check half alike: it is checked exactly
    half an interval after its ping. One that opened between the two was never
    pinged and has not been silent, so it is not dropped."""
    slices = max(1, int(interval / 2 * HEARTBEAT_SLICES_PER_SECOND))
    step = interval / 2 / slices
    while True:
        for ping in (True, False):
            buckets: list[list[Connection]] = [[] for _ in range(slices)]
            for connection in list(connections):
                buckets[hash(connection) % slices].append(connection)
            for bucket in buckets:
                await asyncio.sleep(step)
                for connection in bucket:
                    connection.heartbeat(ping)
