"""The topic pattern matcher, against a table and against a naive matcher on random input."""

from __future__ import annotations

import random

import pytest

from wsrelay.core.patterns import matches, validate_pattern
from wsrelay.errors import InvalidTopic


@pytest.mark.parametrize(
    ("pattern", "topic", "user", "expected"),
    [
        ("news", "news", None, True),
        ("news", "news.eu", None, False),
        ("news.*", "news.eu", None, True),
        ("news.*", "news.eu.fr", None, False),
        ("news.*", "news", None, False),
        ("news.*", "news.", None, False),  # * as a whole segment matches one character or more
        ("news.>", "news.eu", None, True),
        ("news.>", "news.eu.fr", None, True),
        ("news.>", "news", None, False),
        ("chat:*", "chat:1", None, True),
        ("chat:*", "chat:", None, True),  # inside a segment * may match nothing
        ("chat:*", "chat:1.x", None, False),
        ("*.eu", "news.eu", None, True),
        ("inbox:{user}", "inbox:42", "42", True),
        ("inbox:{user}", "inbox:43", "42", False),
        ("inbox:{user}", "inbox:42", None, False),
        ("inbox:{user}.*", "inbox:a.b.x", "a.b", True),  # the user id is literal text
        ("inbox:{user}", "inbox:aXb", "a.b", False),
        ("a.b", "aXb", None, False),  # . is literal
    ],
)
def test_the_table(pattern: str, topic: str, user: str | None, expected: bool) -> None:
    assert matches(validate_pattern(pattern, 128), topic, user) is expected


@pytest.mark.parametrize("bad", ["", "news.>.eu", "news>", "a b", "x" * 129, "{users}"])
def test_malformed_patterns_are_refused(bad: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_pattern(bad, 128)


def naive(pattern: str, topic: str) -> bool:
    """Segment by segment, the rules stated in the module docstring, without regexes."""
    ps, ts = pattern.split("."), topic.split(".")
    for i, p in enumerate(ps):
        if p == ">" and i == len(ps) - 1:
            return len(ts) > i and ".".join(ts[i:]) != ""
        if i >= len(ts):
            return False
        if p == "*":
            if not ts[i]:
                return False
        elif not glob(p, ts[i]):
            return False
    return len(ts) == len(ps)


def glob(pattern: str, text: str) -> bool:
    if "*" not in pattern:
        return pattern == text
    head, _, rest = pattern.partition("*")
    if not text.startswith(head):
        return False
    text = text[len(head) :]
    return any(glob(rest, text[i:]) for i in range(len(text) + 1))


def test_the_matcher_agrees_with_a_naive_one_on_random_input() -> None:
    rng = random.Random(12)
    alphabet = ["a", "b", "ab", ""]
    for _ in range(20000):
        segments = [rng.choice(alphabet) for _ in range(rng.randint(1, 4))]
        topic = ".".join(segments) or "a"
        pattern_segments = [
            rng.choice(["*", "a*", "*b", "a", "b", "ab", "a*b"]) for _ in range(rng.randint(1, 4))
        ]
        if rng.random() < 0.3:
            pattern_segments[-1] = ">"
        pattern = ".".join(pattern_segments)
        assert matches(pattern, topic) is naive(pattern, topic), (pattern, topic)
