"""Who may subscribe and publish where: namespaces and grants, without I/O.

A *namespace* gives every topic matching its pattern a set of rules; the first
namespace (in configuration order) whose pattern matches a topic is the topic's
namespace, and a topic no configured pattern matches belongs to
:data:`DEFAULT_NAMESPACE`, which keeps the relay's original behaviour: anyone may
subscribe, no client may publish.

* ``subscribe = "any"`` lets every connection subscribe; ``"granted"`` only a
  connection holding a subscribe grant whose pattern matches the topic; ``"backend"``
  a connection holding such a grant, or one the authorization hook (``--authorize-url``,
  :class:`wsrelay.core.events.Authorizer`) allows, asked by the node.
* ``publish = "none"`` refuses every client publish; ``"granted"`` allows a
  connection holding a matching publish grant; ``"subscribers"`` allows a connection
  subscribed to the topic (or holding a matching publish grant); ``"backend"`` a
  connection holding a matching publish grant, or one the hook allows.
* ``max_message_size`` bounds a client publish's message (UTF-8 bytes), and
  ``publish_rate`` / ``publish_burst`` its rate per connection (a token bucket).
* ``history_size`` overrides ``--history-size`` for the namespace's topics.
* ``presence`` and ``join_leave`` are parsed and kept for the presence feature.

*Grants* come with a registration (``POST /register``) or a connection token: topic
patterns (:mod:`wsrelay.core.patterns`) in which ``{user}`` stands for the
connection's own user id. Backends (the API key holders) are never subject to these
rules: ``POST /publish`` publishes anywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal

from wsrelay.core.patterns import USER_PLACEHOLDER, matches, validate_pattern
from wsrelay.errors import ForbiddenTopic, InvalidTopic, MessageTooLarge, RateLimited

SubscribeRule = Literal["any", "granted", "backend"]
PublishRule = Literal["none", "granted", "subscribers", "backend"]
SUBSCRIBE_RULES: Final = ("any", "granted", "backend")
PUBLISH_RULES: Final = ("none", "granted", "subscribers", "backend")

MAX_PATTERN_LENGTH: Final = 256
"""Longest namespace pattern accepted in the configuration."""

MAX_GRANTS: Final = 256
"""Most patterns one registration or token may grant per action."""


@dataclass(frozen=True, slots=True)
class Namespace:
    """The rules of the topics matching ``pattern`` (see the module docstring)."""

    pattern: str
    subscribe: SubscribeRule = "any"
    publish: PublishRule = "none"
    presence: bool = False
    join_leave: bool = False
    history_size: int | None = None
    """Publications kept per topic; None: the ``history_size`` setting."""
    max_message_size: int | None = None
    """Largest client-published message, in UTF-8 bytes; None: only the frame limit."""
    publish_rate: float = 10.0
    """Client publishes per second one connection may keep up, per namespace."""
    publish_burst: int = 20
    """Client publishes one connection may make at once before the rate applies."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError(f"namespace {self.pattern!r}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with these rules (empty if nothing)."""
        problems = []
        try:
            validate_pattern(self.pattern, MAX_PATTERN_LENGTH)
        except InvalidTopic as exc:
            problems.append(f"pattern: {exc.message}")
        if USER_PLACEHOLDER in self.pattern:
            # A topic's namespace must not depend on who asks (its history size does not).
            problems.append("pattern: {user} belongs in grants, not in namespace patterns")
        if self.subscribe not in SUBSCRIBE_RULES:
            problems.append(f"subscribe must be one of {', '.join(SUBSCRIBE_RULES)}")
        if self.publish not in PUBLISH_RULES:
            problems.append(f"publish must be one of {', '.join(PUBLISH_RULES)}")
        if self.history_size is not None and self.history_size < 0:
            problems.append("history_size must be 0 (no history) or more")
        if self.max_message_size is not None and self.max_message_size < 1:
            problems.append("max_message_size must be at least 1")
        if self.publish_rate <= 0:
            problems.append("publish_rate must be more than 0")
        if self.publish_burst < 1:
            problems.append("publish_burst must be at least 1")
        return problems

    @property
    def name(self) -> str:
        """How error messages name it."""
        return f"namespace {self.pattern!r}"


DEFAULT_NAMESPACE: Final = Namespace(">")
"""Every topic no configured namespace matches: subscribe any, publish none."""

_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "pattern": (str,),
    "subscribe": (str,),
    "publish": (str,),
    "presence": (bool,),
    "join_leave": (bool,),
    "history_size": (int,),
    "max_message_size": (int,),
    "publish_rate": (int, float),
    "publish_burst": (int,),
}


def namespace_from_table(table: Mapping[str, Any], where: str) -> Namespace:
    """A :class:`Namespace` from one ``[[namespace]]`` table of the config file.

    Raises:
        ValueError: an unknown key, a value of the wrong type, a missing pattern or a
            rule out of range; the message starts with ``where``.
    """
    known = {f.name for f in fields(Namespace)}
    for key, value in table.items():
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        expected = _TYPES[key]
        if (isinstance(value, bool) and bool not in expected) or not isinstance(value, expected):
            raise ValueError(
                f"{where}: {key} must be {' or '.join(t.__name__ for t in expected)}, "
                f"not {type(value).__name__}"
            )
    if "pattern" not in table:
        raise ValueError(f'{where}: pattern is required, e.g. pattern = "chat:*"')
    try:
        return Namespace(**table)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Grants:
    """Topic patterns a connection was granted, per action (``{user}``: its user)."""

    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.subscribe or self.publish)

    @classmethod
    def checked(
        cls,
        subscribe: Iterable[str] = (),
        publish: Iterable[str] = (),
        max_length: int = MAX_PATTERN_LENGTH,
    ) -> Grants:
        """Grants from untrusted lists, each pattern validated.

        Raises:
            InvalidTopic: a pattern is malformed (its list and index are named), or a
                list holds more than :data:`MAX_GRANTS`.
        """
        lists = {"subscribe": list(subscribe), "publish": list(publish)}
        for action, patterns in lists.items():
            if len(patterns) > MAX_GRANTS:
                raise InvalidTopic(f"grants.{action}: at most {MAX_GRANTS} patterns")
            for index, pattern in enumerate(patterns):
                try:
                    validate_pattern(pattern, max_length)
                except InvalidTopic as exc:
                    raise InvalidTopic(f"grants.{action}[{index}]: {exc.message}") from None
        return cls(tuple(dict.fromkeys(lists["subscribe"])), tuple(dict.fromkeys(lists["publish"])))


NO_GRANTS: Final = Grants()


def _granted(patterns: Sequence[str], topic: str, user: str | None) -> bool:
    return any(matches(pattern, topic, user) for pattern in patterns)


class Rules:
    """The configured namespaces, and the decisions made from them."""

    def __init__(self, namespaces: Sequence[Namespace] = ()) -> None:
        self.namespaces: tuple[Namespace, ...] = (*namespaces, DEFAULT_NAMESPACE)
        self.open = not namespaces
        """No namespace configured: every subscription is allowed (the fast path)."""
        # Topics come back again and again; the first-match scan is done once per topic.
        self.namespace = functools.lru_cache(maxsize=65_536)(self._find)

    def _find(self, topic: str) -> Namespace:
        for namespace in self.namespaces:
            if matches(namespace.pattern, topic):
                return namespace
        return DEFAULT_NAMESPACE  # unreachable: the default matches every topic

    def history_size(self, topic: str, default: int) -> int:
        """Publications kept for ``topic``: its namespace's ``history_size``, else ``default``."""
        size = self.namespace(topic).history_size
        return default if size is None else size

    def history_sizes(self, default: int) -> Callable[[str], int] | None:
        """A per-topic history size function for a broker, or None if every topic gets
        ``default`` (no namespace sets ``history_size``)."""
        if all(n.history_size is None for n in self.namespaces):
            return None
        return functools.partial(self.history_size, default=default)

    def check_subscribe(self, topics: Iterable[str], user: str | None, grants: Grants) -> list[str]:
        """Raises :class:`ForbiddenTopic` naming the first topic of ``topics`` (in sorted
        order) that a connection of ``user`` holding ``grants`` may not subscribe to.
        Returns those the authorization hook must decide (``subscribe = "backend"``, no
        grant), sorted."""
        if self.open:
            return []
        ask: list[str] = []
        for topic in sorted(topics):
            namespace = self.namespace(topic)
            if namespace.subscribe == "any" or _granted(grants.subscribe, topic, user):
                continue
            if namespace.subscribe == "backend":
                ask.append(topic)
                continue
            raise ForbiddenTopic(
                f"may not subscribe to {topic!r}: {namespace.name} has subscribe = "
                '"granted" and this connection holds no subscribe grant matching it'
            )
        return ask

    def check_publish(
        self, topic: str, message: str, user: str | None, grants: Grants, subscribed: bool
    ) -> Namespace:
        """The namespace of ``topic`` if a connection of ``user`` holding ``grants``
        (``subscribed`` to the topic or not) may publish ``message`` there.

        Raises:
            ForbiddenTopic: the namespace does not allow this connection to publish.
            MessageTooLarge: the message is over the namespace's ``max_message_size``.
        """
        namespace = self.namespace(topic)
        rule = namespace.publish
        allowed = rule != "none" and (
            rule == "backend"  # unless granted, the node asks the hook (asks_publish)
            or _granted(grants.publish, topic, user)
            or (rule == "subscribers" and subscribed)
        )
        if not allowed:
            why = {
                "none": "no client may publish there",
                "granted": "this connection holds no publish grant matching it",
                "subscribers": "this connection is not subscribed to it and holds no "
                "publish grant matching it",
            }[rule]
            raise ForbiddenTopic(
                f'may not publish to {topic!r}: {namespace.name} has publish = "{rule}" and {why}'
            )
        limit = namespace.max_message_size
        if limit is not None:
            size = len(message.encode())
            if size > limit:
                raise MessageTooLarge(
                    f"the message is {size} bytes; {namespace.name} allows at most {limit} "
                    "(max_message_size)"
                )
        return namespace


