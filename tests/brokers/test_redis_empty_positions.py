"""The Redis broker's position of a topic never published: nothing stored, and trusted
only while nothing can have been lost since (docs/decisions/0008, "The empty position").

Real redis-server (tests/redis_server.py); Redis's own losses are made for real (FLUSHALL,
keys evicted under ``maxmemory``, a restart from an older snapshot). Every wait polls for
the awaited state, bounded by ``TIMEOUT``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

from tests.brokers.conformance import Inbox
from tests.brokers.test_redis_history import CutOff, eventually, node
from tests.redis_server import RedisServer
from wsrelay.brokers.redis import RedisBroker, empty_epoch
from wsrelay.brokers.redis_scripts import GENERATION_KEY, keys
from wsrelay.core.fanout import Publication
from wsrelay.core.history import META_TTL, HistoryLimits, Position, recovered
from wsrelay.core.sse import event_id, parse_event_id
from wsrelay.errors import BrokerUnavailable


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def broker(redis_server: RedisServer) -> AsyncIterator[RedisBroker]:
    a, _ = await node(redis_server.url, "a", HistoryLimits())
    yield a
    await a.stop()


def generation_of(position: Position) -> tuple[str, int]:
    parsed = empty_epoch(position.epoch)
    assert parsed is not None and position.offset == 0, position
    return parsed


async def test_reading_positions_of_fresh_topics_stores_nothing(
    broker: RedisBroker, admin: aioredis.Redis
) -> None:
    topics = [f"fresh.{i}" for i in range(300)]
    await broker.subscribe(*topics)
    pages = await asyncio.gather(*(broker.history(t, since=0, limit=10) for t in topics))
    assert all(p.position.offset == 0 and not p.publications for p in pages)
    assert [k async for k in admin.scan_iter("wsrelay:{fresh*")] == []
    assert await admin.dbsize() == 1  # the generation, one key for every topic
    assert await admin.exists(GENERATION_KEY) == 1
    assert await admin.ttl(GENERATION_KEY) == -1  # no TTL: never evicted by volatile-*


async def test_the_empty_epoch_fits_an_sse_event_id(broker: RedisBroker) -> None:
    before = (await broker.history("t")).position
    generation_of(before)
    assert parse_event_id(event_id({"t": before})) == ({"t": before}, False)


async def test_a_flush_before_the_first_publication_is_not_recovered(
    broker: RedisBroker, admin: aioredis.Redis
) -> None:
    """The publication made before FLUSHALL is lost: the new epoch's stream from offset 1
    must not pass for everything since the position."""
    before = (await broker.history("t")).position
    await broker.publish(Publication("t", "lost"))
    await admin.flushall()
    again = await broker.publish(Publication("t", "new"))
    assert again.position.offset == 1
    page, since = await broker.recover("t", before, 10)
    assert since == before and not recovered(page, since)
    assert page.position == again.position


async def test_keys_evicted_before_the_recovery_are_not_recovered(
    broker: RedisBroker, admin: aioredis.Redis
) -> None:
    """maxmemory evicts the topic's keys (they have a TTL; the generation has none): the
    next publication starts a new epoch at 1, which must not pass for a complete stream."""
    before = (await broker.history("t")).position
    await broker.publish(Publication("t", "lost"))
    await admin.config_set("maxmemory-policy", "volatile-random")
    await admin.config_set("maxmemory", 1)
    try:
        with pytest.raises(OutOfMemoryError):  # after evicting every key with a TTL
            await admin.set("filler", "x")
    finally:
        await admin.config_set("maxmemory", 0)
    assert await admin.exists(*keys("t")) == 0 and await admin.exists(GENERATION_KEY) == 1
    again = await broker.publish(Publication("t", "new"))
    assert again.position.offset == 1
    page, since = await broker.recover("t", before, 10)
    assert since == before and not recovered(page, since)


async def test_redis_restarted_from_an_older_snapshot_is_not_recovered(
    broker: RedisBroker, admin: aioredis.Redis, redis_server: RedisServer
) -> None:
    """The snapshot has the generation and not the publication made after it: Redis comes
    back with the same generation key and the topic never published. Its run id changed."""
    before = (await broker.history("t")).position
    await admin.save()
    await broker.publish(Publication("t", "lost"))
    redis_server.kill()
    await asyncio.to_thread(redis_server.start)

    async def published() -> bool:
        try:
            await broker.publish(Publication("t", "new"))
        except BrokerUnavailable:
            return False
        return True

    await eventually(published, "the broker to publish again")
    page, since = await broker.recover("t", before, 10)
    assert page.position.offset == 1
    assert since == before and not recovered(page, since)


async def test_an_empty_position_older_than_meta_ttl_is_not_trusted(
    broker: RedisBroker,
) -> None:
    """Epochs made after it may have expired since (a topic's position lives META_TTL
    after its last publication); one from the future is not trusted either."""
    before = (await broker.history("t")).position
    generation, born = generation_of(before)
    old = Position(f"g:{generation}:{born - META_TTL * 1000}", 0)
    future = Position(f"g:{generation}:{born + 3_600_000}", 0)
    await broker.publish(Publication("t", "x"))
    for position in (old, future):
        page, since = await broker.recover("t", position, 10)
        assert since == position and not recovered(page, since), position
    page, since = await broker.recover("t", before, 10)  # the genuine one
    assert recovered(page, since) and [p.message for p in page.publications] == ["x"]


async def test_after_a_flush_new_positions_name_the_new_generation(
    broker: RedisBroker, admin: aioredis.Redis
) -> None:
    """The health probe reads the generation again: positions answered after it noticed
    are trusted (a node answering the old one would be told recovered false forever)."""
    generation, _ = generation_of((await broker.history("t")).position)
    await admin.flushall()

    async def renewed() -> bool:
        return generation_of((await broker.history("t")).position)[0] != generation

    await eventually(renewed, "the node to name the new generation")
    fresh = (await broker.history("t")).position
    await broker.publish(Publication("t", "first"))
    page, since = await broker.recover("t", fresh, 10)
    assert recovered(page, since) and [p.message for p in page.publications] == ["first"]


async def two_nodes(url: str) -> tuple[RedisBroker, RedisBroker, Inbox]:
    a, _ = await node(url, "a", HistoryLimits())
    b, inbox = await node(url, "b", HistoryLimits())
    await b.subscribe("t")
    await b.history("t")  # the position B answers a client: where its catch-up starts
    await a.publish(Publication("other", "x"))  # A's publish connection, open before a cut
    return a, b, inbox


async def test_a_node_cut_off_before_the_first_publication_catches_up_without_a_gap(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    a, b, inbox = await two_nodes(redis_server.url)
    cut = CutOff(admin)
    await cut.cut()
    receipts = await a.publish_many([Publication("t", str(i)) for i in range(1, 4)])
    await cut.restore()
    got = await inbox.wait_for(3)
    epoch = receipts[0].position.epoch  # type: ignore[union-attr]
    assert [(p.epoch, p.offset) for p in got] == [(epoch, 1), (epoch, 2), (epoch, 3)]
    await a.publish(Publication("t", "4"))
    assert [p.offset for p in await inbox.wait_for(4)] == [1, 2, 3, 4]
    assert inbox.gaps == []
    await a.stop()
    await b.stop()


async def test_a_node_cut_off_across_a_flush_reports_the_gap(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    a, b, inbox = await two_nodes(redis_server.url)
    cut = CutOff(admin)
    await cut.cut()
    await a.publish(Publication("t", "lost"))
    await admin.flushall()
    receipts = await a.publish_many([Publication("t", str(i)) for i in range(1, 3)])
    epoch = receipts[0].position.epoch  # type: ignore[union-attr]
    await cut.restore()
    got = await inbox.wait_for(2)
    assert inbox.gaps == [("t", epoch, 0)]
    assert [(p.message, p.offset) for p in got] == [("1", 1), ("2", 2)]
    await a.stop()
    await b.stop()


async def evalsha_calls(admin: aioredis.Redis) -> int:
    """EVALSHA run so far (the node's scripts; the probe's runs with EVAL)."""
    stats = await admin.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_forged_or_stale_empty_positions_cost_redis_no_generation_check(
    broker: RedisBroker, admin: aioredis.Redis
) -> None:
    """One command recovering many topics from positions that cannot be trusted (another
    generation, a time in the future or older than META_TTL) reads each topic once and
    asks Redis nothing more; trustworthy ones share one generation check."""
    await eventually(
        lambda: asyncio.sleep(0, broker._redis_clock is not None), "the probe's first check"
    )
    generation, now = generation_of((await broker.history("warm")).position)
    n = 256
    forged = [
        Position(f"g:x:{now}", 0),
        Position(f"g:{generation}:{now + 3_600_000}", 0),
        Position(f"g:{generation}:{now - (META_TTL + 3_600) * 1000}", 0),
        Position(f"g:{generation}:{'9' * 15}", 0),
    ]
    before = await evalsha_calls(admin)
    answers = await asyncio.gather(
        *(broker.recover(f"t{i}", forged[i % len(forged)], 10) for i in range(n))
    )
    assert await evalsha_calls(admin) - before == n  # one history read each, nothing else
    assert not any(recovered(page, since) for page, since in answers)

    positions = await asyncio.gather(*(broker.history(f"t{i}") for i in range(n)))
    before = await evalsha_calls(admin)
    answers = await asyncio.gather(
        *(broker.recover(f"t{i}", p.position, 10) for i, p in enumerate(positions))
    )
    assert await evalsha_calls(admin) - before <= n + 2  # the reads, and a shared check
    assert all(recovered(page, since) for page, since in answers)
