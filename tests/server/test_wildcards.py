"""Wildcard subscriptions (``news.*``, ``news.>``) on a real server, on both WebSocket
stacks with the memory broker, and across two nodes on Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import aiohttp
import pytest
import websockets

from tests.redis_server import RedisServer
from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber, stop_and_check
from wsrelay.config import STACKS


@pytest.fixture(scope="module", params=STACKS)
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    process = ServerProcess(["--stack", request.param, "--max-topics-per-client", "3"]).start()
    yield process
    stop_and_check(process)


async def check_wildcards(publisher: Api, subscriber_api: Api, prefix: str) -> None:
    """A ``prefix.*`` and ``prefix.>`` subscriber (plus ``prefix.eu`` by name) gets each
    matching publication once, nothing else, and stops after unsubscribing."""
    sub = await subscriber_api.connect(None, [f"{prefix}.eu"])
    ack = await sub.subscribe(f"{prefix}.*", f"{prefix}.>")
    assert ack["topics"] == sorted([f"{prefix}.eu", f"{prefix}.*", f"{prefix}.>"])
    assert list(ack["positions"]) == []  # patterns have no position
    for topic in (f"{prefix}.eu", f"{prefix}x.eu", prefix, f"{prefix}.eu.fr"):
        await publisher.publish(topic, topic)
    assert await sub.message() == (f"{prefix}.eu", f"{prefix}.eu")
    assert await sub.message() == (f"{prefix}.eu.fr", f"{prefix}.eu.fr")
    ack = await sub.command({"unsubscribe": [f"{prefix}.>", f"{prefix}.eu"]})
    assert ack["topics"] == [f"{prefix}.*"]
    await publisher.publish(f"{prefix}.eu.fr", "no longer")
    await publisher.publish(f"{prefix}.fence", "fence")
    assert await sub.message() == (f"{prefix}.fence", "fence")
    await sub.close()


async def test_a_wildcard_subscriber_gets_matching_publications_once(api: Api, topic: str) -> None:
    await check_wildcards(api, api, topic)


async def test_since_naming_a_pattern_is_refused(api: Api, topic: str) -> None:
    sub = await api.connect()
    since = {f"{topic}.*": {"offset": 1, "epoch": "e"}}
    answer = await sub.command({"subscribe": [f"{topic}.*"], "since": since})
    assert answer["type"] == "error" and answer["error"]["code"] == "invalid_field", answer
    assert "pattern" in answer["error"]["message"]
    ack = await sub.subscribe("fence")
    assert ack["topics"] == ["fence"]  # the refused command changed nothing
    await sub.close()


async def test_patterns_count_toward_max_topics(api: Api, topic: str) -> None:
    sub = await api.connect(None, [topic])
    await sub.subscribe(f"{topic}.*", f"{topic}.>")
    answer = await sub.command({"subscribe": [f"{topic}.x.*"]})
    assert answer["type"] == "error" and answer["error"]["code"] == "too_many_topics", answer
    status, body = await api.call("POST", "/register", {"topics": ["a.*", "a.>", "b.*", "c"]})
    assert status == 400 and body["error"]["code"] == "too_many_topics", body
    await sub.close()


async def test_registration_topics_may_be_patterns_and_bad_ones_are_refused(
    api: Api, topic: str
) -> None:
    sub = await api.connect(None, [f"{topic}.>"])
    await api.publish(f"{topic}.a.b", "by registration")
    assert await sub.message() == (f"{topic}.a.b", "by registration")
    await sub.close()
    status, body = await api.call("POST", "/register", {"topics": ["chat:*"]})
    assert status == 400 and body["error"]["code"] == "invalid_topic", body
    assert "whole segment" in body["error"]["message"]


async def test_publishing_to_a_pattern_is_refused(api: Api, topic: str) -> None:
    for pattern in (f"{topic}.*", f"{topic}.>"):
        status, body = await api.call("POST", "/publish", {"topic": pattern, "message": "x"})
        assert status == 400 and body["error"]["code"] == "invalid_topic", body
    status, body = await api.call(
        "POST", "/publish/batch", {"messages": [{"topic": f"{topic}.*", "message": "x"}]}
    )
    assert status == 400 and body["error"]["code"] == "invalid_topic", body


async def test_wildcards_across_two_nodes_on_redis(
    start_server: Callable[..., ServerProcess],
    redis_server: RedisServer,
    session: aiohttp.ClientSession,
) -> None:
    """Subscribed on B, published on A: B's Redis pattern subscription brings the
    matching topics (and Redis's wider glob is filtered)."""
    a, b = (start_server("--broker", redis_server.url) for _ in range(2))
    api_a, api_b = Api(session, a.url), Api(session, b.url)
    await check_wildcards(api_a, api_b, "news")
    # Offsets of a topic reached through a pattern are the topic's own, in order.
    reg = await api_b.register(None, ["room.>"])
    ws = await websockets.connect(reg["url"], open_timeout=TIMEOUT)
    sub = Subscriber(ws, reg["id"], reg["url"])
    await sub.subscribe("fence")
    for i in range(10):
        await api_a.publish(f"room.{i % 2}", str(i))
    frames = [await sub.frame() for _ in range(10)]
    for room in range(2):
        mine = [f for f in frames if f["topic"] == f"room.{room}"]
        assert [f["offset"] for f in mine] == [1, 2, 3, 4, 5]
    await sub.close()
