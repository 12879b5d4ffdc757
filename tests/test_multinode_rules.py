"""Namespaces, grants and client publishing with two nodes sharing a real redis-server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets

from tests.redis_server import RedisServer
from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber

Start = Callable[..., ServerProcess]

CONFIG = """
[[namespace]]
pattern = "chat:*"
subscribe = "granted"
publish = "subscribers"

[[namespace]]
pattern = "short:*"
history_size = 3
"""
CHAT = {"subscribe": ["chat:*"]}


async def connect_on(node: ServerProcess, api: Api, user: Any, grants: Any) -> Subscriber:
    """Register through ``api`` (any node) and connect to ``node``."""
    status, reg = await api.call("POST", "/register", {"user_id": user, "grants": grants})
    assert status == 200, reg
    url = f"{node.ws_url}/ws/{reg['id']}"
    return Subscriber(await websockets.connect(url, open_timeout=TIMEOUT), reg["id"], url)


async def publish_as(
    sub: Subscriber, publish: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Send a client publish; its answer, and the message frames that came before it
    (the publisher's own copy may come before or after the answer)."""
    await sub.ws.send(json.dumps({"publish": publish}))
    before: list[dict[str, Any]] = []
    while True:
        frame = await sub.frame()
        if frame["type"] != "message":
            return frame, before
        before.append(frame)


@pytest.fixture
def nodes(start_server: Start, redis_server: RedisServer, tmp_path: Path) -> list[ServerProcess]:
    config = tmp_path / "wsrelay.toml"
    config.write_text(CONFIG)
    return [start_server("--broker", redis_server.url, "--config", str(config)) for _ in range(2)]


async def test_grants_live_with_the_registration_in_redis(
    nodes: list[ServerProcess], session: aiohttp.ClientSession
) -> None:
    n1, n2 = nodes
    a = Api(session, n1.url)
    granted = await connect_on(n2, a, 1, CHAT)  # registered on n1, loaded by n2
    assert (await granted.subscribe("chat:1"))["topics"] == ["chat:1"]
    plain = await connect_on(n2, a, 2, None)
    frame = await plain.command({"subscribe": ["chat:1"]})
    assert frame["error"]["code"] == "forbidden_topic", frame
    await granted.close()
    await plain.close()


async def test_a_client_publish_reaches_subscribers_on_the_other_node(
    nodes: list[ServerProcess], session: aiohttp.ClientSession
) -> None:
    n1, n2 = nodes
    a, b = Api(session, n1.url), Api(session, n2.url)
    publisher = await connect_on(n1, a, "p", CHAT)
    remote = await connect_on(n2, b, "r", CHAT)
    start = (await publisher.subscribe("chat:x"))["positions"]["chat:x"]
    await remote.subscribe("chat:x")
    answer, before = await publish_as(publisher, {"topic": "chat:x", "message": "hi", "id": 1})
    epoch = answer.pop("epoch")
    assert answer == {"type": "published", "id": 1, "offset": start["offset"] + 1}
    # A topic never published was answered an empty position (Redis stores nothing for it,
    # docs/decisions/0008); one published before, the topic's epoch.
    assert (epoch == start["epoch"]) == (start["offset"] > 0), (epoch, start)
    own = before[0] if before else await publisher.frame()
    frame = await remote.frame()
    assert (
        own
        == frame
        == {
            "type": "message",
            "topic": "chat:x",
            "message": "hi",
            "offset": start["offset"] + 1,
        }
    )
    await publisher.close()
    await remote.close()


async def test_skip_self_holds_across_redis(
    nodes: list[ServerProcess], session: aiohttp.ClientSession
) -> None:
    n1, n2 = nodes
    a, b = Api(session, n1.url), Api(session, n2.url)
    publisher = await connect_on(n1, a, "p", CHAT)
    remote = await connect_on(n2, b, "r", CHAT)
    await publisher.subscribe("chat:y")
    await remote.subscribe("chat:y")
    answer, before = await publish_as(
        publisher, {"topic": "chat:y", "message": "not back", "id": 1, "skip_self": True}
    )
    assert answer["type"] == "published", answer
    assert before == []
    assert await remote.message() == ("chat:y", "not back")
    assert await b.publish("chat:y", "fence") == 1
    assert await remote.message() == ("chat:y", "fence")
    assert await publisher.message() == ("chat:y", "fence")  # not "not back" first
    await publisher.close()
    await remote.close()


async def test_a_namespace_history_size_bounds_the_redis_history(
    nodes: list[ServerProcess], session: aiohttp.ClientSession
) -> None:
    n1, n2 = nodes
    a, b = Api(session, n1.url), Api(session, n2.url)
    for topic in ("short:1", "long:1"):
        for i in range(5):
            status, body = await a.call("POST", "/publish", {"topic": topic, "message": str(i)})
            assert status == 200, body
    status, short = await b.call("GET", "/history", params={"topic": "short:1"})
    assert status == 200, short
    assert [p["message"] for p in short["publications"]] == ["2", "3", "4"]
    status, long = await b.call("GET", "/history", params={"topic": "long:1"})
    assert [p["message"] for p in long["publications"]] == ["0", "1", "2", "3", "4"]
