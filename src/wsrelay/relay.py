"""The node: registrations, subscriptions and publishing, over one backend.

:class:`Relay` is what the HTTP/WebSocket adapter calls. It validates input
against the settings, keeps the broker subscribed to exactly the topics with
local subscribers, delivers publications (its own and those the broker brings
from other nodes), and keeps the nodes agreeing about connections: deleting a
registration or connecting it again on one node closes its old socket on
whichever node holds it. It knows nothing of HTTP or of a particular engine;
effects (the framer, the connections' sinks) are passed in.

What one connection costs the backend is kept small, because a node restart
brings every client back at once: an attach sends its independent requests
together (the subscriptions it needs, the registration's keep-alive, the
"attached" announcement), a topic change sends nothing when the topic set did
not change, and several topics go to the broker in one call
(docs/decisions/0006-redis-connection-pool.md counts the commands).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

import msgspec

from wsrelay import codes
from wsrelay.brokers import Backend, MemoryBus
from wsrelay.brokers.memory import MemoryBroker, MemoryPresence
from wsrelay.config import Settings
from wsrelay.core import presence as presence_rules
from wsrelay.core import topics as topic_rules
from wsrelay.core.events import Action, Authorizer, Events, EventSink
from wsrelay.core.fanout import Framer, Publication, deliver
from wsrelay.core.history import MAX_REPLAY, HistoryPage, Position, Receipt, recovered
from wsrelay.core.patterns import is_pattern
from wsrelay.core.registry import Client, Hold, Occupancy, Registry, Sink, user_key
from wsrelay.core.rules import NO_GRANTS, Grants, Namespace, asks_publish
from wsrelay.core.schema import GapFrame, JoinFrame, LeaveFrame, PresenceClient, encode
from wsrelay.errors import (
    AuthorizationUnavailable,
    BrokerUnavailable,
    ForbiddenTopic,
    InvalidField,
    InvalidTopic,
    NotFound,
    RateLimited,
    TooManyRegistrations,
    TooManyTopics,
)
from wsrelay.presence import PresenceTracker

log = logging.getLogger("wsrelay")

CLIENT_ID_BYTES = 16
"""128 random bits: the id is the client's capability to connect, so it must be unguessable."""

CONTROL_TOPIC = "$control"
"""Nodes tell each other about registrations on this topic. ``$`` is outside the
topic alphabet, so no client can subscribe or publish to it."""


HOLD_TIMEOUT: Final = 5.0
"""Seconds a connection opened with ``recover`` waits for its first command before the
publications held for its topics are sent anyway."""


FORWARD_TIMEOUT: Final = 5.0
"""Seconds a node waits for the answer to a command it forwarded to the node holding the
client's stream (:meth:`Relay.forward_command`) before it gives up."""

MAX_FORWARDS_PER_CLIENT: Final = 8
"""Commands of one registration a node forwards at once (each holds an HTTP request and
a wait of up to :data:`FORWARD_TIMEOUT`); past it ``POST /sse/<id>`` is refused at once
with 429 ``rate_limited`` (the node holding the stream carries them out one at a time
anyway)."""


CommandRunner = Callable[[Client, str], Awaitable[tuple[int, str]]]
"""Carries out a command forwarded by another node for a client attached here, with the
client's own connection (the server's SSE streams: ``POST /sse/<id>`` on another node);
returns the HTTP status and JSON body the asking node answers with."""


ENVELOPE_OVERHEAD: Final = 64
"""Bytes of a message frame besides its topic and message (type, offset, framing)."""


PublishItem = (
    tuple[str, str, int | str | None, str | None]
    | tuple[str, str, int | str | None, str | None, str | None]
    | tuple[str, str, int | str | None, str | None, str | None, bool]
)
"""``(topic, message, user_id, idempotency_key[, skip_client[, json]])`` for
:meth:`Relay.publish_many`; ``json``: ``message`` is JSON text (see :meth:`Relay.publish`)."""


class Published(NamedTuple):
    """The outcome of one publish: this node's subscribers, and the receipt."""

    recipients: int
    receipt: Receipt


class Followed(NamedTuple):
    """The outcome of a subscription command: where each topic it named continues, and
    ``recovered`` for those it asked to recover (else None); then the publications to
    send after the acknowledgement, in order (a replay, then those held meanwhile)."""

    positions: dict[str, tuple[Position, bool | None]]
    replay: list[Publication]


