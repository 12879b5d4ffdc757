"""Capacity limits that the HTTP adapter enforces before any work is done.

The limits on an HTTP request's head are written once, here, and read by both
stacks: aiohttp's runner (:func:`wsrelay.server.app.serve`) and the native
publish driver (:mod:`wsrelay.server.native_http`). Past any of them both
answer 400 and close the connection: aiohttp's parser with its own plain-text
body, the native driver with JSON (code ``bad_http``). The time a head may take
is ``--request-timeout`` (``Settings.request_timeout``), counted from the
connection's start or the previous answer, never restarted by a read.
"""

from __future__ import annotations

from aiohttp import web

from wsrelay.errors import ServiceUnavailable, TooManyConnectionsPerIp

# -- HTTP request heads: the same on both stacks --------------------------------------------------

MAX_URL_SIZE = 8190
"""Bytes of a request's target (path and query): aiohttp's ``max_line_size``, which
its parser applies to the target alone (8190 is its default)."""

MAX_FIELD_SIZE = 8190
"""Bytes of a header field's name, and separately of its value: aiohttp's
``max_field_size`` (default 8190). The native driver measures each alone. aiohttp's
C parser (the one in use, 3.14) adds the previous field's name to a name, and the
first field's name to its value, so it can be stricter there, never laxer."""

MAX_HEADERS = 128
"""Header fields in one request: aiohttp's ``max_headers`` (default 128)."""

MAX_HEAD_SIZE = (
    len("OPTIONS  HTTP/1.1\r\n") + MAX_URL_SIZE + MAX_HEADERS * (2 * MAX_FIELD_SIZE + 4) + 2
)
"""The request line and headers together: the most the three limits above let
through (about 2 MiB). aiohttp has no total of its own, so this is the total on
both stacks; it follows from the others and is not a setting of its own."""

HEAD_BUFFER_SIZE = 65536
"""Native publish driver only: bytes of an unfinished head (request line and
headers) it holds before judging it by its size. ``httptools`` reports a header
field only once the next one starts, so a field that never ends cannot be measured;
an unfinished head larger than this, and larger than any head within the limits
could be with the fields received so far, gets 431 ``headers_too_large``. Counted
from the second read of the request on, so one read more (at most 256 KiB) can
arrive first."""


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


class AddressSlots:
    """At most ``limit`` WebSocket connections per client address (0: no limit), each
    also taking one of the process's :class:`ConnectionSlots`; see :meth:`of`."""

    __slots__ = ("limit", "slots", "used")

    def __init__(self, slots: ConnectionSlots, limit: int) -> None:
        self.slots = slots
        self.limit = limit
        self.used: dict[str | None, int] = {}
        """Connections (handshakes in progress included) per address; none at 0."""

    def of(self, address: str | None) -> ConnectionSlots | _AddressSlot:
        """What a connection from ``address`` takes a slot from: the process's slots
        alone without a limit per address, else a slot of both."""
        return self.slots if self.limit <= 0 else _AddressSlot(self, address)


class _AddressSlot:
    """One connection's slot: the address's and the process's, taken and given back
    together."""

    __slots__ = ("address", "limits")

    def __init__(self, limits: AddressSlots, address: str | None) -> None:
        self.limits = limits
        self.address = address

    def acquire(self) -> None:
        """Take a slot of the address, then of the process.

        Raises:
            TooManyConnectionsPerIp: the address holds ``limit`` connections (429).
            ServiceUnavailable: the process holds its maximum (503).
        """
        limits, address = self.limits, self.address
        held = limits.used.get(address, 0)
        if held >= limits.limit:
            raise TooManyConnectionsPerIp(
                f"{address or 'this address'} holds its maximum of {limits.limit} "
                "connection(s) on this server; close one, or retry later"
            )
        limits.slots.acquire()
        limits.used[address] = held + 1

    def release(self) -> None:
        limits = self.limits
        limits.slots.release()
        held = limits.used.get(self.address, 0) - 1
        if held > 0:
            limits.used[self.address] = held
        else:
            limits.used.pop(self.address, None)


SLOTS = web.AppKey("connection_slots", ConnectionSlots)
ADDRESS_SLOTS = web.AppKey("address_slots", AddressSlots)


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
