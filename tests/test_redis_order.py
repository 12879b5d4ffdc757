"""One order on every node when pub/sub loses a publication (issue 12): the order keeper
(:mod:`wsrelay.brokers.redis_order`) fills it from the topic's stream before handing over
anything newer, and says ``gap`` where the stream no longer holds it.

Real parts only: a real redis-server, two ``wsrelay serve`` nodes on it, JSON WebSocket
subscribers on both. Pub/sub is made to lose a publication by running the project's own
publish script (:func:`wsrelay.brokers.redis.publish_command`, as a node sends it) from
the test, with its ``PUBLISH`` sent to a channel no node listens to: the publication
takes its offset and its place in the stream, and no node hears of it. The next
publication, through a node, is the first the nodes see after the hole. Every wait is on
the awaited frame, bounded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.redis_server import RedisServer
from tests.test_redis_outage import Start, subscribers
from tests.utils import Api, Subscriber
from wsrelay.brokers import redis_scripts as scripts
from wsrelay.brokers.redis import publish_command
from wsrelay.core.fanout import Publication
from wsrelay.core.history import HistoryLimits

Frame = dict[str, Any]

NOWHERE = "wsrelay:test:no-one-listens"


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


def unheard(topic: str, message: str, size: int) -> list[Any]:
    """The publish script as a node runs it for ``message`` (keeping ``size``), except
    that its PUBLISH goes to a channel no node subscribes to."""
    command = list(
        publish_command(
            Publication(topic, message), None, origin="test", size=size, limits=HistoryLimits()
        )
    )
    assert command[:2] == ["EVALSHA", scripts.PUBLISH.sha]
    command[:2] = ["EVAL", scripts.PUBLISH.source]  # no need for the script to be loaded
    command[command.index(scripts.channel(topic))] = NOWHERE
    return command


async def publish_unheard(admin: aioredis.Redis, topic: str, message: str, size: int) -> int:
    """Publish ``message`` into ``topic``'s stream and offsets, not to its channel; its
    offset."""
    command = unheard(topic, message, size)
    at, repeat = await admin.execute_command(*command)  # type: ignore[no-untyped-call]
    assert repeat == 0
    return int(at.split(b" ")[1])


async def offsets_kept(admin: aioredis.Redis, topic: str) -> list[int]:
    """The offsets ``topic``'s stream holds."""
    entries = await admin.xrange(scripts.keys(topic)[0])
    assert entries is not None
    return [int(cast(bytes, entry_id).split(b"-")[1]) for entry_id, _ in entries]


async def publish(api: Api, topic: str, message: str) -> Frame:
    status, body = await api.call("POST", "/publish", {"topic": topic, "message": message})
    assert status == 200, body
    return dict(body)


async def frames_until(sub: Subscriber, last: str) -> list[Frame]:
    """Every frame up to and including the message ``last``."""
    frames: list[Frame] = []
    while not frames or frames[-1].get("message") != last:
        frames.append(await sub.frame())
    return frames


def shown(frames: list[Frame]) -> list[tuple[str, Any, int]]:
    """Frames as ``("message", text, offset)`` and ``("gap", epoch, offset)``."""
    return [
        ("message", f["message"], f["offset"])
        if f["type"] == "message"
        else (f["type"], f.get("epoch"), f["offset"])
        for f in frames
    ]


async def two_nodes(
    start_server: Start, session: aiohttp.ClientSession, url: str, topic: str, *args: str
) -> tuple[Api, list[Subscriber]]:
    """Two nodes on ``url`` with a JSON subscriber each (acknowledged: subscribed in
    Redis); the first node's API."""
    apis = [Api(session, start_server("--broker", url, *args).url) for _ in range(2)]
    subs = [sub for api in apis for sub in await subscribers(api, topic, 1)]
    return apis[0], subs


async def test_a_publication_pub_sub_lost_is_filled_from_the_stream_before_the_next(
    start_server: Start,
    redis_server: RedisServer,
    admin: aioredis.Redis,
    session: aiohttp.ClientSession,
    topic: str,
) -> None:
    """Offsets 2-4 never reach pub/sub; offset 5 does: each node reads 2-4 from the
    stream and hands over 2, 3, 4, 5, in order, once each, no gap."""
    api, subs = await two_nodes(start_server, session, redis_server.url, topic)
    first = await publish(api, topic, "m1")
    for sub in subs:
        assert shown(await frames_until(sub, "m1")) == [("message", "m1", first["offset"])]
    lost = [await publish_unheard(admin, topic, f"m{i}", 100) for i in (2, 3, 4)]
    assert lost == [2, 3, 4] and first["offset"] == 1
    after = await publish(api, topic, "m5")
    assert after["offset"] == 5
    for sub in subs:
        assert shown(await frames_until(sub, "m5")) == [
            ("message", f"m{i}", i) for i in (2, 3, 4, 5)
        ]
    await publish(api, topic, "m6")  # and on, live
    for sub in subs:
        assert shown(await frames_until(sub, "m6")) == [("message", "m6", 6)]
        await sub.close()


