"""The asyncio client: :class:`Relay` (HTTP API) and :class:`Subscription` (WebSocket).

HTTP goes through one :class:`aiohttp.ClientSession` per :class:`Relay`; each
subscription holds one WebSocket opened with the ``websockets`` library, whose
background reader answers the server's pings even while the application is busy
with a message. Nothing here imports the server side of wsrelay.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import aiohttp
import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed as WSConnectionClosed
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

from wsrelay.client._errors import (
    Banned,
    CommandRefused,
    ConnectionClosed,
    ConnectionFailed,
    HTTPError,
    NotConnected,
    NotFound,
    ProtocolError,
    PublishInterrupted,
    RelayError,
    Replaced,
    ServerError,
    TooManyRequests,
    Unregistered,
    frame_error,
    http_error,
)
from wsrelay.client._models import (
    Backoff,
    ClientPublished,
    Event,
    Grants,
    History,
    Message,
    NotRecovered,
    NotRecoveredReason,
    Position,
    Publish,
    Published,
    Reconnecting,
    Registration,
    Stats,
    Subscribed,
    Topics,
    UserId,
    parse_retry_after,
)
from wsrelay.client._presence import (
    Join,
    Leave,
    Presence,
    PresenceClient,
    PresenceStats,
    UserDisconnected,
    UserStatus,
)
from wsrelay.core.schema import EMPTY_EPOCH_PREFIX

DEFAULT_URL: Final = "http://127.0.0.1:8000"
MAX_BATCH: Final = 1000
"""Most messages the server accepts in one ``POST /publish/batch``."""
DEFAULT_BATCH_BYTES: Final = 512 * 1024
"""Largest batch body the client builds (the server's default limit is 1 MiB)."""

NO_CLOSE_FRAME: Final = 1006
TERMINAL_CLOSE_CODES: Final = frozenset({1000, 1002, 1003, 1007, 1008, 1009, 1010})
"""Standard codes after which reconnecting cannot help: the registration is gone
(1000), or the client sent something the server refuses (it would send it again).
Codes 4500-4999 are terminal too; every other code means "reconnect"."""

T = TypeVar("T")
Item = Publish | tuple[str, Any] | tuple[str, Any, UserId]

_encode = msgspec.json.Encoder().encode
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decode(data: bytes | str, into: type[T]) -> T:
    decoder = _decoders.get(into)
    if decoder is None:
        # float_hook: a message's number past a double's range (1e400) decodes as inf, as
        # the json module does, instead of failing the frame.
        decoder = _decoders[into] = msgspec.json.Decoder(into, float_hook=float)
    return decoder.decode(data)  # type: ignore[no-any-return]


class _ErrorDetail(msgspec.Struct):
    code: str
    message: str


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


class _TopicPosition(msgspec.Struct):
    offset: int
    epoch: str
    recovered: bool | None = None


class _Frame(msgspec.Struct):
    """Any frame the server sends in JSON mode; unknown types are skipped."""

    type: str
    topic: str = ""
    message: Any = ""
    offset: int = 0
    epoch: str = ""
    topics: list[str] = []
    positions: dict[str, _TopicPosition] = {}
    error: _ErrorDetail | None = None
    id: int | str | None = None
    duplicate: bool = False
    user: str | None = None
    client: str = ""
    clients: list[PresenceClient] = []
    total: int | None = None
    num_clients: int = 0
    num_users: int = 0


GrantsLike = Grants | Mapping[str, Sequence[str]]
"""Grants as a :class:`Grants` or a mapping like ``{"publish": ["chat:*"]}``."""


def _grants(grants: GrantsLike | None) -> Grants | None:
    if grants is None or isinstance(grants, Grants):
        return grants
    if isinstance(grants, Mapping):
        unknown = set(grants) - {"subscribe", "publish"}
        if unknown:
            raise ValueError(f"grants: unknown action(s) {', '.join(sorted(unknown))}")
        for action in ("subscribe", "publish"):
            if isinstance(grants.get(action), str):
                raise ValueError(f"grants: {action} must be a list of patterns, not a string")
        return Grants(list(grants.get("subscribe", ())), list(grants.get("publish", ())))
    raise TypeError(f"grants must be a Grants or a mapping, not {type(grants).__name__}")


class _PublishAnswer(msgspec.Struct):
    recipients: int
    offset: int = 0
    epoch: str = ""
    duplicate: bool = False


class _BatchAnswer(msgspec.Struct):
    recipients: list[int]
    positions: list[Position] = []


def normalize_url(url: str) -> str:
    """``url`` as an ``http(s)://`` base without a trailing slash; ``ws(s)://`` and a
    missing scheme are accepted (``127.0.0.1:8000`` means ``http://127.0.0.1:8000``)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    scheme, rest = url.split("://", 1)
    scheme = {"ws": "http", "wss": "https"}.get(scheme.lower(), scheme.lower())
    return f"{scheme}://{rest}"


def _redact(ws_url: str) -> str:
    """``ws_url`` with the client id (a secret capability) cut to 8 characters."""
    base, _, client_id = ws_url.rpartition("/ws/")
    return f"{base}/ws/{client_id[:8]}…" if base else ws_url


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class Relay:
    """A client of one wsrelay server.

    Use it as an async context manager (or call :meth:`close`)::

        async with Relay("http://127.0.0.1:8000", api_key="secret") as relay:
            await relay.publish("cats", "hello")
            async with relay.subscribe("cats", "dogs") as messages:
                async for message in messages:
                    print(message.topic, message.message)

    Args:
        url: the server's base URL (``http(s)://host:port``; ``ws(s)://`` works too).
        api_key: sent as ``Authorization: Bearer <key>`` to the routes that need it.
        timeout: seconds any one HTTP request, WebSocket handshake or subscription
            acknowledgement may take before :class:`ConnectionFailed` is raised.
        backoff: default reconnect policy of :meth:`subscribe`.
        batch_bytes: largest request body :meth:`publish_many` builds.
        session: an aiohttp session to use instead of one of the client's own
            (which it then does not close).

    Every method raises a :class:`RelayError`: :class:`ConnectionFailed` when the
    server cannot be reached, an :class:`HTTPError` subclass (``code`` and ``status``
    as the server sent them) when it refuses the request.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        backoff: Backoff | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self.timeout = timeout
        self.backoff = backoff or Backoff()
        self.batch_bytes = batch_bytes
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = session
        self._own_session = session is None
        self._subscriptions: set[Subscription] = set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every open subscription (deleting their registrations), then the session."""
        for subscription in list(self._subscriptions):
            await subscription.close()
        if self._session is not None and self._own_session:
            await self._session.close()
            self._session = None

    # -- HTTP API ---------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        message: Any,
        *,
        user_id: UserId = None,
        idempotency_key: str | None = None,
    ) -> Published:
        """Publish ``message`` to ``topic``; with ``user_id`` only that user's clients get
        it. Returns the number of connections on the server's node it was handed to, as a
        :class:`Published` (an ``int``) that also holds the publication's ``offset`` and
        ``epoch`` in the topic.

        ``message`` is a string, or any other value msgspec encodes as JSON (a dict, list,
        number, bool, None, a struct or dataclass...): subscribers receive that value, as
        :attr:`Message.message`. A :class:`msgspec.Raw` holding JSON text is sent as is.
        A string is always a string, even one that holds JSON text.

        With ``idempotency_key``, publishes with the same key on the same topic within the
        server's idempotency window are published once (a repeat answers
        ``duplicate=True`` and the first one's position). A 503 that leaves the outcome
        unknown raises :class:`PublishOutcomeUnknown`: publishing again with the same key
        is then safe.
        """
        body = Publish(topic, message, user_id, idempotency_key)
        answer = await self._request("POST", "/publish", _PublishAnswer, body=_encode(body))
        return Published(answer.recipients, answer.offset, answer.epoch, answer.duplicate)

    async def publish_many(self, messages: Iterable[Item]) -> list[Published]:
        """Publish several messages in order, in as few ``POST /publish/batch`` requests
        as the server's limits allow (1000 messages and ``batch_bytes`` per request).

        ``messages`` holds :class:`Publish` structs (which may carry an
        ``idempotency_key``) or ``(topic, message)`` / ``(topic, message, user_id)``
        tuples; a message is a string or any JSON value, as in :meth:`publish`. Returns
        each message's recipient count as a :class:`Published` (an
        ``int`` with the message's ``offset`` and ``epoch``). A refused batch raises
        (e.g. :class:`BadRequest` for a bad topic); the batches sent before it were
        published.
        """
        recipients: list[Published] = []
        parts: list[bytes] = []
        size = 0
        for item in messages:
            part = _encode(item if isinstance(item, Publish) else Publish(*item))
            if parts and (len(parts) >= MAX_BATCH or size + len(part) + 1 > self.batch_bytes):
                recipients += await self._publish_batch(parts)
                parts, size = [], 0
            parts.append(part)
            size += len(part) + 1
        if parts:
            recipients += await self._publish_batch(parts)
        return recipients

    async def _publish_batch(self, parts: list[bytes]) -> list[Published]:
        body = b'{"messages":[' + b",".join(parts) + b"]}"
        answer = await self._request("POST", "/publish/batch", _BatchAnswer, body=body)
        positions = answer.positions or [Position(0, "")] * len(answer.recipients)
        return [
            Published(count, position.offset, position.epoch)
            for count, position in zip(answer.recipients, positions, strict=True)
        ]

    async def history(
        self,
        topic: str,
        *,
        since: int | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> History:
        """``GET /history``: the publications of ``topic`` the server still keeps, with
        the topic's current position. ``since``: only those after this offset;
        ``limit``: at most this many (the server's default is 100, its maximum 1000);
        ``reverse``: newest first. Offsets are those of :attr:`History.epoch`: compare
        them with a position of another epoch and they mean nothing."""
        params = {"topic": topic}
        if since is not None:
            params["since"] = str(since)
        if limit is not None:
            params["limit"] = str(limit)
        if reverse:
            params["reverse"] = "true"
        return await self._request("GET", "/history", History, params=params)

    async def presence(self, topic: str) -> Presence:
        """``GET /presence?topic=``: every connection subscribed to ``topic`` on every
        node, oldest first (its namespace must have ``presence = true``, else
        :class:`PresenceDisabled`). Needs the API key, if the server has one."""
        return await self._request("GET", "/presence", Presence, params={"topic": topic})

    async def presence_stats(self, topic: str) -> PresenceStats:
        """``GET /presence/stats?topic=``: how many connections are subscribed to
        ``topic`` on every node, and how many distinct users they belong to."""
        return await self._request("GET", "/presence/stats", PresenceStats, params={"topic": topic})

    async def user(self, user_id: int | str) -> UserStatus:
        """``GET /users/<id>``: whether the user has connections open, on any node and to
        any topic, and how many."""
        return await self._request("GET", f"/users/{quote(str(user_id), safe='')}", UserStatus)

    async def disconnect_user(self, user_id: int | str) -> UserDisconnected:
        """``DELETE /users/<id>/connections``: close every connection of the user, on
        every node, with 4503 (its subscriptions end with :class:`Banned` and do not
        reconnect), and delete its registrations. Registering the user again (or giving
        it a connection token) lets it back."""
        path = f"/users/{quote(str(user_id), safe='')}/connections"
        return await self._request("DELETE", path, UserDisconnected)

    async def stats(self) -> Stats:
        """``GET /stats``: the node's live counters."""
        return await self._request("GET", "/stats", Stats)

    async def topics(self, prefix: str = "", limit: int = 100) -> Topics:
        """``GET /topics``: topics with subscribers on the node, busiest first, at most
        ``limit`` (1 to 1000) of those starting with ``prefix``."""
        params = {"prefix": prefix, "limit": str(limit)}
        return await self._request("GET", "/topics", Topics, params=params)

    async def register(
        self,
        user_id: UserId = None,
        topics: Sequence[str] = (),
        *,
        grants: GrantsLike | None = None,
    ) -> Registration:
        """``POST /register``: a new client id and its WebSocket URL. :meth:`subscribe`
        does this for you.

        ``grants``: topic patterns the client may subscribe and publish to where a
        namespace asks for a grant, as :class:`Grants` or ``{"subscribe": [...],
        "publish": [...]}`` (``{user}`` stands for ``user_id``). Raises
        :class:`ForbiddenTopic` (403) if a namespace forbids one of ``topics``."""
        fields: dict[str, Any] = {"user_id": user_id, "topics": list(topics)}
        checked = _grants(grants)
        if checked is not None:  # only then: a server older than grants refuses the field
            fields["grants"] = checked
        body = _encode(fields)
        return await self._request("POST", "/register", Registration, body=body)

    async def unregister(self, client_id: str) -> None:
        """``DELETE /register/<id>``: forget a registration and close its connection
        (with 1000). Raises :class:`NotFound` if the id is unknown."""
        await self._request("DELETE", f"/register/{client_id}", None)

    async def _request(
        self,
        method: str,
        path: str,
        into: type[T] | None,
        *,
        body: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> T:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with (
                asyncio.timeout(self.timeout),
                self._session.request(
                    method, self.url + path, data=body, params=params, headers=headers
                ) as response,
            ):
                status = response.status
                raw = await response.read()
                retry_after = response.headers.get("Retry-After")
        except TimeoutError:
            raise ConnectionFailed(
                f"cannot reach {self.url}: no answer within {self.timeout:g} s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectionFailed(f"cannot reach {self.url}: {_one_line(exc)}") from exc
        if status >= 400:
            raise _error_from(status, raw, retry_after)
        try:
            return _decode(raw, into) if into is not None else None  # type: ignore[return-value]
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(
                f"{method} {self.url}{path} answered HTTP {status} with an unexpected body: {exc}",
                status=status,
            ) from None

    # -- subscriptions ----------------------------------------------------------------------

    def subscribe(
        self,
        *topics: str,
        user_id: UserId = None,
        on_event: Callable[[Event], object] | None = None,
        backoff: Backoff | None = None,
        since: Mapping[str, Position] | None = None,
        grants: GrantsLike | None = None,
    ) -> Subscription:
        """Receive every message published to ``topics`` (and, with ``user_id``, those
        targeted at that user) as :class:`Message` objects.

        ``async with relay.subscribe(...) as sub`` returns once the server has confirmed
        the subscription, so nothing published afterwards is missed; ``async for``
        over the result without ``async with`` connects on the first iteration. See
        :class:`Subscription` for reconnecting, recovery and how it ends.

        ``since`` (optional) resumes where an earlier subscription stopped, e.g. one of
        a previous run of the program: for each topic it names, the publications after
        that position (saved from :attr:`Subscription.positions`, or a
        :class:`Message`'s ``offset`` and ``epoch``) come first; a topic that cannot be
        resumed is reported with a :class:`NotRecovered` event.

        ``grants`` go with the registration (see :meth:`register`), each time it
        registers. The subscription can publish over its own connection too
        (:meth:`Subscription.publish`).
        """
        if not topics:
            raise ValueError("subscribe needs at least one topic (connect() subscribes to none)")
        return self._subscription(topics, user_id, on_event, backoff, since, grants)

    def connect(
        self,
        *,
        user_id: UserId = None,
        grants: GrantsLike | None = None,
        on_event: Callable[[Event], object] | None = None,
        backoff: Backoff | None = None,
    ) -> Subscription:
        """A client connection subscribed to no topic, to publish from as a client
        (:meth:`Subscription.publish`), registered with ``user_id`` and ``grants``::

            async with relay.connect(user_id=42, grants={"publish": ["chat:*"]}) as client:
                await client.publish("chat:1", "hello")

        It reconnects like any :class:`Subscription`, but only while iterated."""
        return self._subscription((), user_id, on_event, backoff, None, grants)

    def _subscription(
        self,
        topics: Sequence[str],
        user_id: UserId,
        on_event: Callable[[Event], object] | None,
        backoff: Backoff | None,
        since: Mapping[str, Position] | None,
        grants: GrantsLike | None,
    ) -> Subscription:
        unknown = set(since or ()) - set(topics)
        if unknown:
            raise ValueError(f"since names topics not subscribed to: {', '.join(sorted(unknown))}")
        subscription = Subscription(
            self,
            topics,
            user_id=user_id,
            on_event=on_event,
            backoff=backoff or self.backoff,
            since=since,
            grants=_grants(grants),
        )
        self._subscriptions.add(subscription)
        return subscription


def _error_from(status: int, raw: bytes, retry_after: str | None = None) -> HTTPError:
    """The exception for an error answer with body ``raw`` and this ``Retry-After``."""
    seconds = parse_retry_after(retry_after)
    try:
        detail = _decode(raw, _ErrorBody).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        text = " ".join(raw[:200].decode("utf-8", "replace").split())
        return http_error(status, f"http_{status}", text or "no error body", seconds)
    return http_error(status, detail.code, detail.message, seconds)


def _closed_error(code: int, reason: str) -> ConnectionClosed | None:
    """The exception for a close after which the client must not reconnect, else None."""
    described = f"the server closed the connection with {code}" + (f": {reason}" if reason else "")
    if code == 1000:
        return Unregistered(
            f"the registration was deleted (close {code})", close_code=code, reason=reason
        )
    if code == 4503:
        return Banned(
            f"the user was disconnected by the backend (close {code})",
            close_code=code,
            reason=reason,
        )
    if code == 4500:
        return Replaced(
            f"another connection took this registration over (close {code})",
            close_code=code,
            reason=reason,
        )
    if code in TERMINAL_CLOSE_CODES or 4500 <= code <= 4999:
        return ConnectionClosed(described, close_code=code, reason=reason)
    return None


class _Lost(Exception):
    """The connection went away; reconnect."""

    def __init__(self, close_code: int | None, reason: str) -> None:
        super().__init__(reason)
        self.close_code = close_code
        self.reason = reason


class Subscription:
    """A registration and its WebSocket, as an async iterator of :class:`Message`.

    Made by :meth:`Relay.subscribe`. It registers the client (``POST /register``),
    connects, sends the topics and waits for the server's confirmation; then each
    iteration returns the next publication.

    **Reconnecting.** When the connection is lost (close 1001, 1006, 1011, 4000-4499
    or any other code not listed below) it reconnects to the same registration,
    waiting :class:`Backoff` delays between attempts; if the server no longer knows
    the id (404, e.g. it restarted with the memory store) it registers again, and it
    sends the topics again after every reconnect. An attempt refused with 429 or 5xx
    and a ``Retry-After`` header (a node shedding load answers ``POST /register`` or
    the upgrade with 503 and one) is followed by the wait the server asked for,
    capped and jittered (:meth:`Backoff.after`), instead of the backoff. ``on_event``
    receives a :class:`Reconnecting` before each attempt (with the delay, the reason
    and any ``retry_after``) and a :class:`Subscribed` after each successful
    (re)subscription. Reconnecting happens inside iteration: keep iterating. Failures
    of the *first* connection are raised at once instead (wrong API key, unreachable
    server, a 503: its :attr:`HTTPError.retry_after` says when the server wants the
    next try).

    **Recovery.** Nothing is missed across a reconnect while the server can help it:
    the subscription keeps each topic's :class:`Position` (the last message received,
    or where the server said the stream starts), connects with ``?recover=true`` and
    sends those positions with its topics (``since``); the server answers with every
    publication after them, then the live stream. Messages that arrive twice (same
    epoch, an offset already received) are dropped, so each is yielded once, in order.
    When a topic cannot be recovered (its history was lost, e.g. the server restarted
    on the memory broker, or the client was away too long) or the server reports
    publications lost on the way (a ``gap`` frame), ``on_event`` receives a
    :class:`NotRecovered` for that topic before any later message: reload what you
    derive from it from your own data. :attr:`positions` holds the current positions,
    for :meth:`Relay.subscribe`'s ``since`` in a later run.

    **Ending.** Iteration raises :class:`Unregistered` when the registration is deleted
    (close 1000), :class:`Replaced` when another connection takes it over (4500),
    :class:`ConnectionClosed` for the other terminal codes (1002, 1003, 1007-1010,
    4501-4999), and the :class:`HTTPError` that made a re-registration fail for good
    (e.g. :class:`Unauthorized` after the key was revoked); the subscription is then
    closed and further iteration stops (``StopAsyncIteration``), as it does after
    :meth:`close`. :meth:`close` (also called on leaving ``async with``, and by
    :meth:`Relay.close`) closes the WebSocket and deletes the registration.
    """

    def __init__(
        self,
        relay: Relay,
        topics: Sequence[str],
        *,
        user_id: UserId,
        on_event: Callable[[Event], object] | None,
        backoff: Backoff,
        since: Mapping[str, Position] | None = None,
        grants: Grants | None = None,
    ) -> None:
        self.relay = relay
        self.topics: tuple[str, ...] = tuple(topics)
        self.user_id = user_id
        self.grants = grants
        """The grants it registers with (None: none, today's behaviour)."""
        self.backoff = backoff
        self.id: str | None = None
        """The current registration id (it changes when the client registers again)."""
        self.reconnects = 0
        """How many times the subscription was restored after a loss."""
        self._on_event = on_event
        self._url: str | None = None
        self._ws: ClientConnection | None = None
        self._pending: deque[Message] = deque()
        self._started = False
        self._closed = False
        self._closing = asyncio.Event()
        self._delete_on_close = True
        self._rng = random.Random()
        self._positions: dict[str, Position] = dict(since or {})
        self._ready = False
        """The current connection's subscription is acknowledged: publishes may go."""
        self._publishes: dict[int, asyncio.Future[Any]] = {}
        """Client publishes sent and not answered yet, by id."""
        self._next_request = 0
        self._reading = False
        """A task is in ``recv`` on the WebSocket (the iteration, or a publish waiting
        for its answer while nobody iterates)."""
        self._read_done = asyncio.Event()
        self._read_done.set()
        self._deferred: BaseException | None = None
        """What a publish's read met that the iteration must act on (a lost connection,
        an error frame that answered no publish)."""

    @property
    def positions(self) -> dict[str, Position]:
        """Each topic's position: its last message received (including those not yet
        iterated over), or where the server said the stream starts. Empty before the
        first connection unless ``since`` was given. A copy."""
        return dict(self._positions)

    @property
    def url(self) -> str | None:
        """The WebSocket URL of the current registration (a secret, like the id)."""
        return self._url

    @property
    def closed(self) -> bool:
        """Whether the subscription has ended (closed, or stopped by a terminal error)."""
        return self._closed

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> Self:
        return self

    async def start(self) -> None:
        """Register, connect and wait for the server to confirm the topics. Raises the
        error of this first attempt (no retry) after cleaning up. Called by ``async
        with`` and by the first iteration; does nothing the second time."""
        if self._started:
            return
        self._started = True
        try:
            registered, lost_topics = await self._connect()
        except _Lost as lost:
            await self.close()
            raise ConnectionFailed(
                f"the connection to {self.relay.url} closed while subscribing: {lost.reason}"
            ) from None
        except BaseException:
            await self.close()
            raise
        self._emit(Subscribed(self._id(), self.topics, 0, registered))
        for event in lost_topics:  # topics of ``since`` that could not be resumed
            self._emit(event)

    async def __anext__(self) -> Message:
        if not self._started:
            await self.start()
        while True:
            if self._pending:
                return self._pending.popleft()
            if self._closed:
                raise StopAsyncIteration
            try:
                message = await self._receive()
                if message is not None:
                    return message
            except _Lost as lost:
                if self._closed:
                    raise StopAsyncIteration from None
                try:
                    await self._reconnect(lost)
                except Exception:
                    await self.close()
                    raise
            except Exception:  # a terminal close or a refused command; not a cancellation
                await self.close()
                raise

    async def close(self) -> None:
        """Close the connection and delete the registration (unless it is already gone
        or another connection replaced this one). Safe to call more than once and from
        another task; a pending iteration then stops."""
        self._closed = True
        self._ready = False
        self._closing.set()
        self.relay._subscriptions.discard(self)
        self._interrupt("the subscription was closed")
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        client_id, self.id = self.id, None
        if client_id is not None and self._delete_on_close:
            with contextlib.suppress(RelayError):
                await self.relay.unregister(client_id)

    # -- internals ---------------------------------------------------------------------------

    def _id(self) -> str:
        assert self.id is not None
        return self.id

    def _emit(self, event: Event) -> None:
        if self._on_event is not None:
            self._on_event(event)

    async def _receive(self) -> Message | None:
        """The next frame's message, None for frames that are not messages (and when a
        publish was reading: its messages are in ``_pending``)."""
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        if self._reading:  # a publish waits for its answer: let it read, then look again
            await self._read_done.wait()
            return None
        if self._ws is None:
            raise _Lost(None, "not connected")
        return self._handle(await self._read(self._ws))

    async def _read(self, ws: ClientConnection) -> str | bytes:
        """One frame from ``ws``, by one task at a time."""
        self._reading = True
        self._read_done.clear()
        try:
            return await ws.recv()
        except WSConnectionClosed as exc:
            if self._closed:  # by close(), from another task
                raise _Lost(None, "closed") from None
            raise self._lost(exc) from None
        finally:
            self._reading = False
            self._read_done.set()

    def _interrupt(self, why: str) -> None:
        """Fail every client publish waiting for its answer: the connection is gone."""
        publishes, self._publishes = self._publishes, {}
        for future in publishes.values():
            if not future.done():
                future.set_exception(
                    PublishInterrupted(
                        f"{why} before the publish was answered: it may or may not have been "
                        "published (publish again with the same idempotency_key to be sure)"
                    )
                )

    async def publish(
        self,
        topic: str,
        message: Any,
        *,
        skip_self: bool = False,
        idempotency_key: str | None = None,
    ) -> ClientPublished:
        """Publish ``message`` (a string, or any JSON value, as in :meth:`Relay.publish`)
        to ``topic`` over this subscription's own connection, as this client, and return
        where the server put it once it answers.

        The topic's namespace must allow it (``publish = "granted"`` with a matching
        publish grant, or ``"subscribers"`` with the topic subscribed to; by default no
        client may publish). The publication goes to every subscriber of the topic (a
        client publish targets no user), this connection too unless ``skip_self``; this
        connection's own copy may come before or after the answer. ``idempotency_key``
        works as in :meth:`Relay.publish`.

        Raises:
            ForbiddenTopic: no rule or grant lets this client publish there (403).
            RateLimited: the connection publishes faster than its namespace allows (429).
            MessageTooLarge: over the namespace's ``max_message_size`` (413).
            BadRequest: an invalid topic or field (400).
            ServiceUnavailable: the server's broker failed (503;
                :class:`PublishOutcomeUnknown` if it may have been published).
            NotConnected: the subscription is closed or between connections; nothing
                was sent.
            PublishInterrupted: the connection was lost, or no answer came within the
                client's ``timeout``, after the publish was sent: it may or may not
                have been published.

        A refusal leaves the connection open. Safe to call from several tasks, and
        while another task iterates over the subscription (which gets the messages a
        waiting publish reads meanwhile).
        """
        if not self._started:
            await self.start()
        ws = self._ws
        if self._closed or ws is None or not self._ready:
            why = "closed" if self._closed else "between connections (it reconnects while iterated)"
            raise NotConnected(f"cannot publish: the subscription is {why}; nothing was sent")
        self._next_request += 1
        request = self._next_request
        body: dict[str, Any] = {"topic": topic, "message": message, "id": request}
        if skip_self:
            body["skip_self"] = True
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        future: asyncio.Future[ClientPublished] = asyncio.get_running_loop().create_future()
        self._publishes[request] = future
        try:
            try:
                await ws.send(_encode({"publish": body}).decode())
            except WSConnectionClosed:
                raise NotConnected(
                    "cannot publish: the connection was lost; nothing was sent"
                ) from None
            async with asyncio.timeout(self.relay.timeout):
                await self._await_answer(ws, future)
            return future.result()
        except TimeoutError:
            raise PublishInterrupted(
                f"no answer to the publish within {self.relay.timeout:g} s: it may or may not "
                "have been published (publish again with the same idempotency_key to be sure)"
            ) from None
        finally:
            self._publishes.pop(request, None)

    async def presence(self, topic: str) -> Presence:
        """Who is subscribed to ``topic`` on every node, asked over this subscription's
        own connection (no API key needed): at most 1000 connections, oldest first, and
        :attr:`Presence.total`. Allowed where this client may subscribe to the topic (it
        need not be subscribed) and the topic's namespace has ``presence = true``.

        Raises:
            ForbiddenTopic: this client may not subscribe to ``topic`` (403).
            PresenceDisabled: the topic keeps no presence (400).
            BadRequest: an invalid topic, or a pattern (400).
            ServiceUnavailable: the server's broker failed (503).
            NotConnected: the subscription is closed or between connections.
            ConnectionFailed: the connection was lost, or no answer came within the
                client's ``timeout``.
        """
        answer: Presence = await self._ask("presence", topic)
        return answer

    async def presence_stats(self, topic: str) -> PresenceStats:
        """How many connections are subscribed to ``topic`` on every node, and how many
        distinct users, asked over this subscription's connection; see :meth:`presence`."""
        answer: PresenceStats = await self._ask("presence_stats", topic)
        return answer

    async def _ask(self, name: str, topic: str) -> Any:
        """Send the query ``{name: topic, "id": n}`` and wait for its answer (matched by
        id, like a publish's)."""
        if not self._started:
            await self.start()
        ws = self._ws
        if self._closed or ws is None or not self._ready:
            why = "closed" if self._closed else "between connections (it reconnects while iterated)"
            raise NotConnected(f"cannot ask for {name}: the subscription is {why}")
        self._next_request += 1
        request = self._next_request
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._publishes[request] = future
        try:
            try:
                await ws.send(_encode({name: topic, "id": request}).decode())
            except WSConnectionClosed:
                raise NotConnected(f"cannot ask for {name}: the connection was lost") from None
            async with asyncio.timeout(self.relay.timeout):
                await self._await_answer(ws, future)
            return future.result()
        except TimeoutError:
            raise ConnectionFailed(f"no answer to {name} within {self.relay.timeout:g} s") from None
        except PublishInterrupted:  # how a lost connection fails what waits for an answer
            raise ConnectionFailed(f"the connection was lost before the {name} answer") from None
        finally:
            self._publishes.pop(request, None)

    async def _await_answer(self, ws: ClientConnection, future: asyncio.Future[Any]) -> None:
        """Wait for ``future``, reading frames from ``ws`` while no other task does (the
        messages read go to ``_pending``, a loss or a stray error to the iteration)."""
        while not future.done():
            if self._reading:
                reader = asyncio.ensure_future(self._read_done.wait())
                try:
                    await asyncio.wait((future, reader), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    reader.cancel()
                continue
            if self._ws is not ws:  # lost meanwhile (its publishes were failed)
                self._interrupt("the connection was lost")
                if not future.done():
                    future.set_exception(PublishInterrupted("the connection was lost"))
                return
            try:
                message = self._handle(await self._read(ws))
            except (_Lost, RelayError) as exc:
                self._deferred = exc  # the iteration reconnects or ends with it
                continue
            if message is not None:
                self._pending.append(message)

    def _lost(self, exc: WSConnectionClosed) -> Exception:
        """What a closed connection means: a terminal error, or _Lost (reconnect)."""
        self._ws = None
        self._ready = False
        self._interrupt("the connection was lost")
        frame = exc.rcvd
        code = frame.code if frame is not None else NO_CLOSE_FRAME
        reason = frame.reason if frame is not None else "no close frame"
        error = _closed_error(code, reason)
        if error is None:
            return _Lost(code, reason or f"close {code}")
        # After 1000 the registration is gone; after 4500 it is the other connection's.
        self._delete_on_close = not isinstance(error, Unregistered | Replaced | Banned)
        return error

    def _handle(self, data: str | bytes) -> Message | None:
        try:
            frame = _decode(data, _Frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"the server sent a frame that is not wsrelay's: {exc}") from None
        if frame.type == "message":
            return self._message(frame)
        if frame.type == "gap":
            self._gap(frame)
            return None
        if frame.type == "published":
            answer = ClientPublished(frame.offset, frame.epoch, frame.duplicate)
            self._answered(frame.id, result=answer)
            return None
        if frame.type == "join" or frame.type == "leave":
            event = Join if frame.type == "join" else Leave
            self._emit(event(frame.topic, frame.user, frame.client))
            return None
        if frame.type == "presence":
            self._answered(frame.id, result=Presence(frame.topic, frame.clients, frame.total))
            return None
        if frame.type == "presence_stats":
            stats = PresenceStats(frame.topic, frame.num_clients, frame.num_users)
            self._answered(frame.id, result=stats)
            return None
        if frame.type == "error" and frame.id is not None:
            # A refused publish (or presence query): never a command's error, even when
            # nothing waits for it (one that timed out).
            detail = frame.error or _ErrorDetail("error", "refused")
            self._answered(frame.id, error=frame_error(detail.code, detail.message))
            return None
        if frame.type == "error" and frame.error is not None:
            raise CommandRefused(frame.error.message, code=frame.error.code)
        return None  # "subscribed" outside a handshake, or a frame type added later

    def _answered(
        self,
        request: int | str | None,
        *,
        result: Any = None,
        error: RelayError | None = None,
    ) -> None:
        future = self._publishes.get(request) if isinstance(request, int) else None
        if future is None or future.done():
            return  # not ours, or given up on (timed out)
        if error is not None:
            future.set_exception(error)
        else:
            assert result is not None
            future.set_result(result)

    def _message(self, frame: _Frame) -> Message | None:
        """The message of a message frame, or None for one already received."""
        known = self._positions.get(frame.topic)
        if frame.offset <= 0 or known is None:  # no offset (an older server), or no epoch
            return Message(frame.topic, frame.message, frame.offset)
        if frame.offset <= known.offset:
            # Already received: a replay that overlaps what the previous connection
            # delivered. Frames carry no epoch; the acknowledgement that preceded them
            # set this topic's, so its offsets compare.
            return None
        self._positions[frame.topic] = Position(frame.offset, known.epoch)
        return Message(frame.topic, frame.message, frame.offset, known.epoch)

    def _gap(self, frame: _Frame) -> None:
        """Publications were lost on their way to this connection; the stream goes on
        after the frame's position. Tell the application, like a failed recovery."""
        known = self._positions.get(frame.topic)
        position = Position(frame.offset, frame.epoch)
        if known is not None and known.epoch == position.epoch and known.offset > frame.offset:
            position = known
        self._positions[frame.topic] = position
        self._emit(NotRecovered(frame.topic, position, known, "gap"))

    def _acknowledged(self, frame: _Frame) -> list[NotRecovered]:
        """Take the positions an acknowledgement gives; the topics it says were not
        recovered, as events to emit once the subscription is reported."""
        lost: list[NotRecovered] = []
        for topic, answer in frame.positions.items():
            known = self._positions.get(topic)
            position = Position(answer.offset, answer.epoch)
            if known is not None and (
                known.epoch == position.epoch
                or (answer.recovered and known.epoch.startswith(EMPTY_EPOCH_PREFIX))
            ):
                # Messages received after the command was sent (a hold that timed out)
                # are already past the position answered; their replay is dropped. A
                # recovered answer to an empty position (a topic never published then)
                # names the real epoch, with the same numbering (docs/decisions/0008).
                position = Position(max(known.offset, position.offset), position.epoch)
            self._positions[topic] = position
            if answer.recovered is False:
                same = known is not None and known.epoch == answer.epoch
                reason: NotRecoveredReason = "too_far_behind" if same else "epoch_changed"
                lost.append(NotRecovered(topic, position, known, reason))
        return lost

    def _command(self) -> str:
        """The subscription command: every topic, and the position of each known one."""
        command: dict[str, Any] = {"topics": list(self.topics)}
        since = {
            topic: {"offset": position.offset, "epoch": position.epoch}
            for topic, position in self._positions.items()
            if topic in self.topics and position.epoch
        }
        if since:
            command["since"] = since
        return _encode(command).decode()

    async def _connect(self) -> tuple[bool, list[NotRecovered]]:
        """Connect (registering first if there is no id, or if the server forgot it),
        send the topics with their positions and wait for their acknowledgement.
        Returns whether it registered, and the topics that were not recovered. Raises
        _Lost if the connection closed meanwhile."""
        registered = False
        if self._url is None:
            await self._register()
            registered = True
        try:
            ws = await self._open(self._url)
        except NotFound:
            if registered:
                raise
            await self._register()
            registered = True
            ws = await self._open(self._url)
        if self._closed:  # closed from another task meanwhile
            await ws.close()
            raise _Lost(None, "closed")
        self._ws = ws
        try:
            await ws.send(self._command())
            async with asyncio.timeout(self.relay.timeout):
                while True:
                    data = await ws.recv()
                    frame = _decode(data, _Frame)
                    if frame.type == "subscribed":
                        self._ready = True
                        return registered, self._acknowledged(frame)
                    message = self._handle(data)
                    if message is not None:
                        self._pending.append(message)
        except WSConnectionClosed as exc:
            raise self._lost(exc) from None
        except TimeoutError:
            self._ws = None
            await ws.close()
            raise ConnectionFailed(
                f"{self.relay.url} did not confirm the subscription within {self.relay.timeout:g} s"
            ) from None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"the server sent a frame that is not wsrelay's: {exc}") from None

    async def _register(self) -> None:
        registration = await self.relay.register(self.user_id, self.topics, grants=self.grants)
        self.id, self._url = registration.id, registration.url

    async def _open(self, url: str | None) -> ClientConnection:
        assert url is not None
        shown = _redact(url)
        try:
            return await connect(
                _recovering(url),
                open_timeout=self.relay.timeout,
                max_size=None,  # publications are bounded by the server's body size limit
                proxy=None,
                user_agent_header="wsrelay-client",
            )
        except InvalidStatus as exc:  # refused before the 101, e.g. 503 with Retry-After
            response = exc.response
            raise _error_from(
                response.status_code,
                bytes(response.body or b""),
                response.headers.get("Retry-After"),
            ) from None
        except InvalidURI as exc:
            raise ProtocolError(f"the server gave an unusable WebSocket URL: {exc}") from None
        except TimeoutError:
            raise ConnectionFailed(
                f"cannot reach {shown}: no WebSocket handshake within {self.relay.timeout:g} s"
            ) from None
        except (OSError, InvalidHandshake) as exc:
            raise ConnectionFailed(f"cannot reach {shown}: {_one_line(exc)}") from exc

    async def _reconnect(self, lost: _Lost) -> None:
        """Reconnect with backoff until subscribed again; after a refusal that carried
        ``Retry-After``, wait what the server asked instead (:meth:`Backoff.after`).
        Raises StopAsyncIteration if closed meanwhile, and the error that makes
        retrying pointless."""
        close_code, reason = lost.close_code, lost.reason
        retry_after: float | None = None
        attempt = 0
        while True:
            attempt += 1
            limit = self.backoff.max_attempts
            if limit is not None and attempt > limit:
                raise ConnectionFailed(
                    f"gave up reconnecting to {self.relay.url} after {limit} attempt(s): {reason}"
                )
            if retry_after is None:
                delay = self.backoff.delay(attempt, self._rng)
            else:
                delay = self.backoff.after(retry_after, self._rng)
            self._emit(Reconnecting(attempt, delay, close_code, reason, retry_after))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._closing.wait()
            if self._closed:
                raise StopAsyncIteration
            try:
                registered, lost_topics = await self._connect()
            except _Lost as again:
                close_code, reason, retry_after = again.close_code, again.reason, None
                continue
            except (ConnectionFailed, ServerError, TooManyRequests) as exc:
                close_code, reason = None, str(exc)
                retry_after = exc.retry_after if isinstance(exc, HTTPError) else None
                continue
            self.reconnects += 1
            self._emit(Subscribed(self._id(), self.topics, self.reconnects, registered))
            for event in lost_topics:
                self._emit(event)
            return


def _recovering(url: str) -> str:
    """``url`` with ``recover=true``: the server holds the topics' publications until
    the first command, whose ``since`` they are replayed after."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "recover"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("recover", "true")])))


__all__ = ["DEFAULT_URL", "MAX_BATCH", "Relay", "Subscription", "normalize_url"]
