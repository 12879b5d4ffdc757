"""A TCP proxy in front of a real server whose connections a test can cut.

A client that talks to the proxy's URL reaches the server through it, byte for byte
(HTTP and WebSocket alike: the ``Host`` header names the proxy, so a registration's
WebSocket URL leads back through it too). :meth:`Proxy.cut` aborts every connection
passing through (the client sees a TCP reset: close 1006, no close frame), as a
network failure would, while the server keeps running; :meth:`Proxy.down` also makes
new connections fail until :meth:`Proxy.up`.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit


class Proxy:
    """See the module docstring."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        assert parts.hostname is not None and parts.port is not None
        self.host, self.port = parts.hostname, parts.port
        self.url = ""
        self.accepted = 0
        """Connections accepted and forwarded so far."""
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._down = False

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def cut(self) -> None:
        """Abort every connection passing through now (both sides see a reset)."""
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    def down(self) -> None:
        """Cut, and abort new connections as they come, until :meth:`up`."""
        self._down = True
        self.cut()

    def up(self) -> None:
        self._down = False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        self._open.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            self._open.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            # One side ended or failed: end the other (a reset, like a dropped network).
            with contextlib.suppress(Exception):
                writer.transport.abort()
