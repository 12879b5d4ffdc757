"""Topic patterns: the one matcher behind namespaces, grants and wildcard subscriptions.

A topic is split into *segments* on ``.``. In a pattern:

* ``*`` matches any run of characters within one segment: ``news.*`` matches
  ``news.eu`` but not ``news.eu.fr`` nor ``news``; ``chat:*`` matches ``chat:1``. As a
  whole segment it is NATS's single-token wildcard, and must match at least one
  character.
* ``>`` as the whole last segment matches one or more segments, at least one character
  in all: ``news.>`` matches ``news.eu`` and ``news.eu.fr``, not ``news`` nor ``news.``
  (NATS's full wildcard).
* ``{user}`` (grants only) stands for the connection's own user id, so that
  ``inbox:{user}`` lets each user read only their own inbox; for an anonymous
  connection such a pattern matches nothing.

Everything else matches itself. Patterns are compiled once and cached.
"""

from __future__ import annotations

import functools
import re
from typing import Final

from wsrelay.errors import InvalidTopic

USER_PLACEHOLDER: Final = "{user}"
WILDCARDS: Final = ("*", ">")

_PATTERN_CHARS = re.compile(r"(?:[A-Za-z0-9_\-.:/@*>]|\{user\})+")


def is_pattern(text: str) -> bool:
    """Whether ``text`` holds a wildcard or the user placeholder (else it is a topic)."""
    return "*" in text or ">" in text or USER_PLACEHOLDER in text


def validate_pattern(pattern: str, max_length: int) -> str:
    """Return ``pattern`` unchanged if it is well formed.

    Raises:
        InvalidTopic: empty, too long, a character outside the topic alphabet (plus
            ``*``, ``>`` and ``{user}``), or ``>`` anywhere but as the whole last segment.
    """
    if not pattern:
        raise InvalidTopic("a topic pattern must not be empty")
    if len(pattern) > max_length:
        raise InvalidTopic(
            f"topic pattern is {len(pattern)} characters long; the limit is {max_length}"
        )
    if _PATTERN_CHARS.fullmatch(pattern) is None:
        raise InvalidTopic(
            f"topic pattern {pattern[:40]!r} has a character outside the topic alphabet, "
            "* > and {user}"
        )
    segments = pattern.split(".")
    for index, segment in enumerate(segments):
        if ">" in segment and (segment != ">" or index != len(segments) - 1):
            raise InvalidTopic(
                f"in topic pattern {pattern[:40]!r}, > may only be the whole last segment (news.>)"
            )
    return pattern


def matches(pattern: str, topic: str, user: str | None = None) -> bool:
    """Whether ``topic`` matches ``pattern`` (``{user}`` standing for ``user``)."""
    if not is_pattern(pattern):
        return pattern == topic
    if USER_PLACEHOLDER in pattern:
        if user is None:
            return False
        return _compile(pattern, user).fullmatch(topic) is not None
    return _compile(pattern, None).fullmatch(topic) is not None


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str, user: str | None) -> re.Pattern[str]:
    segments = pattern.split(".")
    parts = []
    for index, segment in enumerate(segments):
        if segment == ">" and index == len(segments) - 1:
            parts.append(".+")
        elif segment == "*":
            parts.append("[^.]+")
        else:
            pieces = segment.split("*")
            escaped = [_literal(piece, user) for piece in pieces]
            parts.append("[^.]*".join(escaped))
    return re.compile(r"\.".join(parts))


def _literal(text: str, user: str | None) -> str:
    if user is None:
        return re.escape(text)
    return re.escape(user).join(re.escape(piece) for piece in text.split(USER_PLACEHOLDER))
