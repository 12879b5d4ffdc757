"""The WebSocket driver: a pump between a socket and a :class:`~wsrelay.core.session.Session`.

Every WebSocket the relay serves, on either stack, is one
:class:`NativeConnection`: an ``asyncio.Protocol`` that is also its outbox, plus
the ``websockets`` library's sans-I/O :class:`~websockets.server.ServerProtocol`,
which parses the handshake and every frame, checks masking and UTF-8, and runs
the closing handshake. What a frame means (a command, a refusal, a flood) is
the session's to decide; this module only carries bytes and actions.

It takes a connection in one of two ways:

* fresh, from :class:`~wsrelay.server.front.FrontDoor` (``wsrelay serve``'s own
  listening socket), handshake included: an idle connection then costs a third
  of aiohttp's memory (docs/decisions/0004);
* adopted from aiohttp (:mod:`wsrelay.server.ws`) right after aiohttp answered
  the upgrade: an upgrade on a kept-alive connection, ``--stack aiohttp``, or an
  app mounted in another aiohttp application.

No task or coroutine lives as long as the connection; the transport calls back,
and a task exists only while a handshake or commands wait for the relay.

Flow control, so that one client cannot cost the others: input is parsed a
slice (:data:`READ_SLICE`) at a time, and reading stops while commands wait
for the relay (commands keep their order; a flood waits in the kernel) and
while more than the outbox limit waits to be written to the client (pongs and
acknowledgements included). Of the pings one slice brings, only the last is
answered (RFC 6455 5.5.3 allows it), and the session closes a client that
keeps sending control frames (:data:`wsrelay.core.session.CONTROL_FRAME_RATE`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from wsrelay.core.schema import encode
from wsrelay.core.session import (
    ABNORMAL_CLOSURE,
    Action,
    Close,
    Gate,
    Send,
    Session,
    admit,
    close_reason,
)
from wsrelay.errors import BadRequest, RelayError, ServerError, UpgradeRequired
from wsrelay.server import routes
from wsrelay.server.auth import TOKENS, check_origin
from wsrelay.server.connection import (
    CLOSE_TIMEOUT,
    Connection,
    ConnectionStats,
    Flusher,
    attach,
    closed,
    frame_text,
    opened,
)
from wsrelay.server.errors import error_headers, log_refused
from wsrelay.server.keys import CONNECTIONS, FLUSHER, RELAY, SETTINGS
from wsrelay.server.limits import ADDRESS_SLOTS, SLOTS, AddressSlots
from wsrelay.server.metrics import METRICS
from wsrelay.server.proxies import ADDRESSES, ClientAddresses

log = logging.getLogger("wsrelay.server")

_protocol_log = logging.getLogger("wsrelay.protocol")
# websockets logs "connection open/closed" at INFO for every connection; the
# relay's own lines (wsrelay.connections) say more. Its warnings still show.
_protocol_log.setLevel(logging.WARNING)

PING = Frame(Opcode.PING, b"").serialize(mask=False)
"""The keep-alive ping, built once for every connection."""

READ_SLICE = 8 * 1024
"""Bytes handed to the frame parser at a time. Between slices the driver checks
whether to go on: a 256 KiB read of 6-byte pings is 43,690 frames, and parsing them
in one go held the event loop for every other client."""

Data = bytes | bytearray | memoryview
"""What websockets hands over as a frame's payload."""

_BINARY: list[Data] = []
"""Stands for a binary message arriving in pieces: refused once it is whole, never kept."""


class _BinaryMessage:
    """Queued in place of a binary message: the session refuses it in its turn."""


_BINARY_MESSAGE = _BinaryMessage()

_Queued = bytes | _BinaryMessage


