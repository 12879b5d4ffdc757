"""The SSE event id: every topic's position, within its size limit, and read back."""

from __future__ import annotations

import pytest

from wsrelay.core.history import Position
from wsrelay.core.schema import GapFrame, MessageFrame, SubscribedFrame, TopicPosition, encode
from wsrelay.core.sse import MAX_EVENT_ID, StreamPositions, event, event_id, parse_event_id
from wsrelay.errors import InvalidField


def test_an_id_names_every_topic_and_reads_back() -> None:
    positions = {"b.x": Position("9f2c41d0", 17), "a:1/@": Position("00ff", 0)}
    text = event_id(positions)
    assert text == "1;a:1/@=00ff.0;b.x=9f2c41d0.17"
    assert parse_event_id(text) == (positions, False)
    assert parse_event_id("") == ({}, False)
    assert parse_event_id("1") == ({}, False)


def test_past_its_limit_an_id_leaves_topics_out_and_says_so() -> None:
    positions = {f"t{i:04d}" + "x" * 50: Position("abcdef12", i) for i in range(100)}
    text = event_id(positions)
    assert len(text) <= MAX_EVENT_ID and text.endswith(";~")
    kept, truncated = parse_event_id(text)
    assert truncated and 0 < len(kept) < 100
    assert all(positions[topic] == position for topic, position in kept.items())


@pytest.mark.parametrize(
    "text", ["2;a=b.1", "1;a", "1;a=b", "1;a=b.", "1;=b.1", "1;a=.1", "1;a=b.-1", "1;a=b.1e3"]
)
def test_an_id_this_relay_did_not_make_is_refused(text: str) -> None:
    with pytest.raises(InvalidField):
        parse_event_id(text)
    with pytest.raises(InvalidField):
        parse_event_id("1;" + "a=b.1;" * (MAX_EVENT_ID // 6 + 1))


def test_an_event_is_one_data_line_with_its_id() -> None:
    assert event(b'{"a":1}', "1;t=e.2") == b'id: 1;t=e.2\ndata: {"a":1}\n\n'
    assert event(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert event(b"x\ny") == b"data: x\ndata: y\n\n"


def test_a_stream_follows_positions_from_its_frames() -> None:
    stream = StreamPositions()
    ack = SubscribedFrame(
        ["a", "b", "n.*"], {"a": TopicPosition(3, "e1"), "b": TopicPosition(0, "e2")}
    )
    assert stream.see(encode(ack)) == "1;a=e1.3;b=e2.0"
    assert stream.see(encode(MessageFrame("a", "hi", 4))) == "1;a=e1.4;b=e2.0"
    # A topic reached through a pattern only has no position: the id stays.
    assert stream.see(encode(MessageFrame("n.x", "hi", 9))) == "1;a=e1.4;b=e2.0"
    assert stream.see(encode(GapFrame("b", 7, "e3"))) == "1;a=e1.4;b=e3.7"
    assert stream.see(b'{"type":"published","offset":1,"epoch":"e"}') is None
    assert stream.see(encode(SubscribedFrame(["b"], {}))) == "1;b=e3.7"
