from __future__ import annotations

import faulthandler
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # pytest-cov's no_cover marker fails the test under --no-cov (it pauses a coverage
    # controller that does not exist): without coverage there is nothing to pause.
    if config.getoption("no_cov", default=False):
        for item in items:
            item.own_markers[:] = [m for m in item.own_markers if m.name != "no_cover"]


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS and not _partial_run:
        return
    cov = config.pluginmanager.getplugin("_cov")
    if cov is not None and getattr(cov, "options", None) is not None:
        cov.options.cov_fail_under = None


# A backstop behind pytest-timeout: its signal method raises inside whatever runs, and
# an asyncio task may swallow that (one did, in a fixture's teardown, and CI waited its
# whole 90 minutes). Past this, every thread's stack is printed and the run ends.
HANG_BACKSTOP = 60.0
"""Seconds past a test's own timeout before the run is ended."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    marker = item.get_closest_marker("timeout")
    own = float(marker.args[0]) if marker and marker.args else item.config.getini("timeout")
    faulthandler.dump_traceback_later(
        float(own or 120) + HANG_BACKSTOP, exit=True, file=_terminal(item.config)
    )
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _terminal(config: pytest.Config) -> int:
    """The run's real stderr: pytest captures fd 2 while a test runs, and a dump written
    there would be lost with the process. (A private attribute; fd 2 if it moves.)"""
    capman = config.pluginmanager.getplugin("capturemanager")
    err = getattr(getattr(capman, "_global_capturing", None), "err", None)
    saved = getattr(err, "targetfd_save", None)
    return saved if isinstance(saved, int) else 2


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
