"""HTTP handlers: parse, call the relay, answer JSON. No relay logic lives here."""

from __future__ import annotations

import asyncio
import time
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from wsrelay import __version__
from wsrelay.core.payload import message_text, wire_value
from wsrelay.core.rules import NO_GRANTS, Grants
from wsrelay.core.schema import (
    MAX_HISTORY_PAGE,
    BatchPublishResponse,
    DisconnectUserResponse,
    HealthResponse,
    HistoryItem,
    HistoryResponse,
    PositionBody,
    PresenceResponse,
    PresenceStatsResponse,
    PublishResponse,
    ReadyResponse,
    RegisterRequest,
    RegisterResponse,
    StatsResponse,
    TextBatchPublishRequest,
    TopicInfo,
    TopicsResponse,
    UnregisterResponse,
    UserResponse,
    decode,
    decode_batch,
    decode_publish,
    encode,
)
from wsrelay.core.topics import validate_topic
from wsrelay.errors import (
    BadRequest,
    BrokerUnavailable,
    ClientError,
    InvalidField,
    PayloadTooLarge,
    RequestTimeout,
)
from wsrelay.relay import PublishItem, Relay
from wsrelay.server.cluster import group_members
from wsrelay.server.keys import RELAY, SETTINGS
from wsrelay.server.metrics import METRICS

T = TypeVar("T")


def json_response(body: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(body=encode(body), status=status, content_type="application/json")


async def read_json(request: web.Request, into: type[T]) -> T:
    """The request body decoded into ``into``.

    Raises:
        PayloadTooLarge: the declared length is over the limit (nothing is read).
        RequestTimeout: the body did not arrive within ``request_timeout``.
        InvalidJSON, InvalidField: the body is not valid JSON of that shape.
    """
    return decode(await read_body(request), into)


async def read_body(request: web.Request) -> bytes:
    """The request body, within the size and time limits (see :func:`read_json`)."""
    settings = request.app[SETTINGS]
    limit = settings.max_body_size
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(
            f"request body is {request.content_length} bytes; the limit is {limit}"
        )
    # aiohttp stops reading and raises 413 past client_max_size (chunked bodies).
    if request.content.is_eof():
        # The whole body came with the headers (the usual case for a small JSON body):
        # reading cannot wait, so there is nothing to time (a timer per request is not free).
        return await request.read()
    try:
        async with asyncio.timeout(settings.request_timeout):
            body = await request.read()
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {settings.request_timeout:g} s"
        ) from None
    except ConnectionResetError:  # the client went away mid-body: routine, not a fault
        raise BadRequest(
            "the connection closed before the whole body arrived", code="incomplete_body"
        ) from None
    return body


async def _count_registrations(relay: Relay) -> int | None:
    """All registrations, or None when the store cannot count them or is unreachable."""
    try:
        return await relay.registrations.count()
    except BrokerUnavailable:
        return None


