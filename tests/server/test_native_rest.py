"""A connection at rest holds no websockets protocol (server/native.py ``_rest``), and
one that rested speaks WebSocket exactly as before: a message in fragments, a frame cut
between reads, pings, a close.

The app runs in this process (so a test can see when the server has read its bytes and
whether a connection holds a protocol); the client is a real socket speaking raw
WebSocket, on both stacks (fresh connections on ``native``, adopted ones on ``aiohttp``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from tests.server.inprocess import served as serve
from tests.server.rawws import CLOSE, CONTINUATION, PING, PONG, TEXT, RawWebSocket, encode_frame
from tests.utils import TIMEOUT
from wsrelay.config import STACKS, Settings
from wsrelay.server.app import create_app
from wsrelay.server.keys import CONNECTIONS, RELAY
from wsrelay.server.native import NativeConnection


@dataclass
class Served:
    url: str
    app: web.Application

    def connection(self) -> NativeConnection:
        (connection,) = self.app[CONNECTIONS]
        assert isinstance(connection, NativeConnection)
        return connection

    async def open(self) -> RawWebSocket:
        client = await self.app[RELAY].register(None, [])
        return await RawWebSocket.connect(f"{self.url}/ws/{client.id}")


@pytest.fixture(params=STACKS)
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    app = create_app(Settings())
    async with serve(app, request.param) as url:
        yield Served(url, app)


async def until(condition: Callable[[], bool]) -> None:
    """Wait for the server (in this process) to reach ``condition``."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.001)


async def answer(socket: RawWebSocket) -> dict[str, Any]:
    frame = await socket.frame()
    assert frame is not None and frame.opcode == TEXT, frame
    result: dict[str, Any] = json.loads(frame.payload)
    return result


def subscribe(topic: str) -> bytes:
    return json.dumps({"subscribe": [topic]}).encode()


async def test_an_open_idle_connection_holds_no_protocol(served: Served) -> None:
    socket = await served.open()
    await until(lambda: served.connection()._ws is None)
    socket.send(encode_frame(TEXT, subscribe("news")))
    assert (await answer(socket))["topics"] == ["news"]
    # The answer is queued before the command's task ends, and the task lets it go.
    assert served.connection()._ws is None
    assert (await served.app[RELAY].publish("news", "hello")).recipients == 1
    assert (await answer(socket))["message"] == "hello"
    socket.abort()


async def test_a_message_in_fragments_keeps_its_protocol_between_them(served: Served) -> None:
    """A pong proves the first fragment was read; a fresh protocol would refuse the
    continuation (1002)."""
    socket = await served.open()
    await until(lambda: served.connection()._ws is None)
    text = subscribe("news")
    socket.send(encode_frame(TEXT, text[:7], fin=False))
    socket.send(encode_frame(PING, b"between"))
    pong = await socket.frame()
    assert pong is not None and (pong.opcode, pong.payload) == (PONG, b"between")
    assert served.connection()._ws is not None
    socket.send(encode_frame(CONTINUATION, text[7:]))
    assert (await answer(socket))["topics"] == ["news"]
    await until(lambda: served.connection()._ws is None)
    socket.abort()


async def test_a_frame_cut_between_reads_keeps_its_protocol(served: Served) -> None:
    socket = await served.open()
    await until(lambda: served.connection()._ws is None)
    frame = encode_frame(TEXT, subscribe("news"))
    socket.send(frame[:5])

    await until(lambda: served.connection()._ws is not None)  # the half was read
    await asyncio.sleep(0.01)  # the protocol must outlive the rest of the loop's passes
    assert served.connection()._ws is not None
    socket.send(frame[5:])
    assert (await answer(socket))["topics"] == ["news"]
    socket.abort()


async def test_a_rested_connection_closes_with_the_closing_handshake(served: Served) -> None:
    socket = await served.open()
    await until(lambda: served.connection()._ws is None)
    socket.send(encode_frame(CLOSE, (1000).to_bytes(2, "big") + b"bye"))
    assert await socket.close_code() == 1000  # the server's answer echoes the code
    assert await socket.frame() is None  # then the server ends the TCP connection
    socket.abort()
    await until(lambda: not served.app[CONNECTIONS])


async def test_a_rested_connection_is_closed_by_the_server_as_before(served: Served) -> None:
    """The server's own close (here the registration deleted) needs a protocol again."""
    socket = await served.open()
    connection = served.connection()
    await until(lambda: connection._ws is None)
    assert connection.session is not None
    await served.app[RELAY].unregister(connection.session.client.id)
    assert await socket.close_code() is not None
    socket.send(encode_frame(CLOSE, (1000).to_bytes(2, "big")))
    assert await socket.frame() is None
    socket.abort()
    await until(lambda: not served.app[CONNECTIONS])
