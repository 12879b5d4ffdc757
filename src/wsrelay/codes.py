"""WebSocket close codes used by wsrelay, with what a client should do on each.

The ranges follow the convention Centrifugo documents, so that client libraries
can decide without a table of every code:

* ``1000``-``1015`` are the standard codes of RFC 6455 section 7.4.1.
* ``4000``-``4499``: application codes after which the client **should
  reconnect** (with backoff).
* ``4500``-``4999``: application codes after which the client **must not
  reconnect** with the same URL; something has to change first.

Every code wsrelay sends is defined here; nothing else in the package writes a
bare number.
"""

from __future__ import annotations

from typing import Final

NORMAL: Final = 1000
"""The registration was deleted (``DELETE /register/<id>``), or the client closed."""

GOING_AWAY: Final = 1001
"""The server is shutting down. Reconnect, possibly to another node."""

PROTOCOL_ERROR: Final = 1002
"""The client broke the WebSocket protocol (an unmasked or malformed frame, a bad
fragment sequence); sent by the WebSocket library, both stacks."""

UNSUPPORTED_DATA: Final = 1003
"""Raw-mode client sent a binary frame (JSON-mode clients get an error frame instead)."""

INVALID_PAYLOAD: Final = 1007
"""The client sent a text message that is not valid UTF-8."""

POLICY_VIOLATION: Final = 1008
"""Raw-mode client sent an invalid command, or any client sent pings or pongs faster
than the server allows (a flood); the close reason names the problem."""

MESSAGE_TOO_BIG: Final = 1009
"""The client sent a message larger than ``max_message_size``."""

INTERNAL_ERROR: Final = 1011
"""Unexpected server failure. Reconnect with backoff."""

SLOW_CONSUMER: Final = 4008
"""The client did not read fast enough and its outbox passed ``outbox_limit``
bytes; pending messages were dropped for this client only. Reconnect."""

REPLACED: Final = 4500
"""Another connection was opened with the same registration id and took over.
Do not reconnect: the two connections would keep replacing each other."""

BANNED: Final = 4503
"""The backend disconnected the client's user everywhere (``DELETE
/users/<id>/connections``) and deleted the user's registrations. Do not reconnect:
whether the user may come back is the backend's decision (it registers them again,
or issues a new connection token, when it is)."""

RECONNECT_RANGE: Final = range(4000, 4500)
TERMINAL_RANGE: Final = range(4500, 5000)


def should_reconnect(code: int) -> bool:
    """Whether a client that saw close ``code`` should reconnect to the same URL."""
    return code not in TERMINAL_RANGE and code not in _FIX_THE_CLIENT


_FIX_THE_CLIENT: Final = frozenset(
    {NORMAL, PROTOCOL_ERROR, UNSUPPORTED_DATA, INVALID_PAYLOAD, POLICY_VIOLATION, MESSAGE_TOO_BIG}
)
"""Closes that the same client would provoke again by reconnecting (README: close codes)."""
