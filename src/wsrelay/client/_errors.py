"""Exceptions raised by :mod:`wsrelay.client`.

Every one is a :class:`RelayError` carrying the server's error ``code`` (e.g.
``"unauthorized"``) and, for HTTP answers, the ``status``::

    RelayError                     code, status, message
    ├── ConnectionFailed           the server could not be reached or did not answer
    │   ├── NotConnected           a client publish found no open connection: nothing was sent
    │   └── PublishInterrupted     the connection was lost before a client publish's answer:
    │                              it may or may not have been published
    ├── ProtocolError              the server answered something that is not wsrelay's API
    ├── HTTPError                  the server answered 4xx/5xx with {"error": {...}}
    │   │                          (.retry_after: its Retry-After header, in seconds)
    │   ├── BadRequest             400 (invalid_topic, invalid_field, ...)
    │   │   └── PresenceDisabled   400 presence_disabled: the topic keeps no presence
    │   ├── Unauthorized           401 (missing or wrong API key)
    │   ├── Forbidden              403
    │   │   └── ForbiddenTopic     403 forbidden_topic: no namespace rule or grant allows it
    │   ├── NotFound               404 (unknown_client, not_found)
    │   ├── PayloadTooLarge        413
    │   │   └── MessageTooLarge    413 message_too_large: over the namespace's max_message_size
    │   ├── TooManyRequests        429 (too_many_registrations)
    │   │   └── RateLimited        429 rate_limited: client publishes past the namespace's rate
    │   └── ServerError            5xx
    │       └── ServiceUnavailable 503 (broker_unavailable, too_many_connections)
    │           └── PublishOutcomeUnknown  503 publish_outcome_unknown: retry with
    │                                      the same idempotency_key
    ├── CommandRefused             an error frame answered a subscription command
    └── ConnectionClosed           the server closed the WebSocket for good
        ├── Unregistered           1000: the registration was deleted
        ├── Replaced               4500: a newer connection took the registration over
        └── Banned                 4503: the backend disconnected the user everywhere

A refused client publish (``Subscription.publish``) raises the class its error frame's
code maps to, with the ``status`` the same refusal gets over HTTP (``forbidden_topic``:
:class:`ForbiddenTopic`, 403; ``invalid_topic``: :class:`BadRequest`, 400...).

These are the client's own classes: they are not the server-side
``wsrelay.errors`` hierarchy, though the codes are the same strings.
"""

from __future__ import annotations

from typing import ClassVar


class RelayError(Exception):
    """Base of every error the client raises.

    Attributes:
        code: the server's error code (``"unauthorized"``, ``"invalid_topic"``...) or,
            for failures the client detected itself, one of its own
            (``"connection_failed"``, ``"protocol_error"``, ``"closed"``).
        status: the HTTP status of the answer, or ``None`` when there was none.
        message: a one-line human description.
    """

    default_code: ClassVar[str] = "error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.status = status

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, code={self.code!r}, status={self.status!r})"
        )


class ConnectionFailed(RelayError):
    """The server could not be reached (refused, DNS, TLS, reset) or did not answer in time."""

    default_code = "connection_failed"


class ProtocolError(RelayError):
    """The server's answer was not what wsrelay sends (not JSON, wrong shape)."""

    default_code = "protocol_error"


class HTTPError(RelayError):
    """The server refused a request with ``{"error": {"code", "message"}}``.

    ``str()`` is ``"HTTP <status> <code>: <message>"`` (``"refused (<code>, <status>):
    <message>"`` for an error frame that answered a client publish).

    Attributes:
        retry_after: the answer's ``Retry-After`` header in seconds (an HTTP date is
            turned into the seconds until it), or None without one (or an unreadable
            one). A server shedding load sends it with 503 (and 429); a subscription
            waits that long before its next attempt (see ``Backoff.after``).
    """

    default_code = "http_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code, status=status)
        self.retry_after = retry_after

    via_frame: bool = False
    """The refusal came in a WebSocket error frame (a client publish), not an HTTP
    answer; ``status`` is then the one the same refusal gets over HTTP."""

    def __str__(self) -> str:
        if self.via_frame:
            return f"refused ({self.code}, {self.status}): {self.message}"
        return f"HTTP {self.status} {self.code}: {self.message}"


class BadRequest(HTTPError):
    """400: the request was invalid (a bad topic, a wrongly typed field...)."""

    default_code = "bad_request"


class PresenceDisabled(BadRequest):
    """400 ``presence_disabled``: presence was asked for a topic whose namespace keeps
    none (``presence = true`` in a ``[[namespace]]`` of the server's config)."""

    default_code = "presence_disabled"


class Unauthorized(HTTPError):
    """401: the API key is missing or wrong."""

    default_code = "unauthorized"


class Forbidden(HTTPError):
    """403: e.g. ``origin_not_allowed``."""

    default_code = "forbidden"


class ForbiddenTopic(Forbidden):
    """403 ``forbidden_topic``: a namespace rule forbids this subscription or client
    publish, and no grant of the connection allows it; the message names the topic and
    the rule."""

    default_code = "forbidden_topic"


