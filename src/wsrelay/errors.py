"""Errors that cross the relay's boundary, each knowing how it is reported.

The hierarchy::

    RelayError                      code, http_status, close_code
    ├── ClientError                 the peer's fault (4xx / error frame)
    │   ├── BadRequest              400: malformed or invalid input
    │   │   ├── InvalidJSON         400 invalid_json
    │   │   ├── InvalidField        400 invalid_field (wrong type, missing, unknown)
    │   │   ├── InvalidTopic        400 invalid_topic
    │   │   ├── TooManyTopics       400 too_many_topics
    │   │   ├── PresenceDisabled    400 presence_disabled (the topic's namespace keeps none)
    │   │   └── UnsupportedFrame    400 unsupported_frame (binary WebSocket frame)
    │   ├── Unauthorized            401 unauthorized (missing or wrong API key)
    │   │   ├── TokenExpired        401 token_expired (refresh the token, reconnect)
    │   │   └── InvalidToken        401 invalid_token (do not retry)
    │   ├── Forbidden               403 forbidden / origin_not_allowed
    │   │   └── ForbiddenTopic      403 forbidden_topic (no namespace rule or grant allows it)
    │   ├── NotFound                404 not_found / unknown_client
    │   ├── MethodNotAllowed        405 method_not_allowed
    │   ├── RequestTimeout          408 request_timeout (body not sent in time)
    │   ├── PayloadTooLarge         413 payload_too_large
    │   │   └── MessageTooLarge     413 message_too_large (a namespace's max_message_size)
    │   ├── UpgradeRequired         426 upgrade_required
    │   ├── TooManyRegistrations    429 too_many_registrations (the user's limit)
    │   ├── RateLimited             429 rate_limited (a namespace's client publish rate)
    │   ├── TooManyConnectionsPerIp 429 too_many_connections_per_ip, Retry-After: 5
    │   ├── HeadersTooLarge         431 headers_too_large (request line and headers)
    │   └── NotStreaming            409 not_streaming (POST /sse/<id> without its stream here)
    └── ServerError                 ours (5xx / close 1011)
        ├── BrokerUnavailable       503 broker_unavailable, Retry-After: 2
        ├── AuthorizationUnavailable 503 authorization_unavailable (--authorize-url), Retry-After: 2
        └── ServiceUnavailable      503 too_many_connections, Retry-After: 5

Over HTTP an error becomes ``{"error": {"code": ..., "message": ...}}`` with
``http_status``; on a WebSocket it becomes an error frame with the same body
(JSON mode) or a close with ``close_code`` (raw mode).
"""

from __future__ import annotations

from typing import ClassVar

from wsrelay import codes


class RelayError(Exception):
    """Base of every error wsrelay reports to a peer."""

    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500
    close_code: ClassVar[int] = codes.INTERNAL_ERROR
    retry_after: ClassVar[int | None] = None
    """Seconds after which the same request may succeed (sent as ``Retry-After``)."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]  # an instance may refine its class's code

    def to_dict(self) -> dict[str, dict[str, str]]:
        """The JSON body sent for this error, over HTTP and in error frames."""
        return {"error": {"code": self.code, "message": self.message}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code!r})"


class ClientError(RelayError):
    """The request or frame was wrong; retrying it unchanged will fail again."""

    code = "bad_request"
    http_status = 400
    close_code = codes.POLICY_VIOLATION


class BadRequest(ClientError):
    code = "bad_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class InvalidField(BadRequest):
    code = "invalid_field"


class InvalidTopic(BadRequest):
    code = "invalid_topic"


class TooManyTopics(BadRequest):
    code = "too_many_topics"


class PresenceDisabled(BadRequest):
    """Presence was asked for a topic whose namespace does not keep it (``presence =
    true`` in a ``[[namespace]]`` turns it on)."""

    code = "presence_disabled"


class UnsupportedFrame(BadRequest):
    code = "unsupported_frame"
    close_code = codes.UNSUPPORTED_DATA


class Unauthorized(ClientError):
    """No valid credentials; HTTP answers carry ``WWW-Authenticate: Bearer``."""

    code = "unauthorized"
    http_status = 401


class TokenExpired(Unauthorized):
    """The connection token's ``exp`` has passed: get a new token and reconnect."""

    code = "token_expired"


class InvalidToken(Unauthorized):
    """The connection token is forged, malformed or unusable: retrying will not help."""

    code = "invalid_token"


class Forbidden(ClientError):
    code = "forbidden"
    http_status = 403


class ForbiddenTopic(Forbidden):
    """A subscription or client publish that no namespace rule or grant allows; the
    message names the topic and the rule."""

    code = "forbidden_topic"


class NotFound(ClientError):
    code = "not_found"
    http_status = 404


class NotStreaming(ClientError):
    """A command was posted to ``/sse/<id>`` while no SSE stream of that registration
    is open: not on this node, and no node sharing the broker answered for one."""

    code = "not_streaming"
    http_status = 409


class MethodNotAllowed(ClientError):
    code = "method_not_allowed"
    http_status = 405


class RequestTimeout(ClientError):
    code = "request_timeout"
    http_status = 408


class PayloadTooLarge(ClientError):
    code = "payload_too_large"
    http_status = 413
    close_code = codes.MESSAGE_TOO_BIG


class MessageTooLarge(PayloadTooLarge):
    """A client publish over its namespace's ``max_message_size``. Unlike a frame over
    ``--max-message-size`` it does not close a JSON-mode connection."""

    code = "message_too_large"


class HeadersTooLarge(ClientError):
    code = "headers_too_large"
    http_status = 431


class UpgradeRequired(ClientError):
    code = "upgrade_required"
    http_status = 426


class TooManyRegistrations(ClientError):
    """The user already holds ``max_registrations_per_user`` registrations. Unlike other
    client errors, the same request succeeds once one of them is deleted or expires."""

    code = "too_many_registrations"
    http_status = 429


class RateLimited(ClientError):
    """A connection publishes faster than its namespace's ``publish_rate`` allows; the
    same publish succeeds a little later. The connection stays open (JSON mode)."""

    code = "rate_limited"
    http_status = 429


class TooManyConnectionsPerIp(ClientError):
    """The client's address holds ``max_connections_per_ip`` WebSockets on this node
    (behind a trusted proxy, the forwarded address); the same upgrade succeeds once one
    of them closes."""

    code = "too_many_connections_per_ip"
    http_status = 429
    retry_after = 5


class ServerError(RelayError):
    """Something on our side failed; the same request may succeed later."""

    code = "internal_error"
    http_status = 500
    close_code = codes.INTERNAL_ERROR


class BrokerUnavailable(ServerError):
    code = "broker_unavailable"
    http_status = 503
    retry_after = 2


class PublishOutcomeUnknown(BrokerUnavailable):
    """The engine stopped answering after a publish was sent to it: the publication may
    have been published. Retrying with the same ``idempotency_key`` publishes it once."""

    code = "publish_outcome_unknown"


class AuthorizationUnavailable(ServerError):
    """The authorization backend (``--authorize-url``) did not answer in time, or not
    with a decision: the topics it decides are refused (fail closed); try again later."""

    code = "authorization_unavailable"
    http_status = 503
    retry_after = 2


class ServiceUnavailable(ServerError):
    """A capacity limit of this process was reached; try again later or elsewhere."""

    code = "service_unavailable"
    http_status = 503
    retry_after = 5
