from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest

from tests.redis_server import RedisServer
from tests.utils import Api, ServerProcess, stop_and_check

# pytest-cov measures every run (addopts --cov); its fail_under ([tool.coverage.report])
# is a threshold for the whole suite, so a run of some files, or with -k/-m, still
# reports coverage but is not failed for it.
_partial_run = False


def pytest_deselected(items: list[pytest.Item]) -> None:
    global _partial_run
    _partial_run = True


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS and not _partial_run:
        return
    cov = config.pluginmanager.getplugin("_cov")
    if cov is not None and getattr(cov, "options", None) is not None:
        cov.options.cov_fail_under = None


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
