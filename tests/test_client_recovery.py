"""The Python client never misses a message (issue 12): positions, recovery, duplicates.

Against real servers: a subscriber whose connection is cut (a TCP proxy in front of
the server, tests/tcp_proxy.py) while publishes go on gets every message exactly once
and in order; a server restarted on the memory broker is reported as a
:class:`NotRecovered` event with the new epoch. A scripted WebSocket peer (real
sockets, every frame written by the test) covers what a healthy server does not send
on cue: a replay overlapping what was received, and a ``gap`` frame.

Nothing waits by sleeping: each step waits for the event it needs, within TIMEOUT.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from tests.tcp_proxy import Proxy
from tests.test_client import FAST, Events, receive
from tests.utils import TIMEOUT, ServerProcess, free_port
from wsrelay.client import (
    Message,
    NotRecovered,
    Position,
    Publish,
    Published,
    PublishOutcomeUnknown,
    Reconnecting,
    Relay,
    ServiceUnavailable,
    Subscribed,
    Subscription,
)
from wsrelay.client._errors import http_error

Start = Callable[..., ServerProcess]


class Consumer:
    """Iterates a subscription in a task of its own (reconnecting happens inside
    iteration) and lets the test wait for a number of messages."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.received: list[Message] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for message in self.subscription:
            self.received.append(message)
            self._changed.set()

    async def wait_for(self, count: int) -> list[Message]:
        async with asyncio.timeout(TIMEOUT * 4):
            while len(self.received) < count:
                if self.task.done():
                    self.task.result()  # raise what ended it
                    raise AssertionError(f"the subscription ended after {self.received}")
                self._changed.clear()
                await self._changed.wait()
        return self.received

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


async def test_a_cut_connection_loses_nothing_and_delivers_nothing_twice(
    server: ServerProcess, topic: str
) -> None:
    """Three times: the connection is cut (the server keeps running), messages are
    published while the client is away and while it reconnects; every message arrives
    once, in each topic's order, with consecutive offsets, on the same registration."""
    other = topic + ".other"
    events = Events()
    published: dict[str, list[str]] = defaultdict(list)
    async with (
        Proxy(server.url) as proxy,
        Relay(server.url) as publisher,
        Relay(proxy.url, backoff=FAST) as relay,
        relay.subscribe(topic, other, on_event=events) as sub,
    ):
        consumer = Consumer(sub)

        async def publish(count: int) -> None:
            items = []
            for _ in range(count):
                name = (topic, other)[sum(map(len, published.values())) % 2]
                published[name].append(f"{name} #{len(published[name])}")
                items.append((name, published[name][-1]))
            await publisher.publish_many(items)

        await publish(20)
        await consumer.wait_for(20)
        for _ in range(3):
            proxy.down()
            await events.next(Reconnecting)
            await publish(30)  # while the client is away
            proxy.up()
            during = asyncio.create_task(publish(30))  # while it reconnects and recovers
            back = await events.next(Subscribed)
            assert isinstance(back, Subscribed) and not back.registered  # the same registration
            await during
            await publish(10)  # live again
        total = sum(map(len, published.values()))
        received = await consumer.wait_for(total)
        await consumer.stop()

        assert len(received) == total == 20 + 3 * 70
        for name in (topic, other):
            mine = [m for m in received if m.topic == name]
            assert [m.message for m in mine] == published[name]
            assert [m.offset for m in mine] == list(range(1, len(published[name]) + 1))
            assert len({m.epoch for m in mine}) == 1 and mine[0].epoch
            assert sub.positions[name] == Position(len(mine), mine[0].epoch)
        assert sub.reconnects == 3
        assert not any(isinstance(e, NotRecovered) for e in events.seen)