class ControlEvent(msgspec.Struct, array_like=True):
    """``unregistered``: close the client's socket (1000). ``attached``: a newer
    connection opened on node ``node``; close any other (4500). ``banned``: close every
    connection of the user named in ``client_id`` (4503).

    ``unregistered`` is published (kept, so a node that was cut off from the broker
    catches up on it: a deleted registration's socket is closed wherever it is).
    ``attached`` is announced, live only: it is sent on every attach, so in a
    reconnect storm it must be cheap; a node cut off from the broker at that moment
    keeps the older connection until it ends by itself.

    ``command`` (announced): node ``node`` asks the node holding ``client_id``'s
    connection to carry out the command ``body`` for it, under ``request``; that node
    announces ``answer`` back (``node`` still the asking node, ``status`` and ``body`` the
    HTTP answer). The last three fields were added later: events without them decode
    with the defaults, and nodes without them ignore the fields and the two events."""

    event: str
    client_id: str
    node: str
    request: str = ""
    status: int = 0
    body: str = ""


_encode_control = msgspec.json.Encoder().encode
_decode_control = msgspec.json.Decoder(ControlEvent).decode


class Relay:
    """One relay node. Use as ``async with Relay(settings, framer) as relay``."""

    def __init__(
        self,
        settings: Settings,
        framer: Framer,
        backend: Backend | None = None,
        *,
        events: EventSink | None = None,
        authorizer: Authorizer | None = None,
    ) -> None:
        self.settings = settings
        self.framer = framer
        backend = backend if backend is not None else MemoryBus().backend()
        self.broker = backend.broker
        self.registrations = backend.registrations
        self.rules = settings.rules()
        self.registry = Registry()
        self.node_id = secrets.token_hex(8)
        self.events = Events(events, self.node_id) if events is not None else None
        """Where this node's events go (``--webhook-url``); None: no event is made."""
        self.authorizer = authorizer
        """Decides ``"backend"`` namespaces' topics (``--authorize-url``)."""
        self.started_at = time.monotonic()
        self.published = 0
        """Publications accepted on this node (by publish and publish_many)."""
        self.delivered = 0
        """Hand-overs of publications to this node's connections, wherever published."""
        self._last: dict[str, Position] = {}
        """Per topic with subscribers here, the last publication handed to them."""
        self._handed: tuple[str, int, int] = ("", 0, 0)  # the last delivery: topic, offset, count
        self._position_reads: dict[str, asyncio.Future[HistoryPage]] = {}
        """Per topic, a position read about to be sent, for commands to share."""
        self.gaps = 0
        """Times this node's subscribers of a topic were told publications were lost."""
        self._moved: set[str] = set()
        """Clients whose connection here is closing because it reconnected elsewhere."""
        self.command_runner: CommandRunner | None = None
        """Carries out commands other nodes forward for clients attached here (set by the
        server); None: such commands are not answered."""
        self._forwarded: dict[str, asyncio.Future[tuple[int, str]]] = {}
        self._forwarding: dict[str, int] = {}
        """Commands forwarded and unanswered, by client id (:data:`MAX_FORWARDS_PER_CLIENT`)."""
        """Commands this node forwarded, by request id, waiting for their answer."""
        self._running: set[asyncio.Task[None]] = set()
        store = backend.presence if backend.presence is not None else MemoryPresence()
        self.presence = PresenceTracker(store, self.rules, self.node_id, self._announce_presence)

    async def start(self) -> None:
        await self.broker.start(_Inbox(self), self.node_id)
        await self.broker.subscribe(CONTROL_TOPIC)
        await self.presence.start()

    async def stop(self) -> None:
        await self.presence.stop()
        await self.broker.stop()

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def ready(self) -> bool:
        """Whether this node can accept publishes: its broker is reachable."""
        return self.broker.healthy

    # -- registrations ------------------------------------------------------------------

    async def register(
        self, user_id: int | str | None, topics: Iterable[str] = (), grants: Grants = NO_GRANTS
    ) -> Client:
        """Create a registration with a new unguessable id, holding ``grants``.

        Raises:
            InvalidTopic, TooManyTopics: ``topics`` breaks the topic rules.
            ForbiddenTopic: a namespace forbids the user (with ``grants``) one of ``topics``.
            TooManyRegistrations: the user already holds ``max_registrations_per_user``
                (counted on every node; anonymous registrations are never refused).
            BrokerUnavailable: the store is unreachable.
        """
        user, wanted = user_key(user_id), self._validate(topics)
        client_id = secrets.token_hex(CLIENT_ID_BYTES)
        ask = self._check_subscribe(wanted, user, grants)
        await self._authorize("subscribe", user, client_id, ask)
        client = Client(client_id, user, wanted, grants)
        limit = self.settings.max_registrations_per_user
        if not await self.registrations.add(client, limit):
            raise TooManyRegistrations(
                f"user {client.user!r} already holds {limit} registrations, the limit "
                "(max_registrations_per_user); delete one with DELETE /register/<id>, or "
                "reuse one"
            )
        return client

    async def lookup(self, client_id: str) -> Client:
        """The registration ``client_id``, from this node if attached here, else the store.

        Raises:
            NotFound: there is no such registration.
        """
        client = self.registry.attached(client_id) or await self.registrations.get(client_id)
        if client is None:
            raise NotFound("no registration with this id", code="unknown_client")
        return client

    async def unregister(self, client_id: str) -> None:
        """Delete a registration and close its connection, wherever it is, with 1000.

        Raises:
            NotFound: no such registration.
        """
        if not await self.registrations.remove(client_id):
            raise NotFound("no registration with this id", code="unknown_client")
        await self._close_local(client_id, codes.NORMAL, "unregistered")
        await self._tell_nodes("unregistered", client_id)

    # -- connections ----------------------------------------------------------------------

    async def attach(self, client: Client, sink: Sink, *, hold: bool = False) -> None:
        """Make ``sink`` the client's live connection, closing any it replaces here
        or on another node. With ``hold``, publications on the client's topics are held
        back until its first command (which recovers them) or :data:`HOLD_TIMEOUT`.

        Raises:
            NotFound: the registration was deleted meanwhile (``sink`` is not attached).
            BrokerUnavailable: the backend is unreachable (``sink`` stays attached: the
                caller detaches it).
        """
        if hold and client.topics:
            held = client.held = Hold(client)
            held.hold(client.topics)
            asyncio.get_running_loop().call_later(HOLD_TIMEOUT, self._flush_held, client, held)
        previous, change = self.registry.attach(client, sink)
        # Back here after a move elsewhere: this connection's end is no move (an older
        # socket still closing must not make it leave its entries without a leave).
        self._moved.discard(client.id)
        if previous is not None and previous is not sink:
            previous.close(codes.REPLACED, "replaced by a newer connection")
        # Independent of each other: sent together (one round trip with Redis). An
        # announcement for a registration found deleted is harmless: it is gone anyway.
        _, exists, _, _ = await _together(
            self._sync_broker(change),
            self.registrations.attached(client),
            self._tell_nodes("attached", client.id, live=True),
            self.presence.attached(client),
        )
        if not exists:
            await self.detach(client, sink)
            raise NotFound("this registration was deleted", code="unknown_client")

    async def detach(self, client: Client, sink: Sink) -> None:
        """The connection ``sink`` ended; the registration stays."""
        change = self.registry.detach(client, sink)
        moved = client.id in self._moved
        if moved and client.sink is None:
            self._moved.discard(client.id)
        if client.sink is None and self.registry.attached(client.id) is None:
            await _together(
                self._sync_broker(change),
                self.registrations.detached(client),
                self.presence.detached(client, moved=moved),
            )
        else:
            await self._sync_broker(change)

    async def set_topics(
        self, client: Client, topics: Iterable[str], since: Mapping[str, Position] | None = None
    ) -> Followed:
        """Replace the client's topics; see :meth:`subscribe` for ``since``."""
        wanted = self._validate(topics)
        ask = self._check_subscribe(wanted, client.user, client.grants)
        await self._authorize("subscribe", client.user, client.id, ask)
        before = set(client.topics) if self.events is not None else None
        followed = await self._follow(client, wanted, wanted, since or {})
        if before is not None:
            self._topics_changed(client, before)
        return followed

    async def subscribe(
        self, client: Client, topics: Iterable[str], since: Mapping[str, Position] | None = None
    ) -> Followed:
        """Add to the client's topics. For each topic in ``since`` (all of them among
        ``topics``), publications after that position are replayed if the history still
        holds all of them, with no gap and no duplicate before the live stream. One
        command's replay stays within half the outbox limit: topics past it are answered
        not recovered.

        Raises:
            InvalidTopic, TooManyTopics: the topics break the rules.
            ForbiddenTopic: a namespace forbids the client one of them, or the
                authorization hook denied one; nothing changed.
            AuthorizationUnavailable: the hook could not decide; nothing changed.
            BrokerUnavailable: the backend is unreachable; nothing changed.
        """
        wanted = self._validate(topics)
        ask = self._check_subscribe(wanted, client.user, client.grants)
        total = len(client.topics | wanted)
        if total > self.settings.max_topics_per_client:
            raise TooManyTopics(
                f"subscribing would make {total} topics; a client may subscribe to at most "
                f"{self.settings.max_topics_per_client}"
            )
        await self._authorize("subscribe", client.user, client.id, ask)
        before = set(client.topics) if self.events is not None else None
        followed = await self._follow(client, client.topics | wanted, wanted, since or {})
        if before is not None:
            self._topics_changed(client, before)
        return followed

    async def unsubscribe(self, client: Client, topics: Iterable[str]) -> None:
        unwanted = self._validate(topics)
        if client.topics.isdisjoint(unwanted):
            return
        before = set(client.topics)
        await self._save(client, before, self.registry.unsubscribe(client, unwanted))
        if self.events is not None:
            self._topics_changed(client, before)

    async def _follow(
        self, client: Client, after: set[str], named: set[str], since: Mapping[str, Position]
    ) -> Followed:
        """Make ``after`` the client's topics and answer the position of each ``named``
        one. Named topics are held from before they are indexed until their position is
        read, so the client gets: what was live before, the acknowledgement, the replay
        (for ``since``), then what was published after the position, once each."""
        unknown = set(since) - named
        if unknown:
            raise InvalidField(
                f"since names topics the command does not: {', '.join(sorted(unknown))}"
            )
        patterns = {name for name in since if is_pattern(name)}
        if patterns:
            raise InvalidField(
                f"since names patterns ({', '.join(sorted(patterns))}): a pattern has no "
                "position of its own, so it cannot be recovered; recover its topics by name"
            )
        # A pattern has no position: it is followed (indexed) but neither held nor read.
        named = {name for name in named if not is_pattern(name)}
        held = client.held
        if held is None:
            held = client.held = Hold(client)
        starts = {topic: self._last.get(topic) for topic in named}
        held.hold(named)
        try:
            if after != client.topics:
                before = set(client.topics)
                await self._save(client, before, self.registry.set_topics(client, after))
            pages = await _together(*(self._read(topic, since.get(topic)) for topic in named))
        except BaseException:
            self._flush_held(client, held)
            raise
        positions: dict[str, tuple[Position, bool | None]] = {}
        replay: list[Publication] = []
        # A replay is queued at once: more than the outbox takes would close the client
        # as a slow consumer, and it would come back to ask for the same again.
        budget = self.settings.outbox_limit // 2
        for topic, (page, asked) in zip(named, pages, strict=True):
            top = page.position
            if asked is None:
                # The stream continues after the last publication handed over here before
                # the hold began: everything held since follows, nothing is dropped.
                kept = held.release(topic, "", 0)
                start = starts[topic]
                if start is None:
                    start = Position(kept[0].epoch, kept[0].offset - 1) if kept else top
                positions[topic] = (start, None)
                replay.extend(kept)
                continue
            mine = [p for p in page.publications if p.user in (None, client.user)]
            cost = sum(len(p.message) + len(topic) + ENVELOPE_OVERHEAD for p in mine)
            if recovered(page, asked) and cost <= budget:
                budget -= cost
                positions[topic] = (asked, True)
                replay.extend(mine)
            else:
                positions[topic] = (top, False)
            # The read reached ``top``: what is held up to it was replayed (or is given up
            # with recovered false); later copies of it still on their way are dropped.
            replay.extend(held.release(topic, top.epoch, top.offset))
        replay.extend(held.release_all())
        if any(p.skip == client.id for p in replay):  # its own skip_self publications
            replay = [p for p in replay if p.skip != client.id]
        return Followed(positions, replay)

    async def _read(
        self, topic: str, since: Position | None
    ) -> tuple[HistoryPage, Position | None]:
        """The page to answer ``topic`` with, and ``since`` as a position in its epoch
        (``Broker.recover``: a position answered before the topic's first publication
        stands for one in the epoch made since, while nothing was lost)."""
        if since is None:
            return await self._read_position(topic), None
        return await self.broker.recover(topic, since, MAX_REPLAY + 1)

    async def _read_position(self, topic: str) -> HistoryPage:
        """The topic's position, one read shared by every command asking for it in the
        same pass of the event loop (a reconnect storm brings many at once).

        Only commands whose hold began before the read was sent may share it (a position
        read before a hold could miss what came in between): the read is sent from a
        task's first step, which runs after the callbacks of the current pass, and it
        leaves :attr:`_position_reads` as it starts, so later commands read anew."""
        shared = self._position_reads.get(topic)
        if shared is None:
            shared = asyncio.ensure_future(self._read_position_now(topic))
            shared.add_done_callback(_retrieved)  # if every sharer went away meanwhile
            self._position_reads[topic] = shared
        # Shielded: one command cancelled (its connection closed) must not fail the others.
        return await asyncio.shield(shared)

    async def _read_position_now(self, topic: str) -> HistoryPage:
        del self._position_reads[topic]
        return await self.broker.history(topic)

    def _flush_held(self, client: Client, held: Hold) -> None:
        """Send what ``held`` still holds as it is (a command failed, or never came)."""
        if client.held is not held:
            return
        sink = client.sink
        for publication in held.release_all():
            if sink is not None and sink is client.sink:
                deliver(publication, (client,), self.framer)

    async def _save(self, client: Client, before: set[str], change: Occupancy) -> None:
        """The client's topics changed from ``before``: follow them in the broker and store
        them, together. If they cannot be stored, nothing changed: the client is told so
        (an error), and sending the command again must do it again."""
        try:
            await _together(self._sync_broker(change), self.registrations.save_topics(client))
        except BrokerUnavailable:
            undo = self.registry.set_topics(client, before)
            with contextlib.suppress(BrokerUnavailable):  # the first failure is the one told
                await self._sync_broker(undo)
            raise
        if self.registry.attached(client.id) is client:
            await self.presence.topics_changed(client, before)

    # -- publishing -----------------------------------------------------------------------

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
    ) -> Published:
        """Publish to every subscriber of ``topic`` (only ``user_id``'s, if given), on
        every node, in the topic's order, except the client whose id is ``skip``; answers
        how many connections on this node it went to, and its position. With ``json``,
        ``message`` is the compact JSON text of a value other than a string
        (:func:`wsrelay.core.payload.message_text` makes it), delivered as that value.
        ``by``: the client publishing (checked by :meth:`check_client_publish`); the
        authorization hook decides if its namespace says ``publish = "backend"``, and a
        ``client_published`` event is made.

        Raises:
            InvalidTopic: ``topic`` breaks the topic rules.
            ForbiddenTopic, AuthorizationUnavailable: the hook denied ``by`` the topic,
                or could not decide.
            BrokerUnavailable: it was not published.
            PublishOutcomeUnknown: it may have been published; retry with the same key.
        """
        topic_rules.validate_topic(topic, self.settings.max_topic_length)
        if by is not None and asks_publish(self.rules.namespace(topic), topic, by.user, by.grants):
            await self._authorize("publish", by.user, by.id, [topic])
        user = user_key(user_id)
        publication = Publication(topic, message, user, skip=skip, json=json)
        receipt = await self.broker.publish(publication, idempotency_key)
        if receipt.duplicate:
            return Published(0, receipt)
        self.published += 1
        if by is not None and self.events is not None:
            position = receipt.position
            self.events.emit(
                "client_published",
                client=presence_rules.public_id(by.id),
                user=by.user,
                topic=topic,
                offset=position.offset,
                epoch=position.epoch,
                message=msgspec.Raw(message) if json else message,
            )
        return Published(self._recipients(publication, receipt), receipt)

    def check_client_publish(self, client: Client, topic: str, message: str) -> Namespace:
        """The namespace of ``topic`` if ``client`` may publish ``message`` there (its
        rate is the caller's business: it is per connection).

        Raises:
            InvalidTopic: ``topic`` breaks the topic rules.
            ForbiddenTopic: no rule or grant lets the client publish there.
            MessageTooLarge: the namespace's ``max_message_size`` is exceeded.
        """
        topic_rules.validate_topic(topic, self.settings.max_topic_length)
        subscribed = self.registry.receives(client, topic)
        return self.rules.check_publish(topic, message, client.user, client.grants, subscribed)

    async def publish_many(self, items: Sequence[PublishItem]) -> list[Published]:
        """Publish several ``(topic, message, user_id, idempotency_key[, skip[, json]])`` at
        once, in order; answers each one as :meth:`publish` does. Every topic is checked before
        anything is published.

        The broker gets them all together (the Redis broker pipelines them). If it fails
        part-way, those it accepted stay published (every node delivers them) and the
        call raises the first failure, saying how many were published.

        Raises:
            InvalidTopic: an item's topic breaks the rules (its index is in the message).
            BrokerUnavailable, PublishOutcomeUnknown: some were not (or maybe not) published.
        """
        publications, keys = [], []
        for index, item in enumerate(items):
            topic, message, user_id, key = item[:4]
            skip = item[4] if len(item) > 4 else None
            json = len(item) > 5 and bool(item[5])
            try:
                topic_rules.validate_topic(topic, self.settings.max_topic_length)
            except InvalidTopic as exc:
                raise InvalidTopic(f"messages[{index}]: {exc.message}") from None
            publications.append(
                Publication(topic, message, user_key(user_id), skip=skip, json=json)
            )
            keys.append(key)
        outcomes = await self.broker.publish_many(publications, keys)
        answers: list[Published] = []
        failed: Exception | None = None
        for publication, outcome in zip(publications, outcomes, strict=True):
            if isinstance(outcome, Exception):
                failed = failed or outcome
            elif outcome.duplicate:
                answers.append(Published(0, outcome))
            else:
                self.published += 1
                count = self._recipients(publication, outcome)
                answers.append(Published(count, outcome))
        if failed is not None:
            if isinstance(failed, BrokerUnavailable):
                raise type(failed)(
                    f"{failed.message}; {len(answers)} of {len(publications)} messages were "
                    "published (the others were not, or may not have been: retry them with "
                    "the same idempotency_key)"
                ) from None
            raise failed
        return answers

    def deliver(self, publication: Publication) -> int:
        """Hand ``publication`` to local subscribers only."""
        recipients = self.registry.recipients(publication.topic, publication.user)
        handed = deliver(publication, recipients, self.framer)
        self.delivered += handed
        self._handed = (publication.topic, publication.offset, handed)
        return handed

    def _recipients(self, publication: Publication, receipt: Receipt) -> int:
        """How many connections here a publication just accepted went to: counted as it
        was handed over if it already was (the memory broker hands it over before the
        publish returns), else those subscribed now (Redis: it comes back shortly)."""
        topic, user = publication.topic, publication.user
        if self._handed[:2] == (topic, receipt.position.offset):
            return self._handed[2]
        count = self.registry.count_recipients(topic, user)
        skipped = publication.skip and self.registry.attached(publication.skip)
        if skipped and user in (None, skipped.user) and self.registry.receives(skipped, topic):
            count -= 1
        return count

    def _on_gap(self, topic: str, epoch: str, offset: int) -> None:
        """Tell the topic's JSON-mode subscribers that publications were lost before the
        stream continues after ``offset`` (those recovering the topic learn it from
        their recovery's answer)."""
        self.gaps += 1
        if topic in self._last:
            self._last[topic] = Position(epoch, offset)
        frame = self.framer(encode(GapFrame(topic, offset, epoch)))
        for client in list(self.registry.recipients(topic, None)):
            sink = client.sink
            if sink is None or sink.raw or (client.held and client.held.holding(topic)):
                continue
            sink.send(frame)

    def _on_broker_publication(self, publication: Publication) -> None:
        if publication.offset == 0 and publication.topic != CONTROL_TOPIC:
            # An announcement on a topic: a join or leave made on another node.
            self._hand_presence_event(publication.topic, publication.message, publication.skip)
            return
        if publication.topic != CONTROL_TOPIC:
            # Kept for topics subscribed by name only (those vacated drop theirs): a topic
            # reaching this node through a pattern alone has no entry to remember.
            if self.registry.subscriber_count(publication.topic):
                last = self._last.get(publication.topic)
                if last is not None and last.epoch != publication.epoch:
                    # The topic's history was lost (evicted, expired, a broker that did
                    # not say so): offsets restart, and clients that dedupe by offset
                    # must be told before the new epoch's first publication.
                    self._on_gap(publication.topic, publication.epoch, publication.offset - 1)
                self._last[publication.topic] = Position(publication.epoch, publication.offset)
            self.deliver(publication)
            return
        try:
            event = _decode_control(publication.message)
        except msgspec.DecodeError:
            log.warning("ignored a malformed control event")
            return
        if event.event == "banned":
            if event.node != self.node_id:
                self._close_user(event.client_id)
            return
        if event.event == "answer":
            waiting = self._forwarded.get(event.request)
            if event.node == self.node_id and waiting is not None and not waiting.done():
                waiting.set_result((event.status, event.body))
            return
        client = self.registry.attached(event.client_id)
        if client is None or client.sink is None or event.node == self.node_id:
            return
        if event.event == "command":
            if self.command_runner is not None:
                task = asyncio.get_running_loop().create_task(self._run_forwarded(client, event))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        elif event.event == "unregistered":
            client.sink.close(codes.NORMAL, "unregistered")
        elif event.event == "attached":
            self._moved.add(client.id)
            client.sink.close(codes.REPLACED, "replaced by a newer connection")

    # -- commands for a connection on another node -------------------------------------------

    @property
    def forwards(self) -> bool:
        """Whether other nodes may hold this node's clients' connections (a shared
        broker): :meth:`forward_command` can reach them."""
        return not isinstance(self.broker, MemoryBroker)

    async def forward_command(self, client_id: str, text: str) -> tuple[int, str] | None:
        """Have the node holding ``client_id``'s connection carry out the command
        ``text`` (its :attr:`command_runner`): its HTTP status and JSON body, or None if
        no node answered within :data:`FORWARD_TIMEOUT` (none holds the connection, or
        the one holding it is cut off or too slow).

        Raises:
            RateLimited: :data:`MAX_FORWARDS_PER_CLIENT` commands of this client are
                already waiting for their answer.
            BrokerUnavailable: the command could not be handed to the other nodes.
        """
        pending = self._forwarding.get(client_id, 0)
        if pending >= MAX_FORWARDS_PER_CLIENT:
            raise RateLimited(
                f"{pending} commands of this registration are already waiting for the "
                "node holding its stream: wait for their answers"
            )
        self._forwarding[client_id] = pending + 1
        request = secrets.token_hex(8)
        waiting: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        self._forwarded[request] = waiting
        try:
            event = ControlEvent("command", client_id, self.node_id, request, 0, text)
            await self.broker.announce(Publication(CONTROL_TOPIC, _encode_control(event).decode()))
            try:
                async with asyncio.timeout(FORWARD_TIMEOUT):
                    return await waiting
            except TimeoutError:
                return None
        finally:
            del self._forwarded[request]
            left = self._forwarding[client_id] - 1
            if left:
                self._forwarding[client_id] = left
            else:
                del self._forwarding[client_id]

    async def _run_forwarded(self, client: Client, event: ControlEvent) -> None:
        runner = self.command_runner
        if runner is None:
            return
        try:
            status, body = await runner(client, event.body)
            answer = ControlEvent("answer", client.id, event.node, event.request, status, body)
            await self.broker.announce(Publication(CONTROL_TOPIC, _encode_control(answer).decode()))
        except Exception:
            log.exception("could not answer a command forwarded by node %s", event.node)

    # -- presence ---------------------------------------------------------------------------

    def check_presence_query(self, client: Client, topic: str) -> None:
        """Whether ``client`` may read the presence of ``topic``: only if it may subscribe
        to it and the topic keeps presence.

        Raises:
            InvalidTopic: not a valid topic name.
            ForbiddenTopic: the client may not subscribe to it.
            PresenceDisabled: its namespace keeps no presence.
        """
        ask = presence_rules.check_query(
            self.rules, topic, self.settings.max_topic_length, client.user, client.grants
        )
        if ask and not self.registry.receives(client, topic):
            raise ForbiddenTopic(
                f"may not read the presence of {topic!r}: the authorization backend decides "
                "who may subscribe to it, and this connection is not subscribed"
            )

    def check_presence_topic(self, topic: str) -> None:
        """Whether ``topic`` keeps presence (for the API key's routes).

        Raises:
            InvalidTopic, PresenceDisabled: see :func:`wsrelay.core.presence.check_topic`.
        """
        presence_rules.check_topic(self.rules, topic, self.settings.max_topic_length)

    async def presence_of(self, topic: str) -> list[PresenceClient]:
        """The connections subscribed to ``topic`` on every node, oldest first (the caller
        checked that the topic keeps presence).

        Raises:
            BrokerUnavailable: the presence store is unreachable.
        """
        entries = await self.presence.store.entries(presence_rules.topic_set(topic))
        return presence_rules.ordered(entries)

    async def presence_stats(self, topic: str) -> tuple[int, int]:
        """``(connections, distinct users)`` subscribed to ``topic`` on every node."""
        entries = await self.presence.store.entries(presence_rules.topic_set(topic))
        return presence_rules.counts(entries)

    async def user_connections(self, user_id: int | str) -> int:
        """How many connections ``user_id`` has open on every node.

        Raises:
            BrokerUnavailable: the presence store is unreachable.
        """
        return await self.presence.store.count(presence_rules.user_set(str(user_id)))

    async def disconnect_user(self, user_id: int | str) -> tuple[int, int]:
        """Ban ``user_id`` for now: delete its registrations and close its connections on
        every node with :data:`~wsrelay.codes.BANNED`. Returns how many connections it
        had open and how many registrations were deleted.

        Raises:
            BrokerUnavailable: the store is unreachable (nothing may have been done).
        """
        user = str(user_id)
        connections = await self.user_connections(user)
        removed = await self.registrations.remove_user(user)
        await self._close_user_here(user)
        await self._tell_nodes("banned", user)
        return connections, len(removed)

    def _close_user(self, user: str) -> None:
        """Close this node's connections of ``user`` (the ban event of another node)."""
        for client in self.registry.clients_of(user):
            if client.sink is not None:
                client.sink.close(codes.BANNED, "banned: the user was disconnected")

    async def _close_user_here(self, user: str) -> None:
        for client in self.registry.clients_of(user):
            await self._close_local(client.id, codes.BANNED, "banned: the user was disconnected")

    async def _announce_presence(
        self, topic: str, frame: JoinFrame | LeaveFrame, skip: str
    ) -> None:
        """Send a join or leave to the topic's subscribers here (except ``skip``, whose
        own it is) and on the other nodes serving the topic."""
        message = encode(frame).decode()
        self._hand_presence_event(topic, message, skip)
        await self.broker.announce(Publication(topic, message, skip=skip))

    def _hand_presence_event(self, topic: str, message: str, skip: str | None) -> None:
        """A join or leave frame to the topic's JSON-mode subscribers here, except ``skip``
        and those recovering the topic (raw mode carries messages only)."""
        frame: bytes | None = None
        for client in list(self.registry.recipients(topic, None)):
            sink = client.sink
            if sink is None or sink.raw or client.id == skip:
                continue
            if client.held is not None and client.held.holding(topic):
                continue
            if frame is None:
                frame = self.framer(message.encode())
            sink.send(frame)

    # -- helpers ----------------------------------------------------------------------------

    async def _tell_nodes(self, event: str, client_id: str, *, live: bool = False) -> None:
        body = _encode_control(ControlEvent(event, client_id, self.node_id)).decode()
        publication = Publication(CONTROL_TOPIC, body)
        if live:
            await self.broker.announce(publication)
        else:
            await self.broker.publish(publication)

    async def _close_local(self, client_id: str, code: int, reason: str) -> None:
        client = self.registry.attached(client_id)
        if client is not None and client.sink is not None:
            sink = client.sink
            sink.close(code, reason)
            await self.detach(client, sink)

    def _check_subscribe(self, wanted: set[str], user: str | None, grants: Grants) -> list[str]:
        """Namespace and grant rules for topics by name, and for patterns as a whole
        (:func:`~wsrelay.core.topics.check_subscribe_patterns`). Returns the topics the
        authorization hook decides."""
        if self.rules.open:
            return []
        names, patterns = topic_rules.split_patterns(wanted)
        ask = self.rules.check_subscribe(names, user, grants)
        topic_rules.check_subscribe_patterns(self.rules, patterns, user, grants)
        return ask

    async def _authorize(
        self, action: Action, user: str | None, client_id: str, topics: list[str]
    ) -> None:
        """Ask the authorization hook about ``topics`` (one request for all of them).

        Raises:
            ForbiddenTopic: it denied one (the first, in order).
            AuthorizationUnavailable: it could not decide, or none is configured.
        """
        if not topics:
            return
        if self.authorizer is None:
            raise AuthorizationUnavailable(
                f'{topics[0]!r} is in a namespace with {action} = "backend" and no '
                "--authorize-url is set"
            )
        public = presence_rules.public_id(client_id)
        answers = await self.authorizer.authorize(action, user, public, topics)
        for topic in topics:
            if not answers.get(topic, False):
                raise ForbiddenTopic(
                    f"may not {action} to {topic!r}: its namespace has {action} = "
                    '"backend" and the authorization backend denied it'
                )

    def connection_opened(self, client: Client) -> None:
        """A connection of ``client`` opened (its upgrade was answered): the event."""
        if self.events is not None:
            self.events.emit(
                "connected",
                client=presence_rules.public_id(client.id),
                user=client.user,
                topics=sorted(client.topics),
            )

    def connection_closed(self, client: Client, code: int, reason: str, by: str) -> None:
        """A connection of ``client`` that :meth:`connection_opened` announced ended."""
        if self.events is not None:
            self.events.emit(
                "disconnected",
                client=presence_rules.public_id(client.id),
                user=client.user,
                code=code,
                reason=reason,
                by=by,
            )

    def _topics_changed(self, client: Client, before: set[str]) -> None:
        """The events of a command that changed the client's topics from ``before``."""
        assert self.events is not None
        added, removed = client.topics - before, before - client.topics
        public = presence_rules.public_id(client.id)
        if added:
            self.events.emit("subscribed", client=public, user=client.user, topics=sorted(added))
        if removed:
            self.events.emit(
                "unsubscribed", client=public, user=client.user, topics=sorted(removed)
            )

    def _validate(self, topics: Iterable[str]) -> set[str]:
        s = self.settings
        return topic_rules.validate_topics(topics, s.max_topic_length, s.max_topics_per_client)

    async def _sync_broker(self, change: Occupancy) -> None:
        """One call for all the topics occupied, then one for all those vacated (if
        subscribing fails, the node keeps receiving too much rather than too little)."""
        if self.events is not None:
            for topic in change.occupied:
                if not is_pattern(topic):
                    self.events.emit("topic_occupied", topic=topic)
            for topic in change.vacated:
                if not is_pattern(topic):
                    self.events.emit("topic_vacated", topic=topic)
        if change.occupied:
            await self.broker.subscribe(*change.occupied)
        if change.vacated:
            for topic in change.vacated:
                self._last.pop(topic, None)
            await self.broker.unsubscribe(*change.vacated)


class _Inbox:
    """The node as its broker's :class:`~wsrelay.brokers.base.Listener`."""

    __slots__ = ("_relay",)

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def publication(self, publication: Publication) -> None:
        self._relay._on_broker_publication(publication)

    def gap(self, topic: str, epoch: str, offset: int) -> None:
        self._relay._on_gap(topic, epoch, offset)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a shared future's exception as seen: those who await it report it."""
    if not future.cancelled():
        future.exception()


async def _together(*steps: Awaitable[Any]) -> list[Any]:
    """Run ``steps`` concurrently and return their results; every step runs to its end
    even if another fails, and then the first failure (in argument order) is raised."""
    outcomes = await asyncio.gather(*steps, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes
