"""Redis URLs as operators write them: a password, a database number, TLS (``rediss://``).

Each test starts its own redis-server configured that way and two real ``wsrelay serve``
nodes on it, and checks that a message crosses from one node to the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
import websockets

from tests.redis_server import RedisServer, TlsFiles
from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber

Start = Callable[..., ServerProcess]


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., RedisServer]]:
    started: list[RedisServer] = []

    def start(*extra: str, tls: TlsFiles | None = None) -> RedisServer:
        server = RedisServer(*extra, tls=tls).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


async def across_two_nodes(
    start_server: Start, broker: str, session: aiohttp.ClientSession
) -> None:
    """Register and connect on one node, publish on the other, and see it arrive."""
    a, b = (Api(session, start_server("--broker", broker).url) for _ in range(2))
    for api in (a, b):
        status, ready = await api.call("GET", "/ready")
        assert (status, ready) == (200, {"status": "ready"})
    reg = await a.register("u", ["t"])
    ws = await websockets.connect(reg["url"], open_timeout=TIMEOUT)
    sub = Subscriber(ws, reg["id"], reg["url"])
    await sub.subscribe("fence")  # acknowledged: a's Redis subscriptions are in place
    assert await b.publish("t", "across") == 0
    assert await sub.message() == ("t", "across")
    await sub.close()


async def test_a_password_and_a_database_number(
    start_server: Start,
    redis_factory: Callable[..., RedisServer],
    session: aiohttp.ClientSession,
) -> None:
    redis_server = redis_factory("--requirepass", "s3cret")
    broker = f"redis://:s3cret@127.0.0.1:{redis_server.port}/3"
    await across_two_nodes(start_server, broker, session)
    # everything went to database 3, nothing to the default 0
    for db, expect_keys in ((3, True), (0, False)):
        admin = aioredis.Redis(port=redis_server.port, password="s3cret", db=db)
        keys = await admin.keys("wsrelay:*")
        await admin.aclose()
        assert bool(keys) is expect_keys, (db, keys)


async def test_a_wrong_password_is_named_and_the_node_is_not_ready(
    start_server: Start,
    redis_factory: Callable[..., RedisServer],
    session: aiohttp.ClientSession,
) -> None:
    redis_server = redis_factory("--requirepass", "s3cret")
    node = start_server("--broker", f"redis://:wrong@127.0.0.1:{redis_server.port}/0")
    api = Api(session, node.url)
    status, _ = await api.call("GET", "/ready")
    assert status == 503
    status, body = await api.call("POST", "/publish", {"topic": "t", "message": "m"})
    assert status == 503 and body["error"]["code"] == "broker_unavailable"
    assert "AuthenticationError" in node.log()


async def test_tls(
    start_server: Start,
    redis_factory: Callable[..., RedisServer],
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    redis_server = redis_factory(tls=TlsFiles.create(tmp_path))
    assert redis_server.url.startswith("rediss://")
    await across_two_nodes(start_server, redis_server.url, session)


async def test_tls_with_an_untrusted_certificate_is_refused(
    start_server: Start,
    redis_factory: Callable[..., RedisServer],
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Without the CA the node must not talk to Redis: no silent downgrade to no checking."""
    redis_server = redis_factory(tls=TlsFiles.create(tmp_path))
    node = start_server("--broker", f"rediss://127.0.0.1:{redis_server.port}/0")
    status, _ = await Api(session, node.url).call("GET", "/ready")
    assert status == 503
    assert "certificate verify failed" in node.log().lower()
