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
