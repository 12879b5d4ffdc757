"""The node: registrations, subscriptions and publishing, over one broker.

:class:`Relay` is what the HTTP/WebSocket adapter calls. It validates input
against the settings, keeps the registry, keeps the broker subscribed to exactly
the topics with local subscribers, and delivers publications, its own and those
the broker brings from other nodes. It knows nothing of HTTP or of a particular
broker; effects (the framer, the connections' sinks) are passed in.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable

from wsrelay import codes
from wsrelay.brokers import Broker, MemoryBroker
from wsrelay.config import Settings
from wsrelay.core import topics as topic_rules
from wsrelay.core.fanout import Framer, Publication, deliver
from wsrelay.core.registry import Client, Occupancy, Registry, Sink, user_key
from wsrelay.errors import TooManyTopics

log = logging.getLogger("wsrelay")

CLIENT_ID_BYTES = 16
"""128 random bits: the id is the client's capability to connect, so it must be unguessable."""


class Relay:
    """One relay node. Use as ``async with Relay(settings, framer) as relay``."""

    def __init__(self, settings: Settings, framer: Framer, broker: Broker | None = None) -> None:
        self.settings = settings
        self.framer = framer
        self.broker: Broker = broker if broker is not None else MemoryBroker()
        self.registry = Registry()

    async def start(self) -> None:
        await self.broker.start(self._on_broker_publication)

    async def stop(self) -> None:
        await self.broker.stop()

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- registrations ------------------------------------------------------------------

    def register(self, user_id: int | str | None, topics: Iterable[str] = ()) -> Client:
        """Create a registration with a new unguessable id.

        Raises:
            InvalidTopic, TooManyTopics: ``topics`` breaks the topic rules.
        """
        client = Client(
            secrets.token_hex(CLIENT_ID_BYTES), user_key(user_id), self._validate(topics)
        )
        self.registry.add(client)
        return client

    async def unregister(self, client_id: str) -> Client:
        """Delete a registration and close its connection with :data:`codes.NORMAL`.

        Raises:
            NotFound: no such registration.
        """
        sink = self.registry.get(client_id).sink
        client, change = self.registry.remove(client_id)
        if sink is not None:
            sink.close(codes.NORMAL, "unregistered")
        await self._sync_broker(change)
        return client

    # -- connections ----------------------------------------------------------------------

    async def attach(self, client: Client, sink: Sink) -> None:
        """Make ``sink`` the client's live connection, closing any it replaces."""
        previous, change = self.registry.attach(client, sink)
        if previous is not None:
            previous.close(codes.REPLACED, "replaced by a newer connection")
        await self._sync_broker(change)

    async def detach(self, client: Client, sink: Sink) -> None:
        """The connection ``sink`` ended; the registration stays."""
        await self._sync_broker(self.registry.detach(client, sink))

    async def set_topics(self, client: Client, topics: Iterable[str]) -> None:
        await self._sync_broker(self.registry.set_topics(client, self._validate(topics)))

    async def subscribe(self, client: Client, topics: Iterable[str]) -> None:
        wanted = self._validate(topics)
        total = len(client.topics | wanted)
        if total > self.settings.max_topics_per_client:
            raise TooManyTopics(
                f"subscribing would make {total} topics; a client may subscribe to at most "
                f"{self.settings.max_topics_per_client}"
            )
        await self._sync_broker(self.registry.subscribe(client, wanted))

    async def unsubscribe(self, client: Client, topics: Iterable[str]) -> None:
        await self._sync_broker(self.registry.unsubscribe(client, self._validate(topics)))

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, topic: str, message: str, user_id: int | str | None = None) -> int:
        """Publish to every subscriber of ``topic`` (only ``user_id``'s, if given), on
        every node; returns how many connections on this node it was handed to.

        Raises:
            InvalidTopic: ``topic`` breaks the topic rules.
            BrokerUnavailable: the other nodes could not be reached; nothing was delivered.
        """
        topic_rules.validate_topic(topic, self.settings.max_topic_length)
        publication = Publication(topic, message, user_key(user_id))
        await self.broker.publish(publication)
        return self.deliver(publication)

    def deliver(self, publication: Publication) -> int:
        """Hand ``publication`` to local subscribers only."""
        recipients = self.registry.recipients(publication.topic, publication.user)
        return deliver(publication, recipients, self.framer)

    def _on_broker_publication(self, publication: Publication) -> None:
        self.deliver(publication)

    # -- helpers ----------------------------------------------------------------------------

    def _validate(self, topics: Iterable[str]) -> set[str]:
        s = self.settings
        return topic_rules.validate_topics(topics, s.max_topic_length, s.max_topics_per_client)

    async def _sync_broker(self, change: Occupancy) -> None:
        for topic in change.occupied:
            await self.broker.subscribe(topic)
        for topic in change.vacated:
            await self.broker.unsubscribe(topic)
