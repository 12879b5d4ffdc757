"""The HTTP driver for publishers: ``POST /publish`` and ``POST /publish/batch`` without aiohttp.

Why it exists: aiohttp's request path alone (a task, a ``Request``, a response
object and the middleware chain per request) costs about 157 us of CPU per
request here, 1.7x the Node.js relay's whole publish (docs/decisions/0005).
Publishers are few connections sending many small requests, so
:mod:`wsrelay.server.front` hands a connection whose first request is a publish
to :class:`PublishConnection`: ``httptools`` (the llhttp parser uvicorn uses)
parses every request, the publish itself is the same function aiohttp's handler
calls (:func:`wsrelay.server.http.publish_one`), and the answer is one write.

Everything else stays with aiohttp. A request on such a connection that is not
a plain HTTP/1.1 ``POST`` to a publish endpoint (another route, ``Expect:
100-continue``, an upgrade, HTTP/1.0) is handed to aiohttp with the rest of the
connection, once the requests before it are answered. To find where that
request starts, the driver keeps the bytes received since the last moment the
parser was between requests at the start of a read (the *anchor*; usually just
the current read) and, if the request did not start there, replays them into a
fresh parser (:func:`message_start`).

Same rules as through aiohttp: API key, the limits on a request's target and
headers (:mod:`wsrelay.server.limits`, 400), body size (413 from the declared
length, before reading), body and keep-alive time (408 / close), JSON errors, the
request-latency histogram and the refused-request log line.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import httptools
import msgspec
from aiohttp import web

from wsrelay.core.schema import encode
from wsrelay.errors import (
    BadRequest,
    HeadersTooLarge,
    PayloadTooLarge,
    RelayError,
    RequestTimeout,
    ServerError,
)
from wsrelay.server import http, routes
from wsrelay.server.auth import API_KEYS, check_authorization
from wsrelay.server.errors import error_headers, log_refused
from wsrelay.server.keys import SETTINGS
from wsrelay.server.limits import (
    HEAD_BUFFER_SIZE,
    MAX_FIELD_SIZE,
    MAX_HEAD_SIZE,
    MAX_HEADERS,
    MAX_URL_SIZE,
)
from wsrelay.server.metrics import METRICS
from wsrelay.server.proxies import ADDRESSES, ClientAddresses

log = logging.getLogger("wsrelay.server")

Publisher = Callable[[web.Application, bytes], Awaitable[msgspec.Struct]]

ROUTES: dict[bytes, tuple[str, Publisher]] = {
    routes.PUBLISH.encode(): (routes.PUBLISH, http.publish_one),
    routes.PUBLISH_BATCH.encode(): (routes.PUBLISH_BATCH, http.publish_many),
}
"""Paths served here: the route label (metrics, logs) and the work."""

MAX_QUEUED = 16
"""Requests parsed but not yet answered (pipelining) before reading pauses."""

REPLAY_BLOCK = 4096

LINGER_SECONDS = 2.0
"""After refusing a request whose rest is still arriving, how long what the client
sends is read and dropped before the connection closes: closing a socket with
unread data sends a reset, which can destroy the answer before the client reads it
(aiohttp lingers the same way)."""


class _Foreign(Exception):
    """Raised in a parser callback: this request is for aiohttp."""


class _Refused(Exception):
    """Raised in a parser callback: answer ``error`` and close the connection."""

    def __init__(self, error: RelayError) -> None:
        self.error = error


class _Request:
    __slots__ = (
        "authorization",
        "body",
        "close",
        "declared",
        "error",
        "expect",
        "fields",
        "forwarded",
        "head_size",
        "publisher",
        "route",
        "started",
        "target",
        "x_forwarded_for",
    )

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.target = ""  # the request target, path and query
        self.route = routes.PUBLISH  # the route label, once known
        self.publisher: Publisher | None = None
        self.authorization: tuple[str, ...] = ()  # every Authorization header's value
        self.body: list[bytes] = []
        self.close = False
        self.declared = 0  # Content-Length
        self.expect = False
        self.error: RelayError | None = None
        self.fields = 0  # header fields reported so far
        self.head_size = 0  # bytes of request line and headers, counted per read
        self.x_forwarded_for: tuple[str, ...] = ()  # read for the logs (--trusted-proxy)
        self.forwarded: tuple[str, ...] = ()


class HttpShared:
    """What every native HTTP connection of one app uses."""

    __slots__ = ("addresses", "api_keys", "app", "http", "live", "loop", "metrics", "settings")

    def __init__(self, app: web.Application, http_protocol: Callable[[], asyncio.Protocol]) -> None:
        self.app = app
        self.settings = app[SETTINGS]
        self.api_keys: tuple[bytes, ...] = app[API_KEYS]
        self.metrics = app[METRICS]
        self.http = http_protocol
        self.loop = asyncio.get_running_loop()
        self.live: set[PublishConnection] = set()
        self.addresses: ClientAddresses = app.get(ADDRESSES) or ClientAddresses()

    def connection(self, transport: asyncio.Transport, since: float) -> PublishConnection:
        """A connection accepted at ``since`` (loop time), its first line read."""
        return PublishConnection(self, transport, since)

    def close_all(self) -> None:
        """On shutdown: close every connection once what it has received is answered."""
        for connection in list(self.live):
            connection.close_when_answered()


class PublishConnection(asyncio.Protocol):
    """One publisher's keep-alive connection; see the module docstring."""

    __slots__ = (
        "_anchor",
        "_anchor_size",
        "_begun",
        "_current",
        "_deadline",
        "_deadline_at",
        "_handover",
        "_parser",
        "_paused",
        "_queue",
        "_shared",
        "_size",
        "_stopping",
        "_task",
        "_transport",
        "_writing_paused",
    )

    def __init__(
        self, shared: HttpShared, transport: asyncio.Transport, since: float | None = None
    ) -> None:
        self._shared = shared
        self._transport = transport
        self._parser = httptools.HttpRequestParser(self)
        self._current: _Request | None = None  # the request being parsed
        self._size = 0
        self._queue: deque[_Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self._handover: bytes | None = None
        self._anchor: list[bytes] | None = []
        self._anchor_size = 0
        self._begun = 0  # requests begun since the anchor
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_at = 0.0
        self._stopping = False
        self._writing_paused = False
        shared.live.add(self)
        # The first request's headers and body, as aiohttp times them: from the accept.
        self._touch(since)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Given by :class:`~wsrelay.server.front.FrontDoor` at construction already."""

    def data_received(self, data: bytes) -> None:
        if self._handover is not None:
            return  # not ours any more (reading is paused; a read already under way ends here)
        if self._current is None:  # between requests: the anchor moves here
            self._anchor, self._anchor_size, self._begun = [data], len(data), 0
        elif self._anchor is not None:
            self._anchor.append(data)
            self._anchor_size += len(data)
            if self._anchor_size > self._shared.settings.max_body_size + HEAD_BUFFER_SIZE:
                self._anchor = None  # one request this large cannot be followed by a foreign one
        # The request whose head was incomplete when this read came, if any.
        in_head = self._current if self._current and not self._current.publisher else None
        try:
            self._parser.feed_data(data)
            if in_head is not None and in_head is self._current and not in_head.publisher:
                in_head.head_size += len(data)  # the same head, still not complete
                if in_head.head_size > _head_allowance(in_head.fields):
                    too_long = (
                        f"the request line and headers are over {in_head.head_size} bytes and "
                        f"unfinished: a header field or value is over {MAX_FIELD_SIZE} bytes"
                    )
                    self._refuse(HeadersTooLarge(too_long))
        except httptools.HttpParserCallbackError as exc:
            reason = exc.__context__
            if isinstance(reason, _Foreign):
                self._found_foreign()
            elif isinstance(reason, _Refused):
                self._refuse(reason.error)
            else:  # a fault of ours: this client gets a 500, the server goes on
                log.error("unexpected error parsing a publish", exc_info=reason)
                self._refuse(ServerError("internal error; see the server log"))
        except httptools.HttpParserUpgrade:
            self._found_foreign()  # on_headers_complete sends upgrades away; kept for safety
        except httptools.HttpParserError as exc:
            self._refuse(BadRequest(f"malformed HTTP request: {exc}", code="bad_http"))

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        # A publisher that does not read its answers is not read either, so what
        # waits for it stays bounded (the transport's high-water mark).
        self._writing_paused = True
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if not self._paused and self._handover is None and not self._stopping:
            self._transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        # A request being answered finishes (its publish is not cut in half), as with
        # aiohttp; its answer is not written.
        self._shared.live.discard(self)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._current = _Request()
        self._size = 0
        self._begun += 1

    def on_url(self, url: bytes) -> None:
        current = self._current
        assert current is not None
        current.target += url.decode("latin-1")  # it may come in pieces
        if len(current.target) > MAX_URL_SIZE:  # as aiohttp's max_line_size
            too_long = f"the request target is over {MAX_URL_SIZE} bytes"
            raise _Refused(BadRequest(too_long, code="bad_http"))

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called once a field has ended (when the next one starts), trailers included.
        current = self._current
        assert current is not None
        current.fields += 1
        if current.fields > MAX_HEADERS:  # as aiohttp's max_headers
            too_many = f"the request has more than {MAX_HEADERS} header fields"
            raise _Refused(BadRequest(too_many, code="bad_http"))
        if len(value) > MAX_FIELD_SIZE or len(name) > MAX_FIELD_SIZE:  # as aiohttp's
            field = name[:64].decode("latin-1")
            too_long = f"the header field {field!r} or its value is over {MAX_FIELD_SIZE} bytes"
            raise _Refused(BadRequest(too_long, code="bad_http"))
        lowered = name.lower()
        if lowered == b"authorization":
            if current.publisher is None:  # in the head, not a trailer
                current.authorization += (value.decode("latin-1"),)
        elif lowered == b"expect":
            current.expect = True  # aiohttp answers 100-continue
        elif lowered == b"content-length" and value.isdigit():
            current.declared = int(value)  # llhttp refuses any other form, or two of them
        elif lowered == b"x-forwarded-for" and current.publisher is None:
            current.x_forwarded_for += (value.decode("latin-1"),)
        elif lowered == b"forwarded" and current.publisher is None:
            current.forwarded += (value.decode("latin-1"),)

    def on_headers_complete(self) -> None:
        current, parser = self._current, self._parser
        assert current is not None
        target = ROUTES.get(current.target.partition("?")[0].encode("latin-1"))
        if (
            target is None
            or current.expect
            or parser.get_method() != b"POST"
            or parser.get_http_version() != "1.1"
            or parser.should_upgrade()
        ):
            raise _Foreign
        current.route, current.publisher = target
        limit = self._shared.settings.max_body_size
        if current.declared > limit:  # refused before the body is read, as by aiohttp
            too_large = f"request body is {current.declared} bytes; the limit is {limit}"
            raise _Refused(PayloadTooLarge(too_large))
        self._touch()  # the body has request_timeout to arrive

    def on_body(self, body: bytes) -> None:
        current = self._current
        assert current is not None
        self._size += len(body)
        limit = self._shared.settings.max_body_size
        if self._size > limit:
            too_large = f"request body is larger than the limit of {limit} bytes"
            raise _Refused(PayloadTooLarge(too_large))
        current.body.append(body)

    def on_message_complete(self) -> None:
        current = self._current
        assert current is not None
        self._current = None
        current.close = not self._parser.should_keep_alive()
        self._queue.append(current)
        if len(self._queue) >= MAX_QUEUED and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        if self._task is None:
            self._task = self._shared.loop.create_task(self._answer_all())

    # -- answering ----------------------------------------------------------------------------

    async def _answer_all(self) -> None:
        queue, transport = self._queue, self._transport
        while queue:
            request = queue.popleft()
            response = await self._answer(request)
            if transport.is_closing():
                self._task = None
                return
            transport.write(response)
            if request.close:
                self._task = None
                if request.error is not None and not self._stopping:
                    self._linger()
                else:
                    transport.close()
                return
        self._task = None
        if self._stopping:
            transport.close()
            return
        if self._handover is not None:
            self._hand_over()
            return
        if self._paused:
            self._paused = False
            if not self._writing_paused:
                transport.resume_reading()
        self._touch()  # idle: the next request has request_timeout to arrive

    async def _answer(self, request: _Request) -> bytes:
        shared = self._shared
        status, extra = 200, b""
        try:
            if request.error is not None:
                raise request.error
            check_authorization(request.authorization, shared.api_keys)
            assert request.publisher is not None
            body = encode(await request.publisher(shared.app, b"".join(request.body)))
        except RelayError as exc:
            status, body = exc.http_status, encode(exc.to_dict())
            headers = error_headers(exc).items()
            extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers)
            log_refused("POST", request.route, exc, self._address(request))
        except Exception:
            log.exception("unexpected error in POST %s", request.route)
            error = ServerError("internal error; see the server log")
            status, body = error.http_status, encode(error.to_dict())
        shared.metrics.request_latency("POST", request.route, status).observe(
            time.perf_counter() - request.started
        )
        return _head(status, len(body), extra, request.close) + body

    def _linger(self) -> None:
        """Close after telling the client, reading and dropping what it still sends."""
        transport = self._transport
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()  # data_received drops it: _handover is set
        self._shared.loop.call_later(LINGER_SECONDS, transport.close)

    def close_when_answered(self) -> None:
        self._stopping = True
        self._transport.pause_reading()
        if self._task is None:
            self._transport.close()

    def _refuse(self, error: RelayError) -> None:
        """Answer ``error`` after what is queued, then close; read nothing more."""
        request = self._current or _Request()
        self._current = None
        request.error, request.close = error, True
        self._transport.pause_reading()
        self._paused = True
        self._handover = b""  # nothing more is parsed
        self._queue.append(request)
        if self._task is None:
            self._task = self._shared.loop.create_task(self._answer_all())

    # -- handing over to aiohttp --------------------------------------------------------------

    def _found_foreign(self) -> None:
        anchor = b"".join(self._anchor) if self._anchor is not None else None
        offset = 0 if self._begun == 1 else None
        if offset is None and anchor is not None:
            offset = message_start(anchor, self._begun - 1)
        if anchor is None or offset is None:
            self._current = None
            self._refuse(
                BadRequest(
                    "could not route a pipelined request behind a large one; "
                    "send it on a new connection",
                    code="bad_http",
                )
            )
            return
        self._current = None
        self._handover = anchor[offset:]
        self._transport.pause_reading()
        if self._task is None:
            self._hand_over()

    def _hand_over(self) -> None:
        """Give the connection, and what it sent that was not answered, to aiohttp."""
        data, self._handover = self._handover or b"", b""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        transport = self._transport
        self._shared.live.discard(self)
        if transport.is_closing():
            return
        protocol = self._shared.http()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        transport.resume_reading()
        if data:
            protocol.data_received(data)

    # -- time limits --------------------------------------------------------------------------

    def _touch(self, since: float | None = None) -> None:
        """Start the request timeout from ``since`` or now (one timer, moved lazily)."""
        loop = self._shared.loop
        start = loop.time() if since is None else since
        self._deadline_at = start + self._shared.settings.request_timeout
        if self._deadline is None:
            self._deadline = loop.call_at(self._deadline_at, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        loop = self._shared.loop
        if self._task is not None or self._handover is not None:
            return  # answering, or not ours: the answer or aiohttp sets the next limit
        if loop.time() < self._deadline_at:
            self._deadline = loop.call_at(self._deadline_at, self._expire)
            return
        current = self._current
        if current is not None and current.publisher is not None:  # headers done, body late
            timeout = self._shared.settings.request_timeout
            self._refuse(RequestTimeout(f"the request body did not arrive within {timeout:g} s"))
        else:
            self._transport.close()

    def _peer(self) -> str | None:
        peer = self._transport.get_extra_info("peername")
        return str(peer[0]) if isinstance(peer, tuple) and peer else None

    def _address(self, request: _Request) -> str | None:
        """The client's address (behind a trusted proxy, the one it forwards)."""
        addresses = self._shared.addresses
        return addresses.resolve(self._peer(), request.x_forwarded_for, request.forwarded)


def _head_allowance(fields: int) -> int:
    """Bytes an unfinished head with ``fields`` header fields reported may have received
    and still be within the limits: its request line, those fields, one ended but not
    yet reported (httptools reports a field when the next one starts) and the one
    arriving. Never less than :data:`HEAD_BUFFER_SIZE`, never more than the largest
    head, :data:`MAX_HEAD_SIZE`."""
    within = MAX_HEAD_SIZE - (MAX_HEADERS - fields - 2) * (2 * MAX_FIELD_SIZE + 4)
    return max(HEAD_BUFFER_SIZE, min(within, MAX_HEAD_SIZE))


def _head(status: int, length: int, extra: bytes, close: bool) -> bytes:
    phrase = HTTPStatus(status).phrase.encode()
    connection = b"Connection: close\r\n" if close else b""
    return _HEAD % (status, phrase, length, _date(), extra, connection)


_HEAD = (
    b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"Date: %s\r\nServer: wsrelay\r\n%s%s\r\n"
)


_date_cache: list[Any] = [0, b""]


def _date() -> bytes:
    """The ``Date`` header's value, formatted once per second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, email.utils.formatdate(now, usegmt=True).encode()
    value: bytes = _date_cache[1]
    return value


class _Begins:
    """Counts the requests a parser begins."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def on_message_begin(self) -> None:
        self.count += 1


def message_start(data: bytes, index: int) -> int | None:
    """Where request number ``index`` (from 0) begins in ``data``, which starts at
    a request boundary; None if it cannot be found.

    ``httptools`` does not say where in a buffer a request began, so ``data`` is
    replayed into a fresh parser: in blocks (C speed) up to the block where the
    request begins, then a byte at a time through that block only.
    """
    counter = _Begins()
    parser = httptools.HttpRequestParser(counter)
    position = 0
    while position < len(data):
        try:
            parser.feed_data(data[position : position + REPLAY_BLOCK])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # What follows the request may be an upgrade or anything else: only
            # whether the request began in this block matters here.
            if counter.count <= index:
                return None
        if counter.count > index:
            break
        position += REPLAY_BLOCK
    else:
        return None
    try:
        counter = _Begins()
        parser = httptools.HttpRequestParser(counter)
        if position:
            parser.feed_data(data[:position])
        for offset in range(position, min(position + REPLAY_BLOCK, len(data))):
            parser.feed_data(data[offset : offset + 1])
            if counter.count > index:
                return offset
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    return None
