"""The pattern index (a trie by segment) and the rules of subscription patterns.

The index must agree with :func:`wsrelay.core.patterns.matches`, the one matcher: a
property test compares it with a naive scan on random topics and patterns.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsrelay.core.patterns import matches
from wsrelay.core.rules import Grants, Namespace, Rules
from wsrelay.core.topics import (
    PatternIndex,
    check_subscribe_patterns,
    covers,
    overlaps,
    validate_subscription,
    validate_topic,
    validate_topics,
)
from wsrelay.errors import ForbiddenTopic, InvalidTopic, TooManyTopics

# Few and short segments, the empty one included, so that random draws collide often.
LITERALS = st.sampled_from(["a", "b", "ab", ""])
topics = st.lists(LITERALS, min_size=1, max_size=4).map(".".join).filter(bool)
patterns = st.builds(
    lambda head, last: ".".join([*head, last]),
    st.lists(st.one_of(LITERALS, st.just("*")), max_size=3),
    st.one_of(LITERALS, st.just("*"), st.just(">")),
).filter(lambda p: "*" in p or ">" in p)


@settings(max_examples=400, deadline=None)
@given(held=st.lists(patterns, max_size=12), topic=topics)
def test_the_index_agrees_with_a_naive_scan(held: list[str], topic: str) -> None:
    index: PatternIndex[str] = PatternIndex()
    for pattern in held:
        index.add(pattern, pattern)
    found = sorted(p for group in index.match(topic) for p in group)
    assert found == sorted({p for p in held if matches(p, topic)})


@settings(max_examples=200, deadline=None)
@given(held=st.lists(patterns, min_size=1, max_size=12), gone=st.data(), topic=topics)
def test_the_index_agrees_after_removals(held: list[str], gone: st.DataObject, topic: str) -> None:
    index: PatternIndex[str] = PatternIndex()
    for pattern in held:
        index.add(pattern, pattern)
    removed = gone.draw(st.sets(st.sampled_from(held)))
    for pattern in removed:
        assert index.discard(pattern, pattern)
    kept = set(held) - removed
    assert len(index) == len(kept)
    found = sorted(p for group in index.match(topic) for p in group)
    assert found == sorted(p for p in kept if matches(p, topic))


def test_add_and_discard_report_the_first_and_last_holder() -> None:
    index: PatternIndex[str] = PatternIndex()
    assert index.add("news.*", "x") and not index.add("news.*", "y")
    assert not index.discard("news.*", "x") and index.discard("news.*", "y")
    assert not index.discard("news.*", "y")  # no longer held
    assert not index and index.match("news.eu") == []


def test_nats_semantics() -> None:
    index: PatternIndex[str] = PatternIndex()
    for pattern in ("news.*", "news.>", ">", "*.eu"):
        index.add(pattern, pattern)

    def found(topic: str) -> set[str]:
        return {p for group in index.match(topic) for p in group}

    assert found("news.eu") == {"news.*", "news.>", ">", "*.eu"}
    assert found("news.eu.fr") == {"news.>", ">"}
    assert found("news") == {">"}
    assert found("news.") == {">"}  # * and > need a character


def test_a_publish_walks_past_unrelated_patterns() -> None:
    """10,000 patterns on other prefixes: the walk stops at the first segment."""
    index: PatternIndex[int] = PatternIndex()
    for i in range(10_000):
        index.add(f"p{i}.*", i)
    assert index.match("news.eu") == []
    assert len(index) == 10_000


@pytest.mark.parametrize("name", ["news.*", "news.>", ">", "*", "a.*.c", "*.*.>"])
def test_whole_segment_patterns_may_be_subscribed(name: str) -> None:
    assert validate_subscription(name, 128) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("chat:*", "whole segment"),
        ("news.e*", "whole segment"),
        ("inbox:{user}", "belongs in grants"),
        ("news.>.x", "whole last segment"),
        ("a b.*", "character outside"),
    ],
)
def test_other_patterns_are_refused_with_the_reason(name: str, fragment: str) -> None:
    with pytest.raises(InvalidTopic, match=fragment):
        validate_subscription(name, 128)


def test_a_pattern_is_no_topic_to_publish_to() -> None:
    with pytest.raises(InvalidTopic, match="subscriptions may name but a publish may not"):
        validate_topic("news.*", 128)


def test_patterns_count_toward_the_topic_limit() -> None:
    assert validate_topics(["a", "news.*"], 128, 2) == {"a", "news.*"}
    with pytest.raises(TooManyTopics):
        validate_topics(["a", "news.*", "news.>"], 128, 2)


@pytest.mark.parametrize(
    ("grant", "pattern", "covered"),
    [
        ("news.>", "news.*", True),
        ("news.>", "news.>", True),
        ("news.>", "news.*.>", True),
        ("news.*", "news.*", True),
        (">", "*", True),
        ("news.*", "news.>", False),  # news.eu.fr
        ("news.eu", "news.*", False),
        ("news.*.*", "news.*.>", False),
        ("news.>", ">", False),
        ("chat:*.>", "chat:1.*", True),
        ("chat:*", "*", False),
        ("inbox:{user}.*", "inbox:42.*", True),
        ("inbox:{user}.*", "inbox:43.*", False),
    ],
)
def test_a_grant_covers_a_pattern_only_if_it_covers_all_its_topics(
    grant: str, pattern: str, covered: bool
) -> None:
    assert covers(grant, pattern, "42") is covered


@settings(max_examples=400, deadline=None)
@given(grant=patterns, pattern=patterns, topic=topics)
def test_covers_never_claims_too_much(grant: str, pattern: str, topic: str) -> None:
    """Sound: if the grant is said to cover the pattern, every topic of one is the other's."""
    if covers(grant, pattern, None) and matches(pattern, topic):
        assert matches(grant, topic)


@settings(max_examples=400, deadline=None)
@given(pattern=patterns, other=patterns, topic=topics)
def test_overlaps_never_misses_a_common_topic(pattern: str, other: str, topic: str) -> None:
    if matches(pattern, topic) and matches(other, topic):
        assert overlaps(pattern, other)


def test_overlaps_tells_disjoint_patterns_apart() -> None:
    assert not overlaps("news.*", "chat:*")
    assert not overlaps("news.*", "news.*.*")
    assert overlaps("*.eu", "chat:*.>")


RULES = Rules([Namespace("chat:*.>", subscribe="granted"), Namespace("open.>")])


@pytest.mark.parametrize(
    ("pattern", "grants", "allowed"),
    [
        ("news.*", (), True),  # no granted namespace can hold news.x
        ("chat:1.*", (), False),
        ("chat:1.*", ("chat:1.>",), True),
        ("chat:1.*", ("chat:1.x",), False),  # one topic granted is not the whole pattern
        ("*.x", (), False),  # chat:1.x would be among its topics
        (">", (), False),
        (">", (">",), True),
        ("open.*", (), True),
    ],
)
def test_a_pattern_is_checked_as_a_whole(
    pattern: str, grants: tuple[str, ...], allowed: bool
) -> None:
    if allowed:
        check_subscribe_patterns(RULES, [pattern], "42", Grants(grants))
    else:
        with pytest.raises(ForbiddenTopic, match='subscribe = "granted"'):
            check_subscribe_patterns(RULES, [pattern], "42", Grants(grants))


def test_without_namespaces_every_pattern_is_allowed() -> None:
    check_subscribe_patterns(Rules(), [">", "chat:1.*"], None, Grants())