async def test_a_restarted_memory_server_is_reported_not_recovered_with_its_new_epoch(
    start_server: Start, topic: str
) -> None:
    """The memory broker's history dies with the process: after the restart the client
    registers anew, asks to recover, and is told it cannot (a new epoch). The event
    comes before the first message of the new epoch, whose offset 1 is below the old
    position yet is delivered (offsets of different epochs do not compare)."""
    port = str(free_port())
    first = await asyncio.to_thread(start_server, "--port", port)
    events = Events()
    async with (
        Relay(first.url, backoff=FAST) as relay,
        relay.subscribe(topic, on_event=events) as sub,
    ):
        sent = [await relay.publish(topic, f"before {i}") for i in range(3)]
        before = await receive(sub, 3)
        old = Position(3, before[-1].epoch)
        assert [m.offset for m in before] == [1, 2, 3] == [p.offset for p in sent]
        assert {m.epoch for m in before} == {p.epoch for p in sent} == {old.epoch}
        assert sub.positions == {topic: old}

        receiving = asyncio.create_task(anext(sub))
        await asyncio.to_thread(first.stop)
        await events.next(Reconnecting)
        await asyncio.to_thread(start_server, "--port", port)
        back = await events.next(Subscribed)
        assert isinstance(back, Subscribed) and back.registered
        lost = await events.next(NotRecovered)
        assert isinstance(lost, NotRecovered)
        assert lost.topic == topic and lost.reason == "epoch_changed"
        assert lost.previous == old
        assert lost.position.epoch != old.epoch and lost.position.offset == 0

        after = await relay.publish(topic, "after")
        assert after == 1 and after.offset == 1 and after.epoch == lost.position.epoch
        async with asyncio.timeout(TIMEOUT):
            message = await receiving
        assert message == Message(topic, "after", 1, lost.position.epoch)
        assert sub.positions == {topic: Position(1, lost.position.epoch)}


async def test_since_resumes_where_an_earlier_subscription_stopped(
    server: ServerProcess, topic: str
) -> None:
    """``positions`` of one subscription, given as ``since`` to a later one: what was
    published in between comes first; an unknown epoch is reported at once."""
    async with Relay(server.url) as relay:
        async with relay.subscribe(topic) as sub:
            await relay.publish_many([(topic, "one"), (topic, "two")])
            await receive(sub, 2)
            saved = sub.positions
        await relay.publish_many([(topic, "three"), (topic, "four")])
        events = Events()
        async with relay.subscribe(topic, since=saved, on_event=events) as resumed:
            await relay.publish(topic, "five")
            assert [m.message for m in await receive(resumed, 3)] == ["three", "four", "five"]
            assert not any(isinstance(e, NotRecovered) for e in events.seen)

        events = Events()
        stale = {topic: Position(1, "not-an-epoch")}
        async with relay.subscribe(topic, since=stale, on_event=events) as fresh:
            lost = await events.next(NotRecovered)
            assert isinstance(lost, NotRecovered) and lost.reason == "epoch_changed"
            assert lost.previous == stale[topic]
            assert lost.position == Position(5, saved[topic].epoch)
            await relay.publish(topic, "six")
            assert await receive(fresh) == [Message(topic, "six", 6, saved[topic].epoch)]
        with pytest.raises(ValueError, match="not subscribed"):
            relay.subscribe(topic, since={"elsewhere": Position(1, "e")})


async def test_publish_answers_its_position_and_honours_idempotency_keys(
    server: ServerProcess, topic: str
) -> None:
    async with Relay(server.url) as relay:
        first = await relay.publish(topic, "a")
        assert isinstance(first, Published) and isinstance(first, int)
        assert first == 0 and first.recipients == 0 and not first.duplicate
        assert str(first) == f"{first}" == "0"  # printed as the count it always was
        again = await relay.publish(topic, "b", idempotency_key="k1")
        assert (again.offset, again.epoch) == (first.offset + 1, first.epoch)
        repeat = await relay.publish(topic, "b", idempotency_key="k1")
        assert repeat.duplicate and repeat.position == again.position
        batch = await relay.publish_many(
            [(topic, "c"), Publish(topic, "d", idempotency_key="k1"), (topic, "e")]
        )
        assert [p.offset for p in batch] == [again.offset + 1, again.offset, again.offset + 2]
        assert sum(batch) == 0 and all(p.epoch == first.epoch for p in batch)

        history = await relay.history(topic)
        assert history.position == Position(again.offset + 2, first.epoch)
        assert [(h.offset, h.message) for h in history.publications] == [
            (1, "a"),
            (2, "b"),
            (3, "c"),
            (4, "e"),
        ]
        newest = await relay.history(topic, since=1, limit=2, reverse=True)
        assert [h.message for h in newest.publications] == ["e", "c"]
        assert repr(repeat).startswith("Published(recipients=0, offset=2, ")


