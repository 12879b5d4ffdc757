"""The frame pump (server/native.py) against a real server: reading resumes after every
task, bytes behind a handshake are served after the 101 on both paths (fresh and adopted),
a client that left gives its slot back, and shutdown closes unanswered handshakes.

Each test reproduces a hole an adversarial review found in the first version of the pump;
each failed then.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.server.rawws import CLOSE, PING, PONG, TEXT, RawWebSocket, encode_frame, host_port
from tests.utils import TIMEOUT, ServerProcess, stop_and_check
from wsrelay.config import STACKS


def command(body: dict[str, Any]) -> bytes:
    return encode_frame(TEXT, json.dumps(body).encode())


SPLIT_COMMAND = command({"subscribe": ["t"]})
"""One masked frame, sent in two parts (a frame's mask key is random: the parts must be
of the same frame)."""


async def register(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.post(url + "/register", json={}) as r:
        assert r.status == 200
        return str((await r.json())["id"])


async def answer(socket: RawWebSocket, timeout: float = TIMEOUT) -> dict[str, Any] | None:
    """The next text frame as JSON (pongs and pings skipped), or None at a close/EOF."""

    async def read() -> dict[str, Any] | None:
        while True:
            frame = await socket.frame()
            if frame is None or frame.opcode == CLOSE:
                return None
            if frame.opcode in (PING, PONG):
                continue
            result: dict[str, Any] = json.loads(frame.payload)
            return result

    return await asyncio.wait_for(read(), timeout)


async def keep_alive_upgrade(url: str, client_id: str, then: bytes) -> RawWebSocket:
    """On --stack native: GET /health, then the upgrade on the same connection (aiohttp
    answers it and the connection is adopted), ``then`` in the same write as the upgrade."""
    reader, writer = await asyncio.open_connection(*host_port(url))
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"}"), TIMEOUT)
    ws_url = "ws" + url.removeprefix("http") + f"/ws/{client_id}"
    return await RawWebSocket.handshake(ws_url, streams=(reader, writer), then=then)


@pytest.mark.parametrize("stack", STACKS)
async def test_commands_after_a_read_longer_than_one_slice_are_answered(
    start_server: Callable[..., ServerProcess], stack: str
) -> None:
    """A command, then the first 9000 bytes of a larger message, in one write (one read
    of more than READ_SLICE): the first command runs in a task and the rest becomes
    ``_unread``; ``_idle`` parses it but never resumes reading, so the rest of the
    message (and every later command) is never read. Observed: no answer (and, with
    pings on, the client is later dropped as 'no pong' although it is alive)."""
    server = start_server("--stack", stack)
    client_id = await register(server.url)
    socket = await RawWebSocket.connect(f"{server.ws_url}/ws/{client_id}")
    big = command({"subscribe": ["big"], "padding_is_not_a_field": "x" * 12000})
    socket.send(command({"subscribe": ["first"]}) + big[:9000])
    first = await answer(socket)
    assert first is not None and first["type"] == "subscribed"
    socket.send(big[9000:])  # the rest of the big message: an error frame (unknown field)
    socket.send(command({"subscribe": ["second"]}))
    try:
        error = await answer(socket)
        assert error is not None and error["type"] == "error", error
        ack = await answer(socket)
        assert ack is not None and ack["topics"] == ["first", "second"], ack
    finally:
        socket.abort()


@pytest.mark.parametrize(
    ("stack", "how", "tail"),
    [
        ("aiohttp", "direct", encode_frame(PING, b"p")),
        ("aiohttp", "direct", SPLIT_COMMAND[:3]),  # a frame's first bytes
        ("native", "keep-alive", encode_frame(PING, b"p")),
    ],
    ids=["aiohttp-ping-behind-handshake", "aiohttp-partial-frame", "native-keepalive-upgrade"],
)
async def test_adopted_connection_reads_on_after_bytes_behind_the_handshake(
    start_server: Callable[..., ServerProcess], stack: str, how: str, tail: bytes
) -> None:
    """Bytes that aiohttp read past the upgrade (a ping, or the start of a command) are
    handed to the adopted connection as ``_unread``; ``_start`` -> ``_idle`` parses them
    without a command to run and never resumes reading. Observed: no answer, ever."""
    server = start_server("--stack", stack)
    client_id = await register(server.url)
    if how == "keep-alive":
        socket = await keep_alive_upgrade(server.url, client_id, tail)
    else:
        socket = await RawWebSocket.handshake(f"{server.ws_url}/ws/{client_id}", then=tail)
    assert socket.head.startswith(b"HTTP/1.1 101"), socket.head
    socket.send(SPLIT_COMMAND[3:] if tail == SPLIT_COMMAND[:3] else command({"subscribe": ["t"]}))
    try:
        ack = await answer(socket)
        assert ack is not None and ack["type"] == "subscribed", ack
    finally:
        socket.abort()


async def test_adopted_connection_whose_client_left_gives_its_slot_back(
    start_server: Callable[..., ServerProcess],
) -> None:
    """Consequence of the above: a connection stuck with reading paused never hears its
    peer leave, so its slot is held until a write fails. With --max-connections 1 and
    pings off, one client that sent a ping with its handshake and left blocks the
    server for good. Observed: 503 too_many_connections."""
    server = start_server("--stack", "aiohttp", "--max-connections", "1", "--ping-interval", "0")
    client_id = await register(server.url)
    url = f"{server.ws_url}/ws/{client_id}"
    socket = await RawWebSocket.handshake(url, then=encode_frame(PING, b"p"))
    assert socket.head.startswith(b"HTTP/1.1 101"), socket.head
    socket.abort()

    async def slot_free() -> None:
        async with aiohttp.ClientSession() as s:
            while True:
                async with s.get(server.url + "/health") as r:
                    if (await r.json())["connections"] == 0:
                        return
                await asyncio.sleep(0.05)  # polling the count, bounded below

    await asyncio.wait_for(slot_free(), TIMEOUT)
    other = await register(server.url)
    second = await RawWebSocket.handshake(f"{server.ws_url}/ws/{other}")
    second.abort()
    assert second.head.startswith(b"HTTP/1.1 101"), second.head


@pytest.mark.parametrize(
    "early",
    [encode_frame(PING, b"hi"), encode_frame(CLOSE, (1000).to_bytes(2, "big") + b"bye")],
    ids=["ping", "close"],
)
async def test_native_handshake_answer_comes_before_any_frame(
    start_server: Callable[..., ServerProcess], early: bytes
) -> None:
    """A control frame in the same write as the handshake (native stack): websockets,
    still CONNECTING, answers it while the handshake task runs, so the pong is written
    before 'HTTP/1.1 101' (observed: b'\\x8a\\x02hiHTTP/1.1 101 ...'), and for a close
    the connection is closed with no answer at all (observed: EOF), though the
    connection is logged as opened. Either way the client cannot parse the answer; aiohttp
    (--stack aiohttp) answers 101 first."""
    server = start_server("--stack", "native")
    client_id = await register(server.url)
    reader, writer = await asyncio.open_connection(*host_port(server.url))
    try:
        socket = await RawWebSocket.handshake(
            f"{server.ws_url}/ws/{client_id}", streams=(reader, writer), then=early
        )
        head = socket.head
    except asyncio.IncompleteReadError as exc:
        head = exc.partial
    finally:
        writer.transport.abort()
    assert head.startswith(b"HTTP/1.1 101"), head


async def test_sigterm_during_a_native_handshake_leaves_no_unclosed_transport() -> None:
    """SIGTERM while a client is still sending its upgrade's headers (native stack): the
    NativeConnection is in no set the shutdown closes (RelaySite.stop aborts only front
    doors; the app only open connections), so the transport is left open at exit.
    Observed: 'ResourceWarning: unclosed resource <TCPTransport ...>' in the log, which
    stop_and_check refuses."""
    server = ServerProcess(["--stack", "native"]).start()
    writer: asyncio.StreamWriter | None = None
    try:
        _, writer = await asyncio.open_connection(*host_port(server.url))
        writer.write(b"GET /ws/x HTTP/1.1\r\nHost: x\r\n")  # headers not finished
        await writer.drain()
        await asyncio.sleep(0.3)  # lets the server take the bytes; no event says it has
    finally:
        stop_and_check(server)
        if writer is not None:
            writer.transport.abort()
