"""The Redis backend: the shared conformance suite, plus what only Redis can do wrong."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import cast

import pytest
import redis.asyncio as aioredis

from tests.brokers.conformance import (
    EXPIRING_TTL,
    BrokerConformance,
    Inbox,
    Node,
    PresenceStoreConformance,
    PresenceStores,
    RegistrationStoreConformance,
    Stores,
)
from tests.redis_server import RedisServer
from tests.utils import TIMEOUT
from wsrelay.brokers import from_url
from wsrelay.brokers.redis import Commands, RedisBroker, RedisRegistrations, make_client
from wsrelay.brokers.redis_presence import RedisPresence
from wsrelay.brokers.redis_presence import keys as presence_keys
from wsrelay.core.fanout import Publication
from wsrelay.core.history import HistoryLimits
from wsrelay.core.registry import Client
from wsrelay.core.schema import PresenceClient
from wsrelay.errors import BrokerUnavailable


async def start_node(url: str, name: str) -> tuple[RedisBroker, Inbox]:
    broker = RedisBroker(make_client(url), HistoryLimits(size=1000))
    inbox = Inbox()
    await broker.start(inbox, name)
    assert broker.healthy
    return broker, inbox


async def wait_until(condition: Callable[[], object], what: str) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), TIMEOUT)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


class TestRedisBroker(BrokerConformance):
    @pytest.fixture
    async def nodes(self, redis_server: RedisServer) -> AsyncIterator[tuple[Node, Node]]:
        a = await start_node(redis_server.url, "node-a")
        b = await start_node(redis_server.url, "node-b")
        yield a, b
        await a[0].stop()
        await b[0].stop()


async def two_stores(url: str, ttl: int) -> AsyncIterator[Stores]:
    clients = [make_client(url), make_client(url)]  # two nodes, two connections
    yield RedisRegistrations(clients[0], ttl), RedisRegistrations(clients[1], ttl)
    for client in clients:
        await client.aclose()


class TestRedisRegistrations(RegistrationStoreConformance):
    @pytest.fixture
    async def stores(self, redis_server: RedisServer) -> AsyncIterator[Stores]:
        async for stores in two_stores(redis_server.url, ttl=60):
            yield stores

    @pytest.fixture
    async def expiring_stores(self, redis_server: RedisServer) -> AsyncIterator[Stores]:
        async for stores in two_stores(redis_server.url, ttl=EXPIRING_TTL):
            yield stores


async def two_presences(url: str, ttl: float) -> AsyncIterator[tuple[RedisPresence, ...]]:
    clients = [make_client(url), make_client(url)]  # two nodes, two connections
    stores = RedisPresence(clients[0], ttl), RedisPresence(clients[1], ttl)
    for store, node in zip(stores, ("node-a", "node-b"), strict=True):
        await store.start(node)
    yield stores
    for store in stores:
        await store.stop()
    for client in clients:
        await client.aclose()


class TestRedisPresence(PresenceStoreConformance):
    @pytest.fixture
    async def presence_stores(self, redis_server: RedisServer) -> AsyncIterator[PresenceStores]:
        async for stores in two_presences(redis_server.url, ttl=60):
            yield stores[0], stores[1]


async def test_presence_entries_expire_without_their_nodes_heartbeat(
    redis_server: RedisServer,
) -> None:
    """node-b stops (as if killed: its entries are not removed): they go after the TTL,
    while node-a's heartbeat keeps its own; the keys of an abandoned set expire."""
    ttl = 1.0
    async for a, b in two_presences(redis_server.url, ttl=ttl):
        await a.add("topic:t", PresenceClient("ca", "1", "node-a", 1.0))
        await b.add("topic:t", PresenceClient("cb", "2", "node-b", 1.0))
        await b.add("user:2", PresenceClient("cb", "2", "node-b", 1.0))
        await b.stop()  # no more heartbeats from node-b
        started = time.monotonic()
        while {e.client for e in await a.entries("topic:t")} != {"ca"}:
            assert time.monotonic() - started < ttl + TIMEOUT, "node-b's entry stayed"
            await asyncio.sleep(0.05)
        assert await a.count("user:2") == 0
        # Past several TTLs, node-a's entry is still there: its heartbeat rewrote it.
        while time.monotonic() - started < ttl * 2.5:
            assert await a.count("topic:t") == 1
            await asyncio.sleep(0.1)
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            for key in presence_keys("user:2"):
                assert await raw.exists(key) == 0, key
            assert 0 < await raw.pttl(presence_keys("topic:t")[0]) <= ttl * 1000
        finally:
            await raw.aclose()


