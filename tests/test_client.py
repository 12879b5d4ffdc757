"""wsrelay.client against real servers: round trips, errors, reconnects, terminal closes.

Nothing waits by sleeping: each step waits for the event it needs (a message, a
``Subscribed`` or ``Reconnecting`` event from the subscription), bounded by TIMEOUT.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime

import msgspec
import pytest
import websockets

from tests.gate import Gate
from tests.redis_server import RedisServer
from tests.utils import TIMEOUT, ServerProcess, free_port
from wsrelay.client import (
    MAX_BATCH,
    Backoff,
    BadRequest,
    ConnectionFailed,
    Event,
    Message,
    NotFound,
    Publish,
    Reconnecting,
    Relay,
    Replaced,
    ServiceUnavailable,
    Subscribed,
    Subscription,
    Unauthorized,
    Unregistered,
)

Start = Callable[..., ServerProcess]
FAST = Backoff(initial=0.05, maximum=0.5)
"""Short reconnect delays, so that tests wait for the server rather than the backoff."""


class Events:
    """A subscription's on_event callback that tests can wait on."""

    def __init__(self) -> None:
        self.seen: list[Event] = []
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        self.seen.append(event)
        self.queue.put_nowait(event)

    async def next(self, kind: type[Event]) -> Event:
        """The next event of type ``kind``, skipping others."""
        async with asyncio.timeout(TIMEOUT * 4):
            while True:
                event = await self.queue.get()
                if isinstance(event, kind):
                    return event


async def receive(subscription: Subscription, count: int = 1) -> list[Message]:
    async with asyncio.timeout(TIMEOUT):
        return [await anext(subscription) for _ in range(count)]


def text(message: Message | list[Message]) -> tuple[str, str] | list[tuple[str, str]]:
    """A message's (topic, text), or a list's: what was published, without its position."""
    if isinstance(message, list):
        return [(m.topic, m.message) for m in message]
    return message.topic, message.message


async def test_publish_subscribe_round_trip(server: ServerProcess, topic: str) -> None:
    events = Events()
    async with Relay(server.url) as relay, relay.subscribe(topic, on_event=events) as sub:
        first = events.seen[0]
        assert isinstance(first, Subscribed) and first.reconnects == 0 and first.registered
        assert first.id == sub.id and first.topics == (topic,)
        assert await relay.publish(topic, "hello") == 1
        (message,) = await receive(sub)
        assert message == Message(topic, "hello", 1, message.epoch) and message.epoch
        with pytest.raises(AttributeError):
            message.message = "changed"  # type: ignore[misc]
        client_id = sub.id
        assert client_id is not None
    # Leaving the blocks deleted the registration.
    async with Relay(server.url) as relay:
        with pytest.raises(NotFound) as info:
            await relay.unregister(client_id)
        assert info.value.code == "unknown_client" and info.value.status == 404


async def test_iterating_without_async_with_connects_and_relay_close_cleans_up(
    server: ServerProcess, topic: str
) -> None:
    async with Relay(server.url) as relay:
        sub = relay.subscribe(topic)
        # Nothing is registered until the first iteration; run it, then publish
        # until the subscription is in place (each publish reports its recipients).
        receiving = asyncio.create_task(anext(sub))
        async with asyncio.timeout(TIMEOUT):
            while await relay.publish(topic, "first") == 0:
                await asyncio.sleep(0.01)
            assert text(await receiving) == (topic, "first")
        client_id = sub.id
        assert client_id is not None
    assert sub.closed
    async with Relay(server.url) as relay:
        with pytest.raises(NotFound):
            await relay.unregister(client_id)


async def test_user_targeting(server: ServerProcess, topic: str) -> None:
    async with (
        Relay(server.url) as relay,
        relay.subscribe(topic, user_id=7) as user7,
        relay.subscribe(topic) as anonymous,
    ):
        assert await relay.publish(topic, "for 8", user_id=8) == 0
        assert await relay.publish(topic, "for 7", user_id="7") == 1
        assert await relay.publish(topic, "for all") == 2
        assert [m.message for m in await receive(user7, 2)] == ["for 7", "for all"]
        assert [m.message for m in await receive(anonymous)] == ["for all"]


