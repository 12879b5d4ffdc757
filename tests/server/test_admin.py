"""Batch publishing, live counters and the topic list, against a real server."""

from __future__ import annotations

import re
from collections.abc import Callable

import aiohttp
import pytest

from tests.utils import Api, ServerProcess
from wsrelay.core.history import EPOCH_BYTES

EPOCH = re.compile(f"[0-9a-f]{{{2 * EPOCH_BYTES}}}")
"""A topic's epoch: random, so only its shape is known."""


def message_frame(topic: str, text: str, offset: int) -> dict[str, object]:
    """A JSON-mode message frame, as decoded."""
    return {"type": "message", "topic": topic, "message": text, "offset": offset}


async def test_batch_publish_delivers_in_order_and_counts_per_message(api: Api, topic: str) -> None:
    alice = await api.connect("alice", [f"{topic}.a", f"{topic}.b"])
    bob = await api.connect("bob", [f"{topic}.a"])
    messages = [
        {"topic": f"{topic}.a", "message": "1"},
        {"topic": f"{topic}.b", "message": "2"},
        {"topic": f"{topic}.a", "message": "3", "user_id": "bob"},
        {"topic": f"{topic}.none", "message": "4"},
    ]
    status, body = await api.call("POST", "/publish/batch", {"messages": messages})
    assert status == 200, body
    assert set(body) == {"recipients", "positions"}
    assert body["recipients"] == [2, 1, 1, 0]
    # Offsets count per topic; one topic's publications share its epoch.
    positions = body["positions"]
    assert [p["offset"] for p in positions] == [1, 1, 2, 1]
    assert positions[0]["epoch"] == positions[2]["epoch"]
    assert all(set(p) == {"offset", "epoch"} and EPOCH.fullmatch(p["epoch"]) for p in positions)
    assert [await alice.frame(), await alice.frame()] == [
        message_frame(f"{topic}.a", "1", 1),
        message_frame(f"{topic}.b", "2", 1),
    ]
    assert [await bob.frame(), await bob.frame()] == [
        message_frame(f"{topic}.a", "1", 1),
        message_frame(f"{topic}.a", "3", 2),
    ]
    await alice.close()
    await bob.close()


async def test_a_large_batch_arrives_whole_and_in_order(api: Api, topic: str) -> None:
    sub = await api.connect(1, [topic])
    messages = [{"topic": topic, "message": str(i)} for i in range(1000)]
    status, body = await api.call("POST", "/publish/batch", {"messages": messages})
    assert status == 200 and body["recipients"] == [1] * 1000
    assert [p["offset"] for p in body["positions"]] == list(range(1, 1001))
    assert len({p["epoch"] for p in body["positions"]}) == 1
    frames = [await sub.frame() for _ in range(1000)]
    assert frames == [message_frame(topic, str(i), i + 1) for i in range(1000)]
    await sub.close()


@pytest.mark.parametrize(
    ("body", "code", "names"),
    [
        ({"messages": []}, "invalid_field", "messages"),
        ({}, "invalid_field", "messages"),
        ({"messages": [{"topic": "x"}]}, "invalid_field", "message"),
        ({"messages": [{"topic": "ok", "message": "m"}] * 1001}, "invalid_field", "messages"),
        (
            {"messages": [{"topic": "ok", "message": "m"}, {"topic": "bad topic", "message": "m"}]},
            "invalid_topic",
            "messages[1]",
        ),
    ],
)
async def test_a_bad_batch_is_refused_whole(
    api: Api, topic: str, body: object, code: str, names: str
) -> None:
    sub = await api.connect(1, ["ok"])
    status, answer = await api.call("POST", "/publish/batch", body)
    assert status == 400
    assert answer["error"]["code"] == code
    assert names in answer["error"]["message"]
    # nothing of a refused batch was published: the next message is the first to arrive
    assert await api.publish("ok", f"after {topic}") == 1
    assert await sub.message() == ("ok", f"after {topic}")
    await sub.close()


async def test_stats_count_connections_publishes_and_deliveries(
    start_server: Callable[..., ServerProcess], session: aiohttp.ClientSession
) -> None:
    api = Api(session, start_server().url)
    status, before = await api.call("GET", "/stats")
    assert status == 200
    assert before["connections"] == 0 and before["publishes"] == 0
    assert before["broker"] == "up" and before["uptime"] >= 0
    subs = [await api.connect(i, ["news"]) for i in range(3)]
    await api.publish("news", "one")
    await api.call("POST", "/publish/batch", {"messages": [{"topic": "news", "message": "two"}]})
    for sub in subs:
        assert [await sub.message(), await sub.message()] == [("news", "one"), ("news", "two")]
    _, after = await api.call("GET", "/stats")
    assert after["node"] == before["node"]
    assert (after["connections"], after["topics"], after["registrations"]) == (3, 1, 3)
    assert (after["publishes"], after["deliveries"]) == (2, 6)
    for sub in subs:
        await sub.close()


async def test_topics_lists_the_busiest_first_with_prefix_and_limit(
    start_server: Callable[..., ServerProcess], session: aiohttp.ClientSession
) -> None:
    api = Api(session, start_server().url)
    subs = [
        await api.connect(1, ["a.one", "a.two", "b"]),
        await api.connect(2, ["a.two", "b"]),
        await api.connect(3, ["b"]),
    ]
    _, everything = await api.call("GET", "/topics")
    assert everything == {
        "topics": [
            {"topic": "b", "subscribers": 3},
            {"topic": "a.two", "subscribers": 2},
            {"topic": "a.one", "subscribers": 1},
        ],
        "total": 3,
    }
    _, some = await api.call("GET", "/topics?prefix=a.&limit=1")
    assert some == {"topics": [{"topic": "a.two", "subscribers": 2}], "total": 2}
    await subs[0].close()
    _, fewer = await api.call("GET", "/topics?prefix=a.")
    assert fewer == {"topics": [{"topic": "a.two", "subscribers": 1}], "total": 1}
    for sub in subs[1:]:
        await sub.close()


@pytest.mark.parametrize("limit", ["0", "1001", "x", "-1", "9" * 5000, "\u0661"])
async def test_topics_rejects_a_bad_limit(api: Api, limit: str) -> None:
    status, body = await api.call("GET", f"/topics?limit={limit}")
    assert status == 400
    assert body["error"]["code"] == "invalid_field" and "limit" in body["error"]["message"]


async def test_admin_routes_need_the_api_key(
    start_server: Callable[..., ServerProcess], session: aiohttp.ClientSession
) -> None:
    url = start_server("--api-key", "sekrit").url
    batch = {"messages": [{"topic": "t", "message": "m"}]}
    for method, path, body in [
        ("GET", "/stats", None),
        ("GET", "/topics", None),
        ("POST", "/publish/batch", batch),
    ]:
        async with session.request(method, url + path, json=body) as r:
            assert r.status == 401, path
            assert (await r.json())["error"]["code"] == "unauthorized"
        headers = {"Authorization": "Bearer sekrit"}
        async with session.request(method, url + path, json=body, headers=headers) as r:
            assert r.status == 200, path
