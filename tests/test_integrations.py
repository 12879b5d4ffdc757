"""docs/integrations.md's examples, run as written against real relays.

Each ```python block of the page starts with a comment naming its file
(``# shop/views.py``); the tests load those blocks as modules of that name and drive
them: the FastAPI app served by uvicorn, the Django view through Django's
test client (settings configured here), the Celery task by calling it. A real
subscriber must receive what each one publishes, once, however often the example is
called (their idempotency keys).
"""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.redis_server import RedisServer
from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber, free_port

Start = Callable[..., ServerProcess]

PAGE = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
KEY = "integration-test-key-0123456789"


def blocks() -> dict[str, str]:
    """The page's Python blocks by the file their first line names."""
    found = {}
    for code in re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL):
        first = code.splitlines()[0]
        assert first.startswith("# "), f"a block must start with '# <file>': {first!r}"
        found[first[2:].split()[0]] = code
    return found


RUN = {
    "fastapi_app.py",
    "settings.py",
    "shop/views.py",
    "shop/urls.py",
    "shop/tasks.py",
    "hooks_app.py",  # run by tests/test_webhooks.py
}


def test_every_example_on_the_page_is_run_here() -> None:
    assert set(blocks()) == RUN


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], types.ModuleType]]:
    """Load a block as the module its file names (``shop/views.py``: ``shop.views``),
    in ``sys.modules`` for the test's duration."""
    monkeypatch.setitem(sys.modules, "shop", types.ModuleType("shop"))
    sys.modules["shop"].__path__ = []

    def load(file: str) -> types.ModuleType:
        name = file.removesuffix(".py").replace("/", ".")
        module = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, module)
        if "." in name:
            package, _, attribute = name.rpartition(".")
            monkeypatch.setattr(sys.modules[package], attribute, module, raising=False)
        exec(compile(blocks()[file], str(PAGE), "exec"), module.__dict__)
        return module

    yield load


async def received_once(subscriber: Subscriber, api: Api, topic: str, message: str) -> None:
    """``message`` arrives on ``topic``, then a fence: nothing came twice."""
    await api.publish(topic, "fence")
    assert await subscriber.message() == (topic, message)
    assert await subscriber.message() == (topic, "fence")


class Uvicorn:
    """``app`` served by uvicorn (lifespan included) on a free port, in a thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, port=self.port, lifespan="on", log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:  # polling for startup, not waiting for delivery
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)


async def test_the_fastapi_example(
    start_server: Start,
    session: Any,
    monkeypatch: pytest.MonkeyPatch,
    load: Callable[[str], types.ModuleType],
) -> None:
    node = start_server("--api-key", KEY)
    api = Api(session, node.url)
    session.headers["Authorization"] = f"Bearer {KEY}"
    subscriber = await api.connect(topics=["orders.42"])
    monkeypatch.setenv("WSRELAY_URL", node.url)
    monkeypatch.setenv("WSRELAY_API_KEY", KEY)
    app = load("fastapi_app.py").app
    # A connection per request, closed before uvicorn stops. CI once reported a socket
    # unclosed during the next test; a keep-alive connection pooled across uvicorn's stop
    # is the likely one (not proven: it did not happen again in a few runs).
    closing = aiohttp.TCPConnector(force_close=True)
    with Uvicorn(app) as url:  # the lifespan opens the Relay, and closes it on the way out
        answers = []
        async with aiohttp.ClientSession(connector=closing) as shop:
            for _ in range(2):
                async with shop.post(f"{url}/orders/42/ship") as response:
                    answers.append((response.status, await response.json()))
    assert answers[0] == (200, {"offset": 1, "recipients": 1})
    assert answers[1] == (200, {"offset": 1, "recipients": 0})  # the key: published once
    await received_once(subscriber, api, "orders.42", "shipped")
    await subscriber.close()


@pytest.fixture(scope="module")
def django_configured() -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="test only",
            ALLOWED_HOSTS=["testserver"],
            INSTALLED_APPS=[],
            MIDDLEWARE=[],
            ROOT_URLCONF="shop.urls",
            USE_TZ=True,
        )
        django.setup()


async def test_the_django_example(
    start_server: Start,
    session: Any,
    monkeypatch: pytest.MonkeyPatch,
    load: Callable[[str], types.ModuleType],
    django_configured: None,
) -> None:
    from django.test import Client, override_settings

    node = start_server("--api-key", KEY)
    api = Api(session, node.url)
    session.headers["Authorization"] = f"Bearer {KEY}"
    subscriber = await api.connect(topics=["orders.7"])
    monkeypatch.setenv("WSRELAY_URL", node.url)
    monkeypatch.setenv("WSRELAY_API_KEY", KEY)
    ours = load("settings.py")
    with override_settings(
        ROOT_URLCONF="shop.urls", WSRELAY_URL=ours.WSRELAY_URL, WSRELAY_API_KEY=ours.WSRELAY_API_KEY
    ):
        views = load("shop/views.py")
        load("shop/urls.py")

        def requests() -> list[tuple[int, Any]]:
            client = Client()
            answers = [client.post("/orders/7/ship") for _ in range(2)]
            refused = client.get("/orders/7/ship")
            return [*((a.status_code, a.json()) for a in answers), (refused.status_code, None)]

        first, second, refused = await asyncio.to_thread(requests)
        views.relay.close()
    assert first == (200, {"offset": 1, "recipients": 1})
    assert second == (200, {"offset": 1, "recipients": 0})
    assert refused == (405, None)  # require_POST, as written
    await received_once(subscriber, api, "orders.7", "shipped")
    await subscriber.close()


async def test_the_celery_example(
    start_server: Start,
    redis_server: RedisServer,
    session: Any,
    monkeypatch: pytest.MonkeyPatch,
    load: Callable[[str], types.ModuleType],
) -> None:
    try:
        import celery  # noqa: F401  (the real one, where it is installed)
    except ImportError:
        stand_in = types.ModuleType("celery")
        stand_in.shared_task = lambda function: function  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "celery", stand_in)
    a, b = (start_server("--broker", redis_server.url) for _ in range(2))
    api_a, api_b = Api(session, a.url), Api(session, b.url)
    subscriber = await api_b.connect()
    await subscriber.subscribe("orders.9")  # acknowledged: node B follows the topic in Redis
    monkeypatch.setenv("WSRELAY_BROKER", redis_server.url)  # the relay's environment
    tasks = load("shop/tasks.py")
    offsets = [await asyncio.to_thread(tasks.order_shipped, 9) for _ in range(2)]
    tasks.emitter.close()
    assert offsets == [1, 1]  # run twice, published once
    await received_once(subscriber, api_a, "orders.9", "shipped")
    status, history = await api_a.call("GET", "/history?topic=orders.9")
    assert status == 200
    assert [p["message"] for p in history["publications"]] == ["shipped", "fence"]
    await subscriber.close()
