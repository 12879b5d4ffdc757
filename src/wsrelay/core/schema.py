"""Shapes of what crosses the wire, and strict decoding into them.

HTTP bodies and WebSocket frames are described once, as msgspec structs. The
same structs validate input, encode output, and generate the JSON Schemas in
the OpenAPI document (:mod:`wsrelay.server.openapi`), so the document cannot
drift from what the server accepts.

User ids may be integers or strings and are compared as strings: ``42`` and
``"42"`` are the same user. ``null`` (or no user id) makes an anonymous client,
which receives only publications that target no user.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

from wsrelay.core.payload import MAX_DEPTH, JsonMessage, JsonValue
from wsrelay.errors import InvalidField, InvalidJSON

UserId = Annotated[
    int | str | None,
    msgspec.Meta(description='An integer or string; 42 and "42" are the same user.'),
]
Topic = Annotated[str, msgspec.Meta(description="A topic name; see the topic rule.")]

# -- HTTP request and response bodies ---------------------------------------------------


TopicPattern = Annotated[
    str,
    msgspec.Meta(
        description="A topic, or a pattern: * matches within a segment (segments are "
        "separated by .), > as the last segment matches the rest, {user} stands for the "
        "connection's user id."
    ),
]


class GrantsBody(msgspec.Struct, forbid_unknown_fields=True):
    """Topic patterns a client may subscribe and publish to where its namespace asks for
    a grant (``subscribe = "granted"``, ``publish = "granted"`` or ``"subscribers"``)."""

    subscribe: list[TopicPattern] = []
    publish: list[TopicPattern] = []


class RegisterRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /register``."""

    user_id: UserId = None
    topics: list[Topic] = []
    grants: GrantsBody | None = None


class RegisterResponse(msgspec.Struct):
    """Answer to ``POST /register``: ``url`` is where the client opens its WebSocket."""

    id: str
    url: str


class UnregisterResponse(msgspec.Struct):
    """Answer to ``DELETE /register/<id>``."""

    id: str
    unregistered: bool = True


IdempotencyKey = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=200,
        description="Publishes with the same key on the same topic within the "
        "idempotency window are published once; repeats answer the first position.",
    ),
]


ClientId = Annotated[
    str,
    msgspec.Meta(
        max_length=64,
        description="A client id (as returned by POST /register): that connection does "
        "not receive this publication, on any node (as a client's skip_self).",
    ),
]


class PublishRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /publish``. With ``user_id``, only that user's clients receive it.
    ``message`` is a string or any JSON value (:mod:`wsrelay.core.payload`)."""

    topic: Topic
    message: JsonMessage
    user_id: UserId = None
    idempotency_key: IdempotencyKey | None = None
    skip_client: ClientId | None = None


class PositionBody(msgspec.Struct):
    """A place in a topic's stream: ``offset`` of the last publication (0: none yet) in
    ``epoch``, a random id that changes whenever the topic's history is lost."""

    offset: int
    epoch: str


class PublishResponse(msgspec.Struct, omit_defaults=True):
    """Answer to ``POST /publish``: the number of connections on this node subscribed to
    it, and its position. ``duplicate``: a publish with the same idempotency key was
    accepted before; this one published nothing and answers that one's position."""

    recipients: int
    offset: int
    epoch: str
    duplicate: bool = False


MAX_BATCH_MESSAGES = 1000
"""Most messages one ``POST /publish/batch`` may carry (the body size limit also applies)."""


class BatchPublishRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /publish/batch``: several publishes in one request, applied in order."""

    messages: Annotated[
        list[PublishRequest], msgspec.Meta(min_length=1, max_length=MAX_BATCH_MESSAGES)
    ]


class TextPublishRequest(msgspec.Struct, forbid_unknown_fields=True):
    """:class:`PublishRequest` whose ``message`` is a string: what nearly every publish
    is, decoded at the cost it had before messages could be any JSON value."""

    topic: Topic
    message: str
    user_id: UserId = None
    idempotency_key: IdempotencyKey | None = None
    skip_client: ClientId | None = None


class TextBatchPublishRequest(msgspec.Struct, forbid_unknown_fields=True):
    """:class:`BatchPublishRequest` whose messages are all strings."""

    messages: Annotated[
        list[TextPublishRequest], msgspec.Meta(min_length=1, max_length=MAX_BATCH_MESSAGES)
    ]


_FAST_MISSES: Final = (msgspec.ValidationError, msgspec.DecodeError, UnicodeError, RecursionError)


def decode_publish(data: bytes) -> PublishRequest | TextPublishRequest:
    """The body of ``POST /publish``: decoded as a string message first (the common case,
    at its old cost), else with the message kept as :class:`msgspec.Raw` (any JSON value),
    which also names whatever is wrong. Pass ``message`` to
    :func:`~wsrelay.core.payload.message_text`.

    Raises:
        InvalidJSON, InvalidField: as :func:`decode`.
    """
    try:
        return _decode_text_publish(data)
    except _FAST_MISSES:
        return decode(data, PublishRequest)


def decode_batch(data: bytes) -> BatchPublishRequest | TextBatchPublishRequest:
    """The body of ``POST /publish/batch``, as :func:`decode_publish` decodes one."""
    try:
        return _decode_text_batch(data)
    except _FAST_MISSES:
        return decode(data, BatchPublishRequest)


_decode_text_publish = msgspec.json.Decoder(TextPublishRequest).decode
_decode_text_batch = msgspec.json.Decoder(TextBatchPublishRequest).decode


class BatchPublishResponse(msgspec.Struct):
    """Answer to ``POST /publish/batch``: each message's recipient count on this node and
    position, in the order of the request."""

    recipients: list[int]
    positions: list[PositionBody]


MAX_HISTORY_PAGE = 1000
"""Most publications one ``GET /history`` answers."""

EMPTY_EPOCH_PREFIX: Final = "g:"
"""How the epoch of an empty position begins: the position of a topic never published
(Redis answers ``g:<generation>:<ms>`` at offset 0, docs/decisions/0008). Recovered from
later, it is answered in the topic's own epoch, with the same numbering."""


class HistoryItem(msgspec.Struct):
    offset: int
    message: JsonValue
    user_id: str | None
    """The user it was published for, as a string; null: everyone."""


class HistoryResponse(msgspec.Struct):
    """Answer to ``GET /history``: kept publications of ``topic`` and its current
    position (``offset`` of the newest publication, ``epoch``)."""

    topic: str
    offset: int
    epoch: str
    publications: list[HistoryItem]


class StatsResponse(msgspec.Struct):
    """Answer to ``GET /stats``: this node's live counters (for the console and
    ``wsrelay stats``). Counters count since the node started; rates are their
    differences over time."""

    node: str
    version: str
    uptime: float
    """Seconds since this node started."""
    broker: Literal["up", "down"]
    connections: int
    registrations: int | None
    """All nodes' registrations (they share the store); None when it is unreachable."""
    topics: int
    """Topics with at least one subscriber connected to this node."""
    publishes: int
    """Publications accepted by this node's HTTP API."""
    deliveries: int
    """Publications handed to this node's connections, wherever they were published."""
    slow_consumers: int
    """Connections this node closed because their outbox overflowed."""
    workers: int = 1
    """How many processes the counters add up: with ``--workers N``, the workers of this
    ``wsrelay serve`` whose heartbeat is live (``node`` is the one that answered), each
    as of its last heartbeat; 1: this node alone. ``topics`` is then summed too (a
    topic served by two workers counts twice)."""


class NodeInfo(msgspec.Struct):
    """One node sharing the broker, as its last heartbeat described it (``GET /nodes``)."""

    id: str
    """The node's id (``node`` in its ``GET /stats``, and in presence entries)."""
    host: str
    """The machine's host name."""
    pid: int
    version: str
    group: str | None
    """The workers of one ``wsrelay serve --workers N`` share a group (host:port:pid of
    the supervising process); null: a process of its own."""
    started_at: float
    """When the node started, in seconds since the Unix epoch (the node's clock)."""
    uptime: float
    """Seconds the node had been up at its last heartbeat."""
    last_heartbeat: float
    """When it last wrote this, in seconds since the Unix epoch (the node's clock)."""
    connections: int
    topics: int
    publishes: int
    deliveries: int
    slow_consumers: int


class NodesResponse(msgspec.Struct):
    """Answer to ``GET /nodes``: every node sharing the broker whose heartbeat is live,
    oldest first."""

    node: str
    """The node that answered."""
    nodes: list[NodeInfo]


class TopicInfo(msgspec.Struct):
    topic: str
    subscribers: int
    """Connections on this node subscribed to the topic."""


class TopicsResponse(msgspec.Struct):
    """Answer to ``GET /topics``: topics with subscribers on this node, most first."""

    topics: list[TopicInfo]
    total: int
    """How many topics matched; more than ``len(topics)`` when the list was cut at ``limit``."""


