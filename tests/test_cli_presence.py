"""``wsrelay presence TOPIC`` against a real server with a presence namespace."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator

import pytest

from tests.test_cli import run
from tests.utils import ServerProcess, stop_and_check
from wsrelay.client import Relay

CONFIG = """
[[namespace]]
pattern = "room:*"
presence = true
"""
KEY = "k" * 16


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("cli-presence") / "wsrelay.toml"
    config.write_text(CONFIG)
    process = ServerProcess(["--config", str(config), "--api-key", KEY]).start()
    yield process
    stop_and_check(process)


def public(client_id: str | None) -> str:
    assert client_id is not None
    return hashlib.sha256(client_id.encode()).hexdigest()[:32]


async def test_presence_lists_the_connections(server: ServerProcess) -> None:
    async with (
        Relay(server.url, api_key=KEY) as relay,
        relay.subscribe("room:cli", user_id=7) as one,
        relay.subscribe("room:cli") as anonymous,
    ):
        node = (await relay.stats()).node
        done = await asyncio.to_thread(
            run, "presence", "room:cli", "--url", server.url, env={"WSRELAY_API_KEY": KEY}
        )
        assert done.returncode == 0, done.stderr
        first, *rest = done.stdout.splitlines()
        assert first == "room:cli: 2 connection(s), 1 user(s)"
        assert len(rest) == 2
        by_client = {line.split()[0]: line for line in rest}
        assert set(by_client) == {public(one.id), public(anonymous.id)}
        assert f"user 7  node {node}  since " in by_client[public(one.id)]
        assert "user -  " in by_client[public(anonymous.id)]
        done = await asyncio.to_thread(
            run, "presence", "room:cli", "--stats", "--url", server.url, "--api-key", KEY
        )
        assert done.stdout == "room:cli: 2 connection(s), 1 user(s)\n", done.stderr
        done = await asyncio.to_thread(
            run, "presence", "room:cli", "--json", "--url", server.url, "--api-key", KEY
        )
        body = json.loads(done.stdout)
        assert body["topic"] == "room:cli"
        assert {c["client"] for c in body["clients"]} == {public(one.id), public(anonymous.id)}
        done = await asyncio.to_thread(
            run, "presence", "room:cli", "--stats", "--json", "--url", server.url, "--api-key", KEY
        )
        assert json.loads(done.stdout) == {"topic": "room:cli", "num_clients": 2, "num_users": 1}


def test_presence_refusals_are_one_line(server: ServerProcess) -> None:
    done = run("presence", "plain", "--url", server.url, "--api-key", KEY)
    assert done.returncode == 1
    assert done.stderr.startswith("wsrelay presence: ")
    assert "presence = true" in done.stderr and done.stderr.count("\n") == 1
    done = run("presence", "room:x", "--url", server.url)  # no API key
    assert done.returncode == 1 and "unauthorized" in done.stderr.lower(), done.stderr