async def test_publish_many_in_order_across_batches(server: ServerProcess, topic: str) -> None:
    other = topic + ".other"
    count = MAX_BATCH * 2 + 500  # three requests
    async with Relay(server.url) as relay, relay.subscribe(topic, other) as sub:
        before = (await relay.stats()).publishes
        items: list[Publish | tuple[str, str]] = [
            Publish(other, str(i)) if i % 3 == 0 else (topic, str(i)) for i in range(count)
        ]
        assert await relay.publish_many(items) == [1] * count
        assert (await relay.stats()).publishes - before == count
        received = await receive(sub, count)
        assert text(received) == [(other if i % 3 == 0 else topic, str(i)) for i in range(count)]
        assert await relay.publish_many([]) == []


async def test_publish_many_splits_by_size_and_targets_users(
    server: ServerProcess, topic: str
) -> None:
    async with (
        Relay(server.url, batch_bytes=1000) as relay,
        relay.subscribe(topic, user_id="u1") as sub,
    ):
        big = "x" * 300
        counts = await relay.publish_many(
            [(topic, f"{i}{big}", "u1" if i % 2 else "u2") for i in range(20)]
        )
        assert counts == [0, 1] * 10
        assert [m.message for m in await receive(sub, 10)] == [f"{i}{big}" for i in range(1, 20, 2)]


async def test_stats_and_topics(server: ServerProcess, topic: str) -> None:
    async with Relay(server.url) as relay:
        before = await relay.stats()
        async with (
            relay.subscribe(topic + ".a", topic + ".b") as sub,
            relay.subscribe(topic + ".a"),
        ):
            await relay.publish(topic + ".a", "m")
            await receive(sub)
            stats = await relay.stats()
            assert stats.publishes == before.publishes + 1
            assert stats.deliveries == before.deliveries + 2
            assert stats.connections >= 2 and stats.broker == "up" and stats.uptime > 0
            listed = await relay.topics(prefix=topic)
            assert [(t.topic, t.subscribers) for t in listed.topics] == [
                (topic + ".a", 2),
                (topic + ".b", 1),
            ]
            assert listed.total == 2
            assert len((await relay.topics(prefix=topic, limit=1)).topics) == 1
        with pytest.raises(BadRequest) as info:
            await relay.topics(limit=0)
        assert info.value.code == "invalid_field" and info.value.status == 400


async def test_reconnects_and_resubscribes_after_a_server_restart(
    start_server: Start, topic: str
) -> None:
    """The server stops (close 1001) and comes back on the same port with an empty
    memory store: the subscription retries with backoff, gets 404 for its old id,
    registers again, resubscribes, and messages flow again, with no missed iteration."""
    port = str(free_port())
    first = await asyncio.to_thread(start_server, "--port", port)
    events = Events()
    async with (
        Relay(first.url, backoff=FAST) as relay,
        relay.subscribe(topic, "other." + topic, user_id=5, on_event=events) as sub,
    ):
        assert await relay.publish(topic, "before") == 1
        assert text(await receive(sub)) == [(topic, "before")]
        old_id = sub.id
        receiving = asyncio.create_task(anext(sub))  # iterating while the server goes away

        await asyncio.to_thread(first.stop)
        lost = await events.next(Reconnecting)
        assert isinstance(lost, Reconnecting) and lost.close_code == 1001 and lost.attempt == 1
        await events.next(Reconnecting)  # an attempt against the stopped server failed
        assert not receiving.done()

        second = await asyncio.to_thread(start_server, "--port", port)
        assert second.url == first.url
        back = await events.next(Subscribed)
        assert isinstance(back, Subscribed)
        assert back.reconnects == 1 and sub.reconnects == 1
        assert back.registered and back.id == sub.id != old_id
        assert back.topics == (topic, "other." + topic)

        # Resubscribed to both topics, still as user 5.
        assert await relay.publish(topic, "after", user_id=5) == 1
        async with asyncio.timeout(TIMEOUT):
            assert text(await receiving) == (topic, "after")
        assert await relay.publish("other." + topic, "again") == 1
        assert text(await receive(sub)) == [("other." + topic, "again")]
        failed = [e for e in events.seen if isinstance(e, Reconnecting)]
        assert [e.attempt for e in failed] == list(range(1, len(failed) + 1))
        assert all(0 <= e.delay <= FAST.maximum for e in failed)