def test_publish_outcome_unknown_has_a_class_of_its_own() -> None:
    error = http_error(503, "publish_outcome_unknown", "the broker stopped answering", 2.0)
    assert isinstance(error, PublishOutcomeUnknown) and isinstance(error, ServiceUnavailable)
    assert (error.code, error.status, error.retry_after) == ("publish_outcome_unknown", 503, 2.0)
    assert type(http_error(503, "broker_unavailable", "down")) is ServiceUnavailable


# -- a scripted peer: duplicates and gaps --------------------------------------------------


@asynccontextmanager
async def scripted_relay(
    script: Callable[[web.WebSocketResponse, dict[str, Any], int], Any],
) -> AsyncIterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    """A server speaking wsrelay's protocol from a script: ``POST /register`` answers
    one id; each WebSocket connection's first command is recorded with the query it
    connected with, and ``script(ws, command, connection_number)`` answers it."""
    seen: list[tuple[str, dict[str, Any]]] = []

    async def register(request: web.Request) -> web.Response:
        url = f"ws://{request.host}/ws/0123456789abcdef"
        return web.json_response({"id": "0123456789abcdef", "url": url})

    async def unregister(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["id"], "unregistered": True})

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        frame = await ws.receive()
        assert frame.type == WSMsgType.TEXT
        command = json.loads(frame.data)
        seen.append((request.query_string, command))
        await script(ws, command, len(seen))
        return ws

    app = web.Application()
    app.router.add_post("/register", register)
    app.router.add_delete("/register/{id}", unregister)
    app.router.add_get("/ws/{id}", socket)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}", seen
    finally:
        await runner.cleanup()


def message(offset: int, text: str = "") -> str:
    return json.dumps(
        {"type": "message", "topic": "t", "message": text or f"m{offset}", "offset": offset}
    )


async def test_duplicates_are_dropped_and_a_gap_is_reported() -> None:
    """What the server answers is what the client keeps: messages at or below the
    known position are dropped (a replay overlapping a live delivery), a gap frame
    moves the position and is reported, and the next connection sends the position."""

    async def script(ws: web.WebSocketResponse, command: dict[str, Any], n: int) -> None:
        if n == 1:
            positions = {"t": {"offset": 2, "epoch": "e1"}}
            await ws.send_str(
                json.dumps({"type": "subscribed", "topics": ["t"], "positions": positions})
            )
            for frame in (message(1), message(2), message(3), message(3, "again")):
                await ws.send_str(frame)
            await ws.send_str(
                json.dumps({"type": "gap", "topic": "t", "offset": 10, "epoch": "e1"})
            )
            await ws.send_str(message(10, "before the gap's end"))
            await ws.send_str(message(11))
            await ws.close(code=1011, message=b"test: reconnect")
        else:
            positions = {"t": {"offset": 11, "epoch": "e1", "recovered": True}}
            await ws.send_str(
                json.dumps({"type": "subscribed", "topics": ["t"], "positions": positions})
            )
            await ws.send_str(message(11, "replayed twice"))
            await ws.send_str(message(12))
            await ws.receive()  # until the client closes

    events = Events()
    async with (
        scripted_relay(script) as (url, seen),
        Relay(url, backoff=FAST) as relay,
        relay.subscribe("t", on_event=events) as sub,
    ):
        received = await receive(sub, 3)
        assert [(m.offset, m.message, m.epoch) for m in received] == [
            (3, "m3", "e1"),
            (11, "m11", "e1"),
            (12, "m12", "e1"),
        ]
        gaps = [e for e in events.seen if isinstance(e, NotRecovered)]
        assert gaps == [NotRecovered("t", Position(10, "e1"), Position(3, "e1"), "gap")]
        assert [query for query, _ in seen] == ["recover=true", "recover=true"]
        assert [command for _, command in seen] == [
            {"topics": ["t"]},
            {"topics": ["t"], "since": {"t": {"offset": 11, "epoch": "e1"}}},
        ]
        assert sub.positions == {"t": Position(12, "e1")}


