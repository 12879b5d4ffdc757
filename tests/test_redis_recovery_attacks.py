"""Recovery, history and idempotency attacked on the Redis broker (a real redis-server,
tests/redis_server.py), including Redis stopped or killed during a recovery read.

Tests marked ``xfail(strict=True)`` are holes not fixed yet (the reason says what goes
wrong); the others are attacks that held, and what closing a hole changed (a topic never
published gets a position that stores nothing, trusted only while nothing can have been
lost). The memory broker's side is in
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
from wsrelay.core.history import META_TTL

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


async def test_a_client_answered_before_the_first_publication_recovers_it(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """The topic had no publication when the client subscribed (Redis stores nothing for
    it): back after the first ones, the client gets them all, then the live stream, and
    the position answered is in the topic's epoch."""
    api = Api(session, start_server("--broker", redis_server.url).url)
    reg = await api.register(None, ["f"])
    sub = await open_ws(reg["url"])
    start = (await sub.command({"topics": ["f"]}))["positions"]["f"]
    assert start["offset"] == 0, start
    await sub.close()
    missed = [await publish(api, "f", f"missed {i}") for i in range(3)]
    epoch = missed[0]["epoch"]
    assert [(m["offset"], m["epoch"]) for m in missed] == [(1, epoch), (2, epoch), (3, epoch)]

    sub = await open_ws(reg["url"])
    ack = await sub.command({"topics": ["f"], "since": {"f": start}})
    assert ack["positions"]["f"] == {"offset": 0, "epoch": epoch, "recovered": True}, ack
    got = await messages(sub, 3)
    assert [(m["message"], m["offset"]) for m in got] == [(f"missed {i}", i + 1) for i in range(3)]
    live = await publish(api, "f", "live")
    assert [m["offset"] for m in await messages(sub, 1)] == [live["offset"]] == [4]


async def test_a_client_that_saw_the_first_publications_recovers_the_rest(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """Message frames carry no epoch: the client labels what it saw with the position it
    was answered before the first publication, and recovers from there."""
    api = Api(session, start_server("--broker", redis_server.url).url)
    reg = await api.register(None, ["f"])
    sub = await open_ws(reg["url"])
    start = (await sub.command({"topics": ["f"]}))["positions"]["f"]
    seen = [await publish(api, "f", f"seen {i}") for i in range(2)]
    assert [m["offset"] for m in await messages(sub, 2)] == [1, 2]
    await sub.close()
    missed = [await publish(api, "f", f"missed {i}") for i in range(2)]

    sub = await open_ws(reg["url"])
    since = {"f": {"offset": 2, "epoch": start["epoch"]}}
    ack = await sub.command({"topics": ["f"], "since": since})
    assert ack["positions"]["f"] == {"offset": 2, "epoch": seen[0]["epoch"], "recovered": True}
    assert [m["offset"] for m in await messages(sub, 2)] == [m["offset"] for m in missed]


async def test_redis_flushed_before_the_first_publication_is_not_recovered(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """A publication made before FLUSHALL is lost: the stream after it starts at offset 1
    again, which must not pass for everything since the position."""
    api = Api(session, start_server("--broker", redis_server.url).url)
    sub = await open_ws((await api.register(None, ["f"]))["url"])
    start = (await sub.command({"topics": ["f"]}))["positions"]["f"]
    await sub.close()
    await publish(api, "f", "lost")
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    new = await publish(api, "f", "new")
    assert new["offset"] == 1
    sub = await open_ws((await api.register(None, ["f"]))["url"])  # the registration went too
    ack = await sub.command({"topics": ["f"], "since": {"f": start}})
    assert ack["positions"]["f"] == {"offset": 1, "epoch": new["epoch"], "recovered": False}


async def test_a_position_answered_before_the_first_publication_expires_after_a_day(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """The position names Redis's time when it was answered: one older than META_TTL
    (a later epoch of the topic may have expired since) is not trusted."""
    api = Api(session, start_server("--broker", redis_server.url).url)
    sub = await open_ws((await api.register(None, ["f"]))["url"])
    start = (await sub.command({"topics": ["f"]}))["positions"]["f"]
    mark, generation, born = start["epoch"].split(":")
    old = {"offset": 0, "epoch": f"{mark}:{generation}:{int(born) - META_TTL * 1000}"}
    first = await publish(api, "f", "first")
    assert [m["offset"] for m in await messages(sub, 1)] == [1]
    ack = await sub.command({"topics": ["f"], "since": {"f": old}})
    assert ack["positions"]["f"] == {"offset": 1, "epoch": first["epoch"], "recovered": False}


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
    # (``epoch`` was answered before the topic's first publication: the answer names the
    # topic's own)
    real = missed[0]["epoch"]
    assert ack["positions"]["r"] == {"offset": 1, "epoch": real, "recovered": True}, ack
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
    assert position["offset"] == 0, ack  # the topic has no publication in the new Redis
    after = await publish(api, "k", "after")
    assert after["offset"] == 1
    frame = await sub.frame()
    while frame["type"] == "gap":  # the node may also announce the new epoch
        frame = await sub.frame()
    assert (frame["message"], frame["offset"]) == ("after", after["offset"]), frame
