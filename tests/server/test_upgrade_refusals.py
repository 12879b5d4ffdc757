"""A broker failure while a connection is attached is an HTTP refusal, never bytes
inside a WebSocket: the attach happens before the 101, on both stacks.

The app runs in this process over a memory backend whose broker fails to subscribe
(Redis cannot be made to fail between the registration lookup and the attach on
cue); the client is a real socket speaking raw HTTP and WebSocket.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from tests.server.inprocess import served as serve
from tests.server.rawws import RawWebSocket
from wsrelay.brokers import Backend, MemoryBus
from wsrelay.config import STACKS, Settings
from wsrelay.errors import BrokerUnavailable
from wsrelay.server.app import create_app
from wsrelay.server.keys import RELAY


class FailingSubscriptions:
    """A broker that works, except that it cannot subscribe while ``failing`` is set."""

    def __init__(self, broker: Any) -> None:
        self._broker = broker
        self.failing = False

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._broker, name)
        if not name.startswith("subscribe"):
            return attribute

        async def subscribe(*args: Any, **kwargs: Any) -> Any:
            if self.failing:
                raise BrokerUnavailable("Redis is unreachable (test); try again")
            return await attribute(*args, **kwargs)

        return subscribe


@dataclass
class Served:
    url: str
    app: web.Application
    broker: FailingSubscriptions


@pytest.fixture(params=STACKS)
async def relay_app(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    memory = MemoryBus().backend()
    broker = FailingSubscriptions(memory.broker)
    app = create_app(Settings(), backend=Backend(broker, memory.registrations))
    async with serve(app, request.param) as url:
        yield Served(url, app, broker)


async def test_a_broker_failure_at_attach_is_a_503_before_the_upgrade(
    relay_app: Served,
) -> None:
    url, app = relay_app.url, relay_app.app
    client = await app[RELAY].register(None, ["news"])
    relay_app.broker.failing = True
    refused = await RawWebSocket.handshake(f"{url}/ws/{client.id}")
    head = refused.head.decode("latin-1")
    assert head.startswith("HTTP/1.1 503"), head
    assert "\r\nRetry-After: 2\r\n" in head
    length = int(head.lower().split("content-length: ")[1].split("\r\n")[0])
    body = json.loads(await refused.reader.readexactly(length))
    assert body["error"]["code"] == "broker_unavailable"
    refused.abort()
    # The slot and the registration are free again: once the broker is back, it connects.
    relay_app.broker.failing = False
    socket = await RawWebSocket.connect(f"{url}/ws/{client.id}")
    socket.abort()


async def test_publications_during_the_attach_follow_the_101(
    relay_app: Served,
) -> None:
    """Frames fanned out while the attach waits on the broker are held until the 101
    is written: the first bytes on the wire are always the handshake's answer."""
    url, relay = relay_app.url, relay_app.app[RELAY]
    client = await relay.register(None, ["news"])
    broker = relay_app.broker
    original = broker._broker

    class PublishWhileSubscribing:
        def __getattr__(self, name: str) -> Any:
            attribute = getattr(original, name)
            if not name.startswith("subscribe"):
                return attribute

            async def subscribe(*args: Any, **kwargs: Any) -> Any:
                result = await attribute(*args, **kwargs)
                await relay.publish("news", "during the attach")
                # A broker round trip: the event loop runs (and flushes) meanwhile.
                await asyncio.sleep(0.05)
                return result

            return subscribe

    broker._broker = PublishWhileSubscribing()
    socket = await RawWebSocket.connect(f"{url}/ws/{client.id}")  # asserts the 101 comes first
    frame = await socket.frame()
    assert frame is not None and json.loads(frame.payload)["message"] == "during the attach"
    socket.abort()
