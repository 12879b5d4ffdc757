"""Registration and reconnect storms on the Redis backend: nothing refused (issue 11).

Real redis-server, real nodes in subprocesses, real clients. What a node restart
causes (every client coming back at once) must cost a 503 only when Redis itself is
unreachable or stalled, and a refusal is always an HTTP answer before the upgrade.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.redis_server import RedisServer
from tests.utils import TIMEOUT, ServerProcess, free_port
from wsrelay.client import ConnectionFailed, Relay, Subscribed

Start = Callable[..., ServerProcess]

STORM = 2000


async def register_all(urls: list[str], count: int) -> list[dict[str, Any]]:
    """``count`` concurrent registrations, spread over ``urls``; every one must succeed."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def register(i: int) -> tuple[int, Any]:
            body = {"user_id": f"u{i}", "topics": []}
            async with session.post(urls[i % len(urls)] + "/register", json=body) as response:
                return response.status, await response.json()

        answers = await asyncio.gather(*(register(i) for i in range(count)))
    refused = Counter(status for status, _ in answers if status != 200)
    assert not refused, f"registrations refused: {dict(refused)}"
    return [body for _, body in answers]


async def connect_and_subscribe(url: str, topic: str) -> str:
    """Open the registration's WebSocket and subscribe; the outcome as one word."""
    try:
        async with websockets.connect(url, open_timeout=TIMEOUT * 6) as ws:
            await ws.send(json.dumps({"subscribe": [topic]}))
            answer = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT * 6))
            return "subscribed" if answer.get("type") == "subscribed" else "error_frame"
    except InvalidStatus as exc:
        return f"refused {exc.response.status_code}"


@pytest.mark.parametrize("nodes", [1, 2])
async def test_a_connection_storm_is_served_without_refusals(
    nodes: int, start_server: Start, redis_server: RedisServer
) -> None:
    """2,000 concurrent registrations, then 2,000 concurrent connections that each
    subscribe: none refused, no error frame, every client subscribed."""
    servers = [start_server("--broker", redis_server.url) for _ in range(nodes)]
    registrations = await register_all([s.url for s in servers], STORM)
    outcomes = await asyncio.gather(
        *(connect_and_subscribe(r["url"], f"storm.{i % 50}") for i, r in enumerate(registrations))
    )
    assert Counter(outcomes) == {"subscribed": STORM}


async def test_a_stalled_redis_refuses_before_the_upgrade_with_retry_after(
    start_server: Start, redis_server: RedisServer
) -> None:
    """Redis stalls (SIGSTOP for 3 s) while clients connect: a client is either subscribed
    or refused with a 503 that carries Retry-After, before any WebSocket byte; none
    reads HTTP inside a WebSocket (websockets would fail it as a protocol error)."""
    node = start_server("--broker", redis_server.url, "--broker-timeout", "1")
    registrations = await register_all([node.url], 300)
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)  # stalled, not gone: the worst case
    resume = asyncio.get_running_loop().call_later(
        3, redis_server.process.send_signal, signal.SIGCONT
    )

    async def attempt(registration: dict[str, Any], i: int) -> str:
        try:
            async with websockets.connect(registration["url"], open_timeout=TIMEOUT * 6) as ws:
                await ws.send(json.dumps({"subscribe": [f"stall.{i % 10}"]}))
                answer = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT * 6))
                return str(answer.get("type"))
        except InvalidStatus as exc:
            assert exc.response.status_code == 503, exc.response
            assert exc.response.headers.get("Retry-After", "").isdigit(), exc.response.headers
            return "refused 503 with Retry-After"

    try:
        outcomes = Counter(
            await asyncio.gather(*(attempt(r, i) for i, r in enumerate(registrations)))
        )
    finally:
        resume.cancel()
        redis_server.process.send_signal(signal.SIGCONT)
    assert set(outcomes) <= {"subscribed", "error", "refused 503 with Retry-After"}, outcomes
    assert outcomes["refused 503 with Retry-After"] + outcomes["subscribed"] > 0, outcomes


RESTART_BUDGET = 75.0
"""Seconds for every client to be back. `python bench/fanout.py --scenario storm`
measures it uninstrumented; here coverage traces the node (every Python subprocess
of the suite), which runs it about 2.5 times slower. This test's own process is not
traced (no_cover): it runs the 5,000 clients."""


@pytest.mark.no_cover
@pytest.mark.timeout(300)  # connecting the 5,000 clients first may take up to 120 s
async def test_every_client_of_a_restarted_node_is_back_within_30_s(
    start_server: Start, redis_server: RedisServer
) -> None:
    """5,000 clients of the Python client on one node; the node is killed and started
    again on the same port. Every client reconnects and is subscribed again within
    30 s, and the node logs no refused request."""
    port = free_port()
    args = ("--broker", redis_server.url, "--port", str(port))
    node = ServerProcess(args).start()  # killed below: not one start_server checks
    clients = 5000
    resubscribed: set[int] = set()
    first: set[int] = set()
    all_back = asyncio.Event()
    all_up = asyncio.Event()
    async with Relay(node.url) as relay:

        async def run(i: int) -> None:
            def on_event(event: object) -> None:
                if not isinstance(event, Subscribed):
                    return
                if event.reconnects == 0:
                    first.add(i)
                    if len(first) == clients:
                        all_up.set()
                else:
                    resubscribed.add(i)
                    if len(resubscribed) == clients:
                        all_back.set()

            # The claim is the reconnect after the restart. Connecting 5,000 clients from
            # one test process first is only the setup: a first connection that times out
            # on a loaded machine (first connections are not retried) tries again.
            for _ in range(3):
                try:
                    async with relay.subscribe(f"restart.{i % 100}", on_event=on_event) as sub:
                        async for _ in sub:
                            pass
                except ConnectionFailed:
                    if i in first:
                        raise
                else:
                    return

        tasks = [asyncio.create_task(run(i)) for i in range(clients)]
        await asyncio.wait_for(all_up.wait(), 120)
        assert node.process is not None
        node.process.kill()
        node.stop()
        restarted = start_server(*args)
        try:
            await asyncio.wait_for(all_back.wait(), RESTART_BUDGET)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    refused = [line for line in restarted.log().splitlines() if "refused request" in line]
    assert not refused, f"{len(refused)} refused: " + "\n".join(refused[:20])
