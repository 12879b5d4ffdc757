"""What the Redis broker keeps, and what it tells a node that missed something.

Real redis-server (tests/redis_server.py), short limits so that expiry is seen within
the tests' timeout; every wait polls for the awaited state, bounded by ``TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from tests.brokers.conformance import Inbox
from tests.redis_server import RedisServer
from tests.utils import TIMEOUT
from wsrelay.brokers.redis import RedisBroker, make_client
from wsrelay.brokers.redis_scripts import idempotency_key, keys
from wsrelay.core.fanout import Publication
from wsrelay.core.history import META_TTL, HistoryLimits
from wsrelay.errors import BrokerUnavailable, PublishOutcomeUnknown


async def node(url: str, name: str, limits: HistoryLimits) -> tuple[RedisBroker, Inbox]:
    broker = RedisBroker(make_client(url), limits)
    inbox = Inbox()
    await broker.start(inbox, name)
    assert broker.healthy
    return broker, inbox


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, limit: float = TIMEOUT
) -> None:
    async def poll() -> None:
        while not await check():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), limit)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def test_the_stream_holds_history_size_entries_and_history_answers_no_more(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    a, _ = await node(redis_server.url, "a", HistoryLimits(size=10))
    await a.publish_many([Publication("t", str(i)) for i in range(1, 26)])
    assert await admin.xlen(keys("t")[0]) == 10  # exact trimming
    page = await a.history("t", limit=100)
    assert [p.offset for p in page.publications] == list(range(16, 26))
    assert page.position.offset == 25
    # since below what is kept: the kept ones only, never a hole
    assert [p.offset for p in (await a.history("t", since=3, limit=4)).publications] == [
        16,
        17,
        18,
        19,
    ]
    newest = await a.history("t", since=20, limit=3, reverse=True)
    assert [p.message for p in newest.publications] == ["25", "24", "23"]
    await a.stop()


async def test_ttls_the_stream_lives_history_ttl_the_position_longer(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    a, _ = await node(redis_server.url, "a", HistoryLimits(size=10, ttl=120))
    await a.publish(Publication("t", "x"))
    stream, offset, epoch, run = keys("t")
    assert 119_000 < await admin.pttl(stream) <= 120_000
    for key in (offset, epoch, run):
        assert META_TTL * 1000 - 5_000 < await admin.pttl(key) <= META_TTL * 1000
    await a.stop()


async def test_publications_older_than_history_ttl_are_not_answered_the_epoch_stays(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    a, _ = await node(redis_server.url, "a", HistoryLimits(size=10, ttl=0.5))
    first = await a.publish(Publication("t", "old"))
    await eventually(lambda: _no_history(a, "t"), "the publication to leave the history", TIMEOUT)
    assert await admin.exists(keys("t")[0]) == 0  # the stream key expired
    page = await a.history("t", limit=10)
    assert page.position == first.position  # quiet, not lost: same epoch and offset
    second = await a.publish(Publication("t", "new"))
    assert (second.position.epoch, second.position.offset) == (first.position.epoch, 2)
    await a.stop()


async def _no_history(broker: RedisBroker, topic: str) -> bool:
    return not (await broker.history(topic, limit=10)).publications


async def test_an_entry_past_history_ttl_in_a_busy_stream_is_not_answered(
    redis_server: RedisServer,
) -> None:
    """The stream key lives on while publishes come; its old entries still go."""
    a, _ = await node(redis_server.url, "a", HistoryLimits(size=100, ttl=1))
    await a.publish(Publication("t", "old"))
    started = time.monotonic()

    async def old_gone() -> bool:
        await a.publish(Publication("t", "new"))
        page = await a.history("t", limit=100)
        return page.publications[0].message != "old"

    await eventually(old_gone, "the old entry to expire")
    assert time.monotonic() - started >= 0.9
    page = await a.history("t", limit=100)
    assert page.publications and {p.message for p in page.publications} == {"new"}
    await a.stop()


async def test_the_idempotency_window(redis_server: RedisServer, admin: aioredis.Redis) -> None:
    a, inbox = await node(redis_server.url, "a", HistoryLimits(idempotency_window=0.5))
    await a.subscribe("t")
    first = await a.publish(Publication("t", "once"), "k")
    assert 0 < await admin.pttl(idempotency_key("t", "k")) <= 500
    repeat = await a.publish(Publication("t", "once"), "k")
    assert repeat.duplicate and repeat.position == first.position
    assert await admin.xlen(keys("t")[0]) == 1  # nothing published the second time

    async def window_over() -> bool:
        return await admin.exists(idempotency_key("t", "k")) == 0

    await eventually(window_over, "the key to be forgotten")
    later = await a.publish(Publication("t", "once"), "k")
    assert not later.duplicate and later.position.offset == 2
    got = await inbox.wait_for(2)
    assert [(p.message, p.offset) for p in got] == [("once", 1), ("once", 2)]
    await a.stop()


async def test_history_size_zero_keeps_no_stream_but_gives_offsets(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    a, inbox = await node(redis_server.url, "a", HistoryLimits(size=0))
    await a.subscribe("t")
    receipts = await a.publish_many([Publication("t", str(i)) for i in range(3)])
    assert [r.position.offset for r in receipts] == [1, 2, 3]  # type: ignore[union-attr]
    assert await admin.exists(keys("t")[0]) == 0
    page = await a.history("t", since=0, limit=10)
    assert page.publications == [] and page.position.offset == 3
    assert [p.offset for p in await inbox.wait_for(3)] == [1, 2, 3]
    await a.stop()


class CutOff:
    """Cuts the pub/sub connection of the node subscribed to a topic (its own channel and
    the topic's: 2 channels; the other node has 1) and keeps it from reconnecting (Redis
    refuses new clients: maxclients is lowered to those connected) until :meth:`restore`.
    The other node keeps its connections, so its publishes go on."""

    def __init__(self, admin: aioredis.Redis) -> None:
        self.admin = admin

    async def cut(self) -> None:
        clients = await self.admin.client_list(_type="pubsub")
        [subscriber] = [c for c in clients if int(c["sub"]) >= 2]
        await self.admin.client_kill_filter(_id=subscriber["id"])
        connected = int((await self.admin.info("clients"))["connected_clients"])
        await self.admin.config_set("maxclients", connected)

    async def restore(self) -> None:
        await self.admin.config_set("maxclients", 10_000)


async def test_a_node_cut_off_past_the_history_is_told_the_gap_then_continues(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """B's pub/sub connection is down while A publishes more than the stream keeps: B
    gets what it saw, gap(last one lost), then what the stream still holds, in order."""
    a, _ = await node(redis_server.url, "a", HistoryLimits(size=5))
    b, inbox = await node(redis_server.url, "b", HistoryLimits(size=5))
    await b.subscribe("t")
    first = await a.publish(Publication("t", "1"))
    await inbox.wait_for(1)
    cut = CutOff(admin)
    await cut.cut()
    await a.publish_many([Publication("t", str(i)) for i in range(2, 13)])  # 2..12
    await cut.restore()
    await inbox.wait_for(6)
    assert inbox.gaps == [("t", first.position.epoch, 7)]
    assert [p.offset for p in inbox.items] == [1, 8, 9, 10, 11, 12]
    await a.publish(Publication("t", "13"))
    assert [p.offset for p in await inbox.wait_for(7)][-1] == 13
    await a.stop()
    await b.stop()


async def test_redis_flushed_under_a_live_node_a_gap_then_the_new_epoch_from_1(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    a, _ = await node(redis_server.url, "a", HistoryLimits())
    b, inbox = await node(redis_server.url, "b", HistoryLimits())
    await b.subscribe("t")
    before = await a.publish(Publication("t", "old"))
    await inbox.wait_for(1)
    await admin.flushall()
    after = [await a.publish(Publication("t", f"new{i}")) for i in range(3)]
    epoch = after[0].position.epoch
    assert epoch != before.position.epoch
    got = await inbox.wait_for(4)
    assert inbox.gaps == [("t", epoch, 0)]
    assert [(p.epoch, p.offset) for p in got[1:]] == [(epoch, 1), (epoch, 2), (epoch, 3)]
    await a.stop()
    await b.stop()


async def test_a_new_epoch_while_cut_off_is_a_gap_then_its_publications_from_1(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    a, _ = await node(redis_server.url, "a", HistoryLimits())
    b, inbox = await node(redis_server.url, "b", HistoryLimits())
    await b.subscribe("t")
    await a.publish(Publication("t", "old"))
    await inbox.wait_for(1)
    cut = CutOff(admin)
    await cut.cut()
    await admin.flushall()
    receipts = await a.publish_many([Publication("t", f"new{i}") for i in range(3)])
    epoch = receipts[0].position.epoch  # type: ignore[union-attr]
    await cut.restore()
    got = await inbox.wait_for(4)
    assert inbox.gaps == [("t", epoch, 0)]
    assert [(p.message, p.offset) for p in got[1:]] == [("new0", 1), ("new1", 2), ("new2", 3)]
    await a.stop()
    await b.stop()


async def test_history_gone_when_the_node_catches_up_the_next_epoch_still_reports_a_gap(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """The catch-up finds no epoch at all: the node keeps the old one, so the new
    epoch's first publication comes after a gap."""
    a, _ = await node(redis_server.url, "a", HistoryLimits())
    b, inbox = await node(redis_server.url, "b", HistoryLimits())
    await b.subscribe("t")
    await a.publish(Publication("t", "old"))
    await inbox.wait_for(1)
    cut = CutOff(admin)
    await cut.cut()
    await admin.delete(*keys("t"))
    await cut.restore()

    async def reconnected() -> bool:
        return b._connected.is_set() and b.healthy

    await eventually(reconnected, "B to reconnect and catch up")
    receipt = await a.publish(Publication("t", "new"))
    got = await inbox.wait_for(2)
    assert inbox.gaps == [("t", receipt.position.epoch, 0)]
    assert (got[1].message, got[1].offset) == ("new", 1)
    await a.stop()
    await b.stop()


