import pytest

from wsrelay.core.outbox import Outbox, OutboxOverflow


def test_push_reports_the_first_frame_only() -> None:
    """Only the push that makes the outbox non-empty asks for a flush."""
    box = Outbox(100, lambda: 0)
    assert box.push(b"a") is True
    assert box.push(b"b") is False
    assert box.take() == [b"a", b"b"]
    assert box.push(b"c") is True


def test_overflow_counts_queued_and_buffered_bytes() -> None:
    """The limit covers what waits here plus what the transport still holds."""
    buffered = 60
    box = Outbox(100, lambda: buffered)
    box.written(60)
    box.push(b"x" * 40)
    with pytest.raises(OutboxOverflow):
        box.push(b"x")
    assert box.pending_bytes == 40


def test_a_drained_transport_is_measured_before_refusing() -> None:
    """The last measurement may be stale; a frame is refused only if the fresh one agrees."""
    buffered = 90
    box = Outbox(100, lambda: buffered)
    box.written(90)
    buffered = 0  # the kernel took the data since the last write
    assert box.push(b"x" * 50) is True


def test_take_empties() -> None:
    box = Outbox(10, lambda: 0)
    box.push(b"abc")
    box.take()
    assert len(box) == 0 and box.pending_bytes == 0 and box.take() == []


def test_one_frame_waits_without_a_list() -> None:
    """The common case, one frame per flush, makes no list."""
    box = Outbox(100)
    assert box.push(b"abc") is True
    assert box.take_raw() == (b"abc", None)
    assert box.take_raw() == (None, None)
    box.push(b"a")
    box.push(b"b")
    box.push(b"c")
    assert box.take_raw() == (b"a", [b"a", b"b", b"c"])
    assert len(box) == 0 and box.pending_bytes == 0


def test_sent_bytes_raise_the_bound_until_a_measurement_clears_it() -> None:
    """Bytes handed to the transport count against the limit without asking it;
    once they would pass the limit, one measurement replaces the bound."""
    measured: list[int] = []
    buffered = 0

    def measure() -> int:
        measured.append(buffered)
        return buffered

    box = Outbox(100, measure)
    for _ in range(9):
        box.push(b"x" * 10)
        box.take()
        box.sent(10)  # 90 bytes handed over: the bound is 90
    assert measured == []
    box.push(b"x" * 10)  # 90 + 10 fits exactly: still not measured
    box.take()
    box.sent(10)
    assert box.push(b"x" * 10) is True  # the kernel took everything: measured once, 0
    assert measured == [0]
    buffered = 95
    box.take()
    box.sent(95)
    with pytest.raises(OutboxOverflow):  # 95 really buffered + 10 > 100
        box.push(b"x" * 10)
    assert measured == [0, 95]


def test_a_subclass_can_measure_its_own_transport() -> None:
    class Measured(Outbox):
        __slots__ = ()

        def measure_buffered(self) -> int:
            return 95

    box = Measured(100)
    box.sent(95)
    with pytest.raises(OutboxOverflow):
        box.push(b"x" * 10)