class WebSocketProtocol(ServerProtocol):
    """websockets' server protocol, answering only the last ping of a slice.

    ``ServerProtocol`` queues a pong for every ping as it parses it; a client
    sending thousands at once would get thousands of writes. RFC 6455 5.5.3: an
    endpoint "MAY elect to send a Pong frame for only the most recently processed
    Ping frame", which :meth:`pong` does after each slice.
    """

    pong_due: bytes | None = None
    close_due: Frame | None = None

    def recv_frame(self, frame: Frame) -> None:
        # Control frames that came with the handshake (CONNECTING) are answered after the
        # 101: nothing may precede the handshake's answer on the wire.
        if frame.opcode is Opcode.PING and self.state is not State.CLOSING:
            self.pong_due = bytes(frame.data)
            self.events.append(frame)
            return
        if frame.opcode is Opcode.CLOSE and self.state is State.CONNECTING:
            self.close_due = frame
            return
        super().recv_frame(frame)

    def send_response(self, response: Response) -> None:
        super().send_response(response)
        frame, self.close_due = self.close_due, None
        if frame is not None and self.state is State.OPEN:  # the early close, answered now
            super().recv_frame(frame)

    def pong(self) -> None:
        """Answer the last ping received, if one is unanswered and the connection open."""
        data = self.pong_due
        if data is not None and self.state is State.OPEN:
            self.pong_due = None
            self.send_pong(data)


class Shared:
    """What every WebSocket of one app uses: one reference each."""

    __slots__ = (
        "address_slots",
        "addresses",
        "app",
        "connections",
        "flusher",
        "gate",
        "handshaking",
        "loop",
        "metrics",
        "relay",
        "settings",
        "stats",
    )

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.relay = app[RELAY]
        self.settings = settings = app[SETTINGS]
        self.metrics = app[METRICS]
        self.stats: ConnectionStats = self.metrics.stats
        self.flusher: Flusher = app[FLUSHER]
        self.connections: set[Connection] = app[CONNECTIONS]
        self.handshaking: set[NativeConnection] = set()
        """Fresh connections whose handshake is not answered yet (aborted at shutdown)."""
        self.loop = asyncio.get_running_loop()
        verifier = app[TOKENS]
        origins = settings.allowed_origin

        def origin_allowed(origin: str | None) -> None:
            check_origin(origin, origins)

        self.gate = Gate(
            relay=self.relay,
            check_origin=origin_allowed,
            verify_token=verifier.verify if verifier is not None else None,
            slots=app[SLOTS],
        )
        self.addresses: ClientAddresses = app.get(ADDRESSES) or ClientAddresses()
        self.address_slots: AddressSlots = app.get(ADDRESS_SLOTS) or AddressSlots(app[SLOTS], 0)

    def gate_for(self, address: str | None) -> Gate:
        """The gate of a handshake from ``address``: the app's, with a slot per address
        when ``--max-connections-per-ip`` is set."""
        if self.address_slots.limit <= 0:
            return self.gate
        return dataclasses.replace(self.gate, slots=self.address_slots.of(address))

    def protocol(self, state: State = State.CONNECTING) -> WebSocketProtocol:
        return WebSocketProtocol(
            state=state, max_size=self.settings.max_message_size, logger=_protocol_log
        )

    def connection(self, transport: asyncio.Transport, since: float) -> NativeConnection:
        """A fresh connection accepted at ``since`` (loop time), its handshake unread."""
        return NativeConnection(self, transport, since=since)


SHARED = web.AppKey("websocket_shared", Shared)


async def handshake(
    gate: Gate,
    wsp: ServerProtocol,
    request: Request,
    client_id: str | None,
    query: Mapping[str, str],
) -> tuple[Session, Response]:
    """Decide a handshake on either stack: :func:`~wsrelay.core.session.admit`, with
    websockets checking the upgrade headers. Returns the session and the 101 answer.

    Raises:
        RelayError: the handshake is refused (the error knows its status).
    """
    accepted: list[Response] = []

    def check_upgrade() -> None:
        response = wsp.accept(request)
        if response.status_code == HTTPStatus.UPGRADE_REQUIRED:
            raise UpgradeRequired("this endpoint only speaks WebSocket; send an Upgrade request")
        if response.status_code != HTTPStatus.SWITCHING_PROTOCOLS:
            raise BadRequest(f"invalid WebSocket handshake: {wsp.handshake_exc}")
        accepted.append(response)

    # Lower-cased names, the first of repeated headers.
    headers = {k.lower(): v for k, v in reversed(list(request.headers.raw_items()))}
    session = await admit(gate, client_id, query, headers, check_upgrade)
    return session, accepted[0]


