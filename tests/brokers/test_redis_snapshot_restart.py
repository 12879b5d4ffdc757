"""Redis restarted from an older snapshot: the topics' epoch keys come back as they were
in the snapshot, so the offsets given after it would be given again. A restart must start
new epochs (docs/decisions/0008, "Redis restarted"): a client that saw part of the lost
publications is answered ``recovered: false``, a live node gets a gap, never a reused
offset in the same epoch.

Real redis-server (tests/redis_server.py): ``SAVE`` writes the snapshot into the server's
own directory, which a restart on the same port loads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.brokers.test_redis_history import eventually, node
from tests.redis_server import RedisServer
from wsrelay.brokers.redis import RedisBroker
from wsrelay.core.fanout import Publication
from wsrelay.core.history import HistoryLimits, Receipt, recovered
from wsrelay.errors import BrokerUnavailable


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def restart_from_snapshot(redis_server: RedisServer) -> None:
    redis_server.kill()
    redis_server.start()


async def publish_when_back(broker: RedisBroker, publication: Publication) -> Receipt:
    receipt: list[Receipt] = []

    async def published() -> bool:
        try:
            receipt.append(await broker.publish(publication))
        except BrokerUnavailable:
            return False
        return True

    await eventually(published, "the broker to publish again")
    return receipt[0]


async def test_a_restart_from_an_older_snapshot_is_not_recovered(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    b, _ = await node(redis_server.url, "b", HistoryLimits())
    try:
        receipts = await b.publish_many([Publication("t", f"m{i}") for i in range(1, 6)])
        at = receipts[-1].position  # type: ignore[union-attr]
        await admin.save()
        await b.publish_many([Publication("t", f"lost{i}") for i in range(6, 9)])
        await restart_from_snapshot(redis_server)
        receipt = await publish_when_back(b, Publication("t", "new"))
        assert receipt.position.epoch != at.epoch, "an offset of the lost epoch given again"
        assert receipt.position.offset == 1
        page, since = await b.recover("t", at, 10)
        assert not recovered(page, since)
        assert page.position == receipt.position
    finally:
        await b.stop()


async def test_a_live_node_gets_a_gap_after_a_restart_from_an_older_snapshot(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    a, _ = await node(redis_server.url, "a", HistoryLimits())
    b, inbox = await node(redis_server.url, "b", HistoryLimits())
    try:
        await b.subscribe("t")
        await a.publish_many([Publication("t", f"m{i}") for i in range(1, 6)])
        await admin.save()
        await a.publish_many([Publication("t", f"lost{i}") for i in range(6, 9)])
        got = await inbox.wait_for(8)
        old = got[0].epoch
        assert [p.offset for p in got] == list(range(1, 9))
        await restart_from_snapshot(redis_server)
        first = await publish_when_back(a, Publication("t", "new1"))
        await a.publish(Publication("t", "new2"))
        got = await inbox.wait_for(10)
        new = [(p.epoch, p.offset, p.message) for p in got[8:]]
        assert first.position.epoch != old
        assert new == [(first.position.epoch, 1, "new1"), (first.position.epoch, 2, "new2")]
        assert inbox.gaps == [("t", first.position.epoch, 0)]
    finally:
        await a.stop()
        await b.stop()


async def test_a_save_without_a_restart_keeps_the_epoch(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """A save changes LASTSAVE, which the scripts take as a hint to read run_id again: the
    same process, so the same epoch (only a restart starts a new one)."""
    b, _ = await node(redis_server.url, "b", HistoryLimits())
    try:
        first = await b.publish(Publication("t", "1"))
        await admin.save()
        second = await b.publish(Publication("t", "2"))
        await asyncio.sleep(1.1)  # past the second of the save: the fast path again
        await admin.save()
        third = await b.publish(Publication("t", "3"))
        fourth = await b.publish(Publication("t", "4"))
        epochs = {r.position.epoch for r in (first, second, third, fourth)}
        assert len(epochs) == 1
        assert [r.position.offset for r in (first, second, third, fourth)] == [1, 2, 3, 4]
        page, since = await b.recover("t", first.position, 10)
        assert recovered(page, since) and [p.message for p in page.publications] == ["2", "3", "4"]
    finally:
        await b.stop()