async def test_presence_entries_come_back_after_redis_lost_them(
    redis_server: RedisServer,
) -> None:
    """The heartbeat writes whole entries: a FLUSHALL (Redis restarted empty) is repaired
    by the next one."""
    async for a, _ in two_presences(redis_server.url, ttl=60):
        await a.add("topic:t", PresenceClient("ca", "1", "node-a", 1.0))
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            await raw.flushall()
        finally:
            await raw.aclose()
        assert await a.count("topic:t") == 0
        await a.refresh()
        assert await a.entries("topic:t") == [PresenceClient("ca", "1", "node-a", 1.0)]
        await a.remove("topic:t", "ca", "node-a")
        await a.refresh()  # removed entries are not written again
        assert await a.count("topic:t") == 0


async def test_a_dropped_subscriber_connection_catches_up_without_gaps(
    redis_server: RedisServer,
) -> None:
    """CLIENT KILL of the pub/sub connection mid-stream: every publication still
    arrives once, in order (the stream fills what pub/sub lost)."""
    a, _ = await start_node(redis_server.url, "a")
    b, inbox = await start_node(redis_server.url, "b")
    await b.subscribe("t")
    admin = aioredis.from_url(redis_server.url)
    for i in range(300):
        if i == 100:
            await admin.client_kill_filter(_type="pubsub")
        await a.publish(Publication("t", str(i)))
    await inbox.wait_for(300)
    assert [p.message for p in inbox.items] == [str(i) for i in range(300)]
    await admin.aclose()
    await a.stop()
    await b.stop()


async def test_redis_restart_is_survived_and_reported(redis_server: RedisServer) -> None:
    """Killed Redis: unhealthy and publishes raise; restarted without its data: healthy
    again by itself, and what was published before B resubscribed is still delivered."""
    a, _ = await start_node(redis_server.url, "a")
    b, inbox = await start_node(redis_server.url, "b")
    await b.subscribe("t")
    await a.publish(Publication("t", "before"))
    await inbox.wait_for(1)

    redis_server.kill()
    await wait_until(lambda: not b.healthy, "B to notice Redis is gone")
    # Which words depends on where the publish meets the dead connection; both say so.
    with pytest.raises(BrokerUnavailable, match=r"unreachable|nothing was published"):
        await a.publish(Publication("t", "during"))

    redis_server.start()

    async def publish_after_restart() -> None:
        while True:
            try:
                await a.publish(Publication("t", "after"))
                return
            except BrokerUnavailable:
                await asyncio.sleep(0.05)  # a stale pooled connection fails once

    await asyncio.wait_for(publish_after_restart(), TIMEOUT)
    await inbox.wait_for(2)
    await wait_until(lambda: b.healthy, "B to reconnect")
    assert [p.message for p in inbox.items] == ["before", "after"]
    await a.stop()
    await b.stop()


async def test_starting_without_redis_is_unhealthy_then_recovers(
    redis_server: RedisServer,
) -> None:
    redis_server.kill()
    broker = RedisBroker(make_client(redis_server.url), HistoryLimits(size=10))
    inbox = Inbox()
    start = asyncio.create_task(broker.start(inbox, "late"))
    redis_server.start()
    await start
    await wait_until(lambda: broker.healthy, "the broker to connect")
    await broker.stop()


async def test_registrations_round_trip_and_expire(redis_server: RedisServer) -> None:
    client = make_client(redis_server.url)
    store = RedisRegistrations(client, ttl=1)
    reg = Client("abc", "42", {"x", "y"})
    await store.add(reg)
    loaded = await store.get("abc")
    assert loaded is not None and (loaded.user, loaded.topics) == ("42", {"x", "y"})
    loaded.topics = {"z"}
    await store.save_topics(loaded)
    assert (await store.get("abc")).topics == {"z"}  # type: ignore[union-attr]
    assert await store.remove("abc") is True
    assert await store.remove("abc") is False
    assert await store.attached(reg) is False  # gone: a connection must not revive it

    await store.add(Client("short", None, set()))

    async def expired() -> bool:
        return await store.get("short") is None

    async def wait_expired() -> None:
        while not await expired():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(wait_expired(), TIMEOUT)
    await client.aclose()


async def test_attached_registrations_do_not_expire(redis_server: RedisServer) -> None:
    backend = from_url(redis_server.url, registration_ttl=1, history=HistoryLimits(size=10))
    await backend.broker.start(Inbox(), "n")
    reg = Client("kept", "u", set())
    await backend.registrations.add(reg, 1)
    assert await backend.registrations.attached(reg)
    admin = aioredis.from_url(redis_server.url)
    # the refresher renews the 1 s TTL every third of a second; watch it for 2 s
    for _ in range(20):
        ttl = await admin.pttl("wsrelay:reg:kept")
        assert ttl > 0, "an attached registration expired"
        await asyncio.sleep(0.1)
    # ... and its place in its user's count with it
    assert await backend.registrations.add(Client("other", "u", set()), 1) is False
    await backend.registrations.detached(reg)
    await admin.aclose()
    await backend.broker.stop()


