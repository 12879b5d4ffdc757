"""The node registry (``GET /nodes``): the same contract in memory and in Redis, and its
expiry; and the node's heartbeat (:class:`wsrelay.nodes.Beacon`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.redis_server import RedisServer
from tests.utils import TIMEOUT
from wsrelay.brokers.base import NodeRegistry
from wsrelay.brokers.memory import MemoryNodes
from wsrelay.brokers.redis import make_client
from wsrelay.brokers.redis_nodes import KEYS, RedisNodes
from wsrelay.core.schema import NodeInfo
from wsrelay.errors import BrokerUnavailable
from wsrelay.nodes import Beacon


def info(node: str, started_at: float = 1.0, connections: int = 0) -> NodeInfo:
    return NodeInfo(
        id=node,
        host="h",
        pid=1,
        version="v",
        group=None,
        started_at=started_at,
        uptime=0.0,
        last_heartbeat=started_at,
        connections=connections,
        topics=0,
        publishes=0,
        deliveries=0,
        slow_consumers=0,
    )


@pytest.fixture(params=["memory", "redis"])
async def registries(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[NodeRegistry, NodeRegistry]]:
    """Two nodes' views of one registry whose entries live 60 s."""
    if request.param == "memory":
        shared = MemoryNodes(60)
        yield shared, shared
        return
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    clients = [make_client(redis_server.url), make_client(redis_server.url)]
    yield RedisNodes(clients[0], 60), RedisNodes(clients[1], 60)
    for client in clients:
        await client.aclose()


async def test_every_node_sees_every_heartbeat_oldest_first_and_the_last_one_wins(
    registries: tuple[NodeRegistry, NodeRegistry],
) -> None:
    a, b = registries
    assert await a.nodes() == []
    await b.heartbeat(info("node-b", started_at=2.0))
    await a.heartbeat(info("node-a", started_at=3.0))
    await a.heartbeat(info("node-a", started_at=3.0, connections=5))
    assert [(n.id, n.connections) for n in await b.nodes()] == [("node-b", 0), ("node-a", 5)]
    assert await a.nodes() == await b.nodes()


async def test_metrics_snapshots_stay_until_replaced_and_go_with_their_node(
    registries: tuple[NodeRegistry, NodeRegistry],
) -> None:
    a, b = registries
    await a.heartbeat(info("node-a"), b"a1")
    await b.heartbeat(info("node-b"))  # no snapshot
    assert await b.metrics(["node-a", "node-b", "node-c"]) == {"node-a": b"a1"}
    await a.heartbeat(info("node-a"))  # a heartbeat without one keeps the last
    assert await b.metrics(["node-a"]) == {"node-a": b"a1"}
    await a.heartbeat(info("node-a"), b"a2")
    assert await b.metrics(["node-a"]) == {"node-a": b"a2"}
    assert await b.metrics([]) == {}
    await a.leave("node-a")
    assert [n.id for n in await b.nodes()] == ["node-b"]
    assert await b.metrics(["node-a"]) == {}
    await a.leave("node-a")  # twice: nothing to do


async def test_memory_entries_expire_after_the_ttl_without_a_heartbeat() -> None:
    now = [0.0]
    registry = MemoryNodes(30, clock=lambda: now[0])
    await registry.heartbeat(info("a"), b"m")
    await registry.heartbeat(info("b"))
    now[0] = 20.0
    await registry.heartbeat(info("b"))
    now[0] = 30.0
    assert [n.id for n in await registry.nodes()] == ["b"]
    assert await registry.metrics(["a"]) == {}
    now[0] = 50.0
    assert await registry.nodes() == []


async def test_redis_entries_expire_after_the_ttl_and_leave_no_keys(
    redis_server: RedisServer,
) -> None:
    """node-b stops beating (as if killed): it is gone within the TTL while node-a's
    beacon keeps its own; once both are gone, the keys expire too."""
    ttl = 1.0
    client = make_client(redis_server.url)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        registry = RedisNodes(client, ttl)
        beacon = Beacon(registry, lambda: info("node-a"), ttl / 3)
        await beacon.start()
        await registry.heartbeat(info("node-b"), b"snapshot")
        assert {n.id for n in await registry.nodes()} == {"node-a", "node-b"}
        started = time.monotonic()
        while {n.id for n in await registry.nodes()} != {"node-a"}:
            assert time.monotonic() - started < ttl + TIMEOUT, "node-b stayed"
            await asyncio.sleep(0.05)
        assert time.monotonic() - started <= ttl + 0.2
        assert await registry.metrics(["node-b"]) == {}
        while time.monotonic() - started < ttl * 2.5:  # node-a's heartbeat keeps it
            assert [n.id for n in await registry.nodes()] == ["node-a"]
            await asyncio.sleep(0.1)
        await beacon.stop()  # leaves at once
        assert await registry.nodes() == []
        await registry.heartbeat(info("node-c"), b"m")
        for key in KEYS:
            assert 0 < await raw.pttl(key) <= ttl * 1000, key
    finally:
        await raw.aclose()
        await client.aclose()


async def test_redis_registry_calls_fail_clearly_when_redis_is_down(
    redis_server: RedisServer,
) -> None:
    client = make_client(redis_server.url)
    registry = RedisNodes(client, 1.0)
    redis_server.stop()
    try:
        for call in (
            registry.heartbeat(info("a")),
            registry.nodes(),
            registry.metrics(["a"]),
            registry.leave("a"),
        ):
            with pytest.raises(BrokerUnavailable):
                await call
        beacon = Beacon(registry, lambda: info("a"), 0.1)
        await beacon.start()  # starts without Redis, and stops cleanly
        await beacon.stop()
    finally:
        await client.aclose()


async def test_an_unreadable_redis_entry_is_skipped(redis_server: RedisServer) -> None:
    client = make_client(redis_server.url)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        registry = RedisNodes(client, 60)
        await registry.heartbeat(info("a"))
        await raw.hset(KEYS[0], "b", b"not json")
        assert [n.id for n in await registry.nodes()] == ["a"]
    finally:
        await raw.aclose()
        await client.aclose()
