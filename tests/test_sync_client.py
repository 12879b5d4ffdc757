"""wsrelay.client.SyncRelay against real servers: the API, errors, and retries that never
publish twice.

A :class:`Lossy` gate stands between the client and the real relay where a test needs a
failure on cue: a 503 with ``Retry-After``, or a publish forwarded to the relay whose
answer is then lost (the connection dropped), so the client cannot know it went
through. The blocking client runs in a thread (``asyncio.to_thread``) while the test's
loop serves the gate and reads the subscribers.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.gate import Gate
from tests.utils import Api, ServerProcess, Subscriber, free_port
from wsrelay.client import (
    NO_RETRY,
    BadRequest,
    ConnectionFailed,
    History,
    Presence,
    PresenceStats,
    Publish,
    Published,
    RetryPolicy,
    ServiceUnavailable,
    Stats,
    SyncRelay,
    Unauthorized,
)

Start = Callable[..., ServerProcess]


class Lossy(Gate):
    """A :class:`Gate` that also fails publishes on cue: ``fail("503:1")`` answers the
    next one 503 with ``Retry-After: 1`` (``"503"``: without it), ``fail("lose")``
    forwards it to the relay and drops the connection instead of answering."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.actions: deque[str] = deque()
        self.publishes: list[bytes] = []
        """The body of every publish request that reached the gate."""

    def fail(self, *actions: str) -> None:
        self.actions.extend(actions)

    async def _forward(self, request: web.Request) -> web.Response:
        if not request.path.startswith("/publish"):
            return await super()._forward(request)
        self.publishes.append(await request.read())
        action = self.actions.popleft() if self.actions else None
        if action is not None and action.startswith("503"):
            _, _, retry_after = action.partition(":")
            headers = {"Retry-After": retry_after} if retry_after else {}
            body = {"error": {"code": "broker_unavailable", "message": "shedding (test)"}}
            return web.json_response(body, status=503, headers=headers)
        response = await super()._forward(request)
        if action == "lose":
            assert response.status == 200  # published, and the answer never arrives
            assert request.transport is not None
            request.transport.abort()
        return response


def keys_of(body: bytes) -> list[str]:
    document = json.loads(body)
    return [m["idempotency_key"] for m in document.get("messages", [document])]


async def message(subscriber: Subscriber) -> tuple[str, Any, int]:
    frame = await subscriber.frame()
    assert frame["type"] == "message", frame
    return frame["topic"], frame["message"], frame["offset"]


def recorded(relay: SyncRelay) -> list[float]:
    """Record the client's waits between attempts instead of sleeping them."""
    waits: list[float] = []
    relay.sleep = waits.append
    return waits


async def test_publish_history_and_stats_round_trip(server: ServerProcess, api: Api) -> None:
    subscriber = await api.connect(topics=["sync"])
    with SyncRelay(server.url) as relay:
        published = await asyncio.to_thread(relay.publish, "sync", "one")
        many = await asyncio.to_thread(
            relay.publish_many, [("sync", "two"), Publish("sync", "three"), ("other", "x")]
        )
        history = await asyncio.to_thread(relay.history, "sync", since=published.offset)
        value = await asyncio.to_thread(relay.publish, "sync", {"any": ["json", 1, None]})
        stats = await asyncio.to_thread(relay.stats)
    assert isinstance(published, Published) and published == 1 and not published.duplicate
    assert [p.recipients for p in many] == [1, 1, 0]
    assert [p.offset for p in many[:2]] == [published.offset + 1, published.offset + 2]
    assert isinstance(history, History)
    assert [p.message for p in history.publications] == ["two", "three"]
    assert isinstance(stats, Stats) and stats.publishes >= 4
    assert value.offset == published.offset + 3
    for text in ("one", "two", "three", {"any": ["json", 1, None]}):
        assert (await message(subscriber))[1] == text  # a JSON value arrives as that value
    await subscriber.close()


async def test_a_refusal_is_raised_at_once(start_server: Start) -> None:
    node = start_server("--api-key", "k" * 16)
    with SyncRelay(node.url) as anonymous:
        waits = recorded(anonymous)
        with pytest.raises(Unauthorized):
            await asyncio.to_thread(anonymous.publish, "t", "x")
    with SyncRelay(node.url, api_key="k" * 16) as relay:
        waits += recorded(relay)
        with pytest.raises(BadRequest) as caught:
            await asyncio.to_thread(relay.publish, "not a topic", "x")
        assert (caught.value.code, caught.value.status) == ("invalid_topic", 400)
        assert (await asyncio.to_thread(relay.publish, "t", "x")).offset == 1
    assert waits == []  # neither refusal was tried again


