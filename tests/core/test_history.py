"""The memory history, the recovery rule and the idempotency cache, without I/O (a fake clock)."""

from __future__ import annotations

import sys

import pytest

from wsrelay.core.fanout import Publication
from wsrelay.core.history import (
    ENTRY_OVERHEAD,
    META_TTL,
    TOPIC_OVERHEAD,
    HistoryPage,
    IdempotencyCache,
    MemoryHistory,
    Position,
    Receipt,
    recovered,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def history(size: int = 10, ttl: float = 60, memory: int = 10**9) -> tuple[MemoryHistory, Clock]:
    clock = Clock()
    return MemoryHistory(size, ttl, memory, clock), clock


def publish(h: MemoryHistory, topic: str, message: str = "m") -> Publication:
    return h.append(Publication(topic, message))


def test_offsets_count_per_topic_within_one_epoch() -> None:
    h, _ = history()
    got = [publish(h, t) for t in "abab"]
    assert [(p.topic, p.offset) for p in got] == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert got[0].epoch == got[2].epoch != got[1].epoch
    assert h.position("a") == Position(got[0].epoch, 2)


def test_reads_page_forward_backward_and_answer_the_position() -> None:
    h, _ = history()
    for i in range(1, 6):
        publish(h, "t", str(i))
    assert [p.message for p in h.read("t", since=2, limit=2).publications] == ["3", "4"]
    assert [p.message for p in h.read("t", limit=2, reverse=True).publications] == ["5", "4"]
    page = h.read("t")
    assert page.publications == [] and page.position.offset == 5


def test_only_the_last_size_publications_are_kept() -> None:
    h, _ = history(size=3)
    for i in range(1, 8):
        publish(h, "t", str(i))
    assert [p.offset for p in h.read("t", limit=100).publications] == [5, 6, 7]


def test_size_zero_keeps_none_but_still_counts() -> None:
    h, _ = history(size=0)
    assert [publish(h, "t").offset for _ in range(3)] == [1, 2, 3]
    assert h.read("t", limit=10).publications == []
    assert h.stats.bytes == TOPIC_OVERHEAD  # the position only


def test_publications_expire_after_the_ttl_but_the_position_stays() -> None:
    h, clock = history(ttl=60)
    first = publish(h, "t", "old")
    clock.now += 61
    publish(h, "t", "new")
    page = h.read("t", limit=10)
    assert [p.message for p in page.publications] == ["new"]
    assert page.position == Position(first.epoch, 2)


def test_a_topic_untouched_for_the_meta_ttl_is_forgotten_and_gets_a_new_epoch() -> None:
    h, clock = history()
    old = publish(h, "quiet")
    clock.now += META_TTL + 1
    publish(h, "other")  # a new topic: stale ones are dropped when one is made
    assert h.position("quiet") != Position(old.epoch, 1)
    assert h.position("quiet").offset == 0


def test_over_the_memory_limit_the_least_recently_published_topics_go_first() -> None:
    text = "x" * 1000
    entry = ENTRY_OVERHEAD + sys.getsizeof(text)
    limit = 3 * TOPIC_OVERHEAD + 4 * entry - 1  # one byte short of a, b and c
    h, _ = history(memory=limit)
    a = publish(h, "a", text)
    publish(h, "b", text)
    publish(h, "a", text)  # a is now the most recent
    publish(h, "c", text)
    assert h.stats.evicted_topics == 1
    assert h.stats.bytes == 2 * TOPIC_OVERHEAD + 3 * entry
    assert h.position("a").epoch == a.epoch  # kept
    assert h.position("b").offset == 0  # evicted whole: a new epoch, nothing kept


def test_one_topic_over_the_limit_keeps_its_newest() -> None:
    h, _ = history(size=100, memory=3000)
    for i in range(10):
        publish(h, "big", f"{i}" * 500)
    kept = h.read("big", limit=100).publications
    assert kept and kept[-1].offset == 10 and h.stats.bytes <= 3000


@pytest.mark.parametrize(
    ("kept", "top", "since", "expected"),
    [
        ([], 5, Position("e", 5), True),  # nothing missed
        ([6, 7], 7, Position("e", 5), True),
        ([7], 7, Position("e", 5), False),  # 6 is gone
        ([], 7, Position("e", 5), False),  # all gone
        ([6, 7], 7, Position("other", 5), False),  # another epoch
        ([], 7, Position("e", 9), False),  # from the future
    ],
)
def test_the_recovery_rule(kept: list[int], top: int, since: Position, expected: bool) -> None:
    page = HistoryPage([Publication("t", "m", None, o, "e") for o in kept], Position("e", top))
    assert recovered(page, since) is expected


def test_recovery_is_bounded() -> None:
    page = HistoryPage(
        [Publication("t", "m", None, o, "e") for o in range(1, 12)], Position("e", 11)
    )
    assert recovered(page, Position("e", 0), limit=11)
    assert not recovered(page, Position("e", 0), limit=10)


def test_the_idempotency_cache_remembers_within_its_window_and_capacity() -> None:
    clock = Clock()
    cache = IdempotencyCache(window=10, capacity=2, clock=clock)
    receipt = Receipt(Position("e", 1))
    cache.put("t", "k", receipt)
    assert cache.get("t", "k") == Receipt(receipt.position, duplicate=True)
    assert cache.get("other", "k") is None
    clock.now += 11
    assert cache.get("t", "k") is None
    for key in "abc":
        cache.put("t", key, receipt)
    assert cache.get("t", "a") is None and cache.get("t", "c") is not None


def test_positions_asked_by_subscriptions_are_evicted_before_any_publications() -> None:
    text = "x" * 1000
    limit = 3 * TOPIC_OVERHEAD + ENTRY_OVERHEAD + sys.getsizeof(text)
    h, _ = history(memory=limit)
    kept = publish(h, "kept", text)
    for i in range(50):  # a client subscribing to fresh names
        h.position(f"fresh.{i}")
    assert h.stats.bytes <= limit
    assert h.stats.evicted_positions >= 48 and h.stats.evicted_topics == 0
    page = h.read("kept", limit=10)
    assert page.position == Position(kept.epoch, 1) and len(page.publications) == 1
