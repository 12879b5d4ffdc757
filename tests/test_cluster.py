"""One view of many processes: ``GET /nodes`` on memory and Redis, and ``/stats`` and
``/metrics`` of a real ``wsrelay serve --workers 2`` (issue 14, item 5)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import websockets
from prometheus_client.parser import text_string_to_metric_families

from tests.redis_server import RedisServer
from tests.utils import TIMEOUT, Api, ServerProcess, free_port

Start = Callable[..., ServerProcess]
TTL = 1.5
"""--presence-ttl of these servers: a heartbeat every 0.5 s."""


async def fresh(method: str, url: str, **kw: Any) -> tuple[int, Any]:
    """One request on a new connection: with --workers, the kernel may pick any worker."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, url, **kw) as response,
    ):
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def eventually(check: Callable[[], Any], what: str, within: float = TIMEOUT) -> Any:
    """Poll ``check`` (async) until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.05)


def samples(text: str, name: str) -> dict[str, float]:
    """``name``'s value per ``node`` label in a /metrics exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[sample.labels.get("node", "")] = sample.value
    return found


async def test_nodes_lists_the_one_node_of_a_memory_relay(
    start_server: Start, session: aiohttp.ClientSession
) -> None:
    server = start_server("--api-key", "k" * 16)
    api = Api(session, server.url)
    status, _ = await api.call("GET", "/nodes")
    assert status == 401  # a backend route: the API key is required
    headers = {"Authorization": "Bearer " + "k" * 16}
    status, stats = await api.call("GET", "/stats", headers=headers)
    status, body = await api.call("GET", "/nodes", headers=headers)
    assert status == 200, body
    assert body["node"] == stats["node"]
    [node] = body["nodes"]
    assert node["id"] == stats["node"] and node["group"] is None
    assert node["version"] == stats["version"] and node["host"] and node["pid"] > 0
    assert node["uptime"] >= 0 and node["last_heartbeat"] >= node["started_at"]
    assert stats["workers"] == 1
    status, body = await api.call("GET", "/nodes?x=1", headers=headers)  # a query: ignored
    assert status == 200


