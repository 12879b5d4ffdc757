"""wsrelay.emitter: publications made straight into Redis are a relay's publications.

Real redis-server, real nodes (``wsrelay serve --broker redis://…``): what the emitter
publishes gets the topic's next offset, is kept in its history, reaches the subscribers
of every node, and shares idempotency keys with ``POST /publish``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import pytest
import redis

from tests.redis_server import RedisServer
from tests.utils import Api, ServerProcess, Subscriber
from wsrelay.client import (
    NO_RETRY,
    BadRequest,
    Publish,
    RetryPolicy,
    ServiceUnavailable,
)
from wsrelay.config import Settings
from wsrelay.emitter import AsyncEmitter, Emitted, Emitter

Start = Callable[..., ServerProcess]


async def subscribed(api: Api, *topics: str, user_id: str | None = None) -> Subscriber:
    """A subscriber on ``api``'s node whose subscriptions are in place (acknowledged:
    the node's Redis subscription too)."""
    subscriber = await api.connect(user_id)
    await subscriber.subscribe(*topics)
    return subscriber


async def message(subscriber: Subscriber) -> tuple[str, str, int]:
    frame = await subscriber.frame()
    assert frame["type"] == "message", frame
    return frame["topic"], frame["message"], frame["offset"]


async def test_an_emitted_publication_reaches_every_node_in_order_with_offsets(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    a, b = (Api(session, start_server("--broker", redis_server.url).url) for _ in range(2))
    on_a, on_b = await subscribed(a, "orders"), await subscribed(b, "orders")
    status, first = await a.call("POST", "/publish", {"topic": "orders", "message": "http 1"})
    assert status == 200
    with Emitter(redis_server.url, settings=Settings()) as emitter:
        emitted = await asyncio.to_thread(emitter.publish, "orders", "from a worker")
        batch = await asyncio.to_thread(
            emitter.publish_many, [("orders", "w2"), Publish("orders", "w3")]
        )
    assert emitted == Emitted(first["offset"] + 1, first["epoch"])
    assert [e.offset for e in batch] == [first["offset"] + 2, first["offset"] + 3]
    _, after = await a.call("POST", "/publish", {"topic": "orders", "message": "http 2"})
    assert (after["offset"], after["epoch"]) == (first["offset"] + 4, first["epoch"])
    expected = [
        ("orders", text, first["offset"] + i)
        for i, text in enumerate(["http 1", "from a worker", "w2", "w3", "http 2"])
    ]
    for subscriber in (on_a, on_b):
        assert [await message(subscriber) for _ in range(5)] == expected
        await subscriber.close()
    # Kept in the topic's history, as the nodes read it.
    status, history = await b.call("GET", "/history?topic=orders")
    assert status == 200
    assert [p["message"] for p in history["publications"]] == [t for _, t, _ in expected]


async def test_user_targeted_emits_reach_that_user_only(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    api = Api(session, start_server("--broker", redis_server.url).url)
    alice = await subscribed(api, "inbox", user_id="alice")
    bob = await subscribed(api, "inbox", user_id="bob")
    with Emitter(redis_server.url, settings=Settings()) as emitter:
        await asyncio.to_thread(emitter.publish, "inbox", "for alice", user_id="alice")
        await asyncio.to_thread(emitter.publish, "inbox", "for all")
    assert [(await message(alice))[1], (await message(alice))[1]] == ["for alice", "for all"]
    assert (await message(bob))[1] == "for all"  # not "for alice" first
    await alice.close()
    await bob.close()


async def test_idempotency_keys_are_shared_with_post_publish(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    api = Api(session, start_server("--broker", redis_server.url).url)
    subscriber = await subscribed(api, "jobs")
    with Emitter(redis_server.url, settings=Settings()) as emitter:
        first = await asyncio.to_thread(emitter.publish, "jobs", "done", idempotency_key="job-1")
        status, again = await api.call(
            "POST", "/publish", {"topic": "jobs", "message": "done", "idempotency_key": "job-1"}
        )
        assert status == 200
        assert (again["offset"], again["duplicate"]) == (first.offset, True)
        # and the other way round
        _, over_http = await api.call(
            "POST", "/publish", {"topic": "jobs", "message": "two", "idempotency_key": "job-2"}
        )
        repeat = await asyncio.to_thread(emitter.publish, "jobs", "two", idempotency_key="job-2")
        assert repeat == Emitted(over_http["offset"], over_http["epoch"], duplicate=True)
        await api.publish("jobs", "fence")
    received = [(await message(subscriber))[1] for _ in range(3)]
    assert received == ["done", "two", "fence"]  # each once
    await subscriber.close()


async def test_async_emitter_publishes_as_the_node_does(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    api = Api(session, start_server("--broker", redis_server.url).url)
    subscriber = await subscribed(api, "a", "b")
    async with AsyncEmitter(redis_server.url, settings=Settings()) as emitter:
        one = await emitter.publish("a", "one")
        many = await emitter.publish_many([("b", str(i)) for i in range(1200)])  # 2 pipelines
        repeat = await emitter.publish("a", "again", idempotency_key="k")
        assert (await emitter.publish("a", "again", idempotency_key="k")).duplicate
    assert one.offset == 1 and not one.duplicate
    assert [e.offset for e in many] == list(range(1, 1201))
    assert repeat.offset == 2
    assert await message(subscriber) == ("a", "one", 1)
    for i in range(1200):
        assert await message(subscriber) == ("b", str(i), i + 1)
    assert await message(subscriber) == ("a", "again", 2)
    await subscriber.close()


def test_invalid_topics_are_refused_before_anything_is_sent(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    with Emitter(redis_server.url, settings=Settings(max_topic_length=8)) as emitter:
        for topic in ("", "news.*", "has space", "a" * 9):
            with pytest.raises(BadRequest) as caught:
                emitter.publish(topic, "x")
            assert (caught.value.code, caught.value.status) == ("invalid_topic", 400)
        with pytest.raises(BadRequest, match=r"messages\[1\]"):
            emitter.publish_many([("ok", "x"), ("not ok", "y")])
    assert client.keys("wsrelay:*") == []  # not even the valid first one of the batch
    client.close()


def test_a_lost_script_is_loaded_again(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    with Emitter(redis_server.url, settings=Settings()) as emitter:
        assert emitter.publish("t", "1").offset == 1
        client.script_flush()
        assert emitter.publish("t", "2").offset == 2
    client.close()


def test_redis_down_is_retried_then_reported(redis_server: RedisServer) -> None:
    waits: list[float] = []
    policy = RetryPolicy(attempts=2)
    emitter = Emitter(redis_server.url, settings=Settings(), retry=policy, timeout=1)
    emitter.sleep = waits.append
    assert emitter.publish("t", "up").offset == 1
    redis_server.kill()
    with pytest.raises(ServiceUnavailable) as caught:
        emitter.publish("t", "down")
    assert caught.value.status == 503
    assert len(waits) == 2  # two retries, with the policy's backoff
    assert all(0 <= w <= policy.backoff.maximum for w in waits)
    redis_server.start()
    waits.clear()
    assert emitter.publish("t", "back").offset >= 1
    emitter.close()
    never = Emitter(redis_server.url, settings=Settings(), retry=NO_RETRY, timeout=1)
    never.sleep = waits.append
    redis_server.kill()
    with pytest.raises(ServiceUnavailable) as single:
        never.publish("t", "down")
    assert "messages were published" not in str(single.value)
    with pytest.raises(ServiceUnavailable, match="0 of 2 messages were published"):
        never.publish_many([("t", "a"), ("t", "b")])
    assert waits == []
    never.close()


def test_settings_and_url_come_from_the_relays_environment(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSRELAY_BROKER", redis_server.url)
    monkeypatch.setenv("WSRELAY_HISTORY_SIZE", "2")
    client = redis.Redis.from_url(redis_server.url)
    with Emitter() as emitter:
        assert emitter.url == redis_server.url
        emitter.publish_many([("kept", str(i)) for i in range(5)])
    assert client.xlen("wsrelay:{kept}:stream") == 2  # the relay's --history-size
    client.close()
    monkeypatch.setenv("WSRELAY_BROKER", "memory://")
    with pytest.raises(ValueError, match="not a Redis URL"):
        Emitter()


async def test_json_values_are_published_as_post_publish_publishes_them(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    api = Api(session, start_server("--broker", redis_server.url).url)
    subscriber = await subscribed(api, "json")
    value = {"order": 42, "items": [1, 2.5, None, True], "note": "é"}
    with Emitter(redis_server.url, settings=Settings()) as emitter:
        await asyncio.to_thread(emitter.publish, "json", value)
        status, _ = await api.call("POST", "/publish", {"topic": "json", "message": value})
        assert status == 200
        await asyncio.to_thread(emitter.publish, "json", msgspec.Raw(b'[1, {"a": 2}]'))
        await asyncio.to_thread(emitter.publish, "json", '{"a": 1}')  # a string stays one
        with pytest.raises(BadRequest) as invalid:
            emitter.publish("json", msgspec.Raw(b"{nope"))
        with pytest.raises(BadRequest) as deep:
            emitter.publish("json", json_nested(200))
    assert invalid.value.code == "invalid_json"
    assert deep.value.code == "invalid_field"
    received = [(await message(subscriber))[1] for _ in range(4)]
    assert received == [value, value, [1, {"a": 2}], '{"a": 1}']
    status, history = await api.call("GET", "/history?topic=json")
    assert [p["message"] for p in history["publications"]] == received
    await subscriber.close()


def json_nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value
