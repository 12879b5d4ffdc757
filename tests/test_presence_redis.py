"""Presence with two nodes sharing a real redis-server, on both stacks: entries and
join/leave across nodes, a killed node's entries expiring, and a ban closing a user's
sockets on both nodes."""

from __future__ import annotations

import asyncio
import hashlib
import time
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
pattern = "room:*"
presence = true
join_leave = true
"""
TTL = 3.0
"""--presence-ttl of these nodes: a dead node's entries go within 3 s."""


def public(client_id: str) -> str:
    return hashlib.sha256(client_id.encode()).hexdigest()[:32]


@pytest.fixture(params=["native", "aiohttp"])
def args(request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path) -> list[str]:
    config = tmp_path / "wsrelay.toml"
    config.write_text(CONFIG)
    return [
        "--stack",
        request.param,
        "--broker",
        redis_server.url,
        "--config",
        str(config),
        "--presence-ttl",
        str(TTL),
    ]


@pytest.fixture
def nodes(start_server: Start, args: list[str]) -> list[ServerProcess]:
    return [start_server(*args) for _ in range(2)]


async def connect_on(
    node: ServerProcess, api: Api, user: Any, topics: tuple[str, ...] = ()
) -> Subscriber:
    """Register through ``api`` (any node) and connect to ``node``."""
    status, reg = await api.call("POST", "/register", {"user_id": user, "topics": list(topics)})
    assert status == 200, reg
    url = f"{node.ws_url}/ws/{reg['id']}"
    return Subscriber(await websockets.connect(url, open_timeout=TIMEOUT), reg["id"], url)


async def presence(api: Api, topic: str) -> dict[str, dict[str, Any]]:
    status, body = await api.call("GET", "/presence", params={"topic": topic})
    assert status == 200, body
    return {entry["client"]: entry for entry in body["clients"]}


async def node_id(api: Api) -> str:
    status, body = await api.call("GET", "/stats")
    assert status == 200, body
    return str(body["node"])


async def test_presence_and_join_leave_across_two_nodes(
    nodes: list[ServerProcess], session: aiohttp.ClientSession
) -> None:
    n1, n2 = nodes
    a, b = Api(session, n1.url), Api(session, n2.url)
    watcher = await connect_on(n1, a, "w")
    await watcher.subscribe("room:x")
    joiner = await connect_on(n2, b, "j")
    await joiner.subscribe("room:x")
    join = await watcher.frame()
    assert join == {"type": "join", "topic": "room:x", "user": "j", "client": public(joiner.id)}
    for api in (a, b):
        entries = await presence(api, "room:x")
        assert set(entries) == {public(watcher.id), public(joiner.id)}
        assert entries[public(watcher.id)]["node"] == await node_id(a)
        assert entries[public(joiner.id)]["node"] == await node_id(b)
    status, stats = await a.call("GET", "/presence/stats", params={"topic": "room:x"})
    assert stats == {"topic": "room:x", "num_clients": 2, "num_users": 2}, stats
    answer = await joiner.command({"presence": "room:x", "id": 1})
    assert {e["client"] for e in answer["clients"]} == {public(watcher.id), public(joiner.id)}
    await joiner.close()
    leave = await watcher.frame()
    assert leave == {"type": "leave", "topic": "room:x", "user": "j", "client": public(joiner.id)}
    assert set(await presence(b, "room:x")) == {public(watcher.id)}
    status, body = await a.call("GET", "/users/j")
    assert status == 200, body
    assert body == {"user_id": "j", "online": False, "connections": 0}, body
    await watcher.close()


async def test_a_connection_moving_to_the_other_node_neither_leaves_nor_joins(
    nodes: list[ServerProcess], session: aiohttp.ClientSession
) -> None:
    """The same registration connects on n2 while its n1 socket is open: n1's socket is
    replaced (4500), and the presence entry moves instead of disappearing."""
    n1, n2 = nodes
    a = Api(session, n1.url)
    watcher = await connect_on(n1, a, "w", ("room:move",))
    mover = await connect_on(n1, a, "m", ("room:move",))
    assert (await watcher.frame())["type"] == "join"
    moved = Subscriber(
        await websockets.connect(f"{n2.ws_url}/ws/{mover.id}", open_timeout=TIMEOUT),
        mover.id,
        mover.url,
    )
    code, _ = await mover.closed()
    assert code == 4500
    entries = await presence(a, "room:move")
    assert entries[public(mover.id)]["node"] == await node_id(Api(session, n2.url))
    await a.publish("room:move", "fence")
    assert await watcher.message() == ("room:move", "fence")  # no leave, no join before it
    await moved.close()
    await watcher.close()


async def test_a_killed_nodes_entries_expire(
    args: list[str], start_server: Start, session: aiohttp.ClientSession
) -> None:
    survivor = start_server(*args)
    doomed = ServerProcess(args).start()  # killed with SIGKILL: not checked for a clean exit
    try:
        a, d = Api(session, survivor.url), Api(session, doomed.url)
        staying = await connect_on(survivor, a, "stay", ("room:kill",))
        subscribed_at = time.monotonic()
        lost = await connect_on(doomed, d, "lost", ("room:kill",))
        assert set(await presence(a, "room:kill")) == {public(staying.id), public(lost.id)}
        status, body = await a.call("GET", "/users/lost")
        assert status == 200, body
        assert body["connections"] == 1, body
        assert doomed.process is not None
        doomed.process.kill()  # kill -9: no leave, no removal
        killed_at = time.monotonic()
        deadline = killed_at + TTL + TIMEOUT
        while public(lost.id) in await presence(a, "room:kill"):
            assert time.monotonic() < deadline, "the dead node's entry did not expire"
            await asyncio.sleep(0.1)
        assert time.monotonic() - killed_at < TTL + TIMEOUT
        status, body = await a.call("GET", "/users/lost")
        assert status == 200, body
        assert body == {"user_id": "lost", "online": False, "connections": 0}, body
        # The live node's entry outlives its first write by more than the TTL: its
        # heartbeat keeps it.
        while time.monotonic() - subscribed_at < TTL * 1.5:
            assert public(staying.id) in await presence(a, "room:kill")
            await asyncio.sleep(0.2)
        assert set(await presence(a, "room:kill")) == {public(staying.id)}
        await staying.close()
    finally:
        doomed.stop()


async def test_a_ban_closes_the_users_sockets_on_both_nodes(
    nodes: list[ServerProcess], session: aiohttp.ClientSession
) -> None:
    n1, n2 = nodes
    a, b = Api(session, n1.url), Api(session, n2.url)
    here = await connect_on(n1, a, 9)
    there = await connect_on(n2, a, 9, ("room:ban",))
    other = await connect_on(n2, b, 10, ("room:ban",))
    await there.frame()  # other's join
    status, body = await b.call("GET", "/users/9")
    assert status == 200, body
    assert body == {"user_id": "9", "online": True, "connections": 2}, body
    status, body = await a.call("DELETE", "/users/9/connections")
    assert (status, body) == (200, {"user_id": "9", "connections": 2, "registrations": 2})
    for sub in (here, there):
        code, reason = await sub.closed()
        assert code == 4503, (code, reason)
    for node in (n1, n2):
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(f"{node.ws_url}/ws/{there.id}", open_timeout=TIMEOUT)
        assert refused.value.response.status_code == 404
    leave = await other.frame()
    assert leave["type"] == "leave" and leave["client"] == public(there.id), leave
    await b.publish("room:ban", "still here")
    assert await other.message() == ("room:ban", "still here")
    await other.close()
