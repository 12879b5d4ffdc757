"""The broker contract: how one node's publications reach the other nodes.

A broker never sees clients. The node tells it which topics have local
subscribers (:meth:`Broker.subscribe` on the first, :meth:`Broker.unsubscribe`
after the last) and hands it every publication accepted here
(:meth:`Broker.publish`); the broker calls the node's handler with publications
made on *other* nodes for topics this node subscribed to. Local delivery is the
node's own job, so a publication reaches local subscribers without a round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from wsrelay.core.fanout import Publication

PublicationHandler = Callable[[Publication], None]


class Broker(Protocol):
    """What every broker implements. All methods are called from the node's event loop."""

    async def start(self, handler: PublicationHandler) -> None:
        """Connect; from now on deliver other nodes' publications to ``handler``."""
        ...

    async def stop(self) -> None:
        """Disconnect and stop calling the handler. Idempotent."""
        ...

    async def subscribe(self, topic: str) -> None:
        """Start receiving other nodes' publications on ``topic``."""
        ...

    async def unsubscribe(self, topic: str) -> None:
        """Stop receiving publications on ``topic``."""
        ...

    async def publish(self, publication: Publication) -> None:
        """Send ``publication`` to the other nodes subscribed to its topic.

        Raises:
            wsrelay.errors.BrokerUnavailable: it could not be handed over; the
                caller must not report the publish as accepted.
        """
        ...