async def test_what_the_stream_no_longer_holds_is_a_gap_never_a_silent_skip(
    start_server: Start,
    redis_server: RedisServer,
    admin: aioredis.Redis,
    session: aiohttp.ClientSession,
    topic: str,
) -> None:
    """--history-size 3. Offsets 2-6 never reach pub/sub; 7 does, and its own publish
    leaves the stream holding 5-7: each node says gap (the stream continues after 4), then
    hands over 5, 6, 7. Then 8 never reaches pub/sub and is trimmed away: gap after 8, then
    9. A client recovering from offset 1 is told ``recovered: false``."""
    api, subs = await two_nodes(
        start_server, session, redis_server.url, topic, "--history-size", "3"
    )
    first = await publish(api, topic, "m1")
    epoch = first["epoch"]
    for sub in subs:
        assert shown(await frames_until(sub, "m1")) == [("message", "m1", 1)]
    assert [await publish_unheard(admin, topic, f"m{i}", 3) for i in range(2, 7)] == [
        2,
        3,
        4,
        5,
        6,
    ]
    assert await offsets_kept(admin, topic) == [4, 5, 6]
    await publish(api, topic, "m7")
    assert await offsets_kept(admin, topic) == [5, 6, 7]
    for sub in subs:
        assert shown(await frames_until(sub, "m7")) == [
            ("gap", epoch, 4),
            ("message", "m5", 5),
            ("message", "m6", 6),
            ("message", "m7", 7),
        ]

    assert await publish_unheard(admin, topic, "m8", 3) == 8
    await admin.xtrim(scripts.keys(topic)[0], minid="0-9")  # gone before any node reads it
    await publish(api, topic, "m9")
    for sub in subs:
        assert shown(await frames_until(sub, "m9")) == [("gap", epoch, 8), ("message", "m9", 9)]
        await sub.close()

    late = await api.connect(None)
    ack = await late.command(
        {"subscribe": [topic], "since": {topic: {"offset": 1, "epoch": epoch}}}
    )
    assert ack["positions"][topic] == {"offset": 9, "epoch": epoch, "recovered": False}, ack
    await late.close()


async def test_a_new_epoch_between_the_hole_and_its_fill_is_a_gap_not_its_publications(
    start_server: Start,
    redis_server: RedisServer,
    admin: aioredis.Redis,
    session: aiohttp.ClientSession,
    topic: str,
) -> None:
    """In one transaction: offset 2 unheard, 3 heard, the topic's keys deleted (its
    history lost), then the new epoch's 1 and 2 unheard and 3 heard. When a node reads 2
    of the first epoch to fill its hole, the stream holds the new epoch's entries: it must
    say gap, not hand over the new epoch's 2 in the old one's place; then gap (new epoch),
    1, 2, 3 of the new one."""
    api, subs = await two_nodes(start_server, session, redis_server.url, topic)
    first = await publish(api, topic, "old1")
    for sub in subs:
        assert shown(await frames_until(sub, "old1")) == [("message", "old1", 1)]
    heard = unheard(topic, "old3", 100)
    heard[heard.index(NOWHERE)] = scripts.channel(topic)
    heard_new = unheard(topic, "new3", 100)
    heard_new[heard_new.index(NOWHERE)] = scripts.channel(topic)
    async with admin.pipeline(transaction=True) as multi:
        multi.execute_command(*unheard(topic, "old2", 100))
        multi.execute_command(*heard)
        multi.delete(*scripts.keys(topic))
        multi.execute_command(*unheard(topic, "new1", 100))
        multi.execute_command(*unheard(topic, "new2", 100))
        multi.execute_command(*heard_new)
        replies = await multi.execute()
    positions = [r[0].decode().split() for r in (replies[0], replies[1], *replies[3:])]
    old, new = first["epoch"], positions[-1][0]
    assert positions == [[old, "2"], [old, "3"], [new, "1"], [new, "2"], [new, "3"]]
    assert new != old
    for sub in subs:
        assert shown(await frames_until(sub, "new3")) == [
            ("gap", old, 2),
            ("message", "old3", 3),
            ("gap", new, 0),
            ("message", "new1", 1),
            ("message", "new2", 2),
            ("message", "new3", 3),
        ]
        await sub.close()