async def test_reconnect_keeps_the_registration_when_the_server_still_knows_it(
    start_server: Start, redis_server: RedisServer, topic: str
) -> None:
    """With the Redis store the id survives the restart: no new registration."""
    port = str(free_port())
    first = await asyncio.to_thread(start_server, "--port", port, "--broker", redis_server.url)
    events = Events()
    async with (
        Relay(first.url, backoff=FAST) as relay,
        relay.subscribe(topic, on_event=events) as sub,
    ):
        old_id = sub.id
        receiving = asyncio.create_task(anext(sub))
        await asyncio.to_thread(first.stop)
        await events.next(Reconnecting)
        await asyncio.to_thread(start_server, "--port", port, "--broker", redis_server.url)
        back = await events.next(Subscribed)
        assert isinstance(back, Subscribed) and not back.registered and sub.id == old_id
        assert await relay.publish(topic, "after") == 1
        async with asyncio.timeout(TIMEOUT):
            assert text(await receiving) == (topic, "after")


async def test_wrong_api_key_raises_unauthorized(start_server: Start, topic: str) -> None:
    server = await asyncio.to_thread(start_server, "--api-key", "right")
    async with Relay(server.url, api_key="wrong") as relay:
        with pytest.raises(Unauthorized) as info:
            await relay.publish(topic, "m")
        assert info.value.code == "unauthorized" and info.value.status == 401
        assert str(info.value) == "HTTP 401 unauthorized: the API key is not valid"
        sub = relay.subscribe(topic)
        with pytest.raises(Unauthorized):
            await sub.start()
        assert sub.closed
        with pytest.raises(StopAsyncIteration):
            await anext(sub)
    async with Relay(server.url) as relay:  # no key at all
        with pytest.raises(Unauthorized):
            await relay.stats()
    async with (
        Relay(server.url, api_key="right") as relay,
        relay.subscribe(topic) as sub,
    ):
        assert await relay.publish(topic, "m") == 1
        assert text(await receive(sub)) == [(topic, "m")]


