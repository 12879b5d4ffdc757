"""The native publish driver (server/native_http.py) over raw sockets: what a
publisher's connection gets, and when it is handed to aiohttp.

The native driver answers with ``Server: wsrelay``; aiohttp names itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
from dataclasses import dataclass

from tests.server.rawws import TEXT, RawWebSocket, host_port
from tests.utils import TIMEOUT, Api, Subscriber
from wsrelay.core.history import EPOCH_BYTES

EPOCH = re.compile(f"[0-9a-f]{{{2 * EPOCH_BYTES}}}")
"""A topic's epoch: random, so only its shape is known."""


@dataclass
class Answer:
    status: int
    head: bytes
    body: bytes

    @property
    def native(self) -> bool:
        return re.search(rb"(?im)^server: wsrelay\r$", self.head) is not None

    def json(self) -> dict[str, object]:
        return json.loads(self.body)  # type: ignore[no-any-return]

    @property
    def is_json(self) -> bool:
        return re.search(rb"(?im)^content-type: application/json", self.head) is not None

    def receipt(self) -> tuple[int, int, str]:
        """``(recipients, offset, epoch)`` of a publish's answer, which must have exactly
        the documented shape."""
        body = json.loads(self.body)
        assert set(body) == {"recipients", "offset", "epoch"}, body
        recipients, offset, epoch = body["recipients"], body["offset"], body["epoch"]
        assert isinstance(recipients, int) and isinstance(offset, int), body
        assert isinstance(epoch, str) and EPOCH.fullmatch(epoch), body
        return recipients, offset, epoch

    def error_code(self) -> str:
        """The code of a JSON error body, which must have exactly the documented shape."""
        body = json.loads(self.body)
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
        return str(body["error"]["code"])