class HealthResponse(msgspec.Struct):
    """Answer to ``GET /health``."""

    status: Literal["ok"]
    version: str
    broker: Literal["up", "down"]
    connections: int
    registrations: int | None
    """None when the store cannot count cheaply or is unreachable."""
    topics: int


class ReadyResponse(msgspec.Struct):
    """Answer to ``GET /ready``: 200 ``ready`` while this node accepts publishes,
    503 ``unavailable`` while it cannot (its broker is unreachable)."""

    status: Literal["ready", "unavailable"]


class ErrorDetail(msgspec.Struct):
    code: str
    message: str


class ErrorBody(msgspec.Struct):
    """Body of every 4xx/5xx answer and of WebSocket error frames."""

    error: ErrorDetail


# -- WebSocket frames -----------------------------------------------------------------------


class SincePosition(msgspec.Struct, forbid_unknown_fields=True):
    """The last publication a client saw on a topic."""

    offset: Annotated[int, msgspec.Meta(ge=0)]
    epoch: Annotated[str, msgspec.Meta(max_length=64)]


RequestId = Annotated[
    int | str,
    msgspec.Meta(description="Chosen by the client; echoed in the answer to the command."),
]


class ClientPublish(msgspec.Struct, forbid_unknown_fields=True):
    """``{"publish": {...}}``: publish ``message`` to ``topic`` as this client, if its
    namespace allows (``publish`` rule, ``max_message_size``, ``publish_rate``).
    ``skip_self``: this connection does not receive it. Answered by a ``published``
    frame, or an error frame, carrying ``id``."""

    topic: Topic
    message: JsonMessage
    id: RequestId | None = None
    skip_self: bool = False
    idempotency_key: IdempotencyKey | None = None


class ClientCommand(msgspec.Struct, forbid_unknown_fields=True):
    """A frame from client to server; exactly one of the command fields must be present.

    ``{"topics": [...]}`` replaces the subscriptions (the seed's command),
    ``{"subscribe": [...]}`` adds to them, ``{"unsubscribe": [...]}`` removes from them.
    ``since`` (with ``topics`` or ``subscribe``) asks, per topic, for every publication
    after the given position before the live stream. ``{"publish": {...}}`` publishes.
    """

    topics: list[Topic] | None = None
    subscribe: list[Topic] | None = None
    unsubscribe: list[Topic] | None = None
    since: dict[Topic, SincePosition] | None = None
    publish: ClientPublish | None = None
    presence: Topic | None = None
    """``{"presence": "chat:1", "id": 3}``: who is subscribed to the topic, on every node."""
    presence_stats: Topic | None = None
    """``{"presence_stats": "chat:1", "id": 4}``: how many clients and distinct users."""
    id: RequestId | None = None
    """With ``presence`` or ``presence_stats``: echoed in the answer (or error frame)."""


class PublishedFrame(msgspec.Struct, tag_field="type", tag="published", omit_defaults=True):
    """The answer to a client's ``publish``: its position (``offset`` in ``epoch``), and
    ``duplicate`` if its idempotency key was seen before (nothing was published)."""

    offset: int
    epoch: str
    id: int | str | None = None
    duplicate: bool = False


class MessageFrame(msgspec.Struct, tag_field="type", tag="message"):
    """A publication, as JSON-mode clients receive it, with its offset in the topic."""

    topic: str
    message: JsonValue
    offset: int


class TopicPosition(msgspec.Struct, omit_defaults=True):
    """Where a topic's stream continues for the client: publications after ``offset``
    in ``epoch`` follow. ``recovered`` answers a ``since``: true if every publication
    after it follows (replayed, then live), false if some are lost (the epoch changed,
    or the history no longer reaches back)."""

    offset: int
    epoch: str
    recovered: bool | None = None


class SubscribedFrame(msgspec.Struct, tag_field="type", tag="subscribed"):
    """Sent after each subscription command: the client's whole topic set, sorted, and
    the position of each topic the command subscribed to."""

    topics: list[str]
    positions: dict[str, TopicPosition] = {}


class GapFrame(msgspec.Struct, tag_field="type", tag="gap"):
    """Publications of ``topic`` were lost on the way to this client (the topic's history
    was lost or could not be read); the stream continues after ``offset`` in ``epoch``."""

    topic: str
    offset: int
    epoch: str


class StreamFrame(msgspec.Struct, tag_field="type", tag="stream"):
    """An SSE stream's first event: ``id`` is its registration's id (for a token's
    stream, the temporary registration made for it), to which its commands are
    posted (``POST /sse/<id>``)."""

    id: str


