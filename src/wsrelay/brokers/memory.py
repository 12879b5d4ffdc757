"""The in-process backend: the default, for a relay that is one process.

Nodes that share a :class:`MemoryBus` behave like nodes sharing a Redis server,
which is what lets the broker conformance suite (and tests of multi-node logic)
run without any external service. A backend made without a bus gets its own,
so a single node does no work at all per publish.

Positions and history live in the bus (:class:`~wsrelay.core.history.MemoryHistory`),
shared by its nodes as Redis is; a publish hands the publication to every node
subscribed to its topic or to a pattern matching it (once, however many match), its
own included, at once and so in offset order.

Registrations expire as they do in Redis: ``registration_ttl`` seconds after they
were made or their last connection closed, and never while a connection is open.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence

from wsrelay.brokers.base import Backend, Listener
from wsrelay.core.fanout import Publication
from wsrelay.core.history import (
    DEFAULT_LIMITS,
    HistoryLimits,
    HistoryPage,
    IdempotencyCache,
    MemoryHistory,
    Position,
    Receipt,
)
from wsrelay.core.patterns import is_pattern
from wsrelay.core.registry import Client
from wsrelay.core.rules import Grants
from wsrelay.core.schema import NodeInfo, PresenceClient
from wsrelay.core.topics import PatternIndex


class MemoryBus:
    """The shared medium of in-process brokers: their history, publish keys and
    registrations."""

    def __init__(
        self,
        registration_ttl: float | None = None,
        limits: HistoryLimits = DEFAULT_LIMITS,
        history_size: Callable[[str], int] | None = None,
        node_ttl: float | None = None,
    ) -> None:
        self.members: list[MemoryBroker] = []
        self.registrations = MemoryRegistrations(registration_ttl)
        self.history = MemoryHistory(limits.size, limits.ttl, limits.memory, size_of=history_size)
        self.keys = IdempotencyCache(limits.idempotency_window)
        self.presence = MemoryPresence()
        self.nodes = MemoryNodes(node_ttl)

    def backend(self) -> Backend:
        """A new node's view of this bus."""
        return Backend(MemoryBroker(self), self.registrations, self.presence, self.nodes)


class MemoryBroker:
    """A :class:`~wsrelay.brokers.base.Broker` over a :class:`MemoryBus`."""

    healthy = True

    def __init__(self, bus: MemoryBus | None = None) -> None:
        self.bus = bus if bus is not None else MemoryBus()
        self.topics: set[str] = set()
        self.patterns: PatternIndex[str] = PatternIndex()
        """Subscribed patterns, each held by itself (subscribing twice is once)."""
        self._listener: Listener | None = None

    async def start(self, listener: Listener, origin: str = "") -> None:
        self._listener = listener
        if self not in self.bus.members:
            self.bus.members.append(self)

    async def stop(self) -> None:
        self._listener = None
        if self in self.bus.members:
            self.bus.members.remove(self)
        self.topics.clear()
        self.patterns = PatternIndex()

    async def subscribe(self, *topics: str) -> None:
        for name in topics:
            if is_pattern(name):
                self.patterns.add(name, name)
            else:
                self.topics.add(name)

    async def unsubscribe(self, *topics: str) -> None:
        for name in topics:
            if is_pattern(name):
                self.patterns.discard(name, name)
            else:
                self.topics.discard(name)

    def serves(self, topic: str) -> bool:
        """Whether this node is subscribed to ``topic``, by name or by a pattern."""
        return topic in self.topics or (bool(self.patterns) and self.patterns.matches_any(topic))

    async def publish(self, publication: Publication, key: str | None = None) -> Receipt:
        return self._publish(publication, key)

    def _publish(self, publication: Publication, key: str | None) -> Receipt:
        bus = self.bus
        if key is not None:
            earlier = bus.keys.get(publication.topic, key)
            if earlier is not None:
                return earlier
        stored = bus.history.append(publication)
        receipt = Receipt(Position(stored.epoch, stored.offset))
        if key is not None:
            bus.keys.put(publication.topic, key, receipt)
        self._hand_over(stored)
        return receipt

    def _hand_over(self, publication: Publication, *, others_only: bool = False) -> None:
        for member in self.bus.members:
            listener = member._listener
            if others_only and member is self:
                continue
            if listener is None:
                continue
            # Inlined rather than serves(): the by-name test is the hot path.
            topic = publication.topic
            if topic in member.topics or (member.patterns and member.patterns.matches_any(topic)):
                listener.publication(publication)

    async def announce(self, publication: Publication) -> None:
        self._hand_over(publication, others_only=True)  # no position, nothing kept

    async def publish_many(
        self, publications: Sequence[Publication], keys: Sequence[str | None] | None = None
    ) -> list[Receipt | Exception]:
        keys = keys if keys is not None else [None] * len(publications)
        return [self._publish(p, k) for p, k in zip(publications, keys, strict=True)]

    async def history(
        self, topic: str, *, since: int | None = None, limit: int = 0, reverse: bool = False
    ) -> HistoryPage:
        return self.bus.history.read(topic, since, limit, reverse)

    async def recover(
        self, topic: str, since: Position, limit: int
    ) -> tuple[HistoryPage, Position]:
        # A topic never published got its epoch when its position was read: ``since``
        # is already in it (or in a lost history, which no epoch here equals).
        return self.bus.history.read(topic, since.offset, limit), since


