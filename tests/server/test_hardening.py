"""Limits, keepalive, slow clients and graceful shutdown, against real servers."""

from __future__ import annotations

import asyncio
import json
import signal
import socket

import aiohttp
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.server.rawws import PING, PONG, TEXT, RawWebSocket, encode_frame, host_port
from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber
from wsrelay import codes


async def health(api: Api) -> dict[str, int]:
    status, body = await api.call("GET", "/health")
    assert status == 200
    return dict(body)


async def until_connections(api: Api, expected: int) -> None:
    """Wait (bounded) until the server reports ``expected`` open connections."""

    async def poll() -> None:
        while (await health(api))["connections"] != expected:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), TIMEOUT)


# -- connection limit, compression -------------------------------------------------------------


async def test_connections_past_the_limit_get_503_before_the_upgrade(start_server, session):
    server = start_server("--max-connections", "2")
    api = Api(session, server.url)
    first, second = await api.connect(1), await api.connect(2)
    with pytest.raises(InvalidStatus) as info:
        await api.connect(3)
    response = info.value.response
    assert response.status_code == 503
    assert json.loads(response.body or b"")["error"]["code"] == "too_many_connections"
    await first.close()

    async def connect_when_a_slot_frees() -> Subscriber:
        while True:
            try:
                return await api.connect(4)
            except InvalidStatus:
                await asyncio.sleep(0.01)

    third = await asyncio.wait_for(connect_when_a_slot_frees(), TIMEOUT)
    await third.close()
    await second.close()


async def test_permessage_deflate_offered_by_a_client_is_not_negotiated(api: Api) -> None:
    reg = await api.register(1)
    ws = await websockets.connect(reg["url"], compression="deflate")
    assert ws.request is not None and ws.response is not None
    assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]
    assert "Sec-WebSocket-Extensions" not in ws.response.headers
    await ws.close()


# -- keepalive ------------------------------------------------------------------------------------


async def test_a_client_that_never_answers_pings_is_dropped(start_server, session) -> None:
    server = start_server("--ping-interval", "0.4")
    api = Api(session, server.url)
    raw = await RawWebSocket.connect((await api.register(1))["url"])
    opcodes = []
    while (frame := await raw.frame()) is not None:  # never answered
        opcodes.append(frame.opcode)
    assert PING in opcodes
    await until_connections(api, 0)
    raw.abort()


async def test_a_client_that_answers_pings_stays(start_server, session, topic) -> None:
    server = start_server("--ping-interval", "0.4")
    api = Api(session, server.url)
    raw = await RawWebSocket.connect((await api.register(1))["url"])
    pings = 0
    while pings < 4:  # four intervals: without answers it would be gone after one
        frame = await raw.frame()
        assert frame is not None, "the server dropped a client that answered its pings"
        if frame.opcode == PING:
            pings += 1
            raw.send(encode_frame(PONG, frame.payload))
    raw.send(encode_frame(TEXT, json.dumps({"subscribe": [topic]}).encode()))
    while (frame := await raw.frame()) is not None and frame.opcode != TEXT:
        pass
    assert frame is not None and json.loads(frame.payload)["type"] == "subscribed"
    raw.abort()


async def test_pings_go_out_a_slice_at_a_time_and_still_reach_everyone(
    start_server, session
) -> None:
    """With a 2 s interval the sweep has two steps per half interval: every silent
    connection is still pinged and dropped, and one that answers stays."""
    server = start_server("--ping-interval", "2")
    api = Api(session, server.url)
    silent = [await RawWebSocket.connect((await api.register(i))["url"]) for i in range(8)]
    talker = await RawWebSocket.connect((await api.register(99))["url"])

    async def answer_pings() -> int:
        pings = 0
        while (frame := await talker.frame()) is not None:
            if frame.opcode == PING:
                pings += 1
                talker.send(encode_frame(PONG, frame.payload))
                if pings == 2:
                    return pings
        return pings

    async def pinged_then_dropped(raw: RawWebSocket) -> bool:
        opcodes = []
        while (frame := await raw.frame()) is not None:
            opcodes.append(frame.opcode)
        return PING in opcodes

    # frame() waits TIMEOUT per frame; two intervals of 2 s fit in it
    results = await asyncio.gather(answer_pings(), *(pinged_then_dropped(r) for r in silent))
    assert results[0] == 2, "the answering client was dropped before its second ping"
    assert all(results[1:]), "a silent client was dropped without a ping"
    await until_connections(api, 1)
    for raw in (*silent, talker):
        raw.abort()


# -- slow and stalled clients -------------------------------------------------------------------


async def test_a_request_whose_headers_never_end_is_closed(start_server) -> None:
    server = start_server("--request-timeout", "0.5")
    reader, writer = await asyncio.open_connection(*host_port(server.url))
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # closed by the server
    writer.close()


async def test_a_body_that_never_ends_gets_408(start_server) -> None:
    server = start_server("--request-timeout", "0.5")
    reader, writer = await asyncio.open_connection(*host_port(server.url))
    writer.write(b'POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"topic"')
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 408"), head
    assert b'"code":"request_timeout"' in await asyncio.wait_for(reader.read(200), TIMEOUT)
    writer.close()


async def test_500_stalled_connections_do_not_stop_a_new_client(
    start_server, session, topic
) -> None:
    """250 connections stop halfway through their headers and 250 WebSockets never
    read; a new client still registers, subscribes and receives at once."""
    server = start_server()
    api = Api(session, server.url)
    host, port = host_port(server.url)
    partial: list[asyncio.StreamWriter] = []
    for _ in range(250):
        _, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Le")
        partial.append(writer)
    reg = await api.register(0, [topic])
    stalled: list[socket.socket] = []
    for _ in range(250):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, port))
        sock.sendall(
            b"GET /ws/" + reg["id"].encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        stalled.append(sock)  # never read again

    fresh = await asyncio.wait_for(api.connect(1, [topic]), TIMEOUT)
    assert await asyncio.wait_for(api.publish(topic, "still served"), TIMEOUT) >= 1
    assert await fresh.message() == (topic, "still served")
    await fresh.close()
    for writer in partial:
        writer.transport.abort()
    for sock in stalled:
        sock.close()
    await until_connections(api, 0)


# -- graceful shutdown ---------------------------------------------------------------------------


async def test_messages_accepted_before_sigterm_reach_a_client_that_keeps_up(
    start_server, topic
) -> None:
    """Publishers run flat out while SIGTERM arrives: every publish answered 200 with a
    recipient reaches the subscriber before its 1001 close frame."""
    server: ServerProcess = start_server()
    async with aiohttp.ClientSession() as session:
        api = Api(session, server.url)
        sub = await api.connect(1, [topic], fmt="raw")
        received: list[str] = []

        async def read() -> None:
            try:
                while True:
                    message = await sub.ws.recv()
                    assert isinstance(message, str)
                    received.append(message)
            except ConnectionClosed:
                pass

        acknowledged: list[str] = []
        signalled = asyncio.Event()

        async def publish(worker: int) -> None:
            for i in range(100_000):
                message = f"{worker}.{i}"
                try:
                    status, body = await api.call(
                        "POST", "/publish", {"topic": topic, "message": message}
                    )
                except (aiohttp.ClientError, OSError):
                    return  # the server stopped answering
                if status != 200:
                    return
                if body["recipients"] == 1:
                    acknowledged.append(message)
                if len(acknowledged) == 300 and not signalled.is_set():
                    signalled.set()
                    assert server.process is not None
                    server.process.send_signal(signal.SIGTERM)

        reader = asyncio.create_task(read())
        await asyncio.wait_for(asyncio.gather(*(publish(w) for w in range(8))), TIMEOUT * 4)
        await asyncio.wait_for(reader, TIMEOUT)
    assert signalled.is_set() and server.process is not None
    assert await asyncio.to_thread(server.process.wait, TIMEOUT * 4) == 0
    assert sub.ws.close_code == codes.GOING_AWAY
    missing = set(acknowledged) - set(received)
    assert not missing, f"{len(missing)} accepted messages lost, e.g. {sorted(missing)[:5]}"