async def test_a_recovered_answer_in_a_new_epoch_keeps_what_came_live_before_it() -> None:
    """A topic never published answers an empty position (Redis: ``g:<generation>:<ms>``).
    Recovered later, the answer names the topic's real epoch with the same numbering; what
    came live before that answer (a hold that timed out) is not taken again from the
    replay."""

    async def script(ws: web.WebSocketResponse, command: dict[str, Any], n: int) -> None:
        if n == 1:
            positions = {"t": {"offset": 0, "epoch": "g:x:1"}}
            await ws.send_str(
                json.dumps({"type": "subscribed", "topics": ["t"], "positions": positions})
            )
            await ws.send_str(message(1))
            await ws.send_str(message(2))
            await ws.close(code=1011, message=b"test: reconnect")
        else:
            await ws.send_str(message(3))  # live, before the answer
            await ws.send_str(message(4))
            positions = {"t": {"offset": 2, "epoch": "e1", "recovered": True}}
            await ws.send_str(
                json.dumps({"type": "subscribed", "topics": ["t"], "positions": positions})
            )
            for frame in (message(3, "replayed"), message(4, "replayed"), message(5)):
                await ws.send_str(frame)
            await ws.receive()  # until the client closes

    async with (
        scripted_relay(script) as (url, seen),
        Relay(url, backoff=FAST) as relay,
        relay.subscribe("t") as sub,
    ):
        received = await receive(sub, 5)
        assert [(m.offset, m.message) for m in received] == [(i, f"m{i}") for i in range(1, 6)]
        assert seen[1][1]["since"] == {"t": {"offset": 2, "epoch": "g:x:1"}}
        assert sub.positions == {"t": Position(5, "e1")}


async def test_a_recovered_answer_in_another_epoch_than_a_real_known_one_is_taken_as_is() -> None:
    """Only an empty position's numbering carries over to another epoch: a position in a
    real epoch (here moved by a gap frame just before the answer) is not compared with an
    answer in another one, whose messages after the answered offset are all delivered."""

    async def script(ws: web.WebSocketResponse, command: dict[str, Any], n: int) -> None:
        if n == 1:
            positions = {"t": {"offset": 0, "epoch": "e0"}}
            await ws.send_str(
                json.dumps({"type": "subscribed", "topics": ["t"], "positions": positions})
            )
            await ws.send_str(message(1))
            await ws.close(code=1011, message=b"test: reconnect")
        else:
            await ws.send_str(json.dumps({"type": "gap", "topic": "t", "offset": 7, "epoch": "e9"}))
            positions = {"t": {"offset": 2, "epoch": "e1", "recovered": True}}
            await ws.send_str(
                json.dumps({"type": "subscribed", "topics": ["t"], "positions": positions})
            )
            await ws.send_str(message(3))
            await ws.receive()  # until the client closes

    async with (
        scripted_relay(script) as (url, _),
        Relay(url, backoff=FAST) as relay,
        relay.subscribe("t") as sub,
    ):
        received = await receive(sub, 2)
        assert [(m.offset, m.message) for m in received] == [(1, "m1"), (3, "m3")]
        assert sub.positions == {"t": Position(3, "e1")}
