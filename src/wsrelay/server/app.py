"""The application factory: routes, error middleware, and the relay's lifetime.

``create_app(settings)`` returns a fresh aiohttp application holding its own
relay, so several can run in one process (tests do) and one can be mounted in
an existing aiohttp app. :func:`serve` runs one until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from wsrelay import codes
from wsrelay.authorize import HttpAuthorizer
from wsrelay.brokers import Backend, from_url
from wsrelay.brokers.memory import MemoryNodes
from wsrelay.config import Settings
from wsrelay.nodes import Beacon
from wsrelay.relay import Relay
from wsrelay.server import cluster, console, http, metrics, routes, sse, ws
from wsrelay.server.auth import API_KEYS, TOKENS, TokenVerifier, api_keys, protected
from wsrelay.server.connection import Connection, Flusher, frame_text
from wsrelay.server.errors import json_errors
from wsrelay.server.front import RelaySite
from wsrelay.server.keys import AUTHORIZER, CONNECTIONS, FLUSHER, RELAY, SETTINGS, WEBHOOKS
from wsrelay.server.limits import (
    ADDRESS_SLOTS,
    MAX_FIELD_SIZE,
    MAX_HEADERS,
    MAX_URL_SIZE,
    SLOTS,
    AddressSlots,
    ConnectionSlots,
)
from wsrelay.server.native import SHARED, Shared, keep_alive
from wsrelay.server.proxies import ADDRESSES, ClientAddresses
from wsrelay.webhooks import WebhookSender

log = logging.getLogger("wsrelay")

SHUTDOWN_TIMEOUT = 10.0
"""Seconds open connections get to close on shutdown before they are dropped."""


def create_app(
    settings: Settings | None = None,
    *,
    backend: Backend | None = None,
    group: str | None = None,
) -> web.Application:
    """A new relay application. ``backend`` overrides ``settings.broker`` (for tests);
    ``group`` names the ``--workers`` group this process belongs to (``/stats`` and
    ``/metrics`` then answer for the whole group, :mod:`wsrelay.server.cluster`)."""
    settings = settings if settings is not None else Settings()
    app = web.Application(
        middlewares=[metrics.observe, json_errors], client_max_size=settings.max_body_size
    )
    app[SETTINGS] = settings
    app[API_KEYS] = api_keys(settings)
    app[TOKENS] = TokenVerifier.from_settings(settings)
    app[SLOTS] = ConnectionSlots(settings.max_connections)
    app[ADDRESS_SLOTS] = AddressSlots(app[SLOTS], settings.max_connections_per_ip)
    app[ADDRESSES] = ClientAddresses(settings.trusted_proxy)
    app[metrics.METRICS] = metrics.Metrics(app)
    if backend is None:
        backend = from_url(
            settings.broker,
            registration_ttl=settings.registration_ttl,
            history=settings.history_limits(),
            pool_size=settings.broker_pool_size,
            timeout=settings.broker_timeout,
            history_size=settings.rules().history_sizes(settings.history_size),
            presence_ttl=settings.presence_ttl,
        )
    webhooks = authorizer = None
    if settings.webhook_url is not None and settings.webhook_secret:
        webhooks = app[WEBHOOKS] = WebhookSender(
            settings.webhook_url,
            settings.webhook_secret,
            retry_for=settings.webhook_retry_for,
            queue_size=settings.webhook_queue_size,
        )
    if settings.authorize_url is not None:
        authorizer = app[AUTHORIZER] = HttpAuthorizer(
            settings.authorize_url,
            ttl=settings.authorize_ttl,
            timeout=settings.authorize_timeout,
            secret=settings.webhook_secret,
        )
    app[RELAY] = Relay(settings, frame_text, backend, events=webhooks, authorizer=authorizer)
    app[RELAY].command_runner = sse.run_forwarded  # POST /sse/<id> posted to another node
    if group is not None:
        app[cluster.GROUP] = group
    app[cluster.BEACON] = Beacon(
        backend.nodes if backend.nodes is not None else MemoryNodes(),
        lambda: cluster.describe(app),
        settings.presence_ttl / 3,
        (lambda: cluster.snapshot(app)) if group is not None else None,
    )
    connections: set[Connection] = set()
    app[CONNECTIONS] = connections
    app.router.add_get(routes.HEALTH, http.health)
    app.router.add_get(routes.READY, http.ready)
    app.router.add_post(routes.REGISTER, protected(http.register))
    app.router.add_delete(routes.UNREGISTER, protected(http.unregister))
    app.router.add_post(routes.PUBLISH, protected(http.publish))
    app.router.add_post(routes.PUBLISH_BATCH, protected(http.publish_batch))
    app.router.add_get(routes.STATS, protected(http.stats))
    app.router.add_get(routes.TOPICS, protected(http.topics))
    app.router.add_get(routes.HISTORY, protected(http.history))
    app.router.add_get(routes.PRESENCE, protected(http.presence))
    app.router.add_get(routes.PRESENCE_STATS, protected(http.presence_stats))
    app.router.add_get(routes.USER, protected(http.user))
    app.router.add_delete(routes.USER_CONNECTIONS, protected(http.disconnect_user))
    app.router.add_get(routes.WEBSOCKET_BY_ID, ws.websocket)
    app.router.add_get(routes.WEBSOCKET_BY_TOKEN, ws.token_websocket)
    app.router.add_get(routes.SSE_BY_ID, sse.stream)
    app.router.add_post(routes.SSE_BY_ID, sse.command)
    app.router.add_get(routes.SSE_BY_TOKEN, sse.token_stream)
    app.router.add_get(
        routes.METRICS, protected(cluster.metrics if group is not None else metrics.metrics)
    )
    app.router.add_get(routes.NODES, protected(cluster.nodes))
    app.router.add_get(routes.OPENAPI, http.openapi)
    app.router.add_get("/console", console.page)
    app.router.add_get("/console/{asset}", console.asset)
    app.router.add_get("/client/wsrelay.js", console.client_script)
    app.on_startup.append(_start)
    app.on_shutdown.append(_close_connections)
    app.on_cleanup.append(_stop)
    return app


_KEEP_ALIVE = web.AppKey("keep_alive", asyncio.Task[None])


async def _start(app: web.Application) -> None:
    relay = app[RELAY]
    app[FLUSHER] = Flusher(asyncio.get_running_loop(), lambda: relay.delivered)
    app[SHARED] = Shared(app)
    interval = app[SETTINGS].ping_interval
    if interval:
        app[_KEEP_ALIVE] = asyncio.create_task(keep_alive(app[CONNECTIONS], interval))
    if WEBHOOKS in app:
        await app[WEBHOOKS].start()
    if AUTHORIZER in app:
        await app[AUTHORIZER].start()
    await app[RELAY].start()
    await app[cluster.BEACON].start()


async def _close_connections(app: web.Application) -> None:
    live: set[Connection] = app[CONNECTIONS]
    connections = list(live)
    for connection in connections:
        # What was accepted for a client is written before its close frame.
        connection.close(codes.GOING_AWAY, "server shutting down")
    await asyncio.gather(*(c.wait_closed() for c in connections), return_exceptions=True)


async def _stop(app: web.Application) -> None:
    sweep = app.get(_KEEP_ALIVE)
    if sweep is not None:
        sweep.cancel()
    await app[cluster.BEACON].stop()
    await app[RELAY].stop()
    if AUTHORIZER in app:
        await app[AUTHORIZER].stop()
    if WEBHOOKS in app:
        await app[WEBHOOKS].stop()  # the last events (disconnections) delivered first


async def serve(
    settings: Settings,
    *,
    on_listening: Callable[[list[str]], None] | None = None,
    reuse_port: bool = False,
    group: str | None = None,
) -> None:
    """Run a relay with ``settings`` until SIGINT or SIGTERM, then shut down cleanly.
    ``reuse_port`` lets several processes listen on one port (``--workers``), ``group``
    names them together."""
    logging.getLogger("aiohttp.server").addFilter(_quiet_bad_http)
    app = create_app(settings, group=group)
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        # Also the header timeout: aiohttp closes a connection that has not sent a
        # whole request this long after connecting (or after its previous request).
        keepalive_timeout=settings.request_timeout,
        # The same limits as the native publish driver's (server/limits.py).
        max_line_size=MAX_URL_SIZE,
        max_field_size=MAX_FIELD_SIZE,
        max_headers=MAX_HEADERS,
    )
    await runner.setup()
    try:
        site: web.BaseSite
        if settings.stack == "native":
            # New WebSockets and publishers go to the native drivers, all else to aiohttp.
            site = RelaySite(
                runner,
                app[SHARED],
                settings.host,
                settings.port,
                reuse_port=reuse_port,
                backlog=settings.listen_backlog,
            )
        else:
            site = web.TCPSite(
                runner,
                settings.host,
                settings.port,
                reuse_port=reuse_port or None,
                backlog=settings.listen_backlog,
            )
        await site.start()
        # Everything alive now (modules, the app, the relay) lives as long as the process:
        # keep it out of the cyclic collector, so that full collections, which pause
        # every connection, only walk what connections created (Instagram's gc.freeze).
        gc.collect()
        gc.freeze()
        urls = [f"http://{_format_host(host)}:{port}" for host, port, *_ in runner.addresses]
        if on_listening is not None:
            on_listening(urls)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _quiet_bad_http(record: logging.LogRecord) -> bool:
    """A peer sending malformed HTTP is routine on the internet, not a server fault:
    log one line at INFO instead of aiohttp's ERROR with a traceback."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError) and exc.code < 500:
        summary = f"{record.getMessage()}: {' '.join(str(exc).split())}"
        record.msg, record.args = summary, None
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True
