"""The rules of one WebSocket connection, without I/O: events in, actions out.

Every transport that carries a client (the native driver and aiohttp's
handshake, both pumping :mod:`websockets`' frames through
:class:`wsrelay.server.native.NativeConnection`; later SSE) asks a
:class:`Session` what to do, so a rule is written once:

* :func:`admit` decides a handshake (origin, registration or token, format,
  upgrade, a connection slot) and returns the session, or raises the
  :class:`~wsrelay.errors.ClientError` to answer with;
* :meth:`Session.on_text` carries out one command through the :class:`Relay`
  and answers it: an acknowledgement, an error frame, or (raw mode) a close; a
  broker failure is an error frame like any other, on every transport;
* :meth:`Session.on_binary` and :meth:`Session.on_control_frames` answer the other
  inputs, :meth:`Session.refusal` an attach that failed before the upgrade was answered;
* :meth:`Session.closing` and :meth:`Session.ended` keep the close
  bookkeeping: who closed, with which code and why, and a close reason that is
  always valid UTF-8 within the 123 bytes a close frame allows.

A session performs no I/O itself. The relay calls it makes are awaited, which
is why :meth:`Session.on_text` is a coroutine; what reaches the client is
returned as a :class:`Send` or :class:`Close` for the driver to carry out.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from wsrelay import codes
from wsrelay.core.commands import PresenceQuery, decode_command, request_id
from wsrelay.core.fanout import Publication
from wsrelay.core.history import Position, Receipt
from wsrelay.core.patterns import is_pattern
from wsrelay.core.payload import message_text
from wsrelay.core.presence import joins_and_leaves
from wsrelay.core.registry import Client
from wsrelay.core.rules import (
    NO_GRANTS,
    Grants,
    JoinLeaveLimiter,
    Namespace,
    PublishLimiter,
    Rules,
)
from wsrelay.core.schema import (
    MAX_PRESENCE_FRAME,
    ClientPublish,
    ErrorDetail,
    ErrorFrame,
    PresenceClient,
    PresenceFrame,
    PresenceStatsFrame,
    PublishedFrame,
    SubscribedFrame,
    TopicPosition,
)
from wsrelay.core.schema import encode as encode_json
from wsrelay.errors import (
    BadRequest,
    BrokerUnavailable,
    ClientError,
    InvalidField,
    InvalidToken,
    NotFound,
    RelayError,
    ServerError,
    ServiceUnavailable,
    UnsupportedFrame,
)

log = logging.getLogger("wsrelay.server")

MAX_CLOSE_REASON: Final = 123
"""RFC 6455 5.5: a control frame's payload is at most 125 bytes, 2 of them the code."""

ABNORMAL_CLOSURE: Final = 1006
"""RFC 6455: no close frame was exchanged (never sent on the wire; for logs and metrics)."""

CONTROL_FRAME_BURST: Final = 100
"""Pings and pongs a client may send at once before the rate below applies."""

CONTROL_FRAME_RATE: Final = 20.0
"""Pings and pongs per second a client may keep sending. A client's keep-alive needs
one every few seconds; past this the client is flooding, and each control frame costs
the server a parse (and a ping, a pong), so it is closed with
:data:`wsrelay.codes.POLICY_VIOLATION`."""

FORMATS: Final = ("json", "raw")

BINARY_REFUSED: Final = "binary frames are not supported; send JSON text"


def close_reason(reason: str) -> str:
    """``reason`` cut to at most :data:`MAX_CLOSE_REASON` bytes of UTF-8, never inside a
    character (a cut character would make the client fail the connection with 1007)."""
    encoded = reason.encode()
    if len(encoded) <= MAX_CLOSE_REASON:
        return reason
    return encoded[:MAX_CLOSE_REASON].decode(errors="ignore")


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``payload`` to the client as one text message (after what is queued), then
    each of ``more``, each as one text message."""

    payload: bytes
    more: tuple[bytes, ...] = ()
    reply: bool = False
    """``payload`` answers a request (a publish, a presence query) and concerns no one
    else: a one-way transport (SSE) returns it to the caller rather than streaming it.
    A subscription's acknowledgement is streamed: it moves the stream's positions."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with ``code``; ``reason`` is already valid for a close frame."""

    code: int
    reason: str
    fail: bool = False
    """Fail the connection (RFC 6455 7.1.7): end it once the close frame is written,
    without reading anything more (a flood, invalid UTF-8)."""


Action = Send | Close


