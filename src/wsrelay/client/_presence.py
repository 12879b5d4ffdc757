"""Answers of the presence routes (``GET /presence``, ``GET /presence/stats``, ``GET
/users/<id>``, ``DELETE /users/<id>/connections``) and of the WebSocket ``presence``
commands, as the client returns them, and the :class:`Join` and :class:`Leave` events.
Like every client model they ignore fields they do not know."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec


class PresenceClient(msgspec.Struct, frozen=True):
    """One connection subscribed to a topic, on some node: its public id (not the
    registration id, which is the capability to connect), its user (as a string; None:
    anonymous), the node holding it and when it opened (seconds since the Unix epoch,
    by that node's clock)."""

    client: str
    user: str | None
    node: str
    connected_at: float


class Presence(msgspec.Struct, frozen=True):
    """Answer to ``GET /presence?topic=``: every connection subscribed to ``topic`` on
    every node, oldest first."""

    topic: str
    clients: list[PresenceClient]
    total: int | None = None
    """Over the WebSocket, how many connections there are in all: the answer lists at
    most 1000 of them (``GET /presence`` lists them all, and leaves this None)."""

    @property
    def users(self) -> set[str]:
        """The distinct users among :attr:`clients` (anonymous ones left out)."""
        return {c.user for c in self.clients if c.user is not None}


class PresenceStats(msgspec.Struct, frozen=True):
    """Answer to ``GET /presence/stats?topic=``: connections subscribed to ``topic`` on
    every node, and the distinct users they belong to (anonymous connections count as
    clients only)."""

    topic: str
    num_clients: int
    num_users: int


class UserStatus(msgspec.Struct, frozen=True):
    """Answer to ``GET /users/<id>``: whether the user has a connection open, on any node
    and to any topic, and how many (``user_id`` as a string)."""

    user_id: str
    online: bool
    connections: int


class UserDisconnected(msgspec.Struct, frozen=True):
    """Answer to ``DELETE /users/<id>/connections``: how many connections the user had
    open (each is being closed with 4503, on every node) and how many of its
    registrations were deleted."""

    user_id: str
    connections: int
    registrations: int


@dataclass(frozen=True)
class Join:
    """Event: a connection subscribed to ``topic`` (its namespace has ``join_leave``), on
    any node: ``client`` is its public id (as in :class:`PresenceClient`), ``user`` its
    user (None: anonymous). A subscription is not told of its own join."""

    topic: str
    user: str | None
    client: str


@dataclass(frozen=True)
class Leave:
    """Event: a connection unsubscribed from ``topic`` or disconnected (see :class:`Join`).
    A node that dies sends none: its connections drop out of :class:`Presence` within the
    server's ``presence_ttl`` instead."""

    topic: str
    user: str | None
    client: str
