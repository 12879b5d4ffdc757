"""The front door of ``wsrelay serve`` (server/front.py): which stack serves a
connection, how it reads a request that arrives in pieces, and its limits.

Which stack answered shows in the 101: aiohttp names itself in a ``Server``
header, the native driver sends none.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess

import pytest

from tests.server.rawws import TEXT, RawWebSocket, encode_frame, host_port
from tests.utils import TIMEOUT, Api
from wsrelay.config import STACKS
from wsrelay.core.history import EPOCH_BYTES

EPOCH = re.compile(f"[0-9a-f]{{{2 * EPOCH_BYTES}}}")
"""A topic's epoch: random, so only its shape is known."""


def served_by_aiohttp(head: bytes) -> bool:
    return re.search(rb"(?im)^server:.*aiohttp", head) is not None


async def next_text(socket: RawWebSocket) -> dict[str, object]:
    while (frame := await socket.frame()) is not None:
        if frame.opcode == TEXT:
            return json.loads(frame.payload)  # type: ignore[no-any-return]
    raise AssertionError("the server closed before sending a text frame")


async def test_a_fresh_upgrade_is_served_by_the_native_driver(api: Api, topic: str) -> None:
    reg = await api.register(1, [topic])
    socket = await RawWebSocket.connect(reg["url"])
    assert not served_by_aiohttp(socket.head)
    assert await api.publish(topic, "native") == 1
    assert (await next_text(socket))["message"] == "native"
    socket.abort()


async def test_an_upgrade_after_an_http_request_on_one_connection_is_served(
    api: Api, topic: str
) -> None:
    """The second request of a kept-alive HTTP connection never reaches the front
    door: aiohttp's WebSocket route takes it, with the same behaviour."""
    reg = await api.register(1, [topic])
    reader, writer = await asyncio.open_connection(*host_port(api.base))
    writer.write(b"GET /health HTTP/1.1\r\nHost: relay\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 200"), head
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert length is not None
    assert json.loads(await reader.readexactly(int(length.group(1))))["status"] == "ok"

    socket = await RawWebSocket.connect(reg["url"], streams=(reader, writer))
    assert served_by_aiohttp(socket.head)
    assert await api.publish(topic, "kept alive") == 1
    assert (await next_text(socket))["message"] == "kept alive"
    socket.abort()


async def test_requests_that_arrive_a_byte_at_a_time_are_routed(api: Api, topic: str) -> None:
    reg = await api.register(1, [topic])
    socket = await RawWebSocket.connect(reg["url"], trickle=40)
    assert not served_by_aiohttp(socket.head)
    socket.abort()

    reader, writer = await asyncio.open_connection(*host_port(api.base))
    request = b"GET /health HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
    for i in range(len(request)):
        writer.write(request[i : i + 1])
        await writer.drain()
        await asyncio.sleep(0)
    answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    writer.close()


async def test_frames_sent_with_the_handshake_are_not_lost(api: Api, topic: str) -> None:
    """RFC 6455 says a client waits for the 101; one that does not is still served."""
    reg = await api.register(1)
    subscribe = encode_frame(TEXT, json.dumps({"subscribe": [topic]}).encode())
    socket = await RawWebSocket.connect(reg["url"], then=subscribe)
    ack = await next_text(socket)
    positions = ack.pop("positions")
    assert ack == {"type": "subscribed", "topics": [topic]}
    assert isinstance(positions, dict) and set(positions) == {topic}
    assert positions[topic]["offset"] == 0 and EPOCH.fullmatch(positions[topic]["epoch"])
    assert await api.publish(topic, "after") == 1
    assert await next_text(socket) == {
        "type": "message",
        "topic": topic,
        "message": "after",
        "offset": 1,
    }
    socket.abort()


async def test_native_handshake_errors_are_json(api: Api) -> None:
    unknown = await RawWebSocket.handshake(api.base.replace("http", "ws") + "/ws/" + "0" * 32)
    assert unknown.head.startswith(b"HTTP/1.1 404"), unknown.head
    assert re.search(rb"(?im)^content-type: application/json", unknown.head)
    body = await asyncio.wait_for(unknown.reader.read(), TIMEOUT)
    assert json.loads(body)["error"]["code"] == "unknown_client"
    unknown.writer.close()

    reg = await api.register(1)
    plain = await RawWebSocket.handshake(reg["url"], upgrade=False)
    assert plain.head.startswith(b"HTTP/1.1 426"), plain.head
    body = await asyncio.wait_for(plain.reader.read(), TIMEOUT)
    assert json.loads(body)["error"]["code"] == "upgrade_required"
    plain.writer.close()

    deep = await RawWebSocket.handshake(reg["url"] + "/extra")
    assert deep.head.startswith(b"HTTP/1.1 404"), deep.head
    deep.writer.close()


@pytest.mark.parametrize(
    "sent",
    [
        b"",
        b"GET /ws/0123",
        b"POST /publi",
        b"GET /ws/0123 HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n",
    ],
    ids=["nothing", "half a WebSocket line", "half a publish line", "half a handshake"],
)
async def test_a_connection_that_stops_early_is_closed(start_server, sent: bytes) -> None:
    server = start_server("--request-timeout", "0.5")
    reader, writer = await asyncio.open_connection(*host_port(server.url))
    writer.write(sent)
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()


@pytest.mark.parametrize("stack", STACKS)
def test_the_listen_backlog_is_the_setting(start_server, stack: str) -> None:
    """A reconnect storm queues in the kernel rather than losing SYNs to a backlog of 128
    (aiohttp's default): ``ss`` shows a listening socket's backlog as its Send-Q."""
    server = start_server("--stack", stack, "--listen-backlog", "777")
    port = server.url.rsplit(":", 1)[1]
    listing = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    backlogs = {line.split()[2] for line in listing.splitlines() if line.strip()}
    assert backlogs == {"777"}, listing
