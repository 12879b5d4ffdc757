"""What the relay tells your backend, and what it asks it, without I/O.

*Events* (:class:`Event`) are what a node saw happen: a connection opened or closed,
a connected client's topics changed, a topic gained its first or lost its last
subscriber on this node, a client published. The node hands each one to an
:class:`EventSink` (``--webhook-url``: :class:`wsrelay.webhooks.WebhookSender`, which
batches, signs and delivers them at least once). Every event is seen, and so sent, by
exactly one node: connections, commands and client publishes happen on the node holding
the connection, and ``topic_occupied``/``topic_vacated`` are per node (they name it).

The *authorizer* (:class:`Authorizer`, ``--authorize-url``:
:class:`wsrelay.authorize.HttpAuthorizer`) decides the topics of namespaces whose rule
is ``subscribe = "backend"`` or ``publish = "backend"`` (:mod:`wsrelay.core.rules`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any, Final, Literal, Protocol

import msgspec

EVENT_NAMES: Final = (
    "connected",
    "disconnected",
    "subscribed",
    "unsubscribed",
    "topic_occupied",
    "topic_vacated",
    "client_published",
)

Action = Literal["subscribe", "publish"]


class Event(msgspec.Struct, omit_defaults=True):
    """One event, as sent in a webhook batch (``{"events": [...]}``).

    ``id`` is unique across nodes and restarts (the node's random id and a sequence
    number): a receiver deduplicates redeliveries by it. ``time`` is Unix seconds.
    ``client`` is the connection's public id, as presence names it (the first 16 hex
    digits of the SHA-256 of the registration id), never the id itself."""

    id: str
    event: str
    time: float
    node: str
    client: str | None = None
    user: str | None = None
    topics: list[str] | None = None
    """``connected``: the topics the connection follows; ``subscribed``/``unsubscribed``:
    those a command added or removed."""
    topic: str | None = None
    """``topic_occupied``, ``topic_vacated``, ``client_published``."""
    code: int | None = None
    """``disconnected``: the close code (1006: dropped without a close frame)."""
    reason: str | None = None
    by: str | None = None
    """``disconnected``: ``client`` or ``server``, whoever closed."""
    offset: int | None = None
    epoch: str | None = None
    message: Any = None
    """``client_published``: the message (a JSON value, as published)."""


class EventSink(Protocol):
    """Where a node's events go. ``emit`` must not block nor raise: it queues."""

    def emit(self, event: Event) -> None: ...


class Events:
    """Makes a node's events (ids, times) and hands them to ``sink``."""

    __slots__ = ("_sequence", "node", "sink")

    def __init__(self, sink: EventSink, node: str) -> None:
        self.sink = sink
        self.node = node
        self._sequence = itertools.count(1)

    def emit(self, event: str, **fields: Any) -> None:
        number = next(self._sequence)
        self.sink.emit(Event(f"{self.node}-{number}", event, time.time(), self.node, **fields))


class Authorizer(Protocol):
    """Asks the backend which of ``topics`` a connection may subscribe or publish to."""

    async def authorize(
        self, action: Action, user: str | None, client: str, topics: Sequence[str]
    ) -> dict[str, bool]:
        """Each of ``topics``: True if allowed (a topic missing from the answer is denied).

        Raises:
            wsrelay.errors.AuthorizationUnavailable: the backend did not answer in time,
                or answered something else than a decision (fail closed).
        """
        ...