class _Stored:
    __slots__ = ("expires", "grants", "topics", "user")

    def __init__(
        self, user: str | None, topics: frozenset[str], expires: float, grants: Grants
    ) -> None:
        self.user = user
        self.topics = topics
        self.grants = grants
        self.expires = expires
        """When it expires (``clock`` time); infinite while a connection is attached."""


class MemoryRegistrations:
    """A :class:`~wsrelay.brokers.base.RegistrationStore` in a dict.

    Like Redis, it keeps values, not the live :class:`Client` objects: each node
    loads its own copy, and topic changes are saved explicitly.

    Expiry needs no timer: every call first removes what has expired, in deadline
    order from a heap. A deadline that was moved (the client connected, or
    disconnected again) leaves a stale heap entry behind, skipped when popped; the
    heap is rebuilt when stale entries outnumber live ones, so its size stays
    proportional to the number of registrations.
    """

    def __init__(
        self, ttl: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._clock = clock
        self._clients: dict[str, _Stored] = {}
        self._by_user: dict[str, set[str]] = {}  # user -> ids; anonymous ones are not here
        self._deadlines: list[tuple[float, str]] = []

    async def add(self, client: Client, limit: int = 0) -> bool:
        self._expire()
        # No await between the check and the insert: atomic on the event loop.
        if client.user is not None:
            ids = self._by_user.setdefault(client.user, set())
            if limit and len(ids) >= limit and client.id not in ids:
                return False
            ids.add(client.id)
        stored = _Stored(client.user, frozenset(client.topics), math.inf, client.grants)
        self._clients[client.id] = stored
        self._start_countdown(client.id, stored)
        return True

    async def get(self, client_id: str) -> Client | None:
        self._expire()
        stored = self._clients.get(client_id)
        if stored is None:
            return None
        return Client(client_id, stored.user, set(stored.topics), stored.grants)

    async def remove(self, client_id: str) -> bool:
        self._expire()
        return self._remove(client_id)

    async def save_topics(self, client: Client) -> None:
        stored = self._clients.get(client.id)
        if stored is not None:
            stored.topics = frozenset(client.topics)

    async def attached(self, client: Client) -> bool:
        self._expire()
        stored = self._clients.get(client.id)
        if stored is None:
            return False
        stored.expires = math.inf
        return True

    async def detached(self, client: Client) -> None:
        stored = self._clients.get(client.id)
        if stored is not None:
            self._start_countdown(client.id, stored)

    async def count(self) -> int:
        self._expire()
        return len(self._clients)

    async def remove_user(self, user: str) -> list[str]:
        self._expire()
        ids = sorted(self._by_user.get(user, ()))
        for client_id in ids:
            self._remove(client_id)
        return ids

    # -- expiry ---------------------------------------------------------------------------

    def _start_countdown(self, client_id: str, stored: _Stored) -> None:
        if self._ttl is None:
            return
        stored.expires = self._clock() + self._ttl
        heapq.heappush(self._deadlines, (stored.expires, client_id))
        if len(self._deadlines) > 2 * len(self._clients) + 64:
            self._deadlines = [
                (s.expires, i) for i, s in self._clients.items() if s.expires != math.inf
            ]
            heapq.heapify(self._deadlines)

    def _expire(self) -> None:
        deadlines, now = self._deadlines, self._clock()
        while deadlines and deadlines[0][0] <= now:
            expires, client_id = heapq.heappop(deadlines)
            stored = self._clients.get(client_id)
            if stored is not None and stored.expires == expires:
                self._remove(client_id)

    def _remove(self, client_id: str) -> bool:
        stored = self._clients.pop(client_id, None)
        if stored is None:
            return False
        if stored.user is not None:
            ids = self._by_user[stored.user]
            ids.discard(client_id)
            if not ids:
                del self._by_user[stored.user]
        return True


class MemoryPresence:
    """A :class:`~wsrelay.brokers.base.PresenceStore` in dicts, shared by the nodes of a
    bus. Entries never expire: the nodes of a bus live and die with their process."""

    def __init__(self) -> None:
        self._sets: dict[str, dict[str, PresenceClient]] = {}

    async def start(self, node: str) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def add(self, key: str, entry: PresenceClient) -> bool:
        entries = self._sets.setdefault(key, {})
        new = entry.client not in entries
        entries[entry.client] = entry
        return new

    async def remove(self, key: str, client: str, node: str) -> bool:
        entries = self._sets.get(key)
        if entries is None:
            return False
        entry = entries.get(client)
        if entry is None or entry.node != node:
            return False
        del entries[client]
        if not entries:
            del self._sets[key]
        return True

    def forget(self, key: str, client: str) -> None:
        pass  # nothing is refreshed

    async def entries(self, key: str) -> list[PresenceClient]:
        return list(self._sets.get(key, {}).values())

    async def count(self, key: str) -> int:
        return len(self._sets.get(key, ()))


class MemoryNodes:
    """A :class:`~wsrelay.brokers.base.NodeRegistry` in a dict, shared by the nodes of a
    bus; an entry expires ``ttl`` seconds after its last heartbeat (None: never)."""

    def __init__(
        self, ttl: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        self._nodes: dict[str, tuple[NodeInfo, bytes | None, float]] = {}

    async def heartbeat(self, info: NodeInfo, metrics: bytes | None = None) -> None:
        self._expire()
        if metrics is None and info.id in self._nodes:
            metrics = self._nodes[info.id][1]
        expires = math.inf if self.ttl is None else self._clock() + self.ttl
        self._nodes[info.id] = (info, metrics, expires)

    async def nodes(self) -> list[NodeInfo]:
        self._expire()
        return sorted((info for info, _, _ in self._nodes.values()), key=_node_order)

    async def metrics(self, ids: Sequence[str]) -> dict[str, bytes]:
        self._expire()
        found = {}
        for node in ids:
            entry = self._nodes.get(node)
            if entry is not None and entry[1] is not None:
                found[node] = entry[1]
        return found

    async def leave(self, node: str) -> None:
        self._nodes.pop(node, None)

    def _expire(self) -> None:
        now = self._clock()
        for node in [n for n, (_, _, expires) in self._nodes.items() if expires <= now]:
            del self._nodes[node]


def _node_order(info: NodeInfo) -> tuple[float, str]:
    return info.started_at, info.id