class NotFound(HTTPError):
    """404: no such registration (``unknown_client``) or route (``not_found``)."""

    default_code = "not_found"


class PayloadTooLarge(HTTPError):
    """413: the body is over the server's ``--max-body-size``."""

    default_code = "payload_too_large"


class MessageTooLarge(PayloadTooLarge):
    """413 ``message_too_large``: a client publish over its namespace's
    ``max_message_size``."""

    default_code = "message_too_large"


class TooManyRequests(HTTPError):
    """429: e.g. ``too_many_registrations``: the same request may succeed later."""

    default_code = "too_many_requests"


class RateLimited(TooManyRequests):
    """429 ``rate_limited``: the connection published faster than its namespace's
    ``publish_burst`` and ``publish_rate`` allow; the message says when the next one fits."""

    default_code = "rate_limited"


class ServerError(HTTPError):
    """5xx: the server failed; the same request may succeed later."""

    default_code = "internal_error"


class ServiceUnavailable(ServerError):
    """503: ``broker_unavailable`` or ``too_many_connections``; retry later or elsewhere."""

    default_code = "service_unavailable"


class PublishOutcomeUnknown(ServiceUnavailable):
    """503 ``publish_outcome_unknown``: the server lost its broker after the publish was
    handed to it, so the message may or may not have been published. Publishing again
    with the same ``idempotency_key`` is safe: it is published at most once (a repeat
    of an accepted one answers :attr:`~wsrelay.client.Published.duplicate`)."""

    default_code = "publish_outcome_unknown"


class NotConnected(ConnectionFailed):
    """A client publish found the subscription closed or between connections (it
    reconnects while iterated): nothing was sent, so trying again later is safe."""

    default_code = "not_connected"


class PublishInterrupted(ConnectionFailed):
    """The connection was lost (or no answer came within the client's timeout) after a
    client publish was sent and before its answer: it may or may not have been
    published. Publishing again with the same ``idempotency_key`` is safe: a repeat of
    one that was accepted publishes nothing and answers its position
    (``duplicate=True``)."""

    default_code = "publish_interrupted"


class CommandRefused(RelayError):
    """The server answered a subscription command with an error frame."""

    default_code = "command_refused"


class ConnectionClosed(RelayError):
    """The server closed the WebSocket with a code after which reconnecting is pointless.

    Attributes:
        close_code: the WebSocket close code (see the README's table).
        reason: the close frame's reason, possibly empty.
    """

    default_code = "closed"

    def __init__(self, message: str, *, close_code: int, reason: str = "") -> None:
        super().__init__(message)
        self.close_code = close_code
        self.reason = reason


class Unregistered(ConnectionClosed):
    """Close 1000: the registration was deleted (``DELETE /register/<id>``)."""

    default_code = "unregistered"


class Replaced(ConnectionClosed):
    """Close 4500: another connection opened with the same registration took over."""

    default_code = "replaced"


class Banned(ConnectionClosed):
    """Close 4503: the backend disconnected the user on every node and deleted its
    registrations (``DELETE /users/<id>/connections``); reconnecting is the backend's
    decision (it registers the user again)."""

    default_code = "banned"


_BY_STATUS: dict[int, type[HTTPError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    413: PayloadTooLarge,
    429: TooManyRequests,
    503: ServiceUnavailable,
}


_BY_CODE: dict[tuple[int, str], type[HTTPError]] = {
    (503, "publish_outcome_unknown"): PublishOutcomeUnknown,
    (403, "forbidden_topic"): ForbiddenTopic,
    (413, "message_too_large"): MessageTooLarge,
    (429, "rate_limited"): RateLimited,
    (400, "presence_disabled"): PresenceDisabled,
}
"""Codes that need a class of their own, more precise than their status's."""


def http_error(
    status: int, code: str | None, message: str, retry_after: float | None = None
) -> HTTPError:
    """The exception for an HTTP error answer."""
    cls = (
        _BY_CODE.get((status, code or ""))
        or _BY_STATUS.get(status)
        or (ServerError if status >= 500 else HTTPError)
    )
    return cls(message, code=code, status=status, retry_after=retry_after)


_STATUS_BY_CODE: dict[str, int] = {
    "invalid_json": 400,
    "invalid_field": 400,
    "invalid_topic": 400,
    "too_many_topics": 400,
    "unsupported_frame": 400,
    "presence_disabled": 400,
    "forbidden_topic": 403,
    "message_too_large": 413,
    "rate_limited": 429,
    "internal_error": 500,
    "broker_unavailable": 503,
    "publish_outcome_unknown": 503,
}
"""The HTTP status the server gives each code an error frame may carry."""


def frame_error(code: str, message: str) -> HTTPError:
    """The exception for an error frame that answered a client publish: the class and
    ``status`` the same refusal gets over HTTP (an unknown code: :class:`HTTPError`
    with status 400)."""
    error = http_error(_STATUS_BY_CODE.get(code, 400), code, message)
    error.via_frame = True
    return error
