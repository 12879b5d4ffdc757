"""Presence rules, without I/O: which topics keep presence, who may ask, what changes.

A topic keeps *presence* when its namespace (:mod:`wsrelay.core.rules`) says
``presence = true``: every connection subscribed to it *by name* (a pattern
subscription is not a presence in any one topic) is listed, on every node, by
``GET /presence`` and the WebSocket ``presence`` command. With ``join_leave = true``
too, its subscribers are told when a connection joins (subscribes, or connects
with the topic among its subscriptions) or leaves (unsubscribes or disconnects).

A connection is named by its *public id* (:func:`public_id`), never by its
registration id: the registration id is the capability to connect, and presence
is shown to other clients.

Every connection with a user id is also counted for its user, whatever its topics,
for ``GET /users/<id>``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final

from wsrelay.core.patterns import is_pattern
from wsrelay.core.rules import Grants, Rules
from wsrelay.core.schema import PresenceClient
from wsrelay.core.topics import validate_topic
from wsrelay.errors import InvalidTopic, PresenceDisabled

PUBLIC_ID_LENGTH: Final = 32
"""Hex digits of a public id (128 bits of the SHA-256 of the registration id)."""


def public_id(client_id: str) -> str:
    """The public id of the connection of registration ``client_id``: the same on every
    node and across reconnections, and no use for connecting."""
    return hashlib.sha256(client_id.encode()).hexdigest()[:PUBLIC_ID_LENGTH]


def keeps_presence(rules: Rules, topic: str) -> bool:
    """Whether ``topic`` (a name, not a pattern) keeps presence."""
    return not rules.open and not is_pattern(topic) and rules.namespace(topic).presence


def announces(rules: Rules, topic: str) -> bool:
    """Whether joins and leaves of ``topic`` are sent to its subscribers (its namespace
    has ``presence`` and ``join_leave``)."""
    if not keeps_presence(rules, topic):
        return False
    return rules.namespace(topic).join_leave


def presence_topics(rules: Rules, topics: Iterable[str]) -> set[str]:
    """Those of ``topics`` (a client's subscriptions) that keep presence."""
    if rules.open:
        return set()
    return {topic for topic in topics if keeps_presence(rules, topic)}


def joins_and_leaves(
    rules: Rules, current: Iterable[str], command: str, topics: Iterable[str]
) -> int:
    """How many topics that announce joins and leaves the topic command ``command``
    (``topics``, ``subscribe`` or ``unsubscribe``) of ``topics`` would join or leave,
    for a connection subscribed to ``current``: what it costs the connection's
    :class:`~wsrelay.core.rules.JoinLeaveLimiter`."""
    if rules.open:
        return 0
    have, named = set(current), set(topics)
    if command == "subscribe":
        changed = named - have
    elif command == "unsubscribe":
        changed = named & have
    else:
        changed = named ^ have
    return sum(1 for topic in changed if announces(rules, topic))


def check_topic(rules: Rules, topic: str, max_length: int) -> None:
    """Whether presence may be read for ``topic`` at all (the API key's check).

    Raises:
        InvalidTopic: ``topic`` is not a valid topic name (a pattern included).
        PresenceDisabled: its namespace keeps no presence.
    """
    if is_pattern(topic):
        raise InvalidTopic(
            f"presence is kept per topic: name one topic, not the pattern {topic[:64]!r}"
        )
    validate_topic(topic, max_length)
    if not keeps_presence(rules, topic):
        namespace = rules.namespace(topic)
        raise PresenceDisabled(
            f"{topic!r} keeps no presence: its {namespace.name} does not set presence = true"
        )


def check_query(
    rules: Rules, topic: str, max_length: int, user: str | None, grants: Grants
) -> bool:
    """Whether a connection of ``user`` holding ``grants`` may read the presence of
    ``topic``: only if it may subscribe to it, and the topic keeps presence. Returns
    True if the authorization hook decides its subscriptions (``subscribe =
    "backend"``, no grant): then only a subscriber may read it (the caller checks).

    Raises:
        InvalidTopic: not a valid topic name.
        ForbiddenTopic: the connection may not subscribe to it (checked before
            presence_disabled, so a client learns nothing of a topic it may not read).
        PresenceDisabled: its namespace keeps no presence.
    """
    if is_pattern(topic):
        check_topic(rules, topic, max_length)  # raises InvalidTopic
    validate_topic(topic, max_length)
    ask = rules.check_subscribe((topic,), user, grants)
    check_topic(rules, topic, max_length)
    return bool(ask)


def counts(entries: Iterable[PresenceClient]) -> tuple[int, int]:
    """``(clients, distinct users)`` among ``entries``; anonymous ones are no user."""
    clients = 0
    users: set[str] = set()
    for entry in entries:
        clients += 1
        if entry.user is not None:
            users.add(entry.user)
    return clients, len(users)


def ordered(entries: Iterable[PresenceClient]) -> list[PresenceClient]:
    """``entries`` oldest connection first (ties by public id), as answers list them."""
    return sorted(entries, key=lambda entry: (entry.connected_at, entry.client))


def topic_set(topic: str) -> str:
    """The presence store's set of ``topic``'s subscribers."""
    return "topic:" + topic


def user_set(user: str) -> str:
    """The presence store's set of ``user``'s connections."""
    return "user:" + user