def post(path: str, body: bytes, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return (
        f"POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def publish(topic: str, message: str, *headers: str) -> bytes:
    body = json.dumps({"topic": topic, "message": message}).encode()
    return post("/publish", body, *headers)


GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: relay\r\n\r\n"


async def answer(reader: asyncio.StreamReader) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert length is not None, head
    body = await asyncio.wait_for(reader.readexactly(int(length.group(1))), TIMEOUT)
    return Answer(int(head.split(b" ", 2)[1]), head, body)


async def done(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def open_to(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*host_port(base))


async def native_connection(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that the native driver serves: its first request is a publish."""
    reader, writer = await open_to(base)
    writer.write(publish("t.native", "first"))
    first = await answer(reader)
    assert first.native and first.status == 200
    return reader, writer


async def messages(sub: Subscriber, count: int) -> list[tuple[str, int]]:
    """The next ``count`` publications, as ``(message, offset)``."""
    got: list[tuple[str, int]] = []
    for _ in range(count):
        frame = await sub.frame()
        assert frame["type"] == "message", frame
        got.append((frame["message"], frame["offset"]))
    return got


async def test_a_publisher_connection_is_served_natively(api: Api, topic: str) -> None:
    sub = await api.connect(1, [topic])
    reader, writer = await open_to(api.base)
    receipts = []
    for text in ("one", "two"):
        writer.write(publish(topic, text))
        reply = await answer(reader)
        assert reply.native and reply.status == 200
        assert re.search(rb"(?im)^content-type: application/json\r$", reply.head)
        receipts.append(reply.receipt())
    epoch = receipts[0][2]
    assert receipts == [(1, 1, epoch), (1, 2, epoch)]
    assert await messages(sub, 2) == [("one", 1), ("two", 2)]
    await done(writer)
    await sub.close()


async def test_pipelined_publishes_are_answered_in_order(api: Api, topic: str) -> None:
    sub = await api.connect(1, [topic])
    reader, writer = await open_to(api.base)
    texts = [f"m{i}" for i in range(40)]  # past MAX_QUEUED: reading pauses and resumes
    writer.write(b"".join(publish(topic, t) for t in texts))
    replies = [await answer(reader) for _ in texts]
    assert all(r.native for r in replies)
    receipts = [r.receipt() for r in replies]
    epoch = receipts[0][2]
    assert receipts == [(1, offset, epoch) for offset in range(1, len(texts) + 1)]
    assert await messages(sub, len(texts)) == [(t, i) for i, t in enumerate(texts, start=1)]
    await done(writer)
    await sub.close()


async def test_a_later_request_for_another_route_goes_to_aiohttp(api: Api, topic: str) -> None:
    reader, writer = await native_connection(api.base)
    writer.write(GET_HEALTH)
    health = await answer(reader)
    assert health.status == 200 and not health.native and health.json()["status"] == "ok"
    writer.write(publish(topic, "then aiohttp"))  # the connection stays aiohttp's
    later = await answer(reader)
    assert later.status == 200 and not later.native
    await done(writer)


async def test_a_pipelined_request_for_another_route_keeps_its_place(api: Api, topic: str) -> None:
    """The foreign request starts in the middle of a read: it is found by replaying."""
    sub = await api.connect(1, [topic])
    reader, writer = await open_to(api.base)
    writer.write(publish(topic, "a") + publish(topic, "b") + GET_HEALTH + publish(topic, "c"))
    replies = [await answer(reader) for _ in range(4)]
    assert [r.native for r in replies] == [True, True, False, False]
    assert [r.status for r in replies] == [200, 200, 200, 200]
    assert replies[2].json()["status"] == "ok"
    assert [replies[i].receipt()[:2] for i in (0, 1, 3)] == [(1, 1), (1, 2), (1, 3)]
    assert await messages(sub, 3) == [("a", 1), ("b", 2), ("c", 3)]
    await done(writer)
    await sub.close()


async def test_a_websocket_upgrade_after_a_publish_is_served(api: Api, topic: str) -> None:
    reg = await api.register(1, [topic])
    reader, writer = await native_connection(api.base)
    socket = await RawWebSocket.connect(reg["url"], streams=(reader, writer))
    assert await api.publish(topic, "upgraded") == 1
    frame = await socket.frame()
    while frame is not None and frame.opcode != TEXT:
        frame = await socket.frame()
    assert frame is not None and json.loads(frame.payload)["message"] == "upgraded"
    socket.abort()


async def test_a_websocket_upgrade_pipelined_behind_a_publish_is_served(
    api: Api, topic: str
) -> None:
    """Both requests in one write: the upgrade starts in the middle of a read, after a
    publish, and is found by replaying that read (aiohttp then answers it)."""
    reg = await api.register(1, [topic])
    reader, writer = await native_connection(api.base)
    key = base64.b64encode(os.urandom(16)).decode()
    upgrade = (
        f"GET /ws/{reg['id']} HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    writer.write(publish(topic, "before the upgrade") + upgrade.encode())
    first = await answer(reader)
    assert first.native and first.receipt()[:2] == (0, 1)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101"), head
    socket = RawWebSocket(reader, writer)
    assert await api.publish(topic, "after") == 1
    frame = await socket.frame()
    while frame is not None and frame.opcode != TEXT:
        frame = await socket.frame()
    assert frame is not None
    assert json.loads(frame.payload) == {
        "type": "message",
        "topic": topic,
        "message": "after",
        "offset": 2,
    }
    socket.abort()


async def test_a_chunked_body_is_read(api: Api, topic: str) -> None:
    sub = await api.connect(1, [topic])
    reader, writer = await open_to(api.base)
    body = json.dumps({"topic": topic, "message": "in pieces"}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:10], body[10:])) + b"0\r\n\r\n"
    writer.write(
        b"POST /publish HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    )
    reply = await answer(reader)
    assert reply.native and reply.receipt()[:2] == (1, 1)
    assert await messages(sub, 1) == [("in pieces", 1)]
    await done(writer)
    await sub.close()


async def test_expect_100_continue_is_answered(api: Api, topic: str) -> None:
    reader, writer = await open_to(api.base)
    body = json.dumps({"topic": topic, "message": "expected"}).encode()
    request = post("/publish", body, "Expect: 100-continue")
    head, _ = request.split(b"\r\n\r\n", 1)
    writer.write(head + b"\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert interim.startswith(b"HTTP/1.1 100"), interim
    writer.write(body)
    reply = await answer(reader)
    assert reply.status == 200 and reply.receipt()[:2] == (0, 1)
    await done(writer)


async def test_connection_close_is_honoured(api: Api, topic: str) -> None:
    reader, writer = await open_to(api.base)
    writer.write(publish(topic, "last", "Connection: close"))
    reply = await answer(reader)
    assert reply.native and reply.status == 200
    assert re.search(rb"(?im)^connection: close\r$", reply.head)
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    await done(writer)


async def test_bad_input_gets_json_errors(api: Api, topic: str) -> None:
    reader, writer = await open_to(api.base)
    writer.write(post("/publish", b"{not json"))
    invalid = await answer(reader)
    assert invalid.native and invalid.status == 400
    assert invalid.json()["error"]["code"] == "invalid_json"  # type: ignore[index]
    writer.write(post("/publish/batch", b'{"messages": "no"}'))
    wrong = await answer(reader)
    assert wrong.native and wrong.status == 400
    assert wrong.json()["error"]["code"] == "invalid_field"  # type: ignore[index]
    writer.write(b"POST /publish HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n")
    malformed = await answer(reader)
    assert malformed.status == 400 and malformed.json()["error"]["code"] == "bad_http"  # type: ignore[index]
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # and closed
    await done(writer)


async def test_a_declared_body_over_the_limit_is_refused_unread(start_server, topic: str) -> None:
    server = start_server("--max-body-size", "1024")
    reader, writer = await native_connection(server.url)
    writer.write(b"POST /publish HTTP/1.1\r\nHost: relay\r\nContent-Length: 5000\r\n\r\n")
    refused = await answer(reader)
    assert refused.native and refused.status == 413
    assert refused.json()["error"]["code"] == "payload_too_large"  # type: ignore[index]
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    await done(writer)


async def test_the_body_limit_is_not_applied_to_a_request_for_aiohttp(start_server) -> None:
    """A foreign request is aiohttp's to judge, even if it declares a large body."""
    server = start_server("--max-body-size", "1024")
    reader, writer = await native_connection(server.url)
    writer.write(b"GET /health HTTP/1.1\r\nHost: relay\r\nContent-Length: 2000\r\n\r\n")
    writer.write(b"x" * 2000)
    health = await answer(reader)
    assert not health.native and health.status == 200
    await done(writer)


async def test_a_chunked_body_over_the_limit_is_refused(start_server, topic: str) -> None:
    server = start_server("--max-body-size", "1024")
    reader, writer = await native_connection(server.url)
    chunk = b"x" * 800
    writer.write(
        b"POST /publish HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2
    )
    refused = await answer(reader)
    assert refused.native and refused.status == 413
    await done(writer)


async def test_a_body_that_never_arrives_gets_408(start_server, topic: str) -> None:
    server = start_server("--request-timeout", "0.5")
    reader, writer = await native_connection(server.url)
    writer.write(b"POST /publish HTTP/1.1\r\nHost: relay\r\nContent-Length: 100\r\n\r\n{")
    late = await answer(reader)
    assert late.native and late.status == 408
    assert late.json()["error"]["code"] == "request_timeout"  # type: ignore[index]
    await done(writer)


async def test_an_idle_publisher_connection_is_closed(start_server, topic: str) -> None:
    server = start_server("--request-timeout", "0.5")
    reader, writer = await native_connection(server.url)
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    await done(writer)


async def test_the_api_key_is_required(start_server, topic: str) -> None:
    server = start_server(env={"WSRELAY_API_KEY": "k1"})
    reader, writer = await open_to(server.url)
    writer.write(publish(topic, "no key"))
    refused = await answer(reader)
    assert refused.native and refused.status == 401
    assert re.search(rb"(?im)^www-authenticate: Bearer", refused.head)
    writer.write(publish(topic, "with key", "Authorization: Bearer k1"))
    accepted = await answer(reader)
    assert accepted.native and accepted.status == 200
    await done(writer)


async def test_headers_that_never_end_are_refused(api: Api) -> None:
    """The head is measured from the second read on (a read is at most 256 KiB), so
    the header sent here is longer than one read plus the limit."""
    reader, writer = await native_connection(api.base)
    writer.write(b"POST /publish HTTP/1.1\r\nHost: relay\r\nX-Long: ")
    with contextlib.suppress(ConnectionError):  # refused before the end: fine
        for _ in range(100):  # 400 KiB of one header value
            writer.write(b"x" * 4096)
            await writer.drain()
    refused = await answer(reader)
    assert refused.native and refused.status == 431
    assert refused.json()["error"]["code"] == "headers_too_large"  # type: ignore[index]
    await done(writer)


async def test_a_publisher_that_does_not_read_its_answers_is_paused_not_dropped(
    api: Api, topic: str
) -> None:
    """20,000 pipelined publishes whose answers (3 MB) are not read for a while: the
    server stops reading that connection instead of buffering without end, serves
    others meanwhile, and answers every request once the client reads."""
    reader, writer = await native_connection(api.base)
    count = 20_000
    writer.write(b"".join(publish(topic, str(i)) for i in range(count)))
    assert await api.publish(f"{topic}.other", "meanwhile") == 0
    replies = [await answer(reader) for _ in range(count)]
    assert all(r.status == 200 for r in replies)
    receipts = [r.receipt() for r in replies]
    epoch = receipts[0][2]
    assert receipts == [(0, offset, epoch) for offset in range(1, count + 1)]
    await done(writer)