def asks_publish(namespace: Namespace, topic: str, user: str | None, grants: Grants) -> bool:
    """Whether the authorization hook decides a client publish to ``topic`` (in its
    ``namespace``): ``publish = "backend"`` and no publish grant matches."""
    return namespace.publish == "backend" and not _granted(grants.publish, topic, user)


@dataclass(slots=True)
class _Bucket:
    """A token bucket: ``burst`` tokens at once, refilled at ``rate`` per second."""

    allowance: float
    checked: float

    def take(self, cost: float, burst: float, rate: float, now: float) -> float | None:
        """Take ``cost`` tokens at ``now`` (monotonic seconds); None if there were
        enough, else the seconds until there will be (nothing is taken)."""
        allowance = min(burst, self.allowance + (now - self.checked) * rate)
        self.checked = now
        self.allowance = allowance
        if allowance < cost:
            return (cost - allowance) / rate
        self.allowance = allowance - cost
        return None


@dataclass(slots=True)
class PublishLimiter:
    """One connection's client-publish token buckets, one per namespace."""

    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take(self, namespace: Namespace, now: float) -> None:
        """Count one publish at ``now`` (monotonic seconds) in ``namespace``.

        Raises:
            RateLimited: the connection has used up its burst and the rate since.
        """
        bucket = self._buckets.get(namespace.pattern)
        burst = float(namespace.publish_burst)
        if bucket is None:
            bucket = self._buckets[namespace.pattern] = _Bucket(burst, now)
        wait = bucket.take(1.0, burst, namespace.publish_rate, now)
        if wait is not None:
            raise RateLimited(
                f"too many publishes: {namespace.name} allows {namespace.publish_burst} at "
                f"once and {namespace.publish_rate:g} per second; the next one in {wait:.2f} s"
            )


