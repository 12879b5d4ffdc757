"""Hand one publication to its recipients, encoding it once.

The envelope is serialized once per publication, and framed once per mode
(JSON envelope or raw text), lazily: a publication nobody reads in raw mode is
never framed raw. Every recipient gets the same ``bytes`` object; nothing is
allocated per recipient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec

from wsrelay.core.registry import Client
from wsrelay.core.schema import MessageFrame, encode

Framer = Callable[[bytes], bytes]
"""Turns a UTF-8 text payload into the bytes of one WebSocket text frame."""


@dataclass(frozen=True, slots=True)
class Publication:
    """A message on its way to subscribers. ``user`` is a user key or None (everyone).
    ``offset`` and ``epoch`` are its position in the topic's stream, once the broker
    gave it one (0 and "" before, and for announcements, which have none)."""

    topic: str
    message: str
    user: str | None = None
    offset: int = 0
    epoch: str = ""
    skip: str | None = None
    """The id of a client it must not reach (the publisher's own, for ``skip_self``);
    every broker carries it to every node, and the history keeps it for replays."""
    json: bool = False
    """``message`` is the compact JSON text of a JSON value other than a string
    (:mod:`wsrelay.core.payload`): embedded as is in the envelope, sent as is in raw
    mode. False: ``message`` is the string itself."""

    def envelope(self) -> bytes:
        """The JSON-mode payload: ``{"type":"message","topic":...,"message":...,"offset":...}``
        (``message`` a JSON string, or the JSON value embedded as its text)."""
        message = msgspec.Raw(self.message) if self.json else self.message
        return encode(MessageFrame(self.topic, message, self.offset))


def deliver(publication: Publication, recipients: Iterable[Client], framer: Framer) -> int:
    """Queue ``publication`` to each recipient's connection; returns how many accepted it.

    A recipient recovering the topic (:attr:`Client.held`) gets it later, in order, or
    not at all if its recovery already replayed it; the client it skips, never."""
    json_frame: bytes | None = None
    raw_frame: bytes | None = None
    accepted = 0
    skip = publication.skip
    for client in recipients:
        sink = client.sink
        if sink is None or (skip is not None and client.id == skip):
            continue
        if client.held is not None and not client.held.admit(publication):
            continue
        if sink.raw:
            if raw_frame is None:
                raw_frame = framer(publication.message.encode())
            frame = raw_frame
        else:
            if json_frame is None:
                json_frame = framer(publication.envelope())
            frame = json_frame
        if sink.send(frame):
            accepted += 1
    return accepted
