"""The Python client's presence against a real server (memory broker): the HTTP routes
(``Relay.presence``, ``presence_stats``, ``user``, ``disconnect_user``), the WebSocket
queries (``Subscription.presence``, ``presence_stats``), ``Join``/``Leave`` events, and a
ban ending a subscription with ``Banned``, without reconnecting."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator

import pytest

from tests.utils import TIMEOUT, ServerProcess, stop_and_check
from wsrelay.client import (
    Banned,
    Event,
    ForbiddenTopic,
    Join,
    Leave,
    NotConnected,
    Presence,
    PresenceDisabled,
    PresenceStats,
    Reconnecting,
    Relay,
    UserDisconnected,
    UserStatus,
)

CONFIG = """
[[namespace]]
pattern = "room:*"
presence = true
join_leave = true

[[namespace]]
pattern = "secret:*"
subscribe = "granted"
presence = true
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("client-presence") / "wsrelay.toml"
    config.write_text(CONFIG)
    process = ServerProcess(["--config", str(config)]).start()
    yield process
    stop_and_check(process)


def public(client_id: str | None) -> str:
    assert client_id is not None
    return hashlib.sha256(client_id.encode()).hexdigest()[:32]


class Events:
    """Collects a subscription's events; ``next(kind)`` waits for the next of a kind."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.seen: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.seen.append(event)
        self.queue.put_nowait(event)

    async def next(self, kind: type) -> Event:
        async with asyncio.timeout(TIMEOUT):
            while True:
                event = await self.queue.get()
                if isinstance(event, kind):
                    return event


async def test_presence_over_http_and_the_websocket(server: ServerProcess) -> None:
    async with (
        Relay(server.url) as relay,
        relay.subscribe("room:1", user_id=1) as one,
        relay.subscribe("room:1", user_id="two") as two,
    ):
        presence = await relay.presence("room:1")
        assert isinstance(presence, Presence) and presence.topic == "room:1"
        assert {c.client for c in presence.clients} == {public(one.id), public(two.id)}
        assert presence.users == {"1", "two"} and presence.total is None
        assert await relay.presence_stats("room:1") == PresenceStats("room:1", 2, 2)
        over_ws = await one.presence("room:1")
        assert over_ws.total == 2
        assert {c.client for c in over_ws.clients} == {public(one.id), public(two.id)}
        assert await two.presence_stats("room:1") == PresenceStats("room:1", 2, 2)
        with pytest.raises(PresenceDisabled) as disabled:
            await one.presence("plain")
        assert disabled.value.code == "presence_disabled" and disabled.value.status == 400
        with pytest.raises(ForbiddenTopic):
            await one.presence_stats("secret:1")
        with pytest.raises(PresenceDisabled):
            await relay.presence("plain")
        # The connection carries on after a refusal.
        assert (await one.presence_stats("room:1")).num_clients == 2
    async with Relay(server.url) as relay:
        assert await relay.presence_stats("room:1") == PresenceStats("room:1", 0, 0)


async def test_join_and_leave_events(server: ServerProcess) -> None:
    events = Events()
    async with Relay(server.url) as relay:
        watcher = relay.subscribe("room:2", user_id="w", on_event=events)
        async with watcher:
            mine = public(watcher.id)
            reading = asyncio.create_task(anext(watcher))  # events come while iterating
            joiner = relay.subscribe("room:2", user_id="j")
            await joiner.start()
            assert await events.next(Join) == Join("room:2", "j", public(joiner.id))
            joiner_id = joiner.id
            await joiner.close()
            assert await events.next(Leave) == Leave("room:2", "j", public(joiner_id))
            await relay.publish("room:2", "after")
            message = await asyncio.wait_for(reading, TIMEOUT)
            assert message.message == "after"
        assert not any(isinstance(e, Join | Leave) and e.client == mine for e in events.seen)


async def test_a_banned_subscription_ends_and_does_not_reconnect(server: ServerProcess) -> None:
    events = Events()
    async with Relay(server.url) as relay:
        banned = relay.subscribe("room:3", user_id="b", on_event=events)
        bystander = relay.subscribe("room:3", user_id="ok")
        async with banned, bystander:
            assert await relay.user("b") == UserStatus("b", True, 1)
            assert await relay.disconnect_user("b") == UserDisconnected("b", 1, 1)
            with pytest.raises(Banned) as ended:
                await asyncio.wait_for(anext(banned), TIMEOUT)
            assert ended.value.close_code == 4503
            assert banned.closed
            assert not any(isinstance(e, Reconnecting) for e in events.seen)
            with pytest.raises(NotConnected):
                await banned.presence("room:3")
            assert await relay.user("b") == UserStatus("b", False, 0)
            assert (await bystander.presence_stats("room:3")).num_clients == 1


async def test_user_ids_are_sent_quoted(server: ServerProcess) -> None:
    async with Relay(server.url) as relay, relay.subscribe("room:4", user_id="a b?c"):
        assert await relay.user("a b?c") == UserStatus("a b?c", True, 1)
        assert await relay.user(42) == UserStatus("42", False, 0)