async def health(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    registrations = await _count_registrations(relay)
    return json_response(
        HealthResponse(
            status="ok",
            version=__version__,
            broker="up" if relay.ready() else "down",
            connections=relay.registry.connections,
            registrations=registrations,
            topics=relay.registry.topics,
        )
    )


async def ready(request: web.Request) -> web.Response:
    if request.app[RELAY].ready():
        return json_response(ReadyResponse(status="ready"))
    return json_response(ReadyResponse(status="unavailable"), status=503)


async def register(request: web.Request) -> web.Response:
    body = await read_json(request, RegisterRequest)
    relay = request.app[RELAY]
    grants = NO_GRANTS
    if body.grants is not None:
        grants = Grants.checked(
            body.grants.subscribe, body.grants.publish, relay.settings.max_topic_length
        )
    client = await relay.register(body.user_id, body.topics, grants)
    return json_response(RegisterResponse(id=client.id, url=websocket_url(request, client.id)))


async def unregister(request: web.Request) -> web.Response:
    client_id = request.match_info["client_id"]
    await request.app[RELAY].unregister(client_id)
    return json_response(UnregisterResponse(id=client_id))


async def publish(request: web.Request) -> web.Response:
    return json_response(await publish_one(request.app, await read_body(request)))


async def publish_batch(request: web.Request) -> web.Response:
    return json_response(await publish_many(request.app, await read_body(request)))


# The publish endpoints' work, shared with the native HTTP driver (server/native_http.py).


async def publish_one(app: web.Application, body: bytes) -> PublishResponse:
    """``POST /publish`` once its body has arrived."""
    request = decode_publish(body)
    message, is_json = message_text(request.message)
    recipients, receipt = await app[RELAY].publish(
        request.topic,
        message,
        request.user_id,
        backend_key(request.idempotency_key),
        request.skip_client,
        json=is_json,
    )
    metrics = app[METRICS]
    if not receipt.duplicate:
        metrics.publishes.inc()
        metrics.deliveries.inc(recipients)
    position = receipt.position
    return PublishResponse(recipients, position.offset, position.epoch, receipt.duplicate)


async def publish_many(app: web.Application, body: bytes) -> BatchPublishResponse:
    """``POST /publish/batch`` once its body has arrived."""
    request = decode_batch(body)
    items: list[PublishItem]
    if isinstance(request, TextBatchPublishRequest):  # strings only: the common case
        items = [
            (m.topic, m.message, m.user_id, backend_key(m.idempotency_key), m.skip_client)
            for m in request.messages
        ]
    else:
        items = []
        for index, m in enumerate(request.messages):
            try:
                message, is_json = message_text(m.message)
            except ClientError as exc:
                raise type(exc)(f"messages[{index}].{exc.message}") from None
            key = backend_key(m.idempotency_key)
            items.append((m.topic, message, m.user_id, key, m.skip_client, is_json))
    answers = await app[RELAY].publish_many(items)
    metrics = app[METRICS]
    fresh = [recipients for recipients, receipt in answers if not receipt.duplicate]
    metrics.publishes.inc(len(fresh))
    metrics.deliveries.inc(sum(fresh))
    return BatchPublishResponse(
        recipients=[recipients for recipients, _ in answers],
        positions=[PositionBody(r.position.offset, r.position.epoch) for _, r in answers],
    )


def backend_key(key: str | None) -> str | None:
    """The backend's idempotency keys live apart from clients' (``client:<user>:<key>``), so
    that a client cannot claim a key the backend will use and silence its publish."""
    return None if key is None else "api:" + key


async def history(request: web.Request) -> web.Response:
    """``GET /history?topic=&since=&limit=&reverse=``."""
    query = request.query
    topic = query.get("topic")
    if not topic:
        raise InvalidField("topic is required: GET /history?topic=<topic>")
    relay = request.app[RELAY]
    validate_topic(topic, relay.settings.max_topic_length)
    since = _integer(query, "since", None, 0, 2**63 - 1)
    limit = _integer(query, "limit", HISTORY_LIMIT, 0, MAX_HISTORY_PAGE) or 0
    reverse = parse_flag(query.get("reverse", "false"), "reverse")
    page = await relay.broker.history(topic, since=since, limit=limit, reverse=reverse)
    return json_response(
        HistoryResponse(
            topic=topic,
            offset=page.position.offset,
            epoch=page.position.epoch,
            publications=[
                HistoryItem(p.offset, wire_value(p.message, p.json), p.user)
                for p in page.publications
            ],
        )
    )


async def presence(request: web.Request) -> web.Response:
    """``GET /presence?topic=``: the topic's connections on every node."""
    relay = request.app[RELAY]
    topic = _presence_topic(request, "/presence")
    return json_response(PresenceResponse(topic, await relay.presence_of(topic)))


async def presence_stats(request: web.Request) -> web.Response:
    """``GET /presence/stats?topic=``: how many connections and distinct users."""
    relay = request.app[RELAY]
    topic = _presence_topic(request, "/presence/stats")
    clients, users = await relay.presence_stats(topic)
    return json_response(PresenceStatsResponse(topic, clients, users))


def _presence_topic(request: web.Request, route: str) -> str:
    topic = request.query.get("topic")
    if not topic:
        raise InvalidField(f"topic is required: GET {route}?topic=<topic>")
    request.app[RELAY].check_presence_topic(topic)
    return topic


async def user(request: web.Request) -> web.Response:
    """``GET /users/<id>``: whether the user has connections open, on any node."""
    user_id = request.match_info["user_id"]
    connections = await request.app[RELAY].user_connections(user_id)
    return json_response(UserResponse(user_id, connections > 0, connections))


async def disconnect_user(request: web.Request) -> web.Response:
    """``DELETE /users/<id>/connections``: close every connection of the user, on every
    node, with 4503, and delete its registrations."""
    user_id = request.match_info["user_id"]
    connections, registrations = await request.app[RELAY].disconnect_user(user_id)
    return json_response(DisconnectUserResponse(user_id, connections, registrations))


HISTORY_LIMIT = 100
"""How many publications ``GET /history`` answers unless ``?limit=`` says otherwise."""


def _integer(query: Any, name: str, default: int | None, least: int, most: int) -> int | None:
    raw = query.get(name)
    if raw is None:
        return default
    digits = raw.isascii() and raw.isdigit() and len(raw) <= 19
    if not digits or not least <= int(raw) <= most:
        raise InvalidField(f"{name} must be an integer from {least} to {most}")
    return int(raw)


def parse_flag(raw: str, name: str) -> bool:
    if raw in ("true", "1"):
        return True
    if raw in ("false", "0"):
        return False
    raise InvalidField(f"{name} must be true or false, not {raw!r}")


async def stats(request: web.Request) -> web.Response:
    """``GET /stats``: this node's counters; a ``--workers`` group's, added up."""
    relay = request.app[RELAY]
    registrations = await _count_registrations(relay)
    members = await group_members(request.app)
    return json_response(
        StatsResponse(
            node=relay.node_id,
            version=__version__,
            uptime=round(time.monotonic() - relay.started_at, 3),
            broker="up" if relay.ready() else "down",
            connections=sum(n.connections for n in members),
            registrations=registrations,
            topics=sum(n.topics for n in members),
            publishes=sum(n.publishes for n in members),
            deliveries=sum(n.deliveries for n in members),
            slow_consumers=sum(n.slow_consumers for n in members),
            workers=len(members),
        )
    )


TOPICS_LIMIT = 100
"""How many topics ``GET /topics`` lists unless ``?limit=`` says otherwise."""
MAX_TOPICS_LIMIT = 1000
"""The largest ``?limit=`` accepted."""


async def topics(request: web.Request) -> web.Response:
    prefix = request.query.get("prefix", "")
    raw_limit = request.query.get("limit", str(TOPICS_LIMIT))
    digits = raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 6
    if not digits or not 1 <= int(raw_limit) <= MAX_TOPICS_LIMIT:
        raise InvalidField(f"limit must be an integer from 1 to {MAX_TOPICS_LIMIT}")
    busiest, total = request.app[RELAY].registry.busiest_topics(prefix, int(raw_limit))
    return json_response(TopicsResponse(topics=[TopicInfo(t, n) for t, n in busiest], total=total))


async def openapi(request: web.Request) -> web.Response:
    from wsrelay.server.openapi import document

    doc: dict[str, Any] = document(request.app[SETTINGS])
    return web.json_response(doc)


def websocket_url(request: web.Request, client_id: str) -> str:
    """Where the client connects: under ``public_url`` if set, else the Host it used."""
    base = request.app[SETTINGS].public_url
    if base is None:
        scheme = "wss" if request.secure else "ws"
        base = f"{scheme}://{request.host}"
    return f"{base.rstrip('/')}/ws/{client_id}"