async def test_a_users_set_is_emptied_by_removes_and_expires_with_them(
    redis_server: RedisServer,
) -> None:
    """The per-user index leaves nothing behind: removing takes the id out of its user's
    set, and the set's own TTL covers its longest-lived member."""
    client = make_client(redis_server.url)
    store = RedisRegistrations(client, ttl=60)
    admin = aioredis.from_url(redis_server.url)
    await store.add(Client("r1", "u", set()), 10)
    await store.add(Client("r2", "u", set()), 10)
    await store.add(Client("anon", None, set()), 10)
    assert await admin.zrange("wsrelay:user-regs:u", 0, -1) == [b"r1", b"r2"]
    assert 59_000 < await admin.pttl("wsrelay:user-regs:u") <= 60_001
    assert await admin.keys("wsrelay:user-regs:*") == [b"wsrelay:user-regs:u"]  # none for anon
    await store.remove("r1")
    assert await admin.zrange("wsrelay:user-regs:u", 0, -1) == [b"r2"]
    await store.remove("r2")
    assert await admin.exists("wsrelay:user-regs:u") == 0
    await admin.aclose()
    await client.aclose()


async def test_store_calls_fail_clearly_when_redis_is_down(redis_server: RedisServer) -> None:
    redis_server.kill()
    store = RedisRegistrations(make_client(redis_server.url), ttl=10)
    with pytest.raises(BrokerUnavailable):
        await store.get("x")


async def test_concurrent_publishes_are_batched_and_each_arrives_once(
    redis_server: RedisServer,
) -> None:
    """500 publishes in flight at once go out in pipelined batches; none is lost or doubled,
    and the receiving node sees them in the order Redis gave them offsets."""
    a, _ = await start_node(redis_server.url, "a")
    b, inbox = await start_node(redis_server.url, "b")
    await b.subscribe("t")
    await asyncio.gather(*(a.publish(Publication("t", str(i))) for i in range(500)))
    await inbox.wait_for(500)
    assert sorted(int(p.message) for p in inbox.items) == list(range(500))
    admin = aioredis.from_url(redis_server.url)
    entries = cast(
        "list[tuple[bytes, dict[bytes, bytes]]]", await admin.xrange("wsrelay:{t}:stream")
    )
    ids = [entry_id for entry_id, _ in entries]
    order = [fields[b"d"] for _, fields in entries]
    assert ids == [f"0-{i}".encode() for i in range(1, 501)]
    assert [p.message for p in inbox.items] == [o.split(b'"')[-2].decode() for o in order]
    await admin.aclose()
    await a.stop()
    await b.stop()


async def commandstats(admin: aioredis.Redis) -> dict[str, int]:
    stats = await admin.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def test_scripts_redis_lost_are_loaded_again_once(redis_server: RedisServer) -> None:
    """SCRIPT FLUSH (or a restart): the commands that got NOSCRIPT did not run; the script
    is loaded once and they are sent again, in one more round trip."""
    client = make_client(redis_server.url)
    store = RedisRegistrations(client, ttl=60)
    admin = aioredis.from_url(redis_server.url)
    assert await store.add(Client("first", "u", set()))
    await admin.script_flush()
    before = await commandstats(admin)
    added = await asyncio.gather(*(store.add(Client(f"r{i}", "u", set())) for i in range(50)))
    assert added == [True] * 50
    after = await commandstats(admin)
    assert after["script|load"] - before.get("script|load", 0) == 1
    await admin.aclose()
    await client.aclose()


async def test_subscriptions_asked_for_at_once_share_one_subscribe(
    redis_server: RedisServer,
) -> None:
    a, _ = await start_node(redis_server.url, "a")
    b, inbox = await start_node(redis_server.url, "b")
    admin = aioredis.from_url(redis_server.url)
    before = await commandstats(admin)
    await asyncio.gather(*(b.subscribe(f"t{i}", f"u{i}") for i in range(50)))
    after = await commandstats(admin)
    assert after["subscribe"] - before["subscribe"] <= 2  # all 100 topics, in one or two
    await a.publish_many([Publication(f"u{i}", str(i)) for i in range(50)])
    assert sorted(int(p.message) for p in await inbox.wait_for(50)) == list(range(50))
    await admin.aclose()
    await a.stop()
    await b.stop()


async def test_commands_queued_past_the_timeout_fail_unsent(redis_server: RedisServer) -> None:
    """What waits in the queue longer than the timeout (every lane busy) fails as
    BrokerUnavailable without being sent: the caller is not kept waiting twice over."""
    client = make_client(redis_server.url, pool_size=1, timeout=5)
    commands = Commands(client, lanes=1, timeout=0.2)
    await commands.call("PING")
    busy = commands.call("BLPOP", "nothing", "0.5")  # holds the only lane for 0.5 s
    await asyncio.sleep(0.05)  # the lane has taken it
    late = commands.call("SET", "k", "late")
    assert await busy is None
    with pytest.raises(BrokerUnavailable, match=r"did not take the command within 0\.2 s"):
        await late
    assert await commands.call("GET", "k") is None  # never sent
    await commands.stop()
    await client.aclose()
