"""The node: registrations, subscriptions and publishing, over one backend.

:class:`Relay` is what the HTTP/WebSocket adapter calls. It validates input
against the settings, keeps the broker subscribed to exactly the topics with
local subscribers, delivers publications (its own and those the broker brings
from other nodes), and keeps the nodes agreeing about connections: deleting a
registration or connecting it again on one node closes its old socket on
whichever node holds it. It knows nothing of HTTP or of a particular engine;
effects (the framer, the connections' sinks) are passed in.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, Sequence

import msgspec

from wsrelay import codes
from wsrelay.brokers import Backend, MemoryBus
from wsrelay.config import Settings
from wsrelay.core import topics as topic_rules
from wsrelay.core.fanout import Framer, Publication, deliver
from wsrelay.core.registry import Client, Occupancy, Registry, Sink, user_key
from wsrelay.errors import (
    BrokerUnavailable,
    InvalidTopic,
    NotFound,
    TooManyRegistrations,
    TooManyTopics,
)

log = logging.getLogger("wsrelay")

CLIENT_ID_BYTES = 16
"""128 random bits: the id is the client's capability to connect, so it must be unguessable."""

CONTROL_TOPIC = "$control"
"""Nodes tell each other about registrations on this topic. ``$`` is outside the
topic alphabet, so no client can subscribe or publish to it."""


class ControlEvent(msgspec.Struct, array_like=True):
    """``unregistered``: close the client's socket (1000). ``attached``: a newer
    connection opened on node ``node``; close any other (4500)."""

    event: str
    client_id: str
    node: str


_encode_control = msgspec.json.Encoder().encode
_decode_control = msgspec.json.Decoder(ControlEvent).decode