async def test_a_stalled_redis_is_declared_within_2_s_and_publishes_fail_fast(
    redis_server: RedisServer,
) -> None:
    """SIGSTOP: a publish sent meanwhile fails as PublishOutcomeUnknown once the probe
    says so (not after broker_timeout, here 30 s); a new one at once as BrokerUnavailable;
    SIGCONT: healthy again within 2 s."""
    client = make_client(redis_server.url, timeout=30)
    a = RedisBroker(client, HistoryLimits())
    await a.start(Inbox(), "a")
    assert a.healthy and redis_server.process is not None
    await a.publish(Publication("t", "before"))
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        with pytest.raises(PublishOutcomeUnknown):
            await asyncio.wait_for(a.publish(Publication("t", "maybe")), TIMEOUT)
        assert time.monotonic() - stopped < 2.0
        assert not a.healthy
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as refused:
            await a.publish(Publication("t", "refused"))
        assert type(refused.value) is BrokerUnavailable
        assert time.monotonic() - started < 0.1
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    resumed = time.monotonic()

    async def healthy() -> bool:
        return a.healthy

    await eventually(healthy, "the probe to see Redis again")
    assert time.monotonic() - resumed < 2.0
    page = await a.history("t", limit=10)  # the unknown one did run when Redis resumed
    assert [p.message for p in page.publications] == ["before", "maybe"]
    await a.stop()


async def test_a_publish_to_a_dead_redis_was_not_sent(redis_server: RedisServer) -> None:
    a, _ = await node(redis_server.url, "a", HistoryLimits())
    redis_server.kill()
    with pytest.raises(BrokerUnavailable) as refused:
        await asyncio.wait_for(a.publish(Publication("t", "x")), TIMEOUT)
    assert type(refused.value) is BrokerUnavailable  # not "outcome unknown"
    await a.stop()
