"""Capacity limits that the HTTP adapter enforces before any work is done."""

from __future__ import annotations

from aiohttp import web

from wsrelay.errors import ServiceUnavailable


class ConnectionSlots:
    """At most ``limit`` WebSocket connections at once, counting handshakes in progress.

    A slot is taken before the upgrade and given back when the connection ends,
    so concurrent handshakes cannot together overshoot the limit.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def acquire(self) -> None:
        """Take a slot.

        Raises:
            ServiceUnavailable: all ``limit`` slots are taken (503 too_many_connections).
        """
        if self.used >= self.limit:
            raise ServiceUnavailable(
                f"this server holds its maximum of {self.limit} connections; "
                "retry later or connect to another node",
                code="too_many_connections",
            )
        self.used += 1

    def release(self) -> None:
        self.used -= 1


SLOTS = web.AppKey("connection_slots", ConnectionSlots)
