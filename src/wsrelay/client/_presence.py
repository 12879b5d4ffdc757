"""Answers of the presence routes (``GET /presence``, ``GET /presence/stats``), as the
client returns them. Like every client model they ignore fields they do not know."""

from __future__ import annotations

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