class CloseFrame(msgspec.Struct, tag_field="type", tag="close"):
    """An SSE stream's last event when the server ends it: the WebSocket close code it
    stands for (4008 slow consumer, 4500 replaced, 1000 unregistered…) and why."""

    code: int
    reason: str


class ErrorFrame(msgspec.Struct, tag_field="type", tag="error", omit_defaults=True):
    """Sent for a command the server could not apply; the connection stays open. ``id``:
    the refused ``publish``'s."""

    error: ErrorDetail
    id: int | str | None = None


# -- presence ------------------------------------------------------------------------------


class PresenceClient(msgspec.Struct):
    """One connection subscribed to a topic (by name), on some node. ``client`` is the
    connection's public id: the first 32 hex digits of the SHA-256 of its registration
    id (never the id itself, which is the capability to connect)."""

    client: str
    user: str | None
    """The connection's user id, as a string; null: anonymous."""
    node: str
    """The node holding the connection (``node`` in its ``GET /stats``)."""
    connected_at: float
    """When the connection opened, in seconds since the Unix epoch (the node's clock)."""


class PresenceResponse(msgspec.Struct):
    """Answer to ``GET /presence``: every connection subscribed to ``topic`` on every
    node, oldest connection first."""

    topic: str
    clients: list[PresenceClient]


class PresenceStatsResponse(msgspec.Struct):
    """Answer to ``GET /presence/stats``: how many connections are subscribed to
    ``topic`` on every node, and how many distinct users they belong to (anonymous
    connections count as clients, not users)."""

    topic: str
    num_clients: int
    num_users: int


class UserResponse(msgspec.Struct):
    """Answer to ``GET /users/<id>``: whether the user has a connection open, on any
    node and to any topic, and how many."""

    user_id: str
    online: bool
    connections: int


class DisconnectUserResponse(msgspec.Struct):
    """Answer to ``DELETE /users/<id>/connections``: the user's connections on every node
    are being closed with 4503 (``connections``: how many were open) and its
    ``registrations`` were deleted."""

    user_id: str
    connections: int
    registrations: int


class PresenceFrame(msgspec.Struct, tag_field="type", tag="presence", omit_defaults=True):
    """The answer to ``{"presence": topic}``: the topic's connections, on every node,
    oldest first, at most :data:`MAX_PRESENCE_FRAME` of them; ``total`` counts them all."""

    topic: str
    clients: list[PresenceClient]
    total: int
    id: int | str | None = None


MAX_PRESENCE_FRAME = 1000
"""Most connections one WebSocket ``presence`` answer lists (``GET /presence`` lists all)."""


class PresenceStatsFrame(
    msgspec.Struct, tag_field="type", tag="presence_stats", omit_defaults=True
):
    """The answer to ``{"presence_stats": topic}``."""

    topic: str
    num_clients: int
    num_users: int
    id: int | str | None = None


class JoinFrame(msgspec.Struct, tag_field="type", tag="join"):
    """A connection subscribed to ``topic`` (a namespace with ``join_leave``); sent to its
    other subscribers, on every node, never to the connection itself."""

    topic: str
    user: str | None
    client: str


class LeaveFrame(msgspec.Struct, tag_field="type", tag="leave"):
    """A connection unsubscribed from ``topic`` or disconnected (see :class:`JoinFrame`)."""

    topic: str
    user: str | None
    client: str


# -- decoding ------------------------------------------------------------------------------

T = TypeVar("T")

_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}
encode = msgspec.json.Encoder().encode


def decode(data: bytes | str, into: type[T]) -> T:
    """Decode JSON ``data`` into ``into``, strictly (no type coercion).

    Raises:
        InvalidJSON: ``data`` is not JSON, or not UTF-8.
        InvalidField: it is JSON of the wrong shape; the message names the field.
    """
    decoder = _decoders.get(into)
    if decoder is None:
        decoder = _decoders[into] = msgspec.json.Decoder(into)
    try:
        return decoder.decode(data)  # type: ignore[no-any-return]
    except RecursionError:  # a message's JSON value nested past the interpreter's limit
        raise InvalidField(
            f"arrays and objects nest too deeply (a message may nest at most {MAX_DEPTH})"
        ) from None
    except msgspec.ValidationError as exc:
        raise InvalidField(_describe(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidJSON(f"not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"not valid UTF-8: {exc.reason} at byte {exc.start}") from None


def _describe(exc: msgspec.ValidationError) -> str:
    # msgspec says "Expected `str`, got `int` - at `$.topic`"; keep it, it names the field.
    return str(exc)