async def test_unreachable_server_raises_connection_failed(topic: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with Relay(url, timeout=TIMEOUT) as relay:
        with pytest.raises(ConnectionFailed) as info:
            await relay.publish(topic, "m")
        assert str(info.value).startswith(f"cannot reach {url}: ")
        assert info.value.code == "connection_failed" and info.value.status is None
        with pytest.raises(ConnectionFailed):
            async with relay.subscribe(topic):
                pass
        with pytest.raises(ConnectionFailed):
            await relay.stats()


async def test_invalid_topic_is_refused_at_subscribe(server: ServerProcess) -> None:
    async with Relay(server.url) as relay:
        with pytest.raises(BadRequest) as info:
            async with relay.subscribe("no spaces"):
                pass
        assert info.value.code == "invalid_topic"


async def test_deleted_registration_ends_the_subscription(
    server: ServerProcess, topic: str
) -> None:
    """Close 1000 is terminal: the iteration raises Unregistered, then stops."""
    events = Events()
    async with (
        Relay(server.url, backoff=FAST) as relay,
        relay.subscribe(topic, on_event=events) as sub,
    ):
        assert sub.id is not None
        receiving = asyncio.create_task(anext(sub))
        await relay.unregister(sub.id)
        with pytest.raises(Unregistered) as info:
            async with asyncio.timeout(TIMEOUT):
                await receiving
        assert info.value.close_code == 1000 and info.value.code == "unregistered"
        assert sub.closed
        with pytest.raises(StopAsyncIteration):
            await anext(sub)
        assert not any(isinstance(e, Reconnecting) for e in events.seen)


async def test_replaced_connection_ends_without_deleting_the_registration(
    server: ServerProcess, topic: str
) -> None:
    async with Relay(server.url) as relay:
        sub = relay.subscribe(topic)
        await sub.start()
        assert sub.url is not None
        async with websockets.connect(sub.url, open_timeout=TIMEOUT) as other:
            with pytest.raises(Replaced) as info:
                await receive(sub)
            assert info.value.close_code == 4500
            # The registration is the other connection's now: still there, still subscribed.
            assert await relay.publish(topic, "to the new connection") == 1
            async with asyncio.timeout(TIMEOUT):
                frame = msgspec.json.decode(await other.recv())
            assert frame == {
                "type": "message",
                "topic": topic,
                "message": "to the new connection",
                "offset": 1,
            }


async def test_close_from_another_task_stops_iteration(server: ServerProcess, topic: str) -> None:
    async with Relay(server.url) as relay, relay.subscribe(topic) as sub:
        receiving = asyncio.create_task(anext(sub))
        await asyncio.sleep(0)  # let it start waiting
        await sub.close()
        with pytest.raises(StopAsyncIteration):
            async with asyncio.timeout(TIMEOUT):
                await receiving


def test_backoff_is_exponential_with_full_jitter() -> None:
    backoff = Backoff(initial=0.1, maximum=2.0)
    rng = random.Random(1)
    for attempt in range(1, 12):
        ceiling = min(2.0, 0.1 * 2 ** (attempt - 1))
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8 and min(delays) < ceiling * 0.2  # spread, not fixed
    assert dataclasses.replace(backoff, max_attempts=3).max_attempts == 3


# -- Retry-After: a refusal says when to come back ---------------------------------------------

EARLY = 0.01
"""Seconds an asyncio timer may fire before its time (clock resolution), and more."""


def retry_after_waits(events: Events) -> list[Reconnecting]:
    return [e for e in events.seen if isinstance(e, Reconnecting) and e.retry_after is not None]


def test_retry_after_is_parsed_capped_and_jittered() -> None:
    from wsrelay.client._models import parse_retry_after

    assert parse_retry_after("1") == 1.0
    assert parse_retry_after(" 120 ") == 120.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("1e9") == 1e9  # parsed as sent; Backoff.after caps it
    for unusable in (None, "", "-1", "inf", "nan", "soon", "1 s"):
        assert parse_retry_after(unusable) is None, unusable
    now = time.time()
    soon = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)
    assert parse_retry_after(soon, now) == pytest.approx(30, abs=1)  # whole seconds
    past = format_datetime(datetime.fromtimestamp(now - 30, UTC), usegmt=True)
    assert parse_retry_after(past, now) == 0.0

    backoff = Backoff(initial=0.1, maximum=0.5, max_retry_after=10.0)
    rng = random.Random(1)
    for retry_after, low, high in [
        (1.0, 1.0, 1.2),  # 20 % of jitter above the server's value
        (5.0, 5.0, 6.0),
        (1e9, 10.0, 12.0),  # a hostile or broken value: capped, still jittered
        (0.0, 0.0, 0.1),  # "now": jitter of at least `initial`, so not all at once
        (0.2, 0.2, 0.3),
    ]:
        delays = [backoff.after(retry_after, rng) for _ in range(500)]
        assert all(low <= d <= high for d in delays), (retry_after, min(delays), max(delays))
        spread = high - low
        assert max(delays) > high - spread * 0.2 and min(delays) < low + spread * 0.2
    assert Backoff().max_retry_after == 300.0


async def test_first_connection_refused_with_retry_after_raises_it(
    start_server: Start, topic: str
) -> None:
    """A full node refuses the upgrade with a real 503 and Retry-After; the first
    connection raises at once (no retry) and the error says when to come back."""
    server = await asyncio.to_thread(start_server, "--max-connections", "1")
    async with Relay(server.url) as relay, relay.subscribe(topic) as holder:
        assert holder.id is not None
        sub = relay.subscribe(topic)
        with pytest.raises(ServiceUnavailable) as info:
            await sub.start()
        assert info.value.status == 503 and info.value.code == "too_many_connections"
        assert info.value.retry_after is not None and info.value.retry_after > 0
        assert sub.closed


