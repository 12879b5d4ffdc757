"""core/payload.py and the paths a JSON message takes through the core: decoding once,
the depth rule, the envelope embedding the text, raw frames, history accounting."""

from __future__ import annotations

import json
import random
import sys
from typing import Any

import msgspec
import pytest

from wsrelay.core.fanout import Publication, deliver
from wsrelay.core.history import ENTRY_OVERHEAD, TOPIC_OVERHEAD, MemoryHistory
from wsrelay.core.payload import MAX_DEPTH, message_text, too_deep
from wsrelay.core.registry import Client
from wsrelay.errors import InvalidField, InvalidJSON


def raw(text: str | bytes) -> msgspec.Raw:
    """A message as the request decoder hands it over."""
    return msgspec.json.decode(text, type=msgspec.Raw)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('"hi"', ("hi", False)),
        ('"{\\"a\\":1}"', ('{"a":1}', False)),  # a string holding JSON stays a string
        ('""', ("", False)),
        ('"\\u00e9\\n"', ("é\n", False)),  # a string is decoded: its escapes are resolved
        (' { "a" : [ 1 , 2.50 ] , "b" : null } ', ('{"a":[1,2.50],"b":null}', True)),
        ('{"s": "a \\"quoted\\" \\u00e9 é"}', ('{"s":"a \\"quoted\\" \\u00e9 é"}', True)),
        ("123456789012345678901234567890", ("123456789012345678901234567890", True)),
        ("1e400", ("1e400", True)),  # kept as written: the relay never converts numbers
        ("-0.0", ("-0.0", True)),
        ("true", ("true", True)),
        ("false", ("false", True)),
        ("null", ("null", True)),
        ("[]", ("[]", True)),
        ("{}", ("{}", True)),
    ],
)
def test_message_text_is_a_strings_text_or_a_values_compact_json(
    text: str, expected: tuple[str, bool]
) -> None:
    assert message_text(raw(text)) == expected


def test_bad_messages_name_the_field() -> None:
    with pytest.raises(InvalidJSON, match=r"^messages\[2\]\.message: not valid UTF-8"):
        message_text(raw(b'{"a": "\xff"}'), "messages[2].message")
    with pytest.raises(InvalidJSON, match=r"^message: not valid UTF-8"):
        message_text(raw(b'"\xff"'))
    with pytest.raises(InvalidField, match=rf"^message: .* at most {MAX_DEPTH} "):
        message_text(raw("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)))
    assert message_text(raw("[" * MAX_DEPTH + "]" * MAX_DEPTH))[1] is True


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


def shape(rng: random.Random, levels: int) -> Any:
    """A random value with brackets and quotes in its strings, to fool a naive count."""
    if levels == 0 or rng.random() < 0.15:
        return rng.choice(["[", "]", "{", '}"', '\\"[', "\\\\", 1, None, True, "]\n"])
    if rng.random() < 0.5:
        return [shape(rng, levels - 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["k", '"[', "\\{", "]"]) + str(i): shape(rng, levels - 1) for i in range(3)}


def test_too_deep_agrees_with_the_nesting_of_random_values() -> None:
    rng = random.Random(13)
    for _ in range(2000):
        value = shape(rng, rng.randint(0, 9))
        text = json.dumps(value, indent=rng.choice([None, 1, 2])).encode()
        for most in (0, 1, 2, 3, 5):
            assert too_deep(text, most) == (depth(value) > most), (text, most)


@pytest.mark.parametrize("levels", [MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 5000])
@pytest.mark.parametrize(
    ("inner", "more"), [("", 0), ("1", 0), ("{}", 1), ('"]]]"', 0), ('{"k": [2]}', 2)]
)
def test_too_deep_at_the_limit(levels: int, inner: str, more: int) -> None:
    text = "[" * levels + inner + "]" * levels
    assert too_deep(text.encode()) == (levels + more > MAX_DEPTH)


def test_a_wide_value_with_many_brackets_is_not_deep() -> None:
    wide = json.dumps([{"i": i, "s": "[[[[{{{{"} for i in range(5000)]).encode()
    assert not too_deep(wide)


class Sink:
    def __init__(self, raw: bool) -> None:
        self.raw = raw
        self.frames: list[bytes] = []

    def send(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return True

    def close(self, code: int, reason: str) -> None:  # pragma: no cover - never closed here
        raise AssertionError("closed")


def test_the_envelope_embeds_json_text_and_raw_mode_sends_it() -> None:
    clients = [Client(f"c{i}", None, {"t"}) for i in range(4)]
    sinks = [Sink(raw=i % 2 == 1) for i in range(4)]
    for client, sink in zip(clients, sinks, strict=True):
        client.sink = sink
    value = Publication("t", '{"a":[1,"é"]}', offset=3, json=True)
    assert deliver(value, clients, lambda payload: payload) == 4
    assert sinks[0].frames == [
        '{"type":"message","topic":"t","message":{"a":[1,"é"]},"offset":3}'.encode()
    ]
    assert sinks[1].frames == ['{"a":[1,"é"]}'.encode()]
    # Encoded once per mode: every recipient of a mode holds the very same bytes.
    assert sinks[0].frames[0] is sinks[2].frames[0] and sinks[1].frames[0] is sinks[3].frames[0]
    text = Publication("t", '{"a":1}', offset=4)  # the same text as a string
    deliver(text, clients, lambda payload: payload)
    assert (
        sinks[0].frames[1] == b'{"type":"message","topic":"t","message":"{\\"a\\":1}","offset":4}'
    )
    assert sinks[1].frames[1] == b'{"a":1}'


def test_the_history_keeps_the_flag_and_counts_the_json_text() -> None:
    history = MemoryHistory(size=10, ttl=60, memory_limit=1 << 20, clock=lambda: 0.0)
    text = '{"items":[' + ",".join(str(i) for i in range(100)) + "]}"
    stored = history.append(Publication("t", text, json=True))
    assert (stored.offset, stored.json) == (1, True)
    assert history.stats.bytes == TOPIC_OVERHEAD + ENTRY_OVERHEAD + sys.getsizeof(text)
    [kept] = history.read("t", limit=10).publications
    assert (kept.message, kept.json) == (text, True)
