"""Topic names.

The rule (also in README.md and the OpenAPI document): a topic is 1 to
``max_topic_length`` characters (default 128), each an ASCII letter, a digit or
one of ``_ - . : / @``. Topics are case-sensitive and matched exactly; ``*`` and
``>`` are reserved for wildcards a later version may add.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from wsrelay.errors import InvalidTopic, TooManyTopics

TOPIC_ALPHABET = "A-Z a-z 0-9 _ - . : / @"
_TOPIC_CHARS = re.compile(r"[A-Za-z0-9_\-.:/@]+")


def validate_topic(topic: str, max_length: int) -> str:
    """Return ``topic`` unchanged if it is a valid name.

    Raises:
        InvalidTopic: it is empty, too long, or has a character outside the alphabet.
    """
    if not topic:
        raise InvalidTopic("topic must not be empty")
    if len(topic) > max_length:
        raise InvalidTopic(f"topic is {len(topic)} characters long; the limit is {max_length}")
    if _TOPIC_CHARS.fullmatch(topic) is None:
        raise InvalidTopic(f"topic {_shorten(topic)!r} has a character outside {TOPIC_ALPHABET}")
    return topic


def validate_topics(topics: Iterable[str], max_length: int, max_count: int) -> set[str]:
    """Validate each name and the count of distinct names.

    Raises:
        InvalidTopic: one name is invalid.
        TooManyTopics: more than ``max_count`` distinct names.
    """
    result = {validate_topic(t, max_length) for t in topics}
    if len(result) > max_count:
        raise TooManyTopics(f"{len(result)} topics; a client may subscribe to at most {max_count}")
    return result


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