class Refusal(Exception):
    """A command was refused: ``error`` says why, ``request`` is the refused publish's
    or query's ``id`` (None for others). Each transport answers it its own way: an
    error frame (WebSocket, JSON), a close (raw), the HTTP error (SSE's calls)."""

    def __init__(self, error: RelayError, request: int | str | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.request = request


UNKNOWN_POSITION: Final = Position("", 0)
"""Stands for a position a client had but could not say: never recovered (no epoch is
empty), so the topic is answered ``recovered: false`` at its current position."""


@dataclass(frozen=True, slots=True)
class Closed:
    """How a connection ended, for its log line and the close-code metric."""

    code: int
    reason: str
    by: str
    """``server`` or ``client``: who closed (or failed) the connection."""
    seconds: float


class Claims(Protocol):
    """What a verified connection token grants."""

    @property
    def user(self) -> str: ...

    @property
    def topics(self) -> tuple[str, ...]: ...


class Slots(Protocol):
    """The connection limit: taken by :func:`admit`, given back by :meth:`Session.release`."""

    def acquire(self) -> None: ...

    def release(self) -> None: ...


class Followed(Protocol):
    """What a subscription command answers (:class:`wsrelay.relay.Followed`)."""

    @property
    def positions(self) -> Mapping[str, tuple[Position, bool | None]]: ...

    @property
    def replay(self) -> Iterable[Publication]: ...


class PublishedLike(Protocol):
    """What a publish answers (:class:`wsrelay.relay.Published`)."""

    @property
    def receipt(self) -> Receipt: ...


class RelayLike(Protocol):
    """The part of :class:`wsrelay.relay.Relay` a session uses."""

    rules: Rules

    async def lookup(self, client_id: str) -> Client: ...
    async def register(
        self, user_id: int | str | None, topics: Iterable[str] = (), grants: Grants = NO_GRANTS
    ) -> Client: ...
    async def unregister(self, client_id: str) -> None: ...
    async def set_topics(
        self, client: Client, topics: Iterable[str], since: Mapping[str, Position] | None = None
    ) -> Followed: ...
    async def subscribe(
        self, client: Client, topics: Iterable[str], since: Mapping[str, Position] | None = None
    ) -> Followed: ...
    async def unsubscribe(self, client: Client, topics: Iterable[str]) -> None: ...
    def check_client_publish(self, client: Client, topic: str, message: str) -> Namespace: ...
    async def publish(
        self,
        topic: str,
        message: str,
        user_id: int | str | None = None,
        idempotency_key: str | None = None,
        skip: str | None = None,
        *,
        json: bool = False,
        by: Client | None = None,
    ) -> PublishedLike: ...
    def check_presence_query(self, client: Client, topic: str) -> None: ...
    async def presence_of(self, topic: str) -> list[PresenceClient]: ...
    async def presence_stats(self, topic: str) -> tuple[int, int]: ...


@dataclass(frozen=True, slots=True)
class Gate:
    """What admission needs, as plain values (no web framework's application)."""

    relay: RelayLike
    check_origin: Callable[[str | None], None]
    """Raises :class:`~wsrelay.errors.Forbidden` for an origin that is not allowed."""
    verify_token: Callable[[str], Claims] | None
    """Verifies a connection token, or None if tokens are not enabled."""
    slots: Slots
    clock: Callable[[], float] = time.monotonic
    """Monotonic seconds, for the client publish rate."""


async def admit(
    gate: Gate,
    client_id: str | None,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    check_upgrade: Callable[[], None],
    *,
    one_way: bool = False,
) -> Session:
    """Decide a handshake for ``/ws/<client_id>`` (or, if ``client_id`` is None,
    ``/ws?token=...``), in the order a client can act on: origin (403: the ``Origin``
    header, and the ``origin`` query parameter if there is one), the
    registration or token (404/401), the format (400), the upgrade itself (426,
    ``check_upgrade``), a connection slot (503), and only then any registration
    made from a token. ``headers`` is read with lower-case names.

    ``one_way``: a transport that carries no commands of its own (SSE, whose commands
    come by HTTP calls): JSON only (its events carry the positions), and the topics are
    held from the attach until :meth:`Session.resume` recovers them.

    Raises:
        ClientError: the handshake is refused; the error knows its status.
        ServerError: the registration store is unreachable or the node is full (503).
    """
    gate.check_origin(headers.get("origin"))  # 403 before anything
    if "origin" in query:
        # The page wsrelay.js's check (a plain GET) speaks for: a browser sends no Origin
        # header with a GET to the page's own origin. It can only make a request refused.
        gate.check_origin(query["origin"])
    relay = gate.relay
    if client_id is not None:
        client = await relay.lookup(client_id)  # 404
        raw, recover = _format(query, one_way)
        check_upgrade()
        gate.slots.acquire()
        return Session(gate, client, raw, temporary=False, recover=recover)
    if gate.verify_token is None:
        raise NotFound(
            "connection tokens are not enabled on this server (--jwt-secret or "
            "--jwt-public-key-file); register with POST /register and use /ws/<id>"
        )
    token = query.get("token")
    if not token:
        raise InvalidToken("pass the connection token as /ws?token=<token>")
    claims = gate.verify_token(token)  # 401 token_expired / invalid_token
    raw, recover = _format(query, one_way)  # refuse a doomed request before registering
    check_upgrade()
    gate.slots.acquire()
    # Claims without grants (an older verifier) hold none: today's behaviour.
    grants: Grants = getattr(claims, "grants", NO_GRANTS)
    try:
        client = await relay.register(claims.user, claims.topics, grants)  # 403 forbidden_topic
    except BaseException:
        gate.slots.release()
        raise
    return Session(gate, client, raw, temporary=True, recover=recover)


def _format(query: Mapping[str, str], one_way: bool = False) -> tuple[bool, bool]:
    """``format`` (raw or not) and ``recover`` (hold the topics' publications until the
    first command, which recovers them) of a handshake's query; a one-way transport's
    are always JSON and recovering (:meth:`Session.resume` is its first command)."""
    if one_way:
        if query.get("format", "json") != "json":
            raise BadRequest("an SSE stream carries JSON events only: format=raw needs a WebSocket")
        return False, True
    fmt = query.get("format", "json")
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    recover = query.get("recover", "false")
    if recover not in RECOVER_VALUES:
        raise BadRequest(f"recover must be true or false, not {recover!r}")
    if fmt == "raw" and recover in ("true", "1"):
        raise BadRequest("recover needs format=json: raw messages carry no offsets")
    return fmt == "raw", recover in ("true", "1")


RECOVER_VALUES: Final = ("true", "false", "1", "0")


class Session:
    """One admitted connection's state and rules; see the module docstring.

    Lifecycle: :func:`admit` makes it; the driver calls :meth:`open` once the
    upgrade is answered, feeds it inputs, calls :meth:`ended` once the
    connection is gone and :meth:`release` last.
    """

    __slots__ = (
        "_allowance",
        "_checked",
        "_join_leave",
        "_limiter",
        "client",
        "closed_with",
        "gate",
        "opened_at",
        "raw",
        "recover",
        "temporary",
    )

    def __init__(
        self, gate: Gate, client: Client, raw: bool, *, temporary: bool, recover: bool = False
    ) -> None:
        self.gate = gate
        self.client = client
        self.raw = raw
        """Raw mode: publications are the bare message; errors close the connection."""
        self.temporary = temporary
        """Registered from a connection token: unregistered when the connection ends."""
        self.recover = recover
        """The client will recover its topics with its first command: hold them until then."""
        self.opened_at = 0.0
        self.closed_with: tuple[int, str] | None = None
        """The code and reason this side closed with, once it did."""
        self._allowance = float(CONTROL_FRAME_BURST)
        self._checked = 0.0
        self._limiter: PublishLimiter | None = None
        """The client publish rate's buckets, made at the first publish."""
        self._join_leave = JoinLeaveLimiter()
        """How often the client may join and leave topics that announce it."""

    def open(self, now: float) -> None:
        """The upgrade was answered at ``now`` (monotonic seconds)."""
        self.opened_at = now
        self._checked = now

    # -- inputs -------------------------------------------------------------------------------

    async def on_text(self, data: bytes | str) -> Action | None:
        """Carry out one text message, a command, and return its answer: the
        acknowledgement (JSON mode; none in raw mode), an error frame (JSON mode),
        or a close naming the problem (raw mode, where a frame would read as a
        message). Never raises: an unexpected failure closes with 1011."""
        if isinstance(data, bytes | bytearray | memoryview):
            try:
                data = bytes(data).decode()
            except UnicodeDecodeError as exc:
                # RFC 6455 8.1: invalid UTF-8 in a text message fails the connection.
                return self.closing(
                    codes.INVALID_PAYLOAD,
                    f"invalid UTF-8 in a text message at byte {exc.start}",
                    fail=True,
                )
        try:
            return await self.carry_out(data)
        except Refusal as refusal:
            error = refusal.error
            if isinstance(error, ServerError):  # the broker went away: this command failed
                error = ClientError(error.message, code=error.code)
            return self.report(error, refusal.request)
        except Exception:
            log.exception("unexpected error in a WebSocket command")
            return self.closing(codes.INTERNAL_ERROR, "internal error")

    async def carry_out(self, text: str) -> Action | None:
        """Carry out one command, ``text``, and return its answer: the acknowledgement
        (none in raw mode) with what follows it, or a publish's or query's answer
        (:attr:`Send.reply`). Every transport's commands come through here: the
        WebSocket's frames (:meth:`on_text`) and SSE's HTTP calls.

        Raises:
            Refusal: the command was refused (a client error, or the broker failed): its
                error and the refused publish's or query's ``id``.
        """
        followed: Followed | None = None
        request: int | str | None = None
        try:
            try:
                command = decode_command(text)
            except ClientError:
                request = request_id(text)  # a broken publish's error still names its id
                raise
            if isinstance(command, ClientPublish):
                request = command.id
                return await self._publish(command)
            if isinstance(command, PresenceQuery):
                request = command.id
                return await self._presence(command)
            relay, client, topics, since = (
                self.gate.relay,
                self.client,
                command.topics,
                command.since,
            )
            changes = joins_and_leaves(relay.rules, client.topics, command.name, topics)
            if changes:
                self._join_leave.take(changes, self.gate.clock())
            if command.name == "topics":
                followed = await relay.set_topics(client, topics, since)
            elif command.name == "subscribe":
                followed = await relay.subscribe(client, topics, since)
            else:
                await relay.unsubscribe(client, topics)
        except (ClientError, ServerError) as exc:
            raise Refusal(exc, request) from exc
        return self._acknowledge(followed)

    async def resume(self, since: Mapping[str, Position], *, unknown: bool = False) -> Action:
        """The first command of a one-way transport, which cannot send one: the client's
        own topics, recovering each named in ``since`` (what a reconnecting SSE stream's
        ``Last-Event-ID`` holds), as ``{"topics": [...], "since": ...}`` would. Positions
        of topics the client no longer has are ignored. ``unknown``: ``since`` is known
        to be incomplete (a truncated event id), so a topic it leaves out is answered
        ``recovered: false`` rather than resumed from now.

        Raises:
            RelayError: the broker failed (nothing was sent; refuse the stream).
        """
        client = self.client
        named = {topic for topic in client.topics if not is_pattern(topic)}
        asked = {topic: position for topic, position in since.items() if topic in named}
        if unknown:
            for topic in named - asked.keys():
                asked[topic] = UNKNOWN_POSITION
        followed = await self.gate.relay.set_topics(client, sorted(client.topics), asked)
        action = self._acknowledge(followed)
        assert action is not None  # a one-way transport is never raw
        return action

    def _acknowledge(self, followed: Followed | None) -> Action | None:
        """A subscription command's answer: the acknowledgement, then the replay."""
        if self.raw:
            # No acknowledgement; but what was held back while the command ran still goes.
            texts = [p.message.encode() for p in followed.replay] if followed else []
            return Send(texts[0], tuple(texts[1:])) if texts else None
        if followed is None:
            return Send(encode_json(SubscribedFrame(sorted(self.client.topics))))
        positions = {
            topic: TopicPosition(position.offset, position.epoch, recovered)
            for topic, (position, recovered) in followed.positions.items()
        }
        ack = encode_json(SubscribedFrame(sorted(self.client.topics), positions))
        return Send(ack, tuple(publication.envelope() for publication in followed.replay))

    async def _publish(self, command: ClientPublish) -> Action | None:
        """A client publish: allowed by the topic's namespace (rule, message size), within
        the connection's rate there, then published as ``POST /publish`` does."""
        relay, client = self.gate.relay, self.client
        message, is_json = message_text(command.message, "publish.message")
        namespace = relay.check_client_publish(client, command.topic, message)
        if self._limiter is None:
            self._limiter = PublishLimiter()
        self._limiter.take(namespace, self.gate.clock())
        skip = client.id if command.skip_self else None
        key = command.idempotency_key
        if key is not None:
            # Keys are the publisher's own: another client's (or the backend's) publish
            # with the same text must not be taken for a repeat of this one.
            key = f"client:{client.user if client.user is not None else client.id}:{key}"
        published = await relay.publish(
            command.topic, message, None, key, skip, json=is_json, by=client
        )
        if self.raw:
            return None  # raw mode acknowledges nothing
        receipt = published.receipt
        position = receipt.position
        frame = PublishedFrame(position.offset, position.epoch, command.id, receipt.duplicate)
        return Send(encode_json(frame), reply=True)

    async def _presence(self, query: PresenceQuery) -> Action:
        """``presence`` or ``presence_stats``: allowed to a client that may subscribe to
        the topic, where its namespace keeps presence; answered in JSON mode only."""
        if self.raw:
            raise InvalidField(f"{query.name} is answered in JSON: connect without format=raw")
        relay = self.gate.relay
        relay.check_presence_query(self.client, query.topic)
        if query.name == "presence":
            entries = await relay.presence_of(query.topic)
            frame = PresenceFrame(query.topic, entries[:MAX_PRESENCE_FRAME], len(entries), query.id)
            return Send(encode_json(frame), reply=True)
        clients, users = await relay.presence_stats(query.topic)
        stats = PresenceStatsFrame(query.topic, clients, users, query.id)
        return Send(encode_json(stats), reply=True)

    def on_binary(self) -> Action:
        """A binary message arrived (whole): refused."""
        return self.report(UnsupportedFrame(BINARY_REFUSED))

    def on_control_frames(self, count: int, now: float) -> Close | None:
        """``count`` pings or pongs arrived at ``now``: a close if the client floods
        (a token bucket of :data:`CONTROL_FRAME_BURST` refilled at
        :data:`CONTROL_FRAME_RATE` per second)."""
        allowance = self._allowance + (now - self._checked) * CONTROL_FRAME_RATE
        self._checked = now
        allowance = min(allowance, float(CONTROL_FRAME_BURST)) - count
        self._allowance = allowance
        if allowance >= 0:
            return None
        return self.closing(
            codes.POLICY_VIOLATION,
            f"too many pings and pongs: at most {CONTROL_FRAME_BURST} at once and "
            f"{CONTROL_FRAME_RATE:g} per second",
            fail=True,
        )

    def refusal(self, error: Exception) -> RelayError:
        """The relay would not attach the connection, before the upgrade was answered:
        the error to answer the handshake with (a registration deleted meanwhile is a 404,
        a broker failure a 503 with ``Retry-After``)."""
        if isinstance(error, RelayError):
            return error
        log.error("could not attach a connection", exc_info=error)
        return ServerError("internal error; see the server log")

    def closed_before_open(self) -> RelayError:
        """The connection was closed while it was being attached (a newer connection to
        the same registration, or ``DELETE /register``): the error to answer with."""
        code, reason = self.closed_with or (codes.NORMAL, "closed")
        if code == codes.NORMAL:
            return NotFound("this registration was deleted", code="unknown_client")
        return ServiceUnavailable(f"the connection was closed before it opened: {reason}")

    def report(self, error: RelayError, request: int | str | None = None) -> Action:
        """An error frame (naming the refused publish's ``request`` id, if any) in JSON
        mode; in raw mode a close whose reason names it."""
        if self.raw:
            return self.closing(error.close_code, error.message)
        detail = ErrorDetail(code=error.code, message=error.message)
        return Send(encode_json(ErrorFrame(detail, request)))

    # -- closing ------------------------------------------------------------------------------

    def closing(self, code: int, reason: str, *, fail: bool = False) -> Close:
        """This side closes with ``code``: recorded (the first close counts) and
        returned with a reason fit for a close frame."""
        action = Close(code, close_reason(reason), fail)
        if self.closed_with is None:
            self.closed_with = (action.code, action.reason)
        return action

    def ended(
        self,
        now: float,
        *,
        received: tuple[int, str] | None = None,
        failed: tuple[int, str] | None = None,
    ) -> Closed:
        """The connection is gone: how it ended. ``received``: the client's close
        frame, if it closed first; ``failed``: the close the WebSocket library sent
        on a protocol error (1002, 1007, 1009)."""
        seconds = now - self.opened_at
        if self.closed_with is not None:
            return Closed(*self.closed_with, "server", seconds)
        if received is not None:
            return Closed(*received, "client", seconds)
        if failed is not None:
            return Closed(*failed, "server", seconds)
        return Closed(ABNORMAL_CLOSURE, "", "client", seconds)

    async def release(self) -> None:
        """Give back what :func:`admit` took: the slot, and a registration made from
        a token. Call once, after the connection has ended."""
        self.gate.slots.release()
        if self.temporary:
            with contextlib.suppress(NotFound, BrokerUnavailable):  # deleted, or the store is down
                await self.gate.relay.unregister(self.client.id)
