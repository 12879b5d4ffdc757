"""Recovery, history and idempotency attacked on the Redis broker (a real redis-server,
tests/redis_server.py), including Redis stopped or killed during a recovery read.

Tests marked ``xfail(strict=True)`` are holes not fixed yet (the reason says what goes
wrong); the others are attacks that held. The memory broker's side is in
tests/server/test_recovery_attacks.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import websockets

from tests.redis_server import RedisServer
from tests.test_redis_outage import wait_ready
from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber

Start = Callable[..., ServerProcess]

_opened: list[Subscriber] = []


@pytest.fixture(autouse=True)
async def close_sockets() -> AsyncIterator[None]:
    yield
    while _opened:
        await _opened.pop().close()


async def open_ws(url: str, query: str = "?recover=true") -> Subscriber:
    ws = await websockets.connect(url + query, open_timeout=TIMEOUT)
    _opened.append(Subscriber(ws, url.rsplit("/", 1)[-1], url))
    return _opened[-1]


async def publish(api: Api, topic: str, message: str, **extra: Any) -> dict[str, Any]:
    status, body = await api.call("POST", "/publish", {"topic": topic, "message": message, **extra})
    assert status == 200, body
    return dict(body)


async def messages(sub: Subscriber, count: int) -> list[dict[str, Any]]:
    got = []
    for _ in range(count):
        frame = await sub.frame()
        assert frame["type"] == "message", frame
        got.append(frame)
    return got


async def dbsize(redis_server: RedisServer) -> int:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        return int(await client.dbsize())
    finally:
        await client.aclose()


@pytest.mark.xfail(
    strict=True,
    reason="Redis: every subscribe to a never-published topic creates its epoch and offset "
    "keys for a day, so one anonymous client fills Redis at 512 keys per command",
)
async def test_subscribing_to_fresh_topics_does_not_fill_redis(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    api = Api(session, start_server("--broker", redis_server.url).url)
    reg = await api.register()
    attacker = await open_ws(reg["url"], "")
    before = await dbsize(redis_server)
    for round_ in range(8):  # 2000 topic names nobody ever publishes to
        ack = await attacker.command({"topics": [f"junk.{round_}.{i}" for i in range(250)]})
        assert ack["type"] == "subscribed", ack
    await attacker.command({"topics": []})
    grown = await dbsize(redis_server) - before
    assert grown < 100, f"{grown} keys left in Redis by subscriptions alone"


async def test_a_client_cannot_suppress_a_backend_publish_on_redis(
    start_server: Start,
    redis_server: RedisServer,
    session: aiohttp.ClientSession,
    tmp_path: Any,
) -> None:
    config = tmp_path / "wsrelay.toml"
    config.write_text('[[namespace]]\npattern = "chat:*"\npublish = "subscribers"\n')
    api = Api(session, start_server("--broker", redis_server.url, "--config", str(config)).url)
    listener = await open_ws((await api.register(None, ["chat:1"]))["url"], "")
    mallory = await open_ws((await api.register(None, ["chat:1"]))["url"], "")
    spoof = {"topic": "chat:1", "message": "fake", "idempotency_key": "order-17", "skip_self": True}
    answer = await mallory.command({"publish": spoof})
    assert answer["type"] == "published", answer
    assert (await messages(listener, 1))[0]["message"] == "fake"
    backend = await publish(api, "chat:1", "real", idempotency_key="order-17")
    assert backend.get("duplicate") is not True, backend
    assert (await messages(listener, 1))[0]["message"] == "real"


async def test_duplicate_keys_inside_one_batch_publish_once_on_redis(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """Both nodes: the second item with a key already used in the same batch (same
    pipeline) is answered the first one's position and reaches nobody."""
    nodes = [start_server("--broker", redis_server.url) for _ in range(2)]
    apis = [Api(session, n.url) for n in nodes]
    subs = [await open_ws((await api.register(None, ["b"]))["url"], "") for api in apis]
    for sub in subs:
        await sub.command({"topics": ["b"]})
    items = [
        {"topic": "b", "message": "first", "idempotency_key": "k"},
        {"topic": "b", "message": "second", "idempotency_key": "k"},
        {"topic": "b", "message": "third"},
    ]
    status, body = await apis[0].call("POST", "/publish/batch", {"messages": items})
    assert status == 200, body
    assert [p["offset"] for p in body["positions"]] == [1, 1, 2]
    again = await publish(apis[1], "b", "fourth", idempotency_key="k")
    assert (again["offset"], again["duplicate"]) == (1, True)
    fence = await publish(apis[1], "b", "fence")
    for sub in subs:
        got = await messages(sub, 3)
        assert [(m["message"], m["offset"]) for m in got] == [
            ("first", 1),
            ("third", 2),
            ("fence", fence["offset"]),
        ]