async def test_retry_after_is_waited_and_the_key_kept(server: ServerProcess) -> None:
    async with Lossy(server.url) as gate:
        gate.fail("503:1", "503")
        with SyncRelay(gate.url) as relay:
            waits = recorded(relay)
            published = await asyncio.to_thread(relay.publish, "retried", "x")
    assert published.offset >= 1 and not published.duplicate
    assert len(waits) == 2
    assert 1.0 <= waits[0] <= 1.2  # Retry-After: 1, plus at most 20 % of jitter
    assert 0.0 <= waits[1] <= 0.2  # no Retry-After: the backoff's second step
    keys = [keys_of(body) for body in gate.publishes]
    assert len(keys) == 3 and keys[0] == keys[1] == keys[2] and keys[0][0]


async def test_a_publish_whose_answer_was_lost_is_published_once(
    server: ServerProcess, api: Api
) -> None:
    subscriber = await api.connect(topics=["lost"])
    async with Lossy(server.url) as gate:
        gate.fail("lose")
        with SyncRelay(gate.url) as relay:
            waits = recorded(relay)
            published = await asyncio.to_thread(relay.publish, "lost", "once")
            gate.fail("lose")
            batch = await asyncio.to_thread(relay.publish_many, [("lost", "a"), ("lost", "b")])
            fence = await asyncio.to_thread(relay.publish, "lost", "fence")
    assert len(waits) == 2
    assert published.duplicate and published.recipients == 0  # the retry found the first
    assert [p.offset for p in batch] == [published.offset + 1, published.offset + 2]
    assert fence.offset == published.offset + 3
    received = [(await message(subscriber))[1] for _ in range(4)]
    assert received == ["once", "a", "b", "fence"]  # each once
    first, second = keys_of(gate.publishes[2]), keys_of(gate.publishes[3])
    assert first == second and len(set(first)) == 2  # a key per message, kept by the retry
    await subscriber.close()


async def test_no_retry_policy_sends_no_key_and_raises_the_first_failure(
    server: ServerProcess,
) -> None:
    async with Lossy(server.url) as gate:
        gate.fail("503:1")
        with SyncRelay(gate.url, retry=NO_RETRY) as relay:
            waits = recorded(relay)
            with pytest.raises(ServiceUnavailable) as caught:
                await asyncio.to_thread(relay.publish, "t", "x")
            await asyncio.to_thread(relay.publish, "t", "x")
    assert caught.value.retry_after == 1 and waits == []
    assert "idempotency_key" not in json.loads(gate.publishes[1])


def test_an_unreachable_server_is_retried_then_reported() -> None:
    relay = SyncRelay(f"http://127.0.0.1:{free_port()}", retry=RetryPolicy(attempts=2))
    waits = recorded(relay)
    with pytest.raises(ConnectionFailed, match="cannot reach"):
        relay.publish("t", "x")
    assert len(waits) == 2
    relay.close()


def test_threads_share_one_client(server: ServerProcess) -> None:
    relay = SyncRelay(server.url, pool_size=4)
    offsets: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        for i in range(50):
            answer = relay.publish("threads", str(i))
            with lock:
                offsets.append(answer.offset)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    relay.close()
    assert sorted(offsets) == list(range(min(offsets), min(offsets) + 400))  # each once


def test_a_forked_process_gets_a_pool_of_its_own(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SyncRelay(server.url) as relay:
        relay.publish("fork", "parent")
        parent_pool = relay._connections()
        monkeypatch.setattr(os, "getpid", lambda: -1)  # as seen from a child
        assert relay._connections() is not parent_pool
        assert relay.publish("fork", "child").offset == 2


async def test_presence_and_its_stats(start_server: Start, tmp_path: Path, session: Any) -> None:
    config = tmp_path / "wsrelay.toml"
    config.write_text('[[namespace]]\npattern = "room:*"\npresence = true\n')
    node = start_server("--config", str(config))
    api = Api(session, node.url)
    alice = await api.connect("alice", ["room:1"])
    anonymous = await api.connect(None, ["room:1"])
    with SyncRelay(node.url) as relay:
        presence = await asyncio.to_thread(relay.presence, "room:1")
        stats = await asyncio.to_thread(relay.presence_stats, "room:1")
        waits = recorded(relay)
        with pytest.raises(BadRequest) as caught:  # no presence outside the namespace
            await asyncio.to_thread(relay.presence, "lobby")
    assert isinstance(presence, Presence) and presence.topic == "room:1"
    assert [c.user for c in presence.clients] == ["alice", None]  # oldest first
    assert presence.users == {"alice"}
    assert all(c.client not in (alice.id, anonymous.id) for c in presence.clients)
    assert stats == PresenceStats("room:1", num_clients=2, num_users=1)
    assert caught.value.code == "presence_disabled" and waits == []
    await alice.close()
    await anonymous.close()
