"""Server-sent events: ``GET /sse/<id>``, ``GET /sse?token=...`` and ``POST /sse/<id>``.

An SSE stream is a one-way WebSocket: the same :class:`~wsrelay.core.session.Session`
admits it (origin, registration or token, slots), recovers its topics, carries out its
commands and keeps its close bookkeeping; the same fan-out frames reach it through the
same bounded outbox. This module only pumps: :class:`SseConnection` turns each frame
into one event (:mod:`wsrelay.core.sse`: the frame's JSON as ``data``, the positions of
every topic as the ``id``), and the commands a WebSocket would send as frames arrive as
``POST /sse/<id>`` calls, answered with the frame a WebSocket would get.

Both stacks serve it through aiohttp (the front door hands every request that is not
an upgrade or a publish to aiohttp): aiohttp parses and routes the request, the
session decides it, aiohttp writes the response head (``text/event-stream``, chunked),
and the connection is then adopted by an :class:`SseConnection`, which writes each
event as one chunk (the head first: nothing is written before the stream is decided,
so every refusal is an HTTP answer).

The stream's events: ``{"type":"stream","id":<registration id>}`` first, then the
acknowledgement of the opening subscription (the registration's topics, recovered from
``Last-Event-ID`` or ``?last_event_id=``), its replay, and from then on what a JSON-mode
WebSocket receives. A keep-alive comment goes every half ``--ping-interval``. Where a
WebSocket would be closed (4008 slow consumer, 4500 replaced, 1000 unregistered, 4503
banned, 1001 shutdown) the stream ends with a last event,
``{"type":"close","code":...,"reason":...}``: an ``EventSource`` reconnects by itself
after any end, so a client must close it on the codes that say not to reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

from aiohttp import web

from wsrelay.core.registry import Client
from wsrelay.core.schema import CloseFrame, StreamFrame, encode
from wsrelay.core.session import Refusal, Send, Session, admit
from wsrelay.core.sse import KEEP_ALIVE, RETRY, StreamPositions, event, parse_event_id
from wsrelay.errors import (
    BadRequest,
    InvalidJSON,
    NotStreaming,
    PayloadTooLarge,
    RateLimited,
    RelayError,
)
from wsrelay.relay import FORWARD_TIMEOUT
from wsrelay.server import routes
from wsrelay.server.auth import cors_headers
from wsrelay.server.connection import CLOSE_TIMEOUT, Connection, attach, closed, opened, unframe
from wsrelay.server.http import read_body
from wsrelay.server.native import SHARED, Shared
from wsrelay.server.proxies import request_address

log = logging.getLogger("wsrelay.server")

CONTENT_TYPE: Final = "text/event-stream"

LAST_EVENT_ID: Final = "last_event_id"
"""The query parameter standing for the ``Last-Event-ID`` header, for a first connection
(``EventSource`` cannot set headers); the header wins when both are given (a browser's
own reconnection sends the URL as it was, and the header with the newest id)."""

MAX_WAITING_COMMANDS: Final = 8
"""Commands of one stream waiting for their turn (they run one at a time, and one may
wait on the authorization hook or the broker); past it ``POST /sse/<id>`` is refused at
once with 429 ``rate_limited``."""

END: Final = b"0\r\n\r\n"
"""The last chunk of a chunked response."""


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked HTTP/1.1 response."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class SseConnection(Connection, asyncio.Protocol):
    """One SSE stream, from the moment its head is written to its end."""

    __slots__ = (
        "_deadline",
        "_lock",
        "_lost",
        "_previous",
        "_shared",
        "_waiting",
        "address",
        "positions",
        "session",
    )

    def __init__(self, shared: Shared, transport: asyncio.Transport, session: Session) -> None:
        super().__init__(
            transport,
            raw=False,
            outbox_limit=shared.settings.outbox_limit,
            flusher=shared.flusher,
            stats=shared.stats,
        )
        self._shared = shared
        self.session = session
        self.positions = StreamPositions()
        self.address: str | None = None
        self._lock = asyncio.Lock()  # commands run one at a time, as a WebSocket's do
        self._lost = False
        self._previous: Any = None  # aiohttp's request handler, told of the end
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting = 0  # commands posted and not yet answered

    # -- the fan-out's side ---------------------------------------------------------------------

    def send(self, frame: bytes) -> bool:
        """A frame of the fan-out (a WebSocket frame): sent as one event."""
        if self.closing:
            return False
        return self._event(unframe(frame))

    def _event(self, payload: bytes) -> bool:
        return Connection.send(self, chunk(event(payload, self.positions.see(payload))))

    def apply(self, action: Send) -> None:
        """Stream what a command answered: its acknowledgement and what follows it."""
        self._event(action.payload)
        for payload in action.more:
            self._event(payload)

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """A client sends nothing on a stream (commands come by ``POST``): ignored."""

    def eof_received(self) -> bool | None:
        return None  # the client is gone: close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._lost = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        previous, self._previous = self._previous, None
        if previous is not None:  # aiohttp's request handler ends its side too
            previous.connection_lost(exc)
        self._shared.loop.create_task(self._end())

    # -- the stream -------------------------------------------------------------------------------

    def adopt(self, previous: Any, opening: bytes) -> None:
        """The head is written: take the connection over from aiohttp's ``previous``
        request handler, write ``opening`` (the stream's first events), then what
        waited in the outbox."""
        previous.keep_alive(False)
        self._transport.set_protocol(self)
        self._previous = previous
        session, shared = self.session, self._shared
        session.open(time.monotonic())
        self._transport.set_write_buffer_limits(high=self.limit)
        opened(shared.metrics, shared.relay, session.client, False, self.address)
        shared.connections.add(self)
        self._transport.write(chunk(opening))
        self.held = False
        if self.closing:  # closed (replaced, unregistered) while it was being answered
            self._finish()
        else:
            self.flush()
        if self._transport.is_closing() and not self._lost:
            # The peer left before the handover: aiohttp heard of it, this protocol never will.
            self.connection_lost(None)

    async def command(self, text: str) -> bytes:
        """Carry out a command posted for this stream; its answer (the frame a WebSocket
        would get). A subscription's acknowledgement and replay are streamed too, in
        order with the publications around them.

        Raises:
            RelayError: the command was refused (the HTTP call's answer).
        """
        if self._waiting >= MAX_WAITING_COMMANDS:
            raise RateLimited(
                f"{self._waiting} commands of this stream are already waiting for their "
                "turn: wait for their answers"
            )
        self._waiting += 1
        try:
            async with self._lock:
                if self.closing:
                    raise _not_streaming()
                try:
                    action = await self.session.carry_out(text)
                except Refusal as refusal:
                    raise refusal.error from None
                if not isinstance(action, Send):  # JSON mode answers every command
                    raise AssertionError(f"an SSE command answered {action!r}")
                if not action.reply:
                    self.apply(action)
                return action.payload
        finally:
            self._waiting -= 1

    def heartbeat(self, ping: bool) -> None:
        """Every half ping interval: a comment, which keeps proxies from timing the
        stream out and lets a dead peer show (the write fails)."""
        if not self.closing and not self.held:
            self._transport.write(chunk(KEEP_ALIVE))

    def _send_close(self, code: int, reason: str) -> None:
        self.session.closing(code, reason)
        if not self.held:  # else the handler refuses, or adopt() ends the stream
            self._finish()

    def _finish(self) -> None:
        """End the stream: the close event a WebSocket's close frame stands for, the last
        chunk, and the end of the connection (dropped if the client does not read)."""
        code, reason = self.session.closed_with or (1000, "closed")
        transport = self._transport
        if not transport.is_closing():
            transport.write(chunk(event(encode(CloseFrame(code, reason)))) + END)
            transport.close()
        if self._deadline is None and not self._lost:
            self._deadline = self._shared.loop.call_later(CLOSE_TIMEOUT, transport.abort)

    async def _end(self) -> None:
        """After the connection is gone: detach the client and account for it."""
        shared, session = self._shared, self.session
        try:
            shared.connections.discard(self)
            await shared.relay.detach(session.client, self)
            closed(shared.metrics, shared.relay, session.client, session.ended(time.monotonic()))
            await session.release()
        except Exception:
            log.exception("could not detach a closed SSE stream")
        finally:
            self._ended()


def _not_streaming() -> NotStreaming:
    return NotStreaming(
        "no SSE stream of this registration is open on this node: open GET /sse/<id> "
        "first (a WebSocket takes its commands as frames)"
    )


def _nowhere_streaming() -> NotStreaming:
    return NotStreaming(
        "no node sharing the broker holds an SSE stream of this registration (none "
        f"answered within {FORWARD_TIMEOUT:g} s): open GET /sse/<id> first (a WebSocket "
        "takes its commands as frames)"
    )


async def run_forwarded(client: Client, text: str) -> tuple[int, str]:
    """A command another node received by ``POST /sse/<id>`` for ``client``, attached
    here (:attr:`~wsrelay.relay.Relay.command_runner`): carried out by its stream as a
    local ``POST`` is; the HTTP status and JSON body to answer with."""
    connection = client.sink
    try:
        if not isinstance(connection, SseConnection) or connection.closing:
            raise _not_streaming()
        return 200, (await connection.command(text)).decode()
    except RelayError as error:
        return error.http_status, encode(error.to_dict()).decode()


# -- aiohttp's handlers ---------------------------------------------------------------------------


async def stream(request: web.Request) -> web.StreamResponse:
    """``GET /sse/<id>``: the events of a registration made with ``POST /register``."""
    return await _serve(request, request.match_info["client_id"])


async def token_stream(request: web.Request) -> web.StreamResponse:
    """``GET /sse?token=<JWT>``: the events of a registration made from the token's
    claims, which lives as long as the stream."""
    return await _serve(request, None)


async def _serve(request: web.Request, client_id: str | None) -> web.StreamResponse:
    shared: Shared = request.app[SHARED]
    headers = {name.lower(): value for name, value in reversed(list(request.headers.items()))}
    last = headers.get("last-event-id") or request.query.get(LAST_EVENT_ID, "")
    parsed: list[tuple[Any, bool]] = []

    def check_stream() -> None:  # where a WebSocket checks its upgrade
        if request.version < (1, 1):
            raise BadRequest("an SSE stream needs HTTP/1.1 (its events are sent chunked)")
        parsed.append(parse_event_id(last))

    address = request_address(request)
    gate = shared.gate_for(address)
    session = await admit(gate, client_id, request.query, headers, check_stream, one_way=True)
    since, unknown = parsed[0]
    transport = request.transport
    if transport is None:  # the peer left meanwhile: nobody to answer
        await session.release()
        return web.Response(status=499)
    connection = SseConnection(shared, transport, session)
    connection.address = address
    refusal = await attach(connection, shared.relay, session)
    if refusal is not None:
        await session.release()
        raise refusal
    try:
        # Right after the resume and before any await, the acknowledgement and replay go
        # into the (held) outbox: live publications released by the resume follow them.
        connection.apply(_sent(await session.resume(since, unknown=unknown)))
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": CONTENT_TYPE,
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # nginx: pass each event on at once
                **cors_headers(routes.SSE_BY_ID),
            },
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
    except BaseException as exc:
        connection.closing = True
        connection.take_raw()
        with contextlib.suppress(Exception):
            await shared.relay.detach(session.client, connection)
        await session.release()
        if isinstance(exc, ConnectionError):
            return web.Response(status=499)
        raise
    opening = b"retry: %d\n\n" % RETRY + event(encode(StreamFrame(session.client.id)))
    connection.adopt(request.protocol, opening)
    await connection.wait_closed()
    return response


def _sent(action: object) -> Send:
    if not isinstance(action, Send):
        raise AssertionError(f"a stream's resume answered {action!r}")
    return action


async def command(request: web.Request) -> web.Response:
    """``POST /sse/<id>``: one command for the registration's SSE stream (the JSON a
    WebSocket sends as a frame), answered with the frame a WebSocket would receive.

    A stream open on another node sharing the broker gets the command through
    :meth:`~wsrelay.relay.Relay.forward_command`, and that node's answer (the frame or the
    refusal, as its own ``POST`` would give) is this one's; no answer within
    :data:`~wsrelay.relay.FORWARD_TIMEOUT`: 409 ``not_streaming``."""
    shared: Shared = request.app[SHARED]
    shared.gate.check_origin(request.headers.get("Origin"))
    client_id = request.match_info["client_id"]
    relay = shared.relay
    client = relay.registry.attached(client_id)
    connection = client.sink if client is not None else None
    if not isinstance(connection, SseConnection) or connection.closing:
        await relay.lookup(client_id)  # 404 unknown_client: no such registration at all
        if client is not None or not relay.forwards:  # a WebSocket here, or one node
            raise _not_streaming()
        connection = None  # perhaps on another node: the command is forwarded
    limit = shared.settings.max_message_size  # what a WebSocket frame may hold
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(request.content_length, limit)
    body = await read_body(request)
    if len(body) > limit:
        raise _too_large(len(body), limit)
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"the command is not valid UTF-8 (byte {exc.start})") from None
    if connection is not None:
        status, answer = 200, await connection.command(text)
    else:
        forwarded = await relay.forward_command(client_id, text)
        if forwarded is None:
            raise _nowhere_streaming()
        status, answer = forwarded[0], forwarded[1].encode()
    response = web.Response(status=status, body=answer, content_type="application/json")
    response.headers.update(cors_headers(routes.SSE_BY_ID))
    return response


def _too_large(size: int, limit: int) -> RelayError:
    return PayloadTooLarge(
        f"the command is {size} bytes; the limit is {limit} (--max-message-size, as for "
        "a WebSocket frame)"
    )
