"""Settings: one frozen dataclass, each field documenting its default, unit and variable.

The command line (``wsrelay serve --help``) and the README's table are built from
these fields, so a setting is added in one place. Every field can be set with an
environment variable named ``WSRELAY_<FIELD NAME IN CAPITALS>``, and in a TOML file
named by ``--config`` (top-level keys are the field names; ``[[namespace]]`` tables
define the namespaces of :mod:`wsrelay.core.rules`). A command-line flag wins over
the variable, which wins over the file, which wins over the default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wsrelay.core.history import HistoryLimits
from wsrelay.core.rules import Namespace, Rules, namespace_from_table

KiB = 1024
MiB = 1024 * KiB

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
STACKS = ("native", "aiohttp")


def _setting(
    default: Any,
    help: str,
    *,
    metavar: str | None = None,
    secret: bool = False,
    file_only: bool = False,
) -> Any:
    # A secret is kept out of repr(), so a logged Settings never shows it. A file-only
    # setting (the namespaces) has no flag and no variable: it is a list of tables.
    return field(
        default=default,
        repr=not secret,
        metadata={"help": help, "metavar": metavar, "file_only": file_only},
    )


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
    registration_ttl: int = _setting(
        86400,
        "Seconds a registration lives after it is made, or after its last connection "
        "closed, while no connection is open for it.",
        metavar="SECONDS",
    )
    workers: int = _setting(
        1,
        "Processes to run, sharing the port (SO_REUSEPORT) so that every core is used; "
        "more than 1 needs a Redis broker, which lets them act as one relay.",
        metavar="N",
    )
    history_size: int = _setting(
        100,
        "Publications kept per topic, from which clients recover what they missed while "
        "disconnected (and nodes what they missed while cut off from Redis); 0 keeps "
        "none: no history, no recovery.",
        metavar="N",
    )
    history_ttl: float = _setting(
        300.0, "Seconds a publication stays in its topic's history.", metavar="SECONDS"
    )
    history_memory: int = _setting(
        64 * MiB,
        "Bytes the whole history may take (memory broker; Redis has its own maxmemory); "
        "past it the topics published to least recently lose their history.",
        metavar="BYTES",
    )
    idempotency_window: float = _setting(
        300.0,
        "Seconds a publish's idempotency_key is remembered: a repeat within it publishes "
        "nothing and answers the first position.",
        metavar="SECONDS",
    )
    presence_ttl: float = _setting(
        30.0,
        "Seconds a node's presence entries (GET /presence, GET /users/<id>) outlive its "
        "last heartbeat (sent every third of it): a node that died without saying so "
        "drops out of presence within this time (Redis broker; the memory broker's "
        "nodes end with their process).",
        metavar="SECONDS",
    )
    broker_pool_size: int = _setting(
        10,
        "Redis connections this process sends commands on (registrations, connections, "
        "catch-up), plus one for publishes and one for pub/sub. A command waits for a "
        "free connection, up to --broker-timeout, and the commands that waited go together "
        "in one pipeline, so a burst is queued rather than refused (Redis broker only).",
        metavar="N",
    )
    broker_timeout: float = _setting(
        5.0,
        "Seconds a Redis command may take, waiting for a connection included; past it "
        "(a stalled or unreachable Redis) the request gets 503 broker_unavailable, or "
        "publish_outcome_unknown for a publish already sent (retry it with the same "
        "idempotency_key); a publish sent to a Redis that stops answering gets that as "
        "soon as the health probe declares Redis down (Redis broker only).",
        metavar="SECONDS",
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
    max_registrations_per_user: int = _setting(
        100,
        "Registrations one user may hold at once (made by POST /register or by a connection "
        "token, on any node); past it POST /register gets 429. Anonymous registrations are "
        "not counted. 0: no limit.",
        metavar="N",
    )
    log_level: str = _setting("info", "Log level: " + ", ".join(LOG_LEVELS) + ".", metavar="LEVEL")
    log_format: str = _setting(
        "text",
        "Log line format: text, or json (one JSON object per line).",
        metavar="FORMAT",
    )
    # -- hardening (docs/security.md) --
    api_key: tuple[str, ...] = _setting(
        (),
        "API keys that POST /register, DELETE /register/<id>, POST /publish[/batch], GET "
        "/stats, /topics and /metrics require as 'Authorization: Bearer <key>'; several "
        "(repeat the flag, or separate with commas) allow rotation, none asks for no key. "
        "On a non-loopback --host each key must be 16 characters or more. Prefer the "
        "variable: flags are visible to other local users.",
        metavar="KEY",
        secret=True,
    )
    insecure: bool = _setting(
        False,
        "Allow listening on a non-loopback address without --api-key, or with a key "
        "shorter than 16 characters (for example behind a proxy that authenticates).",
    )
    allowed_origin: tuple[str, ...] = _setting(
        (),
        "Origins whose web pages may open WebSockets, as patterns such as "
        "https://*.example.com (repeat the flag, or separate with commas); another Origin "
        "gets 403 before the upgrade. None: no Origin check (see docs/security.md).",
        metavar="PATTERN",
    )
    max_connections: int = _setting(
        10000,
        "WebSocket connections this process holds at once; past it an upgrade gets 503.",
        metavar="N",
    )
    max_connections_per_ip: int = _setting(
        0,
        "WebSocket connections one client address may hold on this process (behind a "
        "--trusted-proxy, the address it forwards); past it an upgrade gets 429 "
        "too_many_connections_per_ip. 0: no limit.",
        metavar="N",
    )
    trusted_proxy: tuple[str, ...] = _setting(
        (),
        "Addresses or CIDR ranges of the proxies in front of the relay (repeat the flag, "
        "or separate with commas), e.g. 10.0.0.0/8: from those peers the client's address "
        "is read from X-Forwarded-For (or, without it, Forwarded), for the logs and "
        "--max-connections-per-ip; from any other peer the headers are ignored. None: "
        "the peer's address is the client's.",
        metavar="CIDR",
    )
    listen_backlog: int = _setting(
        2048,
        "Connections the kernel queues before the server accepts them (capped by "
        "net.core.somaxconn). A reconnect storm after a restart arrives at once; past the "
        "queue, clients' SYNs are dropped and retried after 1, 3, 7... seconds.",
        metavar="N",
    )
    jwt_secret: str | None = _setting(
        None,
        "HS256 secret that verifies connection tokens (GET /ws?token=...). Default: none.",
        metavar="SECRET",
        secret=True,
    )
    jwt_public_key_file: str | None = _setting(
        None,
        "PEM file holding the RSA public key that verifies RS256 connection tokens "
        "(GET /ws?token=...). Default: none.",
        metavar="PATH",
    )
    max_token_lifetime: int = _setting(
        86400,
        "Seconds ahead of now a connection token's exp may lie; a token meant to live "
        "longer is refused with 401 invalid_token. 0: no limit.",
        metavar="SECONDS",
    )
    ping_interval: float = _setting(
        25.0,
        "Seconds between the server's pings on each WebSocket; a client that has not "
        "answered half an interval later is disconnected. 0 turns pings off.",
        metavar="SECONDS",
    )
    stack: str = _setting(
        "native",
        "What serves new connections. native: a WebSocket upgrade goes to a driver on "
        "the websockets library's sans-I/O protocol (about 4.3 KiB per idle connection "
        "instead of 19, docs/decisions/0013), a publish to one on the httptools parser "
        "(about 2.9 times aiohttp's requests/s, docs/decisions/0005), everything else to "
        "aiohttp. aiohttp: "
        "aiohttp serves everything. Same API and rules either way.",
        metavar="STACK",
    )
    request_timeout: float = _setting(
        30.0,
        "Seconds a client gets to send a request's headers (from connecting, or from its "
        "previous request on a kept-alive connection) and, separately, its body; past it "
        "the connection is closed (headers) or answered 408 (body).",
        metavar="SECONDS",
    )
    # -- your backend: webhooks and the authorization hook (README "Webhooks") --
    webhook_url: str | None = _setting(
        None,
        "URL events are POSTed to (connected, disconnected, subscribed, unsubscribed, "
        "topic_occupied, topic_vacated, client_published), in signed batches of up to 100 "
        "events or 50 ms, at least once (each with an id to deduplicate by). Needs "
        "--webhook-secret. Default: none (no events are made).",
        metavar="URL",
    )
    webhook_secret: str | None = _setting(
        None,
        "Secret the Wsrelay-Signature header of webhooks (and of authorization requests) "
        "is an HMAC-SHA256 with. Prefer the variable: flags are visible to other local "
        "users. Default: none.",
        metavar="SECRET",
        secret=True,
    )
    webhook_retry_for: float = _setting(
        600.0,
        "Seconds a webhook batch is retried (exponential backoff with jitter, up to 5 s "
        "apart) while the receiver fails; past it the batch is dropped, counted in "
        "/metrics and logged.",
        metavar="SECONDS",
    )
    webhook_queue_size: int = _setting(
        100_000,
        "Events one process keeps waiting for delivery; past it new events are dropped "
        "(counted in /metrics and logged), never slowing clients down.",
        metavar="N",
    )
    authorize_url: str | None = _setting(
        None,
        'URL the relay POSTs to for topics of namespaces with subscribe = "backend" or '
        'publish = "backend": {"action", "user", "client", "topics"}, answered '
        '{"topics": {"<topic>": true|false}}. Default: none.',
        metavar="URL",
    )
    authorize_ttl: float = _setting(
        60.0,
        "Seconds an answer of --authorize-url is kept per user (or anonymous client), "
        "topic and action; 0 asks every time.",
        metavar="SECONDS",
    )
    authorize_timeout: float = _setting(
        2.0,
        "Seconds the relay waits for --authorize-url; past it, or on any answer that is "
        "not a decision, the command is refused with authorization_unavailable "
        "(fail closed).",
        metavar="SECONDS",
    )

    config: str | None = _setting(
        None,
        "TOML file holding settings (top-level keys are the settings' names, e.g. "
        "history_size = 50) and [[namespace]] tables (topic rules: who may subscribe and "
        "publish); flags and variables override it. Default: none.",
        metavar="FILE",
    )
    namespaces: tuple[Namespace, ...] = _setting(
        (),
        "Topic namespaces, first match wins (config file only: [[namespace]] tables).",
        file_only=True,
    )

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "registration_ttl",
            "broker_pool_size",
            "workers",
            "max_body_size",
            "max_message_size",
            "outbox_limit",
            "max_topics_per_client",
            "max_topic_length",
            "max_connections",
            "listen_backlog",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.max_registrations_per_user < 0:
            problems.append("max_registrations_per_user must be 0 (no limit) or more")
        if self.max_connections_per_ip < 0:
            problems.append("max_connections_per_ip must be 0 (no limit) or more")
        for proxy in self.trusted_proxy:
            try:
                ipaddress.ip_network(proxy.strip(), strict=False)
            except ValueError:
                problems.append(
                    f"trusted_proxy: {proxy!r} is not an IP address or CIDR range "
                    "(e.g. 10.0.0.0/8, 127.0.0.1, fd00::/8)"
                )
        if self.max_token_lifetime < 0:
            problems.append("max_token_lifetime must be 0 (no limit) or more")
        if self.ping_interval < 0:
            problems.append("ping_interval must be 0 (off) or more")
        if self.request_timeout <= 0:
            problems.append("request_timeout must be more than 0")
        if self.history_size < 0:
            problems.append("history_size must be 0 (no history) or more")
        for name in ("history_ttl", "history_memory", "idempotency_window", "presence_ttl"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be more than 0")
        if self.broker_timeout <= 0:
            problems.append("broker_timeout must be more than 0")
        problems.extend(self._backend_problems())
        if self.stack not in STACKS:
            problems.append(f"stack must be one of {', '.join(STACKS)}")
        if self.log_format not in LOG_FORMATS:
            problems.append(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        if any(not key.strip() or "," in key for key in self.api_key):
            problems.append("api_key: a key must not be empty or contain a comma")
        if self.jwt_secret is not None and not self.jwt_secret:
            problems.append("jwt_secret must not be empty")
        if self.jwt_public_key_file is not None and not os.path.isfile(self.jwt_public_key_file):
            problems.append(f"jwt_public_key_file: no such file {self.jwt_public_key_file!r}")
        if not 0 <= self.port <= 65535:
            problems.append("port must be between 0 and 65535")
        if self.log_level not in LOG_LEVELS:
            problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if self.public_url is not None and not self.public_url.startswith(("ws://", "wss://")):
            problems.append("public_url must start with ws:// or wss://")
        if self.workers > 1 and self.broker.startswith("memory:"):
            problems.append(
                "workers above 1 need a shared broker (memory:// keeps everything inside one "
                "process); add --broker redis://HOST:6379/0"
            )
        if self.workers > 1 and self.port == 0:
            problems.append("workers above 1 need a fixed port to share, not 0")
        if problems:
            raise ValueError("; ".join(problems))

    def _backend_problems(self) -> list[str]:
        """What is wrong with the webhook and authorization settings."""
        problems = []
        for name in ("webhook_url", "authorize_url"):
            url = getattr(self, name)
            if url is not None and not url.startswith(("http://", "https://")):
                problems.append(f"{name} must start with http:// or https://")
        if self.webhook_url is not None and not self.webhook_secret:
            problems.append(
                "webhook_url needs webhook_secret, so that the receiver can verify the "
                "events come from the relay"
            )
        if self.webhook_secret is not None and not self.webhook_secret:
            problems.append("webhook_secret must not be empty")
        if self.webhook_retry_for < 0:
            problems.append("webhook_retry_for must be 0 (no retry) or more")
        if self.webhook_queue_size < 1:
            problems.append("webhook_queue_size must be at least 1")
        if self.authorize_ttl < 0:
            problems.append("authorize_ttl must be 0 (no cache) or more")
        if self.authorize_timeout <= 0:
            problems.append("authorize_timeout must be more than 0")
        backend = [
            n.pattern for n in self.namespaces if n.subscribe == "backend" or n.publish == "backend"
        ]
        if backend and self.authorize_url is None:
            problems.append(
                f'namespace {backend[0]!r} has a "backend" rule: set authorize_url, the '
                "URL the relay asks"
            )
        return problems

    def rules(self) -> Rules:
        """The namespaces' rules (:mod:`wsrelay.core.rules`)."""
        return Rules(self.namespaces)

    def history_limits(self) -> HistoryLimits:
        return HistoryLimits(
            self.history_size, self.history_ttl, self.history_memory, self.idempotency_window
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from the config file (``overrides["config"]``, else ``WSRELAY_CONFIG``),
        then ``WSRELAY_*`` variables on top, then ``overrides`` on top.

        Raises:
            ValueError: the file cannot be read or holds an unknown key or a wrongly typed
                value, a variable does not parse, or a value is out of range; the message
                names the culprit in one line.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = overrides.get("config") or environ.get(env_name("config")) or None
        if path is not None:
            values.update(load_config_file(path))
            values["config"] = path
        for f in dataclasses.fields(cls):
            if f.metadata.get("file_only"):
                continue
            raw = environ.get(env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = parse_value(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def load_config_file(path: str) -> dict[str, Any]:
    """The settings a TOML config file sets, as :class:`Settings` field values.

    Top-level keys are setting names (``history_size = 50``, ``api_key = ["k1", "k2"]``;
    sizes may also be strings such as ``"64KiB"``); ``[[namespace]]`` tables define the
    namespaces, in order.

    Raises:
        ValueError: the file cannot be read, is not TOML, or holds an unknown key or a
            value of the wrong type; the message names the file and the key.
    """
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ValueError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path}: not valid TOML: {exc}") from None
    settable = {
        f.name: f for f in dataclasses.fields(Settings) if f.name not in ("config", "namespaces")
    }
    values: dict[str, Any] = {}
    for key, value in document.items():
        if key == "namespace":
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise ValueError(
                    f"config file {path}: namespace must be a list of tables ([[namespace]])"
                )
            values["namespaces"] = tuple(
                namespace_from_table(table, f"config file {path}: namespace {index + 1}")
                for index, table in enumerate(value)
            )
            continue
        f = settable.get(key)
        if f is None:
            raise ValueError(
                f"config file {path}: unknown key {key!r} (settings are named as in "
                "wsrelay serve --help, with _ for -; namespaces are [[namespace]] tables)"
            )
        values[key] = _file_value(f, value, f"config file {path}: {key}")
    return values


def _file_value(f: dataclasses.Field[Any], value: Any, what: str) -> Any:
    """A TOML ``value`` checked (and converted) for field ``f``."""
    kind = f.type
    if isinstance(value, str) and kind not in ("str", "str | None", "tuple[str, ...]"):
        # Sizes with suffixes, durations as strings: parsed as the variable would be.
        try:
            return parse_value(f, value)
        except ValueError as exc:
            raise ValueError(f"{what}: {str(exc).removeprefix(env_name(f.name) + ': ')}") from None
    if kind in ("bool", bool):
        ok = isinstance(value, bool)
    elif kind in ("int", int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind in ("float", float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind == "tuple[str, ...]":
        if isinstance(value, str):
            return parse_value(f, value)
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = {
            "tuple[str, ...]": "a list of strings",
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
        }.get(str(kind), "a string")
        raise ValueError(f"{what} must be {expected}, not {type(value).__name__} {value!r}")
    return value


def env_name(field_name: str) -> str:
    """The environment variable that sets ``field_name``."""
    return "WSRELAY_" + field_name.upper()


def parse_value(f: dataclasses.Field[Any], raw: str) -> Any:
    """Parse ``raw`` for field ``f``; sizes accept a ``KiB``/``MiB`` suffix."""
    if f.type in ("int", int):
        return parse_size(raw, env_name(f.name))
    if f.type in ("float", float):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{env_name(f.name)}: expected a number, got {raw!r}") from None
    if f.type in ("bool", bool):
        return parse_bool(raw, env_name(f.name))
    if f.type == "tuple[str, ...]":
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    return raw


def parse_bool(raw: str, what: str = "value") -> bool:
    """``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``, any case.

    Raises:
        ValueError: ``raw`` is none of those.
    """
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{what}: expected true or false, got {raw!r}")


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
