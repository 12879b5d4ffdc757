"""Webhooks: every event reaches a real receiver, signed, once per event, from the node
that saw it, even across the receiver's outage; batching, overflow and giving up."""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from aiohttp import web

from tests.receivers import SECRET, Backend
from tests.redis_server import RedisServer
from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber, free_port
from wsrelay.config import Settings
from wsrelay.core.events import Event
from wsrelay.webhooks import WebhookSender, sign, verify

Start = Callable[..., ServerProcess]


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    receiver = await Backend().start()
    yield receiver
    await receiver.stop()


def config(tmp_path: Path) -> str:
    path = tmp_path / "wsrelay.toml"
    path.write_text('[[namespace]]\npattern = "room.*"\npublish = "subscribers"\n')
    return str(path)


async def connect(url: str) -> Subscriber:
    ws = await websockets.connect(url, open_timeout=TIMEOUT)
    return Subscriber(ws, url.rsplit("/", 1)[-1], url)


async def metric(session: aiohttp.ClientSession, node: ServerProcess, name: str) -> float:
    async with session.get(node.url + "/metrics") as response:
        text = await response.text()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def until(check: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT * 3) -> None:
    """Poll an async ``check`` until it is true (a condition in another process)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


def key(event: dict[str, Any]) -> tuple[Any, ...]:
    """What makes an event the same event, whichever node sent it."""
    topics = tuple(event.get("topics") or ())
    return (event["event"], event.get("client"), event.get("topic"), topics)


async def test_every_event_arrives_once_per_node_across_a_receiver_outage(
    start_server: Start,
    redis_server: RedisServer,
    session: aiohttp.ClientSession,
    backend: Backend,
    tmp_path: Path,
) -> None:
    env = {"WSRELAY_WEBHOOK_SECRET": SECRET}
    args = ("--broker", redis_server.url, "--config", config(tmp_path))
    hook = ("--webhook-url", backend.url + "/hook")
    a, b = (start_server(*args, *hook, env=env) for _ in range(2))
    api = Api(session, a.url)
    alice_reg = await api.register("alice", ["room.1"])
    bob_reg = await api.register("bob")
    alice = await connect(f"{a.ws_url}/ws/{alice_reg['id']}")
    bob = await connect(f"{b.ws_url}/ws/{bob_reg['id']}")
    await bob.subscribe("room.1")
    answer = await bob.command(
        {"publish": {"topic": "room.1", "message": {"n": 1}, "id": 7, "skip_self": True}}
    )
    assert answer["type"] == "published", answer
    assert await alice.message() == ("room.1", {"n": 1})
    assert await api.publish("room.1", "from the backend") == 1  # no event: not a client's
    assert await alice.message() == ("room.1", "from the backend")
    await backend.wait_for(lambda: any(e["event"] == "client_published" for e in backend.events))

    # The receiver goes away; events keep happening on both nodes.
    await backend.stop()
    assert (await alice.command({"unsubscribe": ["room.1"]}))["type"] == "subscribed"
    await bob.close()
    await alice.close()
    for node in (a, b):  # each node tried, and failed, to send its own events
        await until(functools.partial(failed_attempts, session, node))
    await backend.start()  # the same URL, back

    alice_id, bob_id = _public(alice_reg["id"]), _public(bob_reg["id"])
    expected = {
        ("connected", alice_id, None, ("room.1",)),
        ("connected", bob_id, None, ()),
        ("subscribed", bob_id, None, ("room.1",)),
        ("client_published", bob_id, "room.1", ()),
        ("unsubscribed", alice_id, None, ("room.1",)),
        ("disconnected", bob_id, None, ()),
        ("disconnected", alice_id, None, ()),
        ("topic_occupied", None, "room.1", ()),
        ("topic_vacated", None, "room.1", ()),
    }
    await backend.wait_for(lambda: expected <= {key(e) for e in backend.events})
    assert backend.bad_signatures == 0
    events = list({e["id"]: e for e in backend.events}.values())  # deduplicated by id
    senders: dict[tuple[Any, ...], set[str]] = {}
    for event in events:
        assert event["id"].startswith(event["node"] + "-")
        assert abs(event["time"] - time.time()) < 120
        senders.setdefault((*key(event), event["node"]), set()).add(event["id"])
    # Each event was made once, by one node: alice's on A, bob's on B; each node tells
    # of its own occupancy of room.1 (both had a subscriber).
    for (name, client, _topic, _topics, node), ids in senders.items():
        assert len(ids) == 1, (name, client, node, ids)
    node_of = {e["client"]: e["node"] for e in events if e["event"] == "connected"}
    assert node_of[alice_id] != node_of[bob_id]
    for event in events:
        if event.get("client") is not None:
            assert event["node"] == node_of[event["client"]], event
    published, *others = (e for e in events if e["event"] == "client_published")
    assert others == []  # the backend's publish makes no event
    assert (published["message"], published["user"], published["offset"]) == ({"n": 1}, "bob", 1)
    closed = {e["client"]: e for e in events if e["event"] == "disconnected"}
    assert closed[alice_id]["code"] == closed[bob_id]["code"] == 1000
    assert closed[alice_id]["by"] == "client"
    occupied = [e["node"] for e in events if e["event"] == "topic_occupied"]
    assert sorted(occupied) == sorted({node_of[alice_id], node_of[bob_id]})


async def failed_attempts(session: aiohttp.ClientSession, node: ServerProcess) -> bool:
    return await metric(session, node, "wsrelay_webhook_failed_attempts_total") > 0


def _public(client_id: str) -> str:
    from wsrelay.core.presence import public_id

    return public_id(client_id)


async def test_batches_hold_at_most_100_events(backend: Backend) -> None:
    sender = WebhookSender(backend.url + "/hook", SECRET)
    await sender.start()
    try:
        for number in range(250):
            sender.emit(Event(f"n-{number}", "connected", 0.0, "n"))
        await backend.wait_for(lambda: len(backend.events) == 250)
    finally:
        await sender.stop()
    assert [len(batch) for batch in backend.batches] == [100, 100, 50]
    assert [e["id"] for e in backend.events] == [f"n-{i}" for i in range(250)]
    assert (sender.sent, sender.dropped) == (250, 0)


async def test_a_batch_failing_past_retry_for_is_dropped_and_counted(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    backend.status = 500
    sender = WebhookSender(backend.url + "/hook", SECRET, retry_for=0.3)
    await sender.start()
    try:
        sender.emit(Event("n-1", "connected", 0.0, "n"))
        async with asyncio.timeout(TIMEOUT):
            while not sender.dropped:
                await asyncio.sleep(0.02)
        backend.status = 200
        sender.emit(Event("n-2", "connected", 0.0, "n"))  # the queue goes on
        await backend.wait_for(lambda: len(backend.events) == 1)
    finally:
        await sender.stop()
    assert backend.events[0]["id"] == "n-2"
    assert sender.failed >= 2 and sender.dropped == 1
    assert "dropped 1 webhook events" in caplog.text


async def test_a_full_queue_drops_new_events_without_blocking(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sender = WebhookSender("http://127.0.0.1:9/hook", SECRET, queue_size=2)
    for number in range(5):
        sender.emit(Event(f"n-{number}", "connected", 0.0, "n"))  # never started: queued
    assert (sender.queued, sender.dropped) == (2, 3)
    assert "webhook queue full" in caplog.text


def test_signatures_verify_and_refuse_tampering() -> None:
    body = b'{"events":[]}'
    header = sign("s3cret", body, timestamp=1_700_000_000)
    assert verify("s3cret", header, body, now=1_700_000_100)
    assert not verify("s3cret", header, body + b" ", now=1_700_000_100)
    assert not verify("other", header, body, now=1_700_000_100)
    assert not verify("s3cret", header, body, now=1_700_000_301)  # too old: a replay
    assert verify("s3cret", header, body, tolerance=0, now=1_800_000_000)
    for broken in ("", "t=", "v1=abc", "t=x,v1=abc", "t=1700000000", "garbage,,=="):
        assert not verify("s3cret", broken, body, now=1_700_000_000)
    rotated = header + ",v1=" + "0" * 64  # several v1 values: any may match
    assert verify("s3cret", rotated, body, now=1_700_000_000)


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"webhook_url": "http://x/hook"}, "webhook_url needs webhook_secret"),
        ({"webhook_url": "ftp://x", "webhook_secret": "s"}, "webhook_url must start with"),
        ({"webhook_queue_size": 0}, "webhook_queue_size must be at least 1"),
        ({"webhook_retry_for": -1.0}, "webhook_retry_for must be 0"),
    ],
)
def test_bad_webhook_settings_are_refused(values: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Settings(**values)


async def test_the_integrations_page_receiver_takes_events_and_decides_topics(
    start_server: Start,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.test_integrations import blocks

    monkeypatch.setenv("WSRELAY_WEBHOOK_SECRET", SECRET)
    module: dict[str, Any] = {}
    exec(compile(blocks()["hooks_app.py"], "hooks_app.py", "exec"), module)
    runner = web.AppRunner(module["app"])
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        path = tmp_path / "wsrelay.toml"
        path.write_text('[[namespace]]\npattern = "doc.*"\nsubscribe = "backend"\n')
        relay = start_server(
            "--config",
            str(path),
            "--webhook-url",
            f"http://127.0.0.1:{port}/wsrelay-events",
            "--authorize-url",
            f"http://127.0.0.1:{port}/wsrelay-authorize",
            env={"WSRELAY_WEBHOOK_SECRET": SECRET},
        )
        client = await Api(session, relay.url).connect(7)
        assert (await client.subscribe("doc.7"))["topics"] == ["doc.7"]
        refused = await client.command({"subscribe": ["doc.8"]})
        assert refused["error"]["code"] == "forbidden_topic"
        await client.close()
        handled: dict[str, dict[str, Any]] = module["handled"]

        async def arrived() -> bool:
            return {"connected", "subscribed", "disconnected"} <= {
                e["event"] for e in handled.values()
            }

        await until(arrived)
        subscribed = [e for e in handled.values() if e["event"] == "subscribed"]
        assert [e["topics"] for e in subscribed] == [["doc.7"]]
    finally:
        await runner.cleanup()


async def test_an_sse_stream_is_connected_and_disconnected_like_a_websocket(
    start_server: Start, session: aiohttp.ClientSession, backend: Backend
) -> None:
    from tests.server.test_sse import stream

    node = start_server(
        "--webhook-url", backend.url + "/hook", env={"WSRELAY_WEBHOOK_SECRET": SECRET}
    )
    reg = await Api(session, node.url).register("carol", ["news"])
    client = _public(reg["id"])
    async with stream(session, f"{node.url}/sse/{reg['id']}") as (events, _):
        await backend.wait_for(
            lambda: ("connected", client, None, ("news",)) in {key(e) for e in backend.events}
        )
        assert events.opening["type"] == "subscribed"  # type: ignore[attr-defined]
    await backend.wait_for(lambda: any(e["event"] == "disconnected" for e in backend.events))
    [closed] = [e for e in backend.events if e["event"] == "disconnected"]
    assert closed["client"] == client and closed["by"] == "client", closed
    assert backend.bad_signatures == 0
