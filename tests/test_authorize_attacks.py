"""The authorization hook answering in awkward but valid ways: a decision whose body
arrives in several pieces (chunked, large: extra topics not asked) must be read whole,
and still allow only the topics asked."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.receivers import Backend
from tests.server.test_sse import stream
from tests.utils import TIMEOUT, Api, ServerProcess, free_port
from wsrelay.server.sse import MAX_WAITING_COMMANDS

Start = Callable[..., ServerProcess]

RULES = """
[[namespace]]
pattern = "doc.*"
subscribe = "backend"
"""

DENIED = {"doc.secret", "doc.other"}


@pytest.fixture
async def chunked_hook() -> AsyncIterator[str]:
    """A hook allowing every topic asked except DENIED, answering with padding (topics
    not asked, allowed) in many chunks."""

    async def answer(request: web.Request) -> web.StreamResponse:
        asked = (await request.json())["topics"]
        decision = {f"pad.{i:06d}": True for i in range(20_000)}
        # Allows for topics not asked, which must be neither applied nor cached.
        decision.update({"doc.secret": True, "doc.other": True})
        decision.update({topic: topic not in DENIED for topic in asked})
        body = json.dumps({"topics": decision}).encode()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        step = len(body) // 8 + 1
        for start in range(0, len(body), step):
            await response.write(body[start : start + step])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/authorize", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/authorize"
    await runner.cleanup()


async def test_a_decision_arriving_in_pieces_is_read_whole(
    start_server: Start, chunked_hook: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config = tmp_path / "wsrelay.toml"
    config.write_text(RULES)
    relay = start_server("--config", str(config), "--authorize-url", chunked_hook)
    client = await Api(session, relay.url).connect(7)
    ack = await client.command({"subscribe": ["doc.1"]})
    assert ack["type"] == "subscribed" and ack["topics"] == ["doc.1"], ack
    refused = await client.command({"subscribe": ["doc.secret", "doc.2"]})
    assert refused["type"] == "error", refused
    assert refused["error"]["code"] == "forbidden_topic", refused
    refused = await client.command({"subscribe": ["doc.other"]})  # allowed unasked before
    assert refused["type"] == "error", refused
    assert refused["error"]["code"] == "forbidden_topic", refused
    await client.close()


async def test_posts_piling_up_behind_a_hanging_hook_are_bounded_per_stream(
    start_server: Start, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A stream's commands run one at a time; with the hook hanging, a flood of POSTs
    for it must not queue without bound: past MAX_WAITING_COMMANDS they are refused at
    once (429 rate_limited)."""
    backend = await Backend().start()
    try:
        backend.decide = lambda body: {topic: True for topic in body["topics"]}
        backend.stall.clear()
        config = tmp_path / "wsrelay.toml"
        config.write_text(RULES)
        relay = start_server(
            "--config",
            str(config),
            "--authorize-url",
            backend.url + "/authorize",
            "--authorize-timeout",
            "0.5",
        )
        client_id = (await Api(session, relay.url).register(3))["id"]
        url = f"{relay.url}/sse/{client_id}"
        flood = MAX_WAITING_COMMANDS * 5

        async def one(i: int) -> int:
            data = json.dumps({"subscribe": [f"doc.{i}"]})
            async with session.post(url, data=data) as response:
                return response.status

        async with stream(session, url):
            tasks = [asyncio.ensure_future(one(i)) for i in range(flood)]
            done, _ = await asyncio.wait(tasks, timeout=TIMEOUT)
            refused = [t.result() for t in done if t.result() == 429]
            assert len(refused) >= flood - MAX_WAITING_COMMANDS - 1, [t.result() for t in done]
            backend.stall.set()
            statuses = await asyncio.gather(*tasks)
        assert set(statuses) <= {200, 429, 503}, statuses
    finally:
        backend.stall.set()
        await backend.stop()