async def test_reconnect_waits_as_long_as_a_refused_upgrade_asks(
    start_server: Start, topic: str
) -> None:
    """After a node restart the upgrades are refused with 503: with ``Retry-After: 1``
    the next attempt comes 1 to 1.2 s later, without the header after the backoff,
    and ``Retry-After: 86400`` is capped at ``max_retry_after`` (1.5 s here)."""
    port = str(free_port())
    first = await asyncio.to_thread(start_server, "--port", port)
    backoff = Backoff(initial=0.05, maximum=0.2, max_retry_after=1.5)
    events = Events()
    async with (
        Gate(first.url) as gate,
        Relay(gate.url, backoff=backoff) as relay,
        relay.subscribe(topic, on_event=events) as sub,
    ):
        receiving = asyncio.create_task(anext(sub))
        gate.refuse("upgrade", "1", None, "86400")
        await asyncio.to_thread(first.stop)
        await events.next(Reconnecting)  # the loss (1001)
        await asyncio.to_thread(start_server, "--port", port)  # a new, empty node
        back = await events.next(Subscribed)
        assert isinstance(back, Subscribed) and back.registered  # the old id died with it

        lost, *attempts = [e for e in events.seen if isinstance(e, Reconnecting)]
        assert lost.close_code == 1001 and lost.retry_after is None
        assert [e.retry_after for e in attempts[:3]] == [1.0, None, 86400.0]
        one, none, capped = attempts[:3]
        assert one.reason.startswith("HTTP 503 broker_unavailable: ")
        assert 1.0 <= one.delay <= 1.2
        assert none.delay <= backoff.maximum  # no header: the backoff
        assert 1.5 <= capped.delay <= 1.8  # capped, then 20 % of jitter
        # What the node saw: the first upgrade (redirected), three refused, then more.
        upgrades = gate.seen["upgrade"]
        assert gate.statuses("upgrade")[:5] == [307, 503, 503, 503, 307]
        assert upgrades[2].at - upgrades[1].at >= max(1.0, one.delay) - EARLY
        assert upgrades[4].at - upgrades[3].at >= max(1.5, capped.delay) - EARLY

        assert await relay.publish(topic, "after") == 1
        async with asyncio.timeout(TIMEOUT):
            assert text(await receiving) == (topic, "after")


async def test_reconnect_waits_as_long_as_a_refused_registration_asks(
    start_server: Start, topic: str
) -> None:
    """The node restarted with an empty store: the old id gets 404, and registering
    anew is refused twice with ``Retry-After: 1``; each next try is 1 s or more later."""
    port = str(free_port())
    first = await asyncio.to_thread(start_server, "--port", port)
    events = Events()
    async with (
        Gate(first.url) as gate,
        Relay(gate.url, backoff=FAST) as relay,
        relay.subscribe(topic, on_event=events) as sub,
    ):
        receiving = asyncio.create_task(anext(sub))
        gate.refuse("register", "1", "1")
        await asyncio.to_thread(first.stop)
        await events.next(Reconnecting)  # the loss (1001)
        await asyncio.to_thread(start_server, "--port", port)
        back = await events.next(Subscribed)
        assert isinstance(back, Subscribed) and back.registered and back.reconnects == 1

        waits = retry_after_waits(events)
        assert [e.retry_after for e in waits] == [1.0, 1.0]
        assert all(1.0 <= e.delay <= 1.0 + max(0.2, FAST.initial) for e in waits)
        assert all(e.reason.startswith("HTTP 503 broker_unavailable: ") for e in waits)
        # Every other wait was the backoff's.
        others = [e for e in events.seen if isinstance(e, Reconnecting) and e not in waits]
        assert others and all(e.delay <= FAST.maximum for e in others)
        registrations = gate.seen["register"]
        assert gate.statuses("register") == [200, 503, 503, 200]
        for refused, after, wait in zip(registrations[1:3], registrations[2:], waits, strict=True):
            assert after.at - refused.at >= max(1.0, wait.delay) - EARLY

        assert await relay.publish(topic, "after") == 1
        async with asyncio.timeout(TIMEOUT):
            assert text(await receiving) == (topic, "after")


def test_the_client_does_not_load_the_server() -> None:
    """Applications that only publish or subscribe need not import aiohttp's web server,
    Prometheus or JWT code."""
    code = (
        "import sys, wsrelay.client; "
        "print(sorted(m for m in sys.modules if m.startswith(('wsrelay.server', 'jwt', "
        "'prometheus_client', 'aiohttp.web'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"
