"""The backend contract: how nodes share publications and registrations.

A backend is a :class:`Broker` and a :class:`RegistrationStore` over one engine
(memory for a single process, Redis for many).

The broker never sees clients. The node tells it which topics have local
subscribers (:meth:`Broker.subscribe` on the first, :meth:`Broker.unsubscribe`
after the last; several topics in one call, as one request to the engine), and
which subscription patterns (``news.*``, ``news.>``: names for which
:func:`wsrelay.core.patterns.is_pattern` is true, wildcards as whole segments) the same way, and
hands it every publication accepted here (:meth:`Broker.publish`). The broker
gives each publication its position (:mod:`wsrelay.core.history`: an offset per
topic, an epoch per topic history), keeps the last ones, and hands every
publication on a subscribed topic, *this node's own included*, to the node's
:class:`Listener`: once each, in offset order, the same order on every node.
Where it cannot (the history was lost, or a gap could not be filled), it says
so with :meth:`Listener.gap` instead of skipping silently. Signals between
nodes that only matter to whoever listens right now go by
:meth:`Broker.announce`, which keeps no history and has no position.

The store keeps registrations, so that a client may register on one node and
connect to another, and survive a node's restart. It also counts each user's
registrations, so that ``max_registrations_per_user`` holds across all nodes.

The :class:`PresenceStore` keeps, per *set* (a topic's subscribers, or a user's
connections), an entry per connection, written by the node holding it, so that any
node can list them all. A node that dies without removing its entries loses them
after the store's expiry: the store refreshes the entries its node holds.

The :class:`NodeRegistry` lists the nodes themselves (``GET /nodes``), each writing
its own entry on a heartbeat, and carries the metrics workers share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from wsrelay.core.fanout import Publication
from wsrelay.core.history import HistoryPage, Position, Receipt
from wsrelay.core.registry import Client
from wsrelay.core.schema import NodeInfo, PresenceClient


class Listener(Protocol):
    """What a broker hands publications to: the node."""

    def publication(self, publication: Publication) -> None:
        """A publication on a subscribed topic, with its position (an announcement:
        offset 0). Per topic, in offset order, each once."""
        ...

    def gap(self, topic: str, epoch: str, offset: int) -> None:
        """Publications of ``topic`` before the next one handed over could not be
        delivered (its history was lost: a new epoch; or a gap could not be filled);
        the stream continues after ``offset`` in ``epoch``."""
        ...


class Broker(Protocol):
    """What every broker implements. All methods are called from the node's event loop."""

    @property
    def healthy(self) -> bool:
        """False while the engine is unreachable (publishes then raise)."""
        ...

    async def start(self, listener: Listener, origin: str) -> None:
        """Connect; from now on hand publications on subscribed topics to ``listener``.
        ``origin`` names this node."""
        ...

    async def stop(self) -> None:
        """Disconnect and stop calling the handler. Idempotent."""
        ...

    async def subscribe(self, *topics: str) -> None:
        """Start receiving other nodes' publications on each of ``topics`` (none: no-op).

        A pattern among them (:func:`~wsrelay.core.patterns.is_pattern`) subscribes every
        topic it matches (:func:`~wsrelay.core.patterns.matches`, NATS semantics, and no
        other): their publications are handed over like a subscribed topic's, per topic
        in offset order, each once however many of the node's topics and patterns match.

        Returns once the engine confirmed them, so that a client told it is subscribed
        gets every publication from then on (or, if the engine is unreachable, after a
        bounded wait: the broker subscribes again by itself when it is back)."""
        ...

    async def unsubscribe(self, *topics: str) -> None:
        """Stop receiving publications on each of ``topics`` (none: no-op); a pattern
        among them stops its topics except those still subscribed otherwise."""
        ...

    async def publish(self, publication: Publication, key: str | None = None) -> Receipt:
        """Give ``publication`` its position, keep it in the topic's history and send it
        to every node subscribed to its topic, this one included (whose listener may get
        it before or after this returns). With ``key``, a publish with the same key on
        the same topic within the idempotency window is not made again: its receipt is
        answered, marked duplicate.

        Raises:
            wsrelay.errors.BrokerUnavailable: it was not published; the caller must
                not report the publish as accepted.
            wsrelay.errors.PublishOutcomeUnknown: the engine stopped answering after the
                publish was sent: it may have been published (retry with the same key).
        """
        ...

    async def history(
        self, topic: str, *, since: int | None = None, limit: int = 0, reverse: bool = False
    ) -> HistoryPage:
        """Up to ``limit`` kept publications of ``topic`` with an offset above ``since``,
        oldest first (newest first if ``reverse``), and the topic's current position,
        read together (``limit`` 0: only the position). A topic never published to is
        answered a position at offset 0 that :meth:`recover` accepts later: the memory
        broker gives it its epoch here (kept in memory), the Redis broker an *empty
        position* that stores nothing and that it vouches for in :meth:`recover`.

        Raises:
            wsrelay.errors.BrokerUnavailable: the engine is unreachable.
        """
        ...

    async def recover(
        self, topic: str, since: Position, limit: int
    ) -> tuple[HistoryPage, Position]:
        """What a client at ``since`` needs to recover ``topic``: up to ``limit`` kept
        publications with an offset above ``since.offset``, oldest first, with the
        topic's position (as :meth:`history`); and ``since`` as a position in the page's
        epoch: ``since`` itself, or the position it stands for there when the broker can
        tell that nothing of the topic was lost since (a position it answered before the
        topic's first publication). :func:`wsrelay.core.history.recovered` decides with
        the two.

        Raises:
            wsrelay.errors.BrokerUnavailable: the engine is unreachable.
        """
        ...

    async def announce(self, publication: Publication) -> None:
        """Hand ``publication`` to the other nodes subscribed to its topic now, keeping
        no history: a node that is cut off from the engine at that moment misses it
        (at-most-once), and it is not ordered with :meth:`publish`-ed ones. For
        signals that only matter live, at a fraction of a publish's cost.

        Raises:
            wsrelay.errors.BrokerUnavailable: it could not be handed over.
        """
        ...

    async def publish_many(
        self, publications: Sequence[Publication], keys: Sequence[str | None] | None = None
    ) -> list[Receipt | Exception]:
        """Publish several at once, in order, as ``publish`` would one by one (``keys``:
        each one's idempotency key). Returns each one's receipt, or the error (a
        :class:`~wsrelay.errors.BrokerUnavailable` or ``PublishOutcomeUnknown``) that
        kept it back.
        """
        ...


