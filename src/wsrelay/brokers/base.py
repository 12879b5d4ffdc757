"""The backend contract: how nodes share publications and registrations.

A backend is a :class:`Broker` and a :class:`RegistrationStore` over one engine
(memory for a single process, Redis for many).

The broker never sees clients. The node tells it which topics have local
subscribers (:meth:`Broker.subscribe` on the first, :meth:`Broker.unsubscribe`
after the last; several topics in one call, as one request to the engine) and
hands it every publication accepted here (:meth:`Broker.publish`); the broker
calls the node's handler with publications made on *other* nodes for topics this
node subscribed to. Local delivery is the node's own job, so a publication
reaches local subscribers without a round trip. Signals between nodes that only
matter to whoever listens right now go by :meth:`Broker.announce`, which keeps
no history.

The store keeps registrations, so that a client may register on one node and
connect to another, and survive a node's restart. It also counts each user's
registrations, so that ``max_registrations_per_user`` holds across all nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from wsrelay.core.fanout import Publication
from wsrelay.core.registry import Client

PublicationHandler = Callable[[Publication], None]


class Broker(Protocol):
    """What every broker implements. All methods are called from the node's event loop."""

    @property
    def healthy(self) -> bool:
        """False while the engine is unreachable (publishes then raise)."""
        ...

    async def start(self, handler: PublicationHandler, origin: str) -> None:
        """Connect; from now on deliver other nodes' publications to ``handler``.
        ``origin`` names this node, so that its own publications are not handed back."""
        ...

    async def stop(self) -> None:
        """Disconnect and stop calling the handler. Idempotent."""
        ...

    async def subscribe(self, *topics: str) -> None:
        """Start receiving other nodes' publications on each of ``topics`` (none: no-op).

        Returns once the engine confirmed them, so that a client told it is subscribed
        gets every publication from then on (or, if the engine is unreachable, after a
        bounded wait: the broker subscribes again by itself when it is back)."""
        ...

    async def unsubscribe(self, *topics: str) -> None:
        """Stop receiving publications on each of ``topics`` (none: no-op)."""
        ...

    async def publish(self, publication: Publication) -> None:
        """Send ``publication`` to the other nodes subscribed to its topic.

        Raises:
            wsrelay.errors.BrokerUnavailable: it could not be handed over; the
                caller must not report the publish as accepted.
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

    async def publish_many(self, publications: Sequence[Publication]) -> list[Exception | None]:
        """Send several publications at once, in order, as ``publish`` would one by one.

        Returns each one's outcome: None if it was handed over, else the error (a
        :class:`~wsrelay.errors.BrokerUnavailable`) that kept it back.
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


@dataclass(frozen=True, slots=True)
class Backend:
    """A broker and a registration store over the same engine."""

    broker: Broker
    registrations: RegistrationStore
