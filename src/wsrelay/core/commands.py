"""Decoding a client's WebSocket command into what :class:`~wsrelay.core.session.Session`
carries out: a subscription change or a publish. No I/O and no relay calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec

from wsrelay.core.history import Position
from wsrelay.core.schema import ClientCommand, ClientPublish, decode
from wsrelay.errors import InvalidField

TOPIC_COMMANDS: Final = ("topics", "subscribe", "unsubscribe")


@dataclass(frozen=True, slots=True)
class TopicCommand:
    """``topics`` (replace), ``subscribe`` (add) or ``unsubscribe`` (remove)."""

    name: str
    topics: list[str]
    since: dict[str, Position] | None


Command = TopicCommand | ClientPublish


def decode_command(text: str) -> Command:
    """The one command ``text`` holds.

    Raises:
        InvalidJSON, InvalidField: not a JSON command of a known shape, or not exactly
            one command in it.
    """
    command = decode(text, ClientCommand)
    present = [
        (name, topics)
        for name, topics in zip(
            TOPIC_COMMANDS, (command.topics, command.subscribe, command.unsubscribe), strict=True
        )
        if topics is not None
    ]
    if command.publish is not None:
        if present or command.since is not None:
            raise InvalidField('"publish" goes alone: send other commands in their own frames')
        return command.publish
    if len(present) != 1:
        raise InvalidField('send exactly one of "topics", "subscribe", "unsubscribe" or "publish"')
    name, topics = present[0]
    if command.since is None:
        return TopicCommand(name, topics, None)
    if name == "unsubscribe":
        raise InvalidField('"since" goes with "topics" or "subscribe", not "unsubscribe"')
    since = {t: Position(p.epoch, p.offset) for t, p in command.since.items()}
    return TopicCommand(name, topics, since)


class _PublishId(msgspec.Struct):
    id: int | str | None = None


class _IdOnly(msgspec.Struct):
    publish: _PublishId | None = None


_decode_id = msgspec.json.Decoder(_IdOnly).decode


def request_id(text: str) -> int | str | None:
    """The ``id`` of a ``publish`` command that could not be decoded, if it can be read,
    so that its error frame names it (else None)."""
    try:
        found = _decode_id(text)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    return found.publish.id if found.publish is not None else None
