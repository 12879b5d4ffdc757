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


RESERVED_FILES = 64
"""Open files kept for what is not a WebSocket: the listening sockets, HTTP requests
in progress, Redis connections, log files."""


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit, as servers do
    (many systems start processes with a soft limit of 1024, which would end a relay
    at about a thousand connections with "too many open files"). Returns
    ``(soft, hard)`` after the change; unchanged where the platform has no such limit."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return (0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def connections_allowed_by(open_files: int) -> int:
    """How many WebSocket connections an open-files limit leaves room for."""
    return max(open_files - RESERVED_FILES, 0)
