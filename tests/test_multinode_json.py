"""JSON payloads across two `wsrelay serve` nodes sharing a real redis-server (one on
each stack): values published on one node reach the other's subscribers decoded (raw
ones as JSON text), come back from the Redis stream in history and recovery, and string
publications are stored as they were before JSON payloads existed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import redis.asyncio as aioredis
import websockets

from tests.redis_server import RedisServer
from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber

Start = Callable[..., ServerProcess]

CONFIG = """
[[namespace]]
pattern = "room:*"
publish = "subscribers"
"""

VALUES: list[Any] = [
    {"a": [1, {"b": None}], "c": "é🐈"},
    [True, False, None, 0, -1.5e-3],
    7,
    None,
    '{"a":1}',
    "plain",
]


def same(received: Any, sent: Any) -> bool:
    return json.dumps(received) == json.dumps(sent) and type(received) is type(sent)


def compact(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


async def connect(node: ServerProcess, reg: dict[str, Any], query: str = "") -> Subscriber:
    url = f"{node.ws_url}/ws/{reg['id']}{query}"
    return Subscriber(await websockets.connect(url, open_timeout=TIMEOUT), reg["id"], url)


async def test_values_cross_nodes_through_redis(
    start_server: Start,
    redis_server: RedisServer,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    config = tmp_path / "wsrelay.toml"
    config.write_text(CONFIG)
    common = ("--broker", redis_server.url, "--config", str(config))
    a = start_server(*common, "--stack", "aiohttp")
    b = start_server(*common, "--stack", "native")
    on_a, on_b = Api(session, a.url), Api(session, b.url)
    topic = f"t.json-{time.monotonic_ns()}"
    sub = await connect(b, await on_a.register(1, [topic]))
    raw = await connect(b, await on_a.register(2, [topic]), "?format=raw")
    await sub.subscribe("fence")  # acknowledged: B's Redis subscription is in place
    for value in VALUES[:3]:
        status, body = await on_a.call("POST", "/publish", {"topic": topic, "message": value})
        assert status == 200, body
    batch = [{"topic": topic, "message": value} for value in VALUES[3:]]
    status, body = await on_a.call("POST", "/publish/batch", {"messages": batch})
    assert status == 200, body
    for value in VALUES:
        _, received = await sub.message()
        assert same(received, value), (received, value)
        assert await raw.raw() == compact(value)

    # History on B and a recovery on B read the values back from the Redis stream.
    status, page = await on_b.call("GET", f"/history?topic={topic}")
    assert status == 200, page
    assert all(same(p["message"], v) for p, v in zip(page["publications"], VALUES, strict=True))
    late = await connect(b, await on_b.register())
    since = {topic: {"offset": 0, "epoch": page["epoch"]}}
    ack = await late.command({"subscribe": [topic], "since": since})
    assert ack["positions"][topic]["recovered"] is True, ack
    for value in VALUES:
        _, received = await late.message()
        assert same(received, value), (received, value)

    # A client publish of a value on B reaches A's subscriber decoded.
    room = f"room:{time.monotonic_ns()}"
    listener = await connect(a, await on_a.register(3, [room]))
    speaker = await connect(b, await on_b.register(4))
    await speaker.subscribe(room)
    await listener.subscribe("fence")
    await speaker.ws.send(json.dumps({"publish": {"topic": room, "message": {"x": [1]}}}))
    assert await listener.message() == (room, {"x": [1]})

    # Stored as before for strings: [origin, user, message, skip]; JSON text adds true.
    admin = aioredis.Redis(port=redis_server.port)
    try:
        entries: Any = await admin.xrange(f"wsrelay:{{{topic}}}:stream")
    finally:
        await admin.aclose()
    stored = [msgspec.json.decode(fields[b"d"]) for _, fields in entries]
    assert [len(s) for s in stored] == [5, 5, 5, 5, 4, 4], stored
    assert stored[0][2:] == [compact(VALUES[0]), None, True]
    assert stored[4][1:] == [None, '{"a":1}', None]
    for client in (sub, raw, late, listener, speaker):
        await client.close()
