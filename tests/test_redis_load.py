"""The Redis backend under load (issue 11): bursts wait for a connection instead of being
refused, a connection costs Redis a few commands, and a stalled Redis is reported as such.

A 503 ``broker_unavailable`` must mean that Redis is unreachable or stalled, never that
the node was busy.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import websockets

from tests.redis_server import RedisServer
from tests.utils import TIMEOUT, Api, ServerProcess

Start = Callable[..., ServerProcess]

CONNECTION_SETUP = {"hello", "client|setinfo", "ping", "info", "eval", "hgetall"}
"""Commands a new or idle connection costs (redis-py's handshake and health checks),
the counting itself, and the health probe's (PING, and the script reading Redis's
generation after it: EVAL, INFO, HGETALL): not what a client's connection costs."""


async def test_a_burst_of_registrations_is_queued_not_refused(
    start_server: Start, redis_server: RedisServer
) -> None:
    """400 concurrent POST /register on one node: redis-py's default pool refused all
    but about 100 of them with MaxConnectionsError (503)."""
    node = start_server("--broker", redis_server.url)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def register(i: int) -> tuple[int, object]:
            body = {"user_id": i, "topics": ["t"]}
            async with session.post(node.url + "/register", json=body) as response:
                return response.status, await response.json()

        answers = await asyncio.gather(*(register(i) for i in range(400)))
    refused = [body for status, body in answers if status != 200]
    assert not refused, f"{len(refused)} of 400 refused, e.g. {refused[0]}"


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def calls(admin: aioredis.Redis) -> dict[str, int]:
    """Every command Redis ran so far, by name, those inside Lua scripts included."""
    stats: dict[str, Any] = await admin.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name.startswith("cmdstat_")
    }


def spent(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What ran between the two counts, without the connections' and the probe's own: the
    probe's script (its only EVAL) reads Redis's TIME too, once per run."""
    delta = {name: after[name] - before.get(name, 0) for name in after}
    delta["time"] = delta.get("time", 0) - delta.get("eval", 0)
    return {name: n for name, n in delta.items() if name not in CONNECTION_SETUP and n != 0}


async def test_what_connections_and_subscriptions_cost_redis(
    start_server: Start, redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """Counted with INFO commandstats around N clients. Before issue 11 an upgrade cost 16
    commands (a lookup, a SUBSCRIBE per new topic, the TTL script, and a publish script
    writing the "attached" event to a stream) and sending the same topics again 1."""
    n = 40
    # No presence heartbeat within the counts (it rewrites every entry every third of the TTL).
    node = start_server("--broker", redis_server.url, "--presence-ttl", "3600")
    async with aiohttp.ClientSession() as session:
        api = Api(session, node.url)
        regs = [await api.register(f"u{i}", ["shared", f"own{i}"]) for i in range(n)]
        # The first connection loads the node's scripts into Redis (once per Redis).
        warm = await websockets.connect((await api.register("w", ["w"]))["url"])

        before = await calls(admin)
        sockets = await asyncio.gather(
            *(websockets.connect(reg["url"], open_timeout=TIMEOUT) for reg in regs)
        )
        attach = spent(before, await calls(admin))
        # Per upgrade: the lookup (GET), one script that restarts the registration's TTL
        # (EXPIRE, and TIME, ZADD, PTTL, PEXPIRE for its user's count), the "attached"
        # announcement (PUBLISH, no stream), one script writing the connection's entry in
        # its user's presence set (TIME, ZSCORE, HSET, ZADD, and PEXPIRE on its two keys),
        # and SUBSCRIBEs naming the new topics, several at once: 15 commands and at most
        # one SUBSCRIBE, all sent together.
        assert attach.pop("subscribe", 0) <= n, attach
        assert attach == {
            "evalsha": 2 * n,
            "get": n,
            "publish": n,
            "expire": n,
            "time": 2 * n,
            "zadd": 2 * n,
            "pttl": n,
            "pexpire": 3 * n,
            "zscore": n,
            "hset": n,
        }, attach

        async def command(ws: Any, body: dict[str, Any]) -> None:
            await ws.send(json.dumps(body))
            answer = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert answer["type"] == "subscribed", answer

        # A client sending its topic set again (every client library does on reconnect):
        # nothing is stored; the answer names each topic's position (issue 12), one
        # history script per topic. These topics were never published: the script GETs
        # the epoch and the offset, finds neither and answers Redis's TIME (the node's
        # empty position, docs/decisions/0008), writing nothing. (A published topic's
        # read PEXPIREs both instead, so that a topic its clients still follow keeps its
        # epoch.)
        for ws, i in zip(sockets, range(n), strict=True):
            await command(ws, {"topics": ["shared", f"own{i}"]})
        before = await calls(admin)
        for ws, i in zip(sockets, range(n), strict=True):
            await command(ws, {"topics": ["shared", f"own{i}"]})
        read = {"evalsha": 1, "get": 2, "time": 1}  # one topic's position
        assert spent(before, await calls(admin)) == {k: 2 * n * v for k, v in read.items()}

        # A topic another client here has already: the topic set is stored (SET), and the
        # topic's position read.
        await command(sockets[0], {"subscribe": ["shared2"]})
        before = await calls(admin)
        for ws in sockets[1:]:
            await command(ws, {"subscribe": ["shared2"]})
        assert spent(before, await calls(admin)) == {
            "set": n - 1,
            **{k: (n - 1) * v for k, v in read.items()},
        }

        # The last subscriber here leaves a topic: SET and UNSUBSCRIBE, sent together.
        before = await calls(admin)
        for ws, i in zip(sockets, range(n), strict=True):
            await command(ws, {"unsubscribe": [f"own{i}"]})
        left = spent(before, await calls(admin))
        assert 1 <= left.pop("unsubscribe") <= n  # several may share one
        assert left == {"set": n}
        for ws in [*sockets, warm]:
            await ws.close()


async def test_a_stalled_redis_is_a_503_within_the_broker_timeout(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """SIGSTOP: Redis accepts connections and reads nothing. A publish sent to it fails
    with 503 publish_outcome_unknown (it may run when Redis resumes), a registration with
    503 broker_unavailable after about --broker-timeout (redis-py's default: never), and
    both work again once Redis runs."""
    node = start_server("--broker", redis_server.url, "--broker-timeout", "1")
    api = Api(session, node.url)
    await api.register(1, ["t"])
    assert await api.publish("t", "before") == 0
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        for method, path, body, code in (
            ("POST", "/publish", {"topic": "t", "message": "stalled"}, "publish_outcome_unknown"),
            ("POST", "/register", {"user_id": 2}, "broker_unavailable"),
        ):
            started = time.monotonic()
            status, answer = await asyncio.wait_for(api.call(method, path, body), TIMEOUT)
            elapsed = time.monotonic() - started
            assert (status, answer["error"]["code"]) == (503, code), answer
            assert 0.9 < elapsed < 2.5, (path, elapsed)
        assert "Redis is stalled" in answer["error"]["message"], answer
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)

    async def until_accepted() -> None:
        while (await api.call("POST", "/publish", {"topic": "t", "message": "after"}))[0] != 200:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(until_accepted(), TIMEOUT)
    await api.register(3)