async def test_a_recovery_read_during_a_redis_stall_fails_cleanly_and_succeeds_after(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """Redis SIGSTOPped while a client asks to recover: an error frame (not a close, not a
    hang), and once Redis runs again the same command recovers everything once, in order,
    with the live stream after it (the stalled read's late answer is not mistaken for
    the next one's)."""
    api = Api(session, start_server("--broker", redis_server.url, "--broker-timeout", "1").url)
    reg = await api.register(None, ["r"])
    sub = await open_ws(reg["url"])
    epoch = (await sub.command({"topics": ["r"]}))["positions"]["r"]["epoch"]
    await publish(api, "r", "seen")
    assert (await messages(sub, 1))[0]["offset"] == 1
    await sub.close()
    missed = [await publish(api, "r", f"missed {i}") for i in range(3)]

    sub = await open_ws(reg["url"])
    command = {"topics": ["r"], "since": {"r": {"offset": 1, "epoch": epoch}}}
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        answer = await sub.command(command)
        assert answer["type"] == "error", answer
        assert answer["error"]["code"] == "broker_unavailable", answer
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    await wait_ready(api, 200, TIMEOUT)
    ack = await sub.command(command)
    assert ack["positions"]["r"] == {"offset": 1, "epoch": epoch, "recovered": True}, ack
    assert [m["offset"] for m in await messages(sub, 3)] == [a["offset"] for a in missed]
    live = await publish(api, "r", "live")
    assert [m["offset"] for m in await messages(sub, 1)] == [live["offset"]]


async def test_a_recovery_across_redis_killed_and_restarted_empty_is_not_recovered(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """kill -9 during the recovery read: an error frame; Redis back empty: the same
    command is answered ``recovered: false`` with the new epoch, never a replay of
    nothing claimed complete."""
    api = Api(session, start_server("--broker", redis_server.url, "--broker-timeout", "1").url)
    reg = await api.register(None, ["k"])
    sub = await open_ws(reg["url"])
    epoch = (await sub.command({"topics": ["k"]}))["positions"]["k"]["epoch"]
    await publish(api, "k", "one")
    await publish(api, "k", "two")
    assert len(await messages(sub, 2)) == 2
    command = {"topics": ["k"], "since": {"k": {"offset": 1, "epoch": epoch}}}
    redis_server.kill()
    answer = await sub.command(command)
    assert answer["type"] == "error" and answer["error"]["code"] == "broker_unavailable", answer
    await asyncio.to_thread(redis_server.start)
    await wait_ready(api, 200, TIMEOUT * 2)
    # The registration died with Redis: this connection lives on, and its command works.
    ack = await sub.command(command)
    assert ack["type"] == "subscribed", ack
    position = ack["positions"]["k"]
    assert position["recovered"] is False and position["epoch"] != epoch, ack
    after = await publish(api, "k", "after")
    assert after["epoch"] == position["epoch"]
    frame = await sub.frame()
    while frame["type"] == "gap":  # the node may also announce the new epoch
        frame = await sub.frame()
    assert (frame["message"], frame["offset"]) == ("after", after["offset"]), frame
