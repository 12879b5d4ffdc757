"""Presence under attack, against real servers: a connection that moves away and comes
back, and a client toggling its subscription to flood a topic's members with joins
and leaves."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import websockets

from tests.redis_server import RedisServer
from tests.server.rawws import CLOSE, RawWebSocket
from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber
from wsrelay.core.rules import JOIN_LEAVE_BURST

Start = Callable[..., ServerProcess]

CONFIG = """
[[namespace]]
pattern = "room:*"
presence = true
join_leave = true
"""


def public(client_id: str) -> str:
    return hashlib.sha256(client_id.encode()).hexdigest()[:32]


@pytest.fixture(params=["native", "aiohttp"])
def stack(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "wsrelay.toml"
    path.write_text(CONFIG)
    return str(path)


async def test_a_connection_back_on_its_first_node_leaves_when_it_closes(
    start_server: Start,
    redis_server: RedisServer,
    config: str,
    stack: str,
    session: aiohttp.ClientSession,
) -> None:
    """n1 -> n2 -> n1 while n1's first socket is still closing (its client does not
    answer the 4500): n1 took the registration for 'moved', and when the third
    connection closed it left its presence entries to expire and told nobody."""
    args = ("--stack", stack, "--broker", redis_server.url, "--config", config)
    n1, n2 = start_server(*args), start_server(*args)
    a = Api(session, n1.url)
    watcher = await a.connect("w", ("room:back",))
    reg = await a.register("m", ("room:back",))
    first = await RawWebSocket.connect(f"{n1.ws_url}/ws/{reg['id']}")  # never answers a close
    assert (await watcher.frame())["type"] == "join"
    on_n2 = await websockets.connect(f"{n2.ws_url}/ws/{reg['id']}", open_timeout=TIMEOUT)
    frame = await first.frame()
    assert frame is not None and frame.opcode == CLOSE  # n1 was told: 4500, closing
    back = Subscriber(
        await websockets.connect(f"{n1.ws_url}/ws/{reg['id']}", open_timeout=TIMEOUT),
        reg["id"],
        reg["url"],
    )
    await asyncio.wait_for(on_n2.wait_closed(), TIMEOUT)
    assert on_n2.close_code == 4500
    first.abort()  # n1 detaches the first socket now, the third one attached
    with contextlib.suppress(ConnectionError):
        await first.writer.wait_closed()
    status, body = await a.call("GET", "/users/m")
    assert status == 200 and body["connections"] == 1, body
    await back.close()
    leave = await watcher.frame()
    gone = {"type": "leave", "topic": "room:back", "user": "m", "client": public(reg["id"])}
    assert leave == gone
    status, body = await a.call("GET", "/presence", params={"topic": "room:back"})
    assert status == 200, body
    assert [entry["client"] for entry in body["clients"]] == [public(watcher.id)], body
    await watcher.close()


async def test_a_subscription_toggler_cannot_flood_the_topics_members(
    start_server: Start, config: str, stack: str, session: aiohttp.ClientSession
) -> None:
    server = start_server("--stack", stack, "--config", config)
    api = Api(session, server.url)
    victim = await api.connect("v", ("room:flood",))
    attacker = await api.connect("x")
    toggles = 500
    for _ in range(toggles):
        await attacker.ws.send(json.dumps({"subscribe": ["room:flood"]}))
        await attacker.ws.send(json.dumps({"unsubscribe": ["room:flood"]}))
    refused = 0
    for _ in range(2 * toggles):  # every command answered (or refused)
        frame = await attacker.frame()
        refused += frame["type"] == "error" and frame["error"]["code"] == "rate_limited"
    assert refused > toggles * 0.8, "the toggler was never slowed down"  # its subscribes
    await api.publish("room:flood", "fence")
    events = 0
    while (await victim.frame())["type"] != "message":
        events += 1
    await attacker.close()
    await victim.close()
    # What one client may make the relay send each other member should be bounded
    # by something other than how fast it can type.
    assert events <= 100, f"one client sent {events} join/leave frames to another"
    assert events >= JOIN_LEAVE_BURST  # its burst went through: joins and leaves still work
