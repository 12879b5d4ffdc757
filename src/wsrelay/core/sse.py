"""Server-sent events without I/O: the event format and the event id that resumes a stream.

An SSE stream carries the very frames a JSON-mode WebSocket receives, one event each
(``data:`` holding the frame's JSON; the default event type, so ``EventSource``'s
``onmessage`` sees them all). What SSE adds is the event ``id``: a browser reconnecting
by itself sends back only the last id it received (``Last-Event-ID``), so the id must
say where the stream was in *every* topic it follows, as a WebSocket's ``since`` does.

The id (:func:`event_id`) is ``1`` followed by ``;topic=epoch.offset`` for each topic,
sorted: ``1;cats=9f2c41d0.17;dogs=9f2c41d0.3``. Topic names hold no ``;`` nor ``=``,
epochs no ``.``. It is at most :data:`MAX_EVENT_ID` characters (it goes with every
event); the topics past it are left out and the id ends with ``;~``, and a stream
resumed from such an id answers those topics ``recovered: false`` (the client reloads
them) rather than resume them from now as if nothing had been missed.

:class:`StreamPositions` follows one stream's positions from the frames it carries: a
``subscribed`` acknowledgement sets the topics it names (and drops those no longer
subscribed), a ``message`` moves its topic's offset, a ``gap`` its epoch and offset;
each such frame's event carries the new id, others (answers, joins, errors) none, so
the browser keeps the last.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import msgspec

from wsrelay.core.history import Position
from wsrelay.errors import InvalidField

VERSION: Final = "1"
"""The id format's version, its first field."""

MAX_EVENT_ID: Final = 1024
"""Characters an event id may take (about 45 topics of 10 characters at 7-digit offsets).
Past it topics are left out (:data:`TRUNCATED`)."""

TRUNCATED: Final = "~"
"""The last field of an id that left topics out."""

KEEP_ALIVE: Final = b": keep-alive\n\n"
"""The comment a stream carries when idle (every half ``--ping-interval``), so that
proxies and browsers do not time an idle stream out; clients ignore comments."""

RETRY: Final = 2000
"""Milliseconds ``EventSource`` waits before reconnecting by itself (``retry:``, sent
once at the start of each stream)."""


def event(payload: bytes, event_id: str | None = None) -> bytes:
    """One event carrying ``payload`` (a frame's JSON, one line: compact JSON escapes
    every line break), with ``event_id`` if given."""
    if b"\n" in payload or b"\r" in payload:  # never from the relay's own encoder
        payload = b"\ndata: ".join(payload.splitlines())
    if event_id is None:
        return b"data: " + payload + b"\n\n"
    return b"id: " + event_id.encode() + b"\ndata: " + payload + b"\n\n"


def event_id(positions: Mapping[str, Position]) -> str:
    """The id naming every topic's position, within :data:`MAX_EVENT_ID`."""
    parts = [VERSION]
    size = len(VERSION)
    room = MAX_EVENT_ID - len(TRUNCATED) - 1
    for topic in sorted(positions):
        position = positions[topic]
        part = f"{topic}={position.epoch}.{position.offset}"
        size += len(part) + 1
        if size > room:
            parts.append(TRUNCATED)
            break
        parts.append(part)
    return ";".join(parts)


def parse_event_id(text: str) -> tuple[dict[str, Position], bool]:
    """The positions an id names, and whether it left topics out. An empty id names none.

    Raises:
        InvalidField: not an id this relay made (the message says what is wrong).
    """
    if not text:
        return {}, False
    if len(text) > MAX_EVENT_ID:
        raise InvalidField(f"Last-Event-ID is over {MAX_EVENT_ID} characters")
    version, *parts = text.split(";")
    if version != VERSION:
        raise InvalidField(
            f"Last-Event-ID must start with {VERSION!r} (an id from this relay), "
            f"not {version[:20]!r}"
        )
    truncated = bool(parts) and parts[-1] == TRUNCATED
    if truncated:
        parts.pop()
    positions: dict[str, Position] = {}
    for part in parts:
        topic, _, rest = part.partition("=")
        epoch, _, offset = rest.rpartition(".")
        if not topic or not epoch or not (offset.isascii() and offset.isdigit()):
            raise InvalidField(f"Last-Event-ID: {part[:80]!r} is not topic=epoch.offset")
        positions[topic] = Position(epoch, int(offset))
    return positions, truncated


class _Position(msgspec.Struct):
    offset: int
    epoch: str


class _Frame(msgspec.Struct):
    """What a stream's positions need of a frame; the rest (a message's body) is skipped."""

    type: str
    topic: str = ""
    offset: int = 0
    epoch: str = ""
    topics: list[str] = []
    positions: dict[str, _Position] = {}


_decode_frame = msgspec.json.Decoder(_Frame).decode

_MOVES: Final = (b'{"type":"message"', b'{"type":"gap"', b'{"type":"subscribed"')
"""How the frames that move a position begin (the schema's tag comes first)."""


class StreamPositions:
    """One stream's position in each topic it follows by name; see the module docstring."""

    __slots__ = ("_id", "positions")

    def __init__(self) -> None:
        self.positions: dict[str, Position] = {}
        self._id: str | None = None

    def see(self, payload: bytes) -> str | None:
        """Take the frame ``payload`` into account; the id its event carries (the new
        positions), or None for a frame that moves none."""
        if not payload.startswith(_MOVES):
            return None
        frame = _decode_frame(payload)
        positions = self.positions
        if frame.type == "message":
            known = positions.get(frame.topic)
            if known is None:  # a topic reached through a pattern only: no position to keep
                return self._id
            positions[frame.topic] = Position(known.epoch, frame.offset)
        elif frame.type == "gap":
            positions[frame.topic] = Position(frame.epoch, frame.offset)
        else:
            kept = set(frame.topics)
            for topic in [t for t in positions if t not in kept]:
                del positions[topic]
            for topic, answer in frame.positions.items():
                positions[topic] = Position(answer.epoch, answer.offset)
        self._id = event_id(positions)
        return self._id
