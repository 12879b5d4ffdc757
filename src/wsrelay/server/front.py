"""The listening socket of ``wsrelay serve``: each new connection to the driver that serves it best.

Every accepted connection starts with a :class:`FrontDoor`, which reads only
the first request line and hands the connection, bytes and all, to:

* :class:`~wsrelay.server.native.NativeConnection` if it is ``GET /ws...``
  (HTTP/1.1): a WebSocket, held in a third of aiohttp's memory
  (docs/decisions/0004);
* :class:`~wsrelay.server.native_http.PublishConnection` if it is
  ``POST /publish`` or ``POST /publish/batch`` (HTTP/1.1): a publisher, served
  at about 2.9 times aiohttp's requests/s (docs/decisions/0005), which passes the connection
  on to aiohttp at the first request that is not a publish;
* aiohttp's own protocol otherwise (its ``web.Server`` is the protocol factory
  aiohttp passes to ``loop.create_server`` itself).

After the hand-over the front door is gone: it costs one call on a
connection's first packet. An upgrade sent as a later request on a kept-alive
HTTP connection reaches aiohttp's WebSocket route (:mod:`wsrelay.server.ws`),
with the same rules. ``--stack aiohttp`` leaves everything to aiohttp.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import cast

from aiohttp import web

from wsrelay.server.native import Shared
from wsrelay.server.native_http import HttpShared
from wsrelay.server.routes import NATIVE_PREFIXES, PUBLISH_REQUEST_LINE, WEBSOCKET_REQUEST_LINE

ProtocolFor = Callable[[asyncio.Transport, float], asyncio.Protocol]
"""A native driver's factory: the transport, and when it was accepted (loop time), from
which the driver counts the header timeout."""

MAX_PEEK = 8192
"""Bytes read while looking for the end of the first request line; a longer line
goes to aiohttp, which refuses it (400)."""


class FrontDoor(asyncio.Protocol):
    """The first protocol of an accepted connection; see the module docstring."""

    __slots__ = (
        "_buffer",
        "_http",
        "_publish",
        "_since",
        "_timeout",
        "_timer",
        "_transport",
        "_waiting",
        "_websocket",
    )

    def __init__(
        self,
        http: Callable[[], asyncio.Protocol],
        websocket: ProtocolFor,
        publish: ProtocolFor,
        timeout: float,
        waiting: set[FrontDoor],
    ) -> None:
        self._waiting = waiting  # the site's doors still reading a first line
        self._http = http
        self._websocket = websocket
        self._publish = publish
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._since = 0.0
        self._timeout = timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport = stream
        self._waiting.add(self)
        # A client that connects and says nothing is closed after the request timeout,
        # as aiohttp does with a request whose headers never end.
        loop = asyncio.get_running_loop()
        self._since = loop.time()
        self._timer = loop.call_at(self._since + self._timeout, stream.abort)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        line_end = buffer.find(b"\n")
        if line_end < 0 and len(buffer) < MAX_PEEK and _may_be_routed(buffer):
            self._buffer = buffer  # wait for the whole first line
            return
        driver: ProtocolFor | None = None
        if line_end >= 0:
            if WEBSOCKET_REQUEST_LINE.match(buffer, 0, line_end + 1):
                driver = self._websocket
            elif PUBLISH_REQUEST_LINE.match(buffer, 0, line_end + 1):
                driver = self._publish
        self._hand_over(driver, buffer)

    def _hand_over(self, driver: ProtocolFor | None, buffer: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buffer = b""
        self._waiting.discard(self)
        # A native driver counts its header timeout from the accept; aiohttp starts its
        # own, which only a first line that looked native yet was not can lengthen.
        protocol = driver(transport, self._since) if driver is not None else self._http()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(buffer)

    def eof_received(self) -> bool | None:
        return None  # nothing complete arrived: close

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def _may_be_routed(start: bytes) -> bool:
    """Whether ``start``, the beginning of a first line, could still be a routed one."""
    return any(prefix.startswith(start[: len(prefix)]) for prefix in NATIVE_PREFIXES)


class RelaySite(web.BaseSite):
    """A TCP site whose connections start at a :class:`FrontDoor`.

    Used by :func:`wsrelay.server.app.serve` in place of ``web.TCPSite``; the
    runner stops it and reports its addresses like any other site.
    """

    __slots__ = (
        "_host",
        "_port",
        "_publishers",
        "_reuse_port",
        "_shared",
        "_waiting",
    )

    def __init__(
        self,
        runner: web.AppRunner,
        shared: Shared,
        host: str | None,
        port: int,
        *,
        reuse_port: bool = False,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._shared = shared
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._waiting: set[FrontDoor] = set()
        self._publishers: HttpShared | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host or '0.0.0.0'}:{self._port}"

    async def start(self) -> None:
        await super().start()
        http = self._runner.server
        assert http is not None
        websocket = self._shared.connection
        self._publishers = HttpShared(self._shared.app, http)
        publish = self._publishers.connection
        timeout = self._shared.settings.request_timeout
        waiting = self._waiting

        def front_door() -> FrontDoor:
            return FrontDoor(http, websocket, publish, timeout, waiting)

        self._server = await asyncio.get_running_loop().create_server(
            front_door,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port or None,
            family=socket.AF_UNSPEC,
        )

    async def stop(self) -> None:
        """Stop listening; close what the native HTTP side holds (aiohttp closes its
        own connections, the app's shutdown the WebSockets)."""
        await super().stop()
        for door in list(self._waiting):
            door.abort()
        for connection in list(self._shared.handshaking):  # handshakes still unanswered
            connection.abort()
        if self._publishers is not None:
            self._publishers.close_all()
