from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest

from tests.redis_server import RedisServer
from tests.utils import Api, ServerProcess, stop_and_check


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One relay shared by tests that isolate themselves by topic; checked for
    tracebacks and a clean exit at the end."""
    process = ServerProcess().start()
    yield process
    stop_and_check(process)


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """Start a relay with extra ``serve`` arguments or environment; stopped and
    checked after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        process = ServerProcess(args, env or {}).start()
        started.append(process)
        return process

    yield start
    for process in started:
        stop_and_check(process)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def api(server: ServerProcess, session: aiohttp.ClientSession) -> Api:
    return Api(session, server.url)


@pytest.fixture
def topic(request: pytest.FixtureRequest) -> str:
    """A topic name unique to the test, so tests sharing a server never cross."""
    name = request.node.name
    return "t." + "".join(c if c.isalnum() else "-" for c in name)[:100]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free port (see tests/redis_server.py on skipping)."""
    server = RedisServer().start()
    yield server
    server.stop()