class NativeConnection(Connection, asyncio.Protocol):
    """One WebSocket, from its handshake (or its adoption) to its close.

    Phases: the handshake (a task runs :func:`handshake`, reading paused), open
    (frames arrive through :meth:`data_received`; commands queue for one task,
    reading paused until they are done), and closed (:meth:`connection_lost`
    starts the task that detaches the client, or the running task does).
    """

    __slots__ = (
        "_commands",
        "_deadline",
        "_early",
        "_fragments",
        "_heard",
        "_lost",
        "_previous",
        "_shared",
        "_task",
        "_unread",
        "_write_paused",
        "_ws",
        "address",
        "session",
    )

    def __init__(
        self,
        shared: Shared,
        transport: asyncio.Transport,
        wsp: WebSocketProtocol | None = None,
        *,
        since: float | None = None,
    ) -> None:
        super().__init__(
            transport,
            raw=False,
            outbox_limit=shared.settings.outbox_limit,
            flusher=shared.flusher,
            stats=shared.stats,
        )
        self._shared = shared
        self._ws: WebSocketProtocol | None = wsp if wsp is not None else shared.protocol()
        """websockets' protocol while it holds state; None while the connection rests
        (:meth:`_rest`), when a fresh one would be the same."""
        self.session: Session | None = None
        self._task: asyncio.Task[None] | None = None
        self._commands: list[_Queued] | None = None  # text (or a binary marker) awaiting its turn
        self._unread: bytes | None = None  # received, not parsed yet: a task runs
        self._early: list[Frame] | None = None  # frames that came with the handshake
        self._fragments: list[Data] | None = None  # a text message arriving in pieces
        self._heard = True  # anything received since the last ping
        self._lost = False
        self._write_paused = False
        self._previous: asyncio.BaseProtocol | None = None  # aiohttp's, for an adopted one
        self.address: str | None = None
        """The client's address (behind a trusted proxy, the one it forwards), for the
        logs and the slots per address; the peer's until the handshake is read."""
        # Until the handshake is answered, the request timeout applies, as on HTTP,
        # counted from the accept (the front door read the first line meanwhile).
        self._deadline: asyncio.TimerHandle | None = None
        if wsp is None:
            shared.handshaking.add(self)
            start = shared.loop.time() if since is None else since
            self._deadline = shared.loop.call_at(
                start + shared.settings.request_timeout, transport.abort
            )

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Given by :class:`~wsrelay.server.front.FrontDoor` at construction already."""

    def data_received(self, data: bytes) -> None:
        self._heard = True
        if self._unread is not None:  # a task runs; what came before must be parsed first
            self._unread += data
            self._transport.pause_reading()
            return
        self._receive(data)

    def eof_received(self) -> bool | None:
        if self._unread is None:
            self._protocol().receive_eof()
            self._write_pending()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._lost = True
        self._shared.handshaking.discard(self)
        self._unread = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        previous, self._previous = self._previous, None
        if previous is not None:  # aiohttp's request handler ends its side too
            previous.connection_lost(exc)
        if self._task is None:  # else the running task ends the connection
            self._task = self._shared.loop.create_task(self._end())

    def pause_writing(self) -> None:
        # More than the outbox limit waits for this client: read nothing more from it
        # (a client that sends pings and never reads would otherwise grow our memory).
        self._write_paused = True
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._task is None and not self._lost:
            self._transport.resume_reading()

    # -- input ----------------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        """Parse ``data`` a slice at a time; keep the rest unparsed once a task runs."""
        wsp = self._protocol()
        size = len(data)
        offset = 0
        while offset < size:
            chunk = data if size <= READ_SLICE else data[offset : offset + READ_SLICE]
            offset += READ_SLICE
            wsp.receive_data(chunk)
            events = wsp.events_received()
            if events:
                self._on_events(cast(list[Frame | Request], events))
            wsp.pong()
            self._write_pending()
            if wsp.eof_sent:  # closed: the rest is discarded
                break
            if self._task is not None and offset < size:
                self._unread = data[offset:]
                break
        if self._task is not None or self._write_paused:
            self._transport.pause_reading()
        else:
            self._rest()

    def _on_events(self, events: Sequence[Frame | Request]) -> None:
        if self.session is None:
            if self._task is None:
                for index, event in enumerate(events):
                    if isinstance(event, Request):
                        # Frames may not precede the answer (RFC 6455 4.1), but keep any.
                        self._early = cast(list[Frame], list(events[index + 1 :]))
                        self._task = self._shared.loop.create_task(self._handshake(event))
                        return
            elif self._early is not None:
                self._early.extend(cast(list[Frame], events))
            return
        self._on_frames(cast(Sequence[Frame], events))

    def _on_frames(self, frames: Sequence[Frame]) -> None:
        control = 0
        for frame in frames:
            opcode = frame.opcode
            if opcode is Opcode.TEXT:
                if frame.fin:
                    self._queue(frame.data)
                else:
                    self._fragments = [frame.data]
            elif opcode is Opcode.CONT:  # websockets checked that a message is open
                fragments = self._fragments
                if fragments is _BINARY:
                    if frame.fin:
                        self._fragments = None
                        self._queue(_BINARY_MESSAGE)
                elif fragments is not None:
                    fragments.append(frame.data)
                    if frame.fin:
                        self._fragments = None
                        self._queue(b"".join(fragments))
            elif opcode is Opcode.BINARY:
                if frame.fin:
                    self._queue(_BINARY_MESSAGE)
                else:
                    self._fragments = _BINARY
            elif opcode is Opcode.PING or opcode is Opcode.PONG:
                control += 1
            # CLOSE: websockets answered it.
        if control and self.session is not None and not self.closing:
            flood = self.session.on_control_frames(control, time.monotonic())
            if flood is not None:
                self._apply(flood)

    def _queue(self, data: Data | _BinaryMessage) -> None:
        """A whole message: carried out in order, after those before it."""
        if self.closing:
            return
        item: _Queued = data if isinstance(data, bytes | _BinaryMessage) else bytes(data)
        if self._commands is None:
            self._commands = [item]
        else:
            self._commands.append(item)
        if self._task is None:
            self._task = self._shared.loop.create_task(self._run_commands())

    async def _run_commands(self) -> None:
        session = self.session
        assert session is not None
        commands = self._commands
        while commands and not self.closing:
            item = commands.pop(0)
            if isinstance(item, _BinaryMessage):
                action: Action | None = session.on_binary()
            else:
                action = await session.on_text(item)
            if action is not None:
                self._apply(action)
        self._commands = None
        await self._idle()

    async def _idle(self) -> None:
        """The running task is done: end the connection if it is gone, else read on."""
        self._task = None
        if self._lost:
            await self._end()
            return
        unread, self._unread = self._unread, None
        if unread:
            self._receive(unread)  # may start the next task, which pauses reading again
        if self._task is None and not self._write_paused and not self._lost:
            # Also when closing: the client's answer to our close must be read.
            self._transport.resume_reading()
            self._rest()

    def _protocol(self) -> WebSocketProtocol:
        """websockets' protocol, a fresh open one if the connection rested."""
        wsp = self._ws
        if wsp is None:
            wsp = self._ws = self._shared.protocol(State.OPEN)
        return wsp

    def _rest(self) -> None:
        """Let go of websockets' protocol while it holds nothing a fresh open one lacks.

        An idle connection then costs no protocol (about 1.4 KiB), and none keeps its
        handshake request: the protocol's parser is a generator whose suspended frame
        holds the request for as long as the protocol lives (2-3 KiB; docs/decisions/0013).
        """
        wsp = self._ws
        if (
            wsp is not None
            and self.session is not None
            and not self.held
            and not self.closing
            and wsp.state is State.OPEN
            and wsp.current_size is None
            and not wsp.expect_continuation_frame
            and wsp.pong_due is None
            and wsp.close_due is None
            and not wsp.reader.buffer
            and not wsp.events
            and not wsp.writes
        ):
            self._ws = None

    def _apply(self, action: Action) -> None:
        if isinstance(action, Send):
            self.send(frame_text(action.payload))
            for payload in action.more:
                self.send(frame_text(payload))
        elif action.fail:
            self._fail(action)
        else:
            self.close(action.code, action.reason)

    # -- the handshake --------------------------------------------------------------------------

    async def _handshake(self, request: Request) -> None:
        shared = self._shared
        started = time.perf_counter()
        route = routes.WEBSOCKET_BY_ID
        headers = request.headers
        self.address = shared.addresses.resolve(
            self._peer(), headers.get_all("X-Forwarded-For"), headers.get_all("Forwarded")
        )
        gate = shared.gate_for(self.address)
        try:
            client_id, query, route = routes.websocket_target(request.path)
            session, response = await handshake(gate, self._protocol(), request, client_id, query)
        except RelayError as exc:
            self._refuse(exc, route, started)
            return
        except Exception:
            log.exception("unexpected error in GET %s", route)
            self._refuse(ServerError("internal error; see the server log"), route, started)
            return
        self.session = session
        if self._lost:  # the peer left while we were deciding
            await self._end()
            return
        refusal = await self.attach(session)
        if refusal is not None:
            self._refuse(refusal, route, started)
            return
        if self._lost or self._transport.is_closing():
            # The peer left, or closed before the answer (websockets ended the stream).
            self._task = None
            if self._lost:
                await self._end()
            return  # else connection_lost ends it
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._shared.handshaking.discard(self)
        self._protocol().send_response(response)
        self._write_pending()
        await self._start(session)

    async def attach(self, session: Session) -> RelayError | None:
        """Attach the connection to its client before the upgrade is answered
        (:func:`wsrelay.server.connection.attach`). Returns the error to refuse with."""
        return await attach(self, self._shared.relay, session)

    def _refuse(self, error: RelayError, route: str, started: float) -> None:
        """Answer the handshake with ``error`` as JSON, as every HTTP error is."""
        shared = self._shared
        body = encode(error.to_dict())
        headers = Headers(
            {
                "Content-Type": "application/json",
                "Content-Length": str(len(body)),
                "Connection": "close",
                **error_headers(error, route),
            }
        )
        status = HTTPStatus(error.http_status)
        log_refused("GET", route, error, self._address())
        shared.handshaking.discard(self)
        shared.metrics.request_latency("GET", route, error.http_status).observe(
            time.perf_counter() - started
        )
        self._early = None
        if not self._lost:
            self._protocol().send_response(Response(status.value, status.phrase, headers, body))
            self._write_pending()
        self._task = None
        if self._lost:
            self._task = shared.loop.create_task(self._end())

    def adopt(self, session: Session, previous: Any) -> None:
        """Take over a connection whose upgrade aiohttp answered: from now on this
        protocol reads and writes it. ``previous`` is aiohttp's request handler,
        which hands over the bytes it read past the handshake and hears of the end."""
        tail: list[bytes] = []
        previous.set_parser(_Tail(tail))  # aiohttp feeds what it holds, then nothing more
        previous.keep_alive(False)
        self._transport.set_protocol(self)
        self._previous = previous
        self.session = session
        self._unread = b"".join(tail) if tail else None
        self._transport.pause_reading()
        self._task = self._shared.loop.create_task(self._start(session))

    async def _start(self, session: Session) -> None:
        """The 101 is written: what was held goes out, then the frames read so far."""
        shared = self._shared
        session.open(time.monotonic())
        self._transport.set_write_buffer_limits(high=self.limit)
        opened(shared.metrics, shared.relay, session.client, session.raw, self._address())
        shared.connections.add(self)
        self.held = False
        self.flush()
        early, self._early = self._early, None
        if early and not self.closing:
            self._on_frames(early)
            self._protocol().pong()
            self._write_pending()
        if self._commands:  # the early frames brought commands: run them now
            await self._run_commands()
            return
        await self._idle()

    # -- output ---------------------------------------------------------------------------------

    def _write_pending(self) -> None:
        wsp = self._ws
        if wsp is None:  # at rest: nothing to send
            return
        transport = self._transport
        for data in wsp.data_to_send():
            if data:
                transport.write(data)
            else:  # websockets' end of stream: a server closes the TCP connection first
                transport.close()
        if wsp.close_sent is not None and not self.closing:
            # websockets failed the connection (1002, 1009...) or answered a client's close.
            self.closing = True
            self._drop_later()

    # -- closing --------------------------------------------------------------------------------

    def _send_close(self, code: int, reason: str) -> None:
        if self.session is not None:
            action = self.session.closing(code, reason)
        else:
            action = Close(code, close_reason(reason))
        code, reason = action.code, action.reason
        wsp = self._protocol()
        if wsp.state is State.OPEN:
            wsp.send_close(code, reason)
            self._write_pending()
        self._drop_later()

    def _fail(self, action: Close) -> None:
        """Fail the connection (RFC 6455 7.1.7): the close frame, then the end of the
        TCP connection without waiting for the client's answer; nothing more is read."""
        if self.closing:
            return
        self.closing = True
        self.take_raw()
        self._unread = None
        self._commands = None
        self._protocol().fail(action.code, action.reason)
        self._write_pending()
        self._drop_later()

    def _drop_later(self) -> None:
        # A peer that never reads (a slow consumer) or never answers the close
        # would hold the transport open; past the deadline it is dropped.
        if self._deadline is None and not self._lost:
            self._deadline = self._shared.loop.call_later(CLOSE_TIMEOUT, self._transport.abort)

    def heartbeat(self, ping: bool) -> None:
        if self.closing or (self._ws is not None and self._ws.state is not State.OPEN):
            return
        if ping:
            self._heard = False  # any frame from now on proves the client is there
            self._transport.write(PING)
        elif not self._heard and self._task is None and not self._write_paused:
            # (Not while we stopped reading: then the silence is ours.)
            self.closing = True
            if self.session is not None:
                self.session.closing(ABNORMAL_CLOSURE, "no pong within half the ping interval")
            self._transport.abort()

    async def _end(self) -> None:
        """After the connection is gone: detach the client and account for it."""
        shared, session = self._shared, self.session
        try:
            if session is not None:
                try:
                    if session.opened_at:
                        shared.connections.discard(self)
                    if session.opened_at or session.client.sink is self:
                        await shared.relay.detach(session.client, self)  # attached, or was
                    if session.opened_at:
                        record = session.ended(
                            time.monotonic(), received=self._received(), failed=self._failed()
                        )
                        closed(shared.metrics, shared.relay, session.client, record)
                finally:
                    await session.release()
        except Exception:
            log.exception("could not detach a closed connection")
        finally:
            self._task = None
            self._ended()

    def _received(self) -> tuple[int, str] | None:
        """The client's close frame, if the client closed first."""
        wsp = self._ws
        if wsp is None:  # it rested: nothing was received since it was open
            return None
        if wsp.close_rcvd is not None and wsp.close_rcvd_then_sent is not False:
            return wsp.close_rcvd.code, wsp.close_rcvd.reason
        return None

    def _failed(self) -> tuple[int, str] | None:
        """The close websockets sent on a protocol error, if it did."""
        sent = self._ws.close_sent if self._ws is not None else None
        return (sent.code, sent.reason) if sent is not None else None

    def abort(self) -> None:
        """Drop the connection at once (shutdown, while its handshake is unanswered)."""
        self._transport.abort()

    def _peer(self) -> str | None:
        peer = self._transport.get_extra_info("peername")
        return str(peer[0]) if isinstance(peer, tuple) and peer else None

    def _address(self) -> str | None:
        """The client's address: the one resolved at the handshake, else the peer's."""
        return self.address if self.address is not None else self._peer()


class _Tail:
    """Stands in for aiohttp's WebSocket parser for a moment: keeps the bytes aiohttp
    read past the handshake, which :meth:`NativeConnection.adopt` then parses."""

    __slots__ = ("_tail",)

    def __init__(self, tail: list[bytes]) -> None:
        self._tail = tail

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._tail.append(bytes(data))
        return False, b""

    def feed_eof(self) -> None:
        """aiohttp's handler saw the end; the connection's protocol hears it itself."""


HEARTBEAT_SLICES_PER_SECOND = 2
"""The sweep's steps per second: connections are pinged a slice at a time, so that
15,000 pings (and their pongs) are not one stall of the event loop."""


async def keep_alive(connections: set[Connection], interval: float) -> None:
    """Every WebSocket's pings: one timer for the whole app rather than one per
    connection (a ``TimerHandle`` and a libuv timer each). Every interval each
    connection is pinged; half an interval later, one that has sent nothing since
    is dropped. The app runs it from startup to cleanup.

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