class Relay:
    """One relay node. Use as ``async with Relay(settings, framer) as relay``."""

    def __init__(self, settings: Settings, framer: Framer, backend: Backend | None = None) -> None:
        self.settings = settings
        self.framer = framer
        backend = backend if backend is not None else MemoryBus().backend()
        self.broker = backend.broker
        self.registrations = backend.registrations
        self.registry = Registry()
        self.node_id = secrets.token_hex(8)
        self.started_at = time.monotonic()
        self.published = 0
        """Publications accepted on this node (by publish and publish_many)."""
        self.delivered = 0
        """Hand-overs of publications to this node's connections, wherever published."""

    async def start(self) -> None:
        await self.broker.start(self._on_broker_publication, self.node_id)
        await self.broker.subscribe(CONTROL_TOPIC)

    async def stop(self) -> None:
        await self.broker.stop()

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def ready(self) -> bool:
        """Whether this node can accept publishes: its broker is reachable."""
        return self.broker.healthy

    # -- registrations ------------------------------------------------------------------

    async def register(self, user_id: int | str | None, topics: Iterable[str] = ()) -> Client:
        """Create a registration with a new unguessable id.

        Raises:
            InvalidTopic, TooManyTopics: ``topics`` breaks the topic rules.
            TooManyRegistrations: the user already holds ``max_registrations_per_user``
                (counted on every node; anonymous registrations are never refused).
            BrokerUnavailable: the store is unreachable.
        """
        client = Client(
            secrets.token_hex(CLIENT_ID_BYTES), user_key(user_id), self._validate(topics)
        )
        limit = self.settings.max_registrations_per_user
        if not await self.registrations.add(client, limit):
            raise TooManyRegistrations(
                f"user {client.user!r} already holds {limit} registrations, the limit "
                "(max_registrations_per_user); delete one with DELETE /register/<id>, or "
                "reuse one"
            )
        return client

    async def lookup(self, client_id: str) -> Client:
        """The registration ``client_id``, from this node if attached here, else the store.

        Raises:
            NotFound: there is no such registration.
        """
        client = self.registry.attached(client_id) or await self.registrations.get(client_id)
        if client is None:
            raise NotFound("no registration with this id", code="unknown_client")
        return client

    async def unregister(self, client_id: str) -> None:
        """Delete a registration and close its connection, wherever it is, with 1000.

        Raises:
            NotFound: no such registration.
        """
        if not await self.registrations.remove(client_id):
            raise NotFound("no registration with this id", code="unknown_client")
        await self._close_local(client_id, codes.NORMAL, "unregistered")
        await self._tell_nodes("unregistered", client_id)

    # -- connections ----------------------------------------------------------------------

    async def attach(self, client: Client, sink: Sink) -> None:
        """Make ``sink`` the client's live connection, closing any it replaces here
        or on another node.

        Raises:
            NotFound: the registration was deleted meanwhile (``sink`` is not attached).
        """
        previous, change = self.registry.attach(client, sink)
        if previous is not None and previous is not sink:
            previous.close(codes.REPLACED, "replaced by a newer connection")
        await self._sync_broker(change)
        if not await self.registrations.attached(client):
            await self.detach(client, sink)
            raise NotFound("this registration was deleted", code="unknown_client")
        await self._tell_nodes("attached", client.id)

    async def detach(self, client: Client, sink: Sink) -> None:
        """The connection ``sink`` ended; the registration stays."""
        change = self.registry.detach(client, sink)
        await self._sync_broker(change)
        if client.sink is None and self.registry.attached(client.id) is None:
            await self.registrations.detached(client)

    async def set_topics(self, client: Client, topics: Iterable[str]) -> None:
        await self._sync_broker(self.registry.set_topics(client, self._validate(topics)))
        await self.registrations.save_topics(client)

    async def subscribe(self, client: Client, topics: Iterable[str]) -> None:
        wanted = self._validate(topics)
        total = len(client.topics | wanted)
        if total > self.settings.max_topics_per_client:
            raise TooManyTopics(
                f"subscribing would make {total} topics; a client may subscribe to at most "
                f"{self.settings.max_topics_per_client}"
            )
        await self._sync_broker(self.registry.subscribe(client, wanted))
        await self.registrations.save_topics(client)

    async def unsubscribe(self, client: Client, topics: Iterable[str]) -> None:
        await self._sync_broker(self.registry.unsubscribe(client, self._validate(topics)))
        await self.registrations.save_topics(client)

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
        self.published += 1
        return self.deliver(publication)

    async def publish_many(self, items: Sequence[tuple[str, str, int | str | None]]) -> list[int]:
        """Publish several ``(topic, message, user_id)`` at once, in order; returns each
        one's local recipient count. Every topic is checked before anything is published.

        The broker gets them all together (the Redis broker pipelines them), and local
        subscribers get them in the order given. If the broker fails part-way, those it
        accepted are still delivered here (other nodes have them too) and the call raises.

        Raises:
            InvalidTopic: an item's topic breaks the rules (its index is in the message).
            BrokerUnavailable: some publications could not be handed to the broker.
        """
        publications = []
        for index, (topic, message, user_id) in enumerate(items):
            try:
                topic_rules.validate_topic(topic, self.settings.max_topic_length)
            except InvalidTopic as exc:
                raise InvalidTopic(f"messages[{index}]: {exc.message}") from None
            publications.append(Publication(topic, message, user_key(user_id)))
        outcomes = await self.broker.publish_many(publications)
        recipients = []
        failed: Exception | None = None
        for publication, outcome in zip(publications, outcomes, strict=True):
            if outcome is None:
                self.published += 1
                recipients.append(self.deliver(publication))
            elif failed is None:
                failed = outcome
        if failed is not None:
            if isinstance(failed, BrokerUnavailable):
                accepted = len(recipients)
                raise BrokerUnavailable(
                    f"{failed.message}; {accepted} of {len(publications)} messages were "
                    "published (the others were not)"
                ) from None
            raise failed
        return recipients

    def deliver(self, publication: Publication) -> int:
        """Hand ``publication`` to local subscribers only."""
        recipients = self.registry.recipients(publication.topic, publication.user)
        handed = deliver(publication, recipients, self.framer)
        self.delivered += handed
        return handed

    def _on_broker_publication(self, publication: Publication) -> None:
        if publication.topic != CONTROL_TOPIC:
            self.deliver(publication)
            return
        try:
            event = _decode_control(publication.message)
        except msgspec.DecodeError:
            log.warning("ignored a malformed control event")
            return
        client = self.registry.attached(event.client_id)
        if client is None or client.sink is None or event.node == self.node_id:
            return
        if event.event == "unregistered":
            client.sink.close(codes.NORMAL, "unregistered")
        elif event.event == "attached":
            client.sink.close(codes.REPLACED, "replaced by a newer connection")

    # -- helpers ----------------------------------------------------------------------------

    async def _tell_nodes(self, event: str, client_id: str) -> None:
        body = _encode_control(ControlEvent(event, client_id, self.node_id)).decode()
        await self.broker.publish(Publication(CONTROL_TOPIC, body))

    async def _close_local(self, client_id: str, code: int, reason: str) -> None:
        client = self.registry.attached(client_id)
        if client is not None and client.sink is not None:
            sink = client.sink
            sink.close(code, reason)
            await self.detach(client, sink)

    def _validate(self, topics: Iterable[str]) -> set[str]:
        s = self.settings
        return topic_rules.validate_topics(topics, s.max_topic_length, s.max_topics_per_client)

    async def _sync_broker(self, change: Occupancy) -> None:
        for topic in change.occupied:
            await self.broker.subscribe(topic)
        for topic in change.vacated:
            await self.broker.unsubscribe(topic)
