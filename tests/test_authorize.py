"""The authorization hook: a real relay asks a real HTTP backend about topics of
``"backend"`` namespaces; allowing, denying, caching, and failing closed when the
backend is slow, failing or down."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.receivers import SECRET, Backend
from tests.utils import TIMEOUT, Api, ServerProcess
from wsrelay.config import Settings
from wsrelay.core.presence import public_id
from wsrelay.core.rules import Namespace

Start = Callable[..., ServerProcess]

RULES = """
[[namespace]]
pattern = "doc.*"
subscribe = "backend"
publish = "backend"
"""


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    hook = await Backend().start()
    hook.decide = lambda body: {topic: "secret" not in topic for topic in body["topics"]}
    yield hook
    hook.stall.set()
    await hook.stop()


@pytest.fixture
def relay(start_server: Start, backend: Backend, tmp_path: Path) -> ServerProcess:
    config = tmp_path / "wsrelay.toml"
    config.write_text(RULES)
    return start_server(
        "--config",
        str(config),
        "--authorize-url",
        backend.url + "/authorize",
        "--authorize-timeout",
        "0.5",
        env={"WSRELAY_WEBHOOK_SECRET": SECRET},
    )


async def test_the_backend_allows_and_denies_per_topic_asked_once_per_command(
    relay: ServerProcess, backend: Backend, session: aiohttp.ClientSession
) -> None:
    api = Api(session, relay.url)
    client = await api.connect(42)
    refused = await client.command({"subscribe": ["doc.1", "doc.secret", "news"]})
    assert refused["type"] == "error" and refused["error"]["code"] == "forbidden_topic"
    assert "doc.secret" in refused["error"]["message"]
    assert "backend" in refused["error"]["message"]
    assert backend.asked == [
        {
            "action": "subscribe",
            "user": "42",
            "client": public_id(client.id),
            "topics": ["doc.1", "doc.secret"],  # one request; news is not the backend's
        }
    ]
    assert backend.bad_signatures == 0  # signed with --webhook-secret
    ack = await client.command({"subscribe": ["doc.1"]})
    assert ack["type"] == "subscribed" and ack["topics"] == ["doc.1"]
    assert len(backend.asked) == 1  # doc.1's answer was cached (--authorize-ttl)

    published = await client.command(
        {"publish": {"topic": "doc.2", "message": "hi", "id": 1, "skip_self": True}}
    )
    assert published["type"] == "published", published
    assert backend.asked[-1]["action"] == "publish"
    assert backend.asked[-1]["topics"] == ["doc.2"]
    denied = await client.command({"publish": {"topic": "doc.secret", "message": "x", "id": 2}})
    assert (denied["type"], denied["error"]["code"], denied["id"]) == (
        "error",
        "forbidden_topic",
        2,
    )
    await client.close()


async def test_registration_topics_are_asked_and_grants_need_no_asking(
    relay: ServerProcess, backend: Backend, session: aiohttp.ClientSession
) -> None:
    api = Api(session, relay.url)
    status, body = await api.call("POST", "/register", {"user_id": "u", "topics": ["doc.secret-1"]})
    assert (status, body["error"]["code"]) == (403, "forbidden_topic")
    assert backend.asked[-1]["topics"] == ["doc.secret-1"]
    assert backend.asked[-1]["user"] == "u"
    asked = len(backend.asked)
    status, body = await api.call(
        "POST",
        "/register",
        {"user_id": "u", "topics": ["doc.secret-2"], "grants": {"subscribe": ["doc.secret-2"]}},
    )
    assert status == 200, body
    assert len(backend.asked) == asked  # a grant decides without the backend


async def test_a_slow_backend_is_refused_within_the_timeout_and_not_cached(
    relay: ServerProcess, backend: Backend, session: aiohttp.ClientSession
) -> None:
    api = Api(session, relay.url)
    client = await api.connect(7)
    backend.stall.clear()  # the backend hangs
    started = time.monotonic()
    answer = await client.command({"subscribe": ["doc.slow"]})
    waited = time.monotonic() - started
    assert answer["type"] == "error", answer
    assert answer["error"]["code"] == "authorization_unavailable"
    assert "0.5 s" in answer["error"]["message"]
    assert 0.4 < waited < TIMEOUT  # bounded by --authorize-timeout
    status, body = await api.call("POST", "/register", {"user_id": 7, "topics": ["doc.slow"]})
    assert (status, body["error"]["code"]) == (503, "authorization_unavailable")
    backend.stall.set()
    ack = await client.command({"subscribe": ["doc.slow"]})  # asked again: it answers now
    assert ack["type"] == "subscribed", ack
    await client.close()


async def test_a_failing_or_stopped_backend_fails_closed(
    relay: ServerProcess, backend: Backend, session: aiohttp.ClientSession
) -> None:
    api = Api(session, relay.url)
    client = await api.connect(8)
    backend.authorize_status = 500
    answer = await client.command({"subscribe": ["doc.a"]})
    assert answer["error"]["code"] == "authorization_unavailable"
    assert "answered 500" in answer["error"]["message"]
    backend.authorize_status = 200
    backend.decide = lambda body: "not a decision"  # type: ignore[assignment,return-value]
    answer = await client.command({"subscribe": ["doc.a"]})
    assert answer["error"]["code"] == "authorization_unavailable"
    await backend.stop()
    answer = await client.command({"publish": {"topic": "doc.b", "message": "x", "id": 3}})
    assert (answer["error"]["code"], answer["id"]) == ("authorization_unavailable", 3)
    assert (await client.command({"subscribe": ["news"]}))["type"] == "subscribed"  # others go
    async with session.get(relay.url + "/metrics") as response:
        metrics = await response.text()
    assert "wsrelay_authorize_unavailable_total 3.0" in metrics
    await client.close()


def test_a_backend_rule_needs_an_authorize_url() -> None:
    namespaces: Any = (Namespace("doc.*", subscribe="backend"),)
    with pytest.raises(ValueError, match="set authorize_url"):
        Settings(namespaces=namespaces)
    Settings(namespaces=namespaces, authorize_url="http://127.0.0.1:1/authorize")
    with pytest.raises(ValueError, match="subscribe must be one of any, granted, backend"):
        Namespace("doc.*", subscribe="anyone")  # type: ignore[arg-type]
