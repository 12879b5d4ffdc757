"""Topic names, subscription patterns, and the index that matches patterns.

The rule (also in README.md and the OpenAPI document): a topic is 1 to
``max_topic_length`` characters (default 128), each an ASCII letter, a digit or
one of ``_ - . : / @``. Topics are case-sensitive and matched exactly.

A *subscription* names a topic or a *pattern* (:mod:`wsrelay.core.patterns`, NATS
semantics): ``news.*`` (one segment) or ``news.>`` (one or more). In a subscription a
wildcard must be a whole segment: ``chat:*`` is refused, because the index below
(:class:`PatternIndex`) walks a publication's topic one segment at a time and a
wildcard inside a segment could only be found by testing every such pattern held,
which would make a publish's cost grow with the number of patterns. ``{user}``
belongs in grants, not in subscriptions. Publishing always names a topic.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from wsrelay.core.patterns import USER_PLACEHOLDER, is_pattern, matches, validate_pattern
from wsrelay.core.rules import Grants, Rules
from wsrelay.errors import ForbiddenTopic, InvalidTopic, TooManyTopics

TOPIC_ALPHABET = "A-Z a-z 0-9 _ - . : / @"
_TOPIC_CHARS = re.compile(r"[A-Za-z0-9_\-.:/@]+")

ONE: str = "*"
"""The single-segment wildcard, as a whole segment."""
REST: str = ">"
"""The rest wildcard, as the whole last segment."""


def validate_topic(topic: str, max_length: int) -> str:
    """Return ``topic`` unchanged if it is a valid name (not a pattern).

    Raises:
        InvalidTopic: it is empty, too long, a pattern, or has a character outside the
            alphabet.
    """
    if not topic:
        raise InvalidTopic("topic must not be empty")
    if len(topic) > max_length:
        raise InvalidTopic(f"topic is {len(topic)} characters long; the limit is {max_length}")
    if _TOPIC_CHARS.fullmatch(topic) is None:
        if "*" in topic or ">" in topic:
            # The one place a pattern is refused outright: a publication has one topic.
            raise InvalidTopic(
                f"topic {_shorten(topic)!r} has a character outside {TOPIC_ALPHABET}: "
                "* and > make a pattern, which subscriptions may name but a publish may not"
            )
        raise InvalidTopic(f"topic {_shorten(topic)!r} has a character outside {TOPIC_ALPHABET}")
    return topic


def validate_subscription(name: str, max_length: int) -> str:
    """Return ``name`` unchanged if it is a topic or a pattern a client may subscribe to.

    Raises:
        InvalidTopic: an invalid topic; a malformed pattern; ``{user}`` in it; or ``*``
            as part of a segment (``chat:*``) rather than a whole one (``chat.*``).
    """
    if not is_pattern(name):
        return validate_topic(name, max_length)
    validate_pattern(name, max_length)
    if USER_PLACEHOLDER in name:
        raise InvalidTopic(
            f"{_shorten(name)!r}: {USER_PLACEHOLDER} belongs in grants, not in subscriptions"
        )
    for segment in name.split("."):
        if "*" in segment and segment != ONE:
            raise InvalidTopic(
                f"in subscription pattern {_shorten(name)!r}, * must be a whole segment "
                f"(news.*), not part of one ({segment!r})"
            )
    return name


def validate_topics(names: Iterable[str], max_length: int, max_count: int) -> set[str]:
    """Validate each subscription (a topic or a pattern) and the count of distinct ones:
    patterns count toward ``max_count`` as topics do.

    Raises:
        InvalidTopic: one name is invalid.
        TooManyTopics: more than ``max_count`` distinct names.
    """
    result = {validate_subscription(t, max_length) for t in names}
    if len(result) > max_count:
        raise TooManyTopics(f"{len(result)} topics; a client may subscribe to at most {max_count}")
    return result


def split_patterns(names: Iterable[str]) -> tuple[set[str], set[str]]:
    """``(topics, patterns)`` of ``names``."""
    topics: set[str] = set()
    patterns: set[str] = set()
    for name in names:
        (patterns if is_pattern(name) else topics).add(name)
    return topics, patterns


# -- the index --------------------------------------------------------------------------------

M = TypeVar("M")


class _Node(Generic[M]):
    __slots__ = ("children", "members")

    def __init__(self) -> None:
        self.children: dict[str, _Node[M]] = {}
        """By segment: a literal one, ``*`` or ``>``."""
        self.members: set[M] = set()
        """Who holds the pattern that ends here."""


class PatternIndex(Generic[M]):
    """Subscription patterns by segment (a trie, as NATS's sublist), each held by members.

    :meth:`match` walks a topic segment by segment, following at each node the literal
    child and the ``*`` child and collecting the ``>`` child: its cost depends on the
    topic and on the patterns that share its prefixes, never on how many patterns are
    held elsewhere. Patterns must pass :func:`validate_subscription` (wildcards are
    whole segments).
    """

    __slots__ = ("_count", "_root")

    def __init__(self) -> None:
        self._root: _Node[M] = _Node()
        self._count = 0

    def __len__(self) -> int:
        """Patterns held by at least one member."""
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def add(self, pattern: str, member: M) -> bool:
        """Let ``member`` hold ``pattern``; True if nobody held it before."""
        node = self._root
        for segment in pattern.split("."):
            child = node.children.get(segment)
            if child is None:
                child = node.children[segment] = _Node()
            node = child
        first = not node.members
        node.members.add(member)
        if first:
            self._count += 1
        return first

    def discard(self, pattern: str, member: M) -> bool:
        """``member`` no longer holds ``pattern``; True if that left nobody holding it."""
        path: list[tuple[_Node[M], str]] = []
        node = self._root
        for segment in pattern.split("."):
            child = node.children.get(segment)
            if child is None:
                return False
            path.append((node, segment))
            node = child
        if member not in node.members:
            return False
        node.members.discard(member)
        if node.members:
            return False
        self._count -= 1
        # Prune the nodes left empty, so that the trie is only as big as what is held.
        for parent, segment in reversed(path):
            child = parent.children[segment]
            if child.members or child.children:
                break
            del parent.children[segment]
        return True

    def match(self, topic: str) -> list[set[M]]:
        """The members of each held pattern that ``topic`` matches (one set per pattern)."""
        found: list[set[M]] = []
        segments = topic.split(".")
        last = len(segments) - 1
        level: Sequence[_Node[M]] = (self._root,)
        for index, segment in enumerate(segments):
            following: list[_Node[M]] = []
            for node in level:
                children = node.children
                if not children:
                    continue
                rest = children.get(REST)
                # ``>`` takes the rest of the topic, at least one character of it.
                if rest is not None and rest.members and (index < last or segment):
                    found.append(rest.members)
                child = children.get(segment)
                if child is not None:
                    following.append(child)
                # ``*`` takes one whole segment, at least one character.
                one = children.get(ONE) if segment else None
                if one is not None:
                    following.append(one)
            if not following:
                return found
            level = following
        found.extend(node.members for node in level if node.members)
        return found

    def matches_any(self, topic: str) -> bool:
        """Whether any held pattern matches ``topic``."""
        return bool(self.match(topic))


# -- may a pattern be subscribed to? ----------------------------------------------------------


def covers(grant: str, pattern: str, user: str | None) -> bool:
    """Whether every topic ``pattern`` (a valid subscription pattern) matches also matches
    ``grant`` (a grant pattern, ``{user}`` standing for ``user``). Exact for grants whose
    wildcards are whole segments; a wildcard inside a grant's segment (``chat:*``)
    covers only a literal segment it matches (so ``chat:*`` covers ``chat:1.>`` but not
    ``chat:*``-like subscriptions, which are refused anyway)."""
    if USER_PLACEHOLDER in grant:
        if user is None or any(c in user for c in "*>."):
            return False  # a user id that is not one literal segment covers nothing
        grant = grant.replace(USER_PLACEHOLDER, user)
    wanted, allowed = pattern.split("."), grant.split(".")
    if allowed[-1] == REST:
        head = len(allowed) - 1
        # Every topic of ``pattern`` must have more than ``head`` segments (true when
        # ``pattern`` has, ``>`` included), the first ``head`` covered, and a non-empty
        # rest (only a single empty literal segment left over could be empty).
        if len(wanted) <= head or wanted[head:] == [""]:
            return False
        pairs = zip(allowed[:head], wanted[:head], strict=True)
        return all(_segment_covers(a, w) for a, w in pairs)
    if len(wanted) != len(allowed) or wanted[-1] == REST:
        return False
    return all(_segment_covers(a, w) for a, w in zip(allowed, wanted, strict=True))


def _segment_covers(allowed: str, wanted: str) -> bool:
    if wanted == REST:
        return False  # handled by the caller where it can be covered (the last segment)
    if allowed == ONE:
        return wanted != ""  # ``*`` needs one character; any other segment has one
    if wanted == ONE:
        return False  # a literal or partial wildcard cannot take every segment
    return matches(allowed, wanted)


def overlaps(pattern: str, other: str) -> bool:
    """Whether some topic might match both ``pattern`` (a subscription pattern) and
    ``other`` (a namespace pattern). Errs towards True: it only says False when no topic
    can match both, so a check built on it may refuse too much, never too little."""
    return _overlap(pattern.split("."), other.split("."))


def _overlap(a: list[str], b: list[str]) -> bool:
    if not a or not b:
        return not a and not b
    if a[0] == REST or b[0] == REST:
        return True  # ``>`` takes one or more segments: the other has at least one
    if not _segments_overlap(a[0], b[0]):
        return False
    return _overlap(a[1:], b[1:])


def _segments_overlap(a: str, b: str) -> bool:
    if "*" not in a:
        return matches(b, a) if "*" in b else a == b
    if "*" not in b:
        return matches(a, b)
    # Both have a wildcard: their fixed prefixes and suffixes must agree.
    a_head, a_tail = a.split("*")[0], a.split("*")[-1]
    b_head, b_tail = b.split("*")[0], b.split("*")[-1]
    heads = a_head.startswith(b_head) or b_head.startswith(a_head)
    tails = a_tail.endswith(b_tail) or b_tail.endswith(a_tail)
    return heads and tails


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def check_subscribe_patterns(
    rules: Rules, patterns: Iterable[str], user: str | None, grants: Grants
) -> None:
    """Whether a connection of ``user`` holding ``grants`` may subscribe to each of
    ``patterns``, as a whole: a pattern is allowed if one subscribe grant covers every
    topic it matches (:func:`covers`: grant ``news.>`` allows ``news.*``), or if no
    namespace with ``subscribe = "granted"`` (or ``"backend"``: the authorization hook
    decides topics by name, never patterns) could hold one of its topics
    (:func:`overlaps`). So a pattern never lets a client receive a topic it could not
    subscribe to by name; it may be refused where each of its topics would be allowed
    (a granted namespace shadowed by an earlier open one): subscribe to those by name.

    Raises:
        ForbiddenTopic: naming the first refused pattern (in sorted order) and the rule.
    """
    if rules.open:
        return
    for pattern in sorted(patterns):
        if any(covers(grant, pattern, user) for grant in grants.subscribe):
            continue
        for namespace in rules.namespaces:
            rule = namespace.subscribe
            if rule in ("granted", "backend") and overlaps(pattern, namespace.pattern):
                raise ForbiddenTopic(
                    f"may not subscribe to {pattern!r}: it may match topics of "
                    f'{namespace.name}, which has subscribe = "{rule}", and this connection '
                    "holds no subscribe grant covering the whole pattern"
                )