JOIN_LEAVE_BURST: Final = 20
"""Joins and leaves (of topics whose namespace announces them) one connection may make
at once: enough for a page subscribing to its rooms, or several room switches."""

JOIN_LEAVE_RATE: Final = 2.0
"""Joins and leaves per second one connection may make after its burst. Each is told to
every other subscriber of the topic on every node, so without a bound a client toggling
its subscription would flood them all (and could get slow readers cut off)."""


@dataclass(slots=True)
class JoinLeaveLimiter:
    """One connection's budget of joins and leaves in topics that announce them."""

    _bucket: _Bucket = field(default_factory=lambda: _Bucket(float(JOIN_LEAVE_BURST), 0.0))

    def take(self, changes: int, now: float) -> None:
        """Count a command that joins or leaves ``changes`` such topics at ``now``.

        Raises:
            RateLimited: past the burst and the rate; the command changes nothing.
        """
        if self._bucket.checked == 0.0:
            self._bucket.checked = now
        # One command may join a whole page of topics at once (cost capped at the burst).
        cost = float(min(changes, JOIN_LEAVE_BURST))
        wait = self._bucket.take(cost, JOIN_LEAVE_BURST, JOIN_LEAVE_RATE, now)
        if wait is not None:
            raise RateLimited(
                f"too many joins and leaves: a connection may join or leave topics that "
                f"announce them {JOIN_LEAVE_BURST} times at once and {JOIN_LEAVE_RATE:g} "
                f"times per second; this command's {changes} can go in {wait:.2f} s"
            )
