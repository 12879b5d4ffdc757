"""The in-process broker: the default, for a relay that is one process.

Nodes that share a :class:`MemoryBus` behave like nodes sharing a Redis server,
which is what lets the broker conformance suite (and tests of multi-node logic)
run without any external service. A broker made without a bus gets its own, so
a single node does no work at all per publish.
"""

from __future__ import annotations

from wsrelay.brokers.base import PublicationHandler
from wsrelay.core.fanout import Publication


class MemoryBus:
    """The shared medium of in-process brokers."""

    def __init__(self) -> None:
        self.members: list[MemoryBroker] = []


class MemoryBroker:
    """A :class:`~wsrelay.brokers.base.Broker` over a :class:`MemoryBus`."""

    def __init__(self, bus: MemoryBus | None = None) -> None:
        self.bus = bus if bus is not None else MemoryBus()
        self.topics: set[str] = set()
        self._handler: PublicationHandler | None = None

    async def start(self, handler: PublicationHandler) -> None:
        self._handler = handler
        if self not in self.bus.members:
            self.bus.members.append(self)

    async def stop(self) -> None:
        self._handler = None
        if self in self.bus.members:
            self.bus.members.remove(self)
        self.topics.clear()

    async def subscribe(self, topic: str) -> None:
        self.topics.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        self.topics.discard(topic)

    async def publish(self, publication: Publication) -> None:
        for member in self.bus.members:
            handler = member._handler
            if member is not self and handler is not None and publication.topic in member.topics:
                handler(publication)
