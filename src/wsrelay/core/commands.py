"""Decoding a client's WebSocket command into what :class:`~wsrelay.core.session.Session`
carries out: a subscription change, a publish or a presence query. No I/O and no relay calls."""

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


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    """``presence`` (the topic's connections) or ``presence_stats`` (their counts)."""

    name: str
    topic: str
    id: int | str | None


PRESENCE_COMMANDS: Final = ("presence", "presence_stats")

Command = TopicCommand | ClientPublish | PresenceQuery


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
    queries = [
        (name, topic)
        for name, topic in zip(
            PRESENCE_COMMANDS, (command.presence, command.presence_stats), strict=True
        )
        if topic is not None
    ]
    if queries:
        if len(queries) > 1 or present or command.since is not None or command.publish:
            raise InvalidField(
                f'"{queries[0][0]}" goes alone (with its "id"): send other commands in '
                "their own frames"
            )
        return PresenceQuery(queries[0][0], queries[0][1], command.id)
    if command.id is not None:
        raise InvalidField(
            '"id" goes with "presence" or "presence_stats" (a publish carries its own)'
        )
    if command.publish is not None:
        if present or command.since is not None:
            raise InvalidField('"publish" goes alone: send other commands in their own frames')
        return command.publish
    if len(present) != 1:
        raise InvalidField(
            'send exactly one of "topics", "subscribe", "unsubscribe", "publish", '
            '"presence" or "presence_stats"'
        )
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
    id: int | str | None = None


_decode_id = msgspec.json.Decoder(_IdOnly).decode


def request_id(text: str) -> int | str | None:
    """The ``id`` of a ``publish`` (or presence) command that could not be decoded, if
    it can be read, so that its error frame names it (else None)."""
    try:
        found = _decode_id(text)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None
    return found.publish.id if found.publish is not None else found.id
