"""Hostile ``POST /sse/<id>`` on a node that does not hold the stream: each forwarded
command costs a Redis announce and up to ``FORWARD_TIMEOUT`` of waiting, so one
client must not be able to make a node hold an unbounded number of them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import aiohttp

from tests.redis_server import RedisServer
from tests.utils import Api, ServerProcess
from wsrelay.relay import FORWARD_TIMEOUT, MAX_FORWARDS_PER_CLIENT

Start = Callable[..., ServerProcess]


async def test_a_post_flood_for_one_registration_holds_a_bounded_number_of_forwards(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """Many concurrent POSTs for a registration streaming nowhere: at most
    MAX_FORWARDS_PER_CLIENT wait for an answer (409 after the timeout), the rest are
    refused at once with 429 rate_limited; another registration is not affected."""
    node_a = start_server("--broker", redis_server.url)
    node_b = start_server("--broker", redis_server.url)
    a = Api(session, node_a.url)
    client_id = (await a.register(1, ["fl.t"]))["id"]
    url = f"{node_b.url}/sse/{client_id}"
    flood = MAX_FORWARDS_PER_CLIENT * 6
    started = time.monotonic()
    refused_at: list[float] = []

    async def one() -> tuple[int, str]:
        async with session.post(url, data=json.dumps({"subscribe": ["fl.u"]})) as response:
            body = await response.json()
            if response.status == 429:
                refused_at.append(time.monotonic() - started)
            return response.status, body["error"]["code"]

    answers = await asyncio.gather(*(one() for _ in range(flood)))
    assert answers.count((409, "not_streaming")) <= MAX_FORWARDS_PER_CLIENT, answers
    assert answers.count((429, "rate_limited")) >= flood - MAX_FORWARDS_PER_CLIENT, answers
    assert refused_at and max(refused_at) < FORWARD_TIMEOUT  # refused without waiting

    # The bound is per registration, and released: a later POST waits its turn again.
    other = (await a.register(2, ["fl.t"]))["id"]

    async def status(target: str) -> int:
        async with session.post(target, data="{}") as response:
            return response.status

    statuses = await asyncio.gather(status(f"{node_b.url}/sse/{other}"), status(url))
    assert list(statuses) == [409, 409], statuses