async def test_nodes_on_redis_lists_both_and_drops_one_killed_within_its_expiry(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    args = ["--broker", redis_server.url, "--presence-ttl", str(TTL)]
    a = start_server(*args)
    b = ServerProcess(args).start()  # killed with SIGKILL: not checked for a clean exit
    try:
        await _kill_one_of_two(session, a, b)
    finally:
        b.stop()


async def _kill_one_of_two(
    session: aiohttp.ClientSession, a: ServerProcess, b: ServerProcess
) -> None:
    api_a, api_b = Api(session, a.url), Api(session, b.url)
    id_a = (await api_a.call("GET", "/stats"))[1]["node"]
    id_b = (await api_b.call("GET", "/stats"))[1]["node"]
    reg = await api_a.register(1, ["t"])
    ws = await websockets.connect(b.ws_url + "/ws/" + reg["id"], open_timeout=TIMEOUT)

    async def both_seen_with_the_connection_on_b() -> bool:
        listed = {n["id"]: n for n in (await api_a.call("GET", "/nodes"))[1]["nodes"]}
        return set(listed) == {id_a, id_b} and listed[id_b]["connections"] == 1

    await eventually(both_seen_with_the_connection_on_b, "A lists B with its connection")
    listed = (await api_b.call("GET", "/nodes"))[1]["nodes"]
    assert {n["id"] for n in listed} == {id_a, id_b}
    assert all(n["group"] is None for n in listed)
    assert (await api_a.call("GET", "/stats"))[1]["connections"] == 0  # not a group: A alone

    assert b.process is not None
    b.process.kill()  # -9: B leaves nothing behind on purpose
    killed = time.monotonic()
    await ws.close()

    async def b_gone() -> bool:
        return [n["id"] for n in (await api_a.call("GET", "/nodes"))[1]["nodes"]] == [id_a]

    await eventually(b_gone, "B dropped out of /nodes", within=TTL + TIMEOUT)
    assert time.monotonic() - killed <= TTL + 0.5  # its expiry, and a poll


async def test_workers_metrics_show_every_worker_and_stats_add_them_up(
    start_server: Start, redis_server: RedisServer
) -> None:
    """A real `wsrelay serve --workers 2`: whichever worker answers, /metrics has both
    workers' series (labelled node) and no counter goes back; /stats adds them up."""
    port = free_port()
    server = start_server(
        "--broker", redis_server.url, "--workers", "2", "--port", str(port),
        "--presence-ttl", str(TTL),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    async def both_listed() -> list[dict[str, Any]]:
        nodes = (await fresh("GET", url + "/nodes"))[1]["nodes"]
        return nodes if len(nodes) == 2 else []

    workers = await eventually(both_listed, "both workers in /nodes", TIMEOUT * 2)
    ids = {n["id"] for n in workers}
    assert len({n["group"] for n in workers}) == 1 and workers[0]["group"] is not None
    assert str(port) in workers[0]["group"]

    async with aiohttp.ClientSession() as session:
        api = Api(session, url)
        regs = [await api.register(None, ["t"]) for _ in range(16)]
    sockets = []
    for reg in regs:  # new connections: the kernel spreads them over both workers
        # max_queue=None: 24 messages left unread must not stop it reading the close frame
        sockets.append(await websockets.connect(reg["url"], open_timeout=TIMEOUT, max_queue=None))

    async def sixteen_on_two() -> bool:
        nodes = (await fresh("GET", url + "/nodes"))[1]["nodes"]
        counts = [n["connections"] for n in nodes]
        return sum(counts) == 16 and all(counts)

    await eventually(sixteen_on_two, "16 connections, on both workers")

    answering = set()
    last: dict[str, float] = {}
    for i in range(24):
        status, body = await fresh("POST", url + "/publish", json={"topic": "t", "message": i})
        assert status == 200, body
        status, text = await fresh("GET", url + "/metrics")
        assert status == 200
        types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
        assert len(types) == len(set(types)), "a family exposed twice"
        connections = samples(text, "wsrelay_connections")
        assert set(connections) == ids and sum(connections.values()) == 16
        publishes = samples(text, "wsrelay_publishes_total")
        assert set(publishes) == ids
        for node, value in publishes.items():
            assert value >= last.get(node, 0), f"{node}'s counter went back"
        last = publishes
        status, stats = await fresh("GET", url + "/stats")
        answering.add(stats["node"])
        assert (stats["workers"], stats["connections"]) == (2, 16)
    assert answering == ids  # both answered: the views above were not one worker's

    async def all_counted() -> bool:
        # Deliveries too: another worker's count is as old as its last heartbeat.
        stats = (await fresh("GET", url + "/stats"))[1]
        return bool((stats["publishes"], stats["deliveries"]) == (24, 24 * 16))

    await eventually(all_counted, "24 publishes and their deliveries added up")
    for _ in range(10):  # the same total, whichever worker answers
        status, stats = await fresh("GET", url + "/stats")
        assert (stats["publishes"], stats["deliveries"]) == (24, 24 * 16)
    for ws in sockets:
        await ws.close()
    assert server.process is not None


async def test_nodes_answers_503_while_redis_is_down(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    server = start_server("--broker", redis_server.url, "--broker-timeout", "0.5")
    api = Api(session, server.url)
    assert (await api.call("GET", "/nodes"))[0] == 200
    redis_server.stop()
    status, body = await api.call("GET", "/nodes")
    assert (status, body["error"]["code"]) == (503, "broker_unavailable"), body
    status, stats = await api.call("GET", "/stats")  # a node alone never needs the registry
    assert (status, stats["workers"]) == (200, 1)
