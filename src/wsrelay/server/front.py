"""The listening socket of ``wsrelay serve``: HTTP to aiohttp, WebSockets to the native driver.

Every accepted connection starts with a :class:`FrontDoor`, which reads only
the first request line. A fresh connection whose first request is
``GET /ws...`` (HTTP/1.1) is handed to
:class:`~wsrelay.server.native.NativeConnection`, which parses the handshake
with the ``websockets`` library; anything else goes, bytes and all, to the
protocol aiohttp would have used (its ``web.Server`` is the protocol factory
aiohttp passes to ``loop.create_server`` itself). After the hand-over the front
door is gone: an HTTP request costs one extra call on its connection's first
packet, nothing after.

An upgrade sent as a later request on a kept-alive HTTP connection reaches
aiohttp's own WebSocket route (:mod:`wsrelay.server.ws`), with the same rules.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable

from aiohttp import web

from wsrelay.server.native import Shared

WEBSOCKET_REQUEST_LINE = re.compile(rb"GET /ws(?:[/?][^ \r\n]*)? HTTP/1\.1\r?\n")
"""The request lines the native driver takes."""

_PREFIX = b"GET /ws"

MAX_PEEK = 8192
"""Bytes read while looking for the end of the first request line; a longer line
goes to aiohttp, which refuses it (414)."""


class FrontDoor(asyncio.Protocol):
    """The first protocol of an accepted connection; see the module docstring."""

    __slots__ = ("_buffer", "_http", "_native", "_timeout", "_timer", "_transport")

    def __init__(
        self,
        http: Callable[[], asyncio.Protocol],
        native: Callable[[asyncio.Transport], asyncio.Protocol],
        timeout: float,
    ) -> None:
        self._http = http
        self._native = native
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport
        # A client that connects and says nothing is closed after the request timeout,
        # as aiohttp does with a request whose headers never end.
        self._timer = asyncio.get_running_loop().call_later(self._timeout, transport.abort)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        line_end = buffer.find(b"\n")
        if line_end < 0 and len(buffer) < MAX_PEEK and _PREFIX.startswith(buffer[: len(_PREFIX)]):
            self._buffer = buffer  # might still be a WebSocket request: wait for the line
            return
        native = line_end >= 0 and WEBSOCKET_REQUEST_LINE.match(buffer, 0, line_end + 1)
        self._hand_over(self._native if native else None, buffer)

    def _hand_over(
        self, native: Callable[[asyncio.Transport], asyncio.Protocol] | None, buffer: bytes
    ) -> None:
        transport = self._transport
        assert transport is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buffer = b""
        protocol = native(transport) if native is not None else self._http()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(buffer)

    def eof_received(self) -> bool | None:
        return None  # nothing complete arrived: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class RelaySite(web.BaseSite):
    """A TCP site whose connections start at a :class:`FrontDoor`.

    Used by :func:`wsrelay.server.app.serve` in place of ``web.TCPSite``; the
    runner stops it and reports its addresses like any other site.
    """

    __slots__ = ("_host", "_port", "_reuse_port", "_shared")

    def __init__(
        self,
        runner: web.AppRunner,
        shared: Shared,
        host: str | None,
        port: int,
        *,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner)
        self._shared = shared
        self._host = host
        self._port = port
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return f"http://{self._host or '0.0.0.0'}:{self._port}"

    async def start(self) -> None:
        await super().start()
        http = self._runner.server
        assert http is not None
        native = self._shared.connection
        timeout = self._shared.settings.request_timeout

        def front_door() -> FrontDoor:
            return FrontDoor(http, native, timeout)

        self._server = await asyncio.get_running_loop().create_server(
            front_door,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port or None,
            family=socket.AF_UNSPEC,
        )