class RegistrationStore(Protocol):
    """Where registrations live. Methods raise BrokerUnavailable when the engine is down."""

    async def add(self, client: Client, limit: int = 0) -> bool:
        """Store a new registration, unless its user already holds ``limit`` live ones
        (0: no limit); False if refused. Check and insert are one atomic step, across
        every node sharing the store; expired registrations do not count, nor does an
        anonymous one (``client.user`` None) count or get refused."""
        ...

    async def get(self, client_id: str) -> Client | None:
        """The registration with this id, or None (never made, deleted or expired)."""
        ...

    async def remove(self, client_id: str) -> bool:
        """Delete a registration; False if there was none."""
        ...

    async def save_topics(self, client: Client) -> None:
        """Record the client's current topic set."""
        ...

    async def attached(self, client: Client) -> bool:
        """A connection opened: keep the registration alive. False if it is gone."""
        ...

    async def detached(self, client: Client) -> None:
        """Its connection closed: the registration may now expire."""
        ...

    async def count(self) -> int | None:
        """How many registrations exist, if the store can tell cheaply."""
        ...

    async def remove_user(self, user: str) -> list[str]:
        """Delete every registration of ``user`` (on every node); the ids deleted."""
        ...


class PresenceStore(Protocol):
    """Presence entries, by set: ``topic:<topic>`` (the connections subscribed to the
    topic) and ``user:<user>`` (the user's connections). An entry is keyed by its
    connection's public id and belongs to the node named in it.

    Methods raise :class:`~wsrelay.errors.BrokerUnavailable` when the engine is down;
    the entries this node holds are written again by the next refresh."""

    async def start(self, node: str) -> None:
        """Begin refreshing the entries this node (``node``) adds, if they expire."""
        ...

    async def stop(self) -> None:
        """Stop refreshing. Idempotent."""
        ...

    async def add(self, key: str, entry: PresenceClient) -> bool:
        """Add (or replace) ``entry`` in set ``key``; True if the set had no entry for
        its client (a join), False if it replaced one (the connection moved, or this
        node added it already)."""
        ...

    async def remove(self, key: str, client: str, node: str) -> bool:
        """Remove ``client``'s entry from set ``key`` if ``node`` holds it (a newer
        connection on another node keeps its own); True if it was removed (a leave)."""
        ...

    def forget(self, key: str, client: str) -> None:
        """Stop refreshing ``client``'s entry in set ``key`` without removing it: its
        connection moved to another node, whose entry replaces it (or it expires)."""
        ...

    async def entries(self, key: str) -> list[PresenceClient]:
        """The live entries of set ``key`` (expired ones are dropped first)."""
        ...

    async def count(self, key: str) -> int:
        """How many live entries set ``key`` holds."""
        ...


class NodeRegistry(Protocol):
    """Every node sharing the engine, as its last heartbeat described it. An entry lives
    the store's ``ttl`` after its last heartbeat: a node that died without leaving
    vanishes within it. With each heartbeat a node may leave a metrics snapshot (bytes),
    which nodes of its ``--workers`` group read to answer ``GET /metrics`` for them all.

    Methods raise :class:`~wsrelay.errors.BrokerUnavailable` when the engine is down."""

    async def heartbeat(self, info: NodeInfo, metrics: bytes | None = None) -> None:
        """Write (or replace) ``info`` for node ``info.id``, and ``metrics`` if given
        (else the last snapshot stays); both live ``ttl`` from now."""
        ...

    async def nodes(self) -> list[NodeInfo]:
        """The live nodes (expired ones are dropped first), oldest first."""
        ...

    async def metrics(self, ids: Sequence[str]) -> dict[str, bytes]:
        """The last metrics snapshot of each live node of ``ids`` that left one."""
        ...

    async def leave(self, node: str) -> None:
        """Remove ``node``'s entry and snapshot at once (a clean shutdown)."""
        ...


@dataclass(frozen=True, slots=True)
class Backend:
    """A broker, a registration store, a presence store and a node registry over the
    same engine (``presence`` or ``nodes`` None: the node keeps it to itself, in memory)."""

    broker: Broker
    registrations: RegistrationStore
    presence: PresenceStore | None = None
    nodes: NodeRegistry | None = None
