"""Settings: one frozen dataclass, each field documenting its default, unit and variable.

The command line (``wsrelay serve --help``) and the README's table are built from
these fields, so a setting is added in one place. Every field can be set with an
environment variable named ``WSRELAY_<FIELD NAME IN CAPITALS>``; a command-line
flag wins over the variable, which wins over the default.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KiB = 1024
MiB = 1024 * KiB

LOG_LEVELS = ("debug", "info", "warning", "error")


def _setting(default: Any, help: str, *, metavar: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything an operator can configure. Sizes are bytes, durations seconds."""

    host: str = _setting("127.0.0.1", "Address to listen on.", metavar="ADDR")
    port: int = _setting(8000, "TCP port to listen on (0 picks a free port).", metavar="PORT")
    public_url: str | None = _setting(
        None,
        "Base URL clients reach the relay at, e.g. wss://relay.example.com, used in the "
        "url returned by POST /register (for use behind a proxy). Default: built from "
        "the request's Host header.",
        metavar="URL",
    )
    broker: str = _setting(
        "memory://", "Broker URL; memory:// keeps everything in this process.", metavar="URL"
    )
    max_body_size: int = _setting(
        1 * MiB, "Largest HTTP request body accepted, in bytes; larger gets 413.", metavar="BYTES"
    )
    max_message_size: int = _setting(
        64 * KiB,
        "Largest WebSocket message accepted from a client, in bytes; larger closes "
        "that client with 1009.",
        metavar="BYTES",
    )
    outbox_limit: int = _setting(
        1 * MiB,
        "Bytes that may wait to be written to one client; past it the client is "
        "disconnected with 4008 (slow consumer) and the others are unaffected.",
        metavar="BYTES",
    )
    max_topics_per_client: int = _setting(
        256, "Topics one client may subscribe to at once.", metavar="N"
    )
    max_topic_length: int = _setting(128, "Longest topic name, in characters.", metavar="N")
    log_level: str = _setting("info", "Log level: " + ", ".join(LOG_LEVELS) + ".", metavar="LEVEL")

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "max_body_size",
            "max_message_size",
            "outbox_limit",
            "max_topics_per_client",
            "max_topic_length",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if not 0 <= self.port <= 65535:
            problems.append("port must be between 0 and 65535")
        if self.log_level not in LOG_LEVELS:
            problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if self.public_url is not None and not self.public_url.startswith(("ws://", "wss://")):
            problems.append("public_url must start with ws:// or wss://")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``WSRELAY_*`` variables, then ``overrides`` on top.

        Raises:
            ValueError: a variable does not parse, or a value is out of range.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = parse_value(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def env_name(field_name: str) -> str:
    """The environment variable that sets ``field_name``."""
    return "WSRELAY_" + field_name.upper()


def parse_value(f: dataclasses.Field[Any], raw: str) -> Any:
    """Parse ``raw`` for field ``f``; sizes accept a ``KiB``/``MiB`` suffix."""
    if f.type in ("int", int):
        return parse_size(raw, env_name(f.name))
    return raw


def parse_size(raw: str, what: str = "value") -> int:
    """``"65536"``, ``"64KiB"`` or ``"1MiB"`` as an int.

    Raises:
        ValueError: ``raw`` is not such a number.
    """
    text = raw.strip()
    for suffix, unit in (("KiB", KiB), ("MiB", MiB), ("K", KiB), ("M", MiB)):
        if text.endswith(suffix):
            number = text[: -len(suffix)].strip()
            if number.isdigit():
                return int(number) * unit
            break
    if text.isdigit():
        return int(text)
    raise ValueError(f"{what}: expected a whole number (optionally with KiB or MiB), got {raw!r}")
