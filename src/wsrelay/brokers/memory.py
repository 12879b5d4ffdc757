"""The in-process backend: the default, for a relay that is one process.

Nodes that share a :class:`MemoryBus` behave like nodes sharing a Redis server,
which is what lets the broker conformance suite (and tests of multi-node logic)
run without any external service. A backend made without a bus gets its own,
so a single node does no work at all per publish.

Registrations kept in memory do not expire; they end with ``DELETE`` or with
the process.
"""

from __future__ import annotations

from wsrelay.brokers.base import Backend, PublicationHandler
from wsrelay.core.fanout import Publication
from wsrelay.core.registry import Client


class MemoryBus:
    """The shared medium of in-process brokers, and their shared registrations."""

    def __init__(self) -> None:
        self.members: list[MemoryBroker] = []
        self.registrations = MemoryRegistrations()

    def backend(self) -> Backend:
        """A new node's view of this bus."""
        return Backend(MemoryBroker(self), self.registrations)


class MemoryBroker:
    """A :class:`~wsrelay.brokers.base.Broker` over a :class:`MemoryBus`."""

    healthy = True

    def __init__(self, bus: MemoryBus | None = None) -> None:
        self.bus = bus if bus is not None else MemoryBus()
        self.topics: set[str] = set()
        self._handler: PublicationHandler | None = None

    async def start(self, handler: PublicationHandler, origin: str = "") -> None:
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


class MemoryRegistrations:
    """A :class:`~wsrelay.brokers.base.RegistrationStore` in a dict.

    Like Redis, it keeps values, not the live :class:`Client` objects: each node
    loads its own copy, and topic changes are saved explicitly.
    """

    def __init__(self) -> None:
        self._clients: dict[str, tuple[str | None, frozenset[str]]] = {}
        self._by_user: dict[str, set[str]] = {}  # user -> ids; anonymous ones are not here

    async def add(self, client: Client, limit: int = 0) -> bool:
        # No await between the check and the insert: atomic on the event loop.
        if client.user is not None:
            ids = self._by_user.setdefault(client.user, set())
            if limit and len(ids) >= limit and client.id not in ids:
                return False
            ids.add(client.id)
        self._clients[client.id] = (client.user, frozenset(client.topics))
        return True

    async def get(self, client_id: str) -> Client | None:
        stored = self._clients.get(client_id)
        return None if stored is None else Client(client_id, stored[0], set(stored[1]))

    async def remove(self, client_id: str) -> bool:
        stored = self._clients.pop(client_id, None)
        if stored is None:
            return False
        user = stored[0]
        if user is not None:
            ids = self._by_user[user]
            ids.discard(client_id)
            if not ids:
                del self._by_user[user]
        return True

    async def save_topics(self, client: Client) -> None:
        if client.id in self._clients:
            self._clients[client.id] = (client.user, frozenset(client.topics))

    async def attached(self, client: Client) -> bool:
        return client.id in self._clients

    async def detached(self, client: Client) -> None:
        pass

    async def count(self) -> int:
        return len(self._clients)
