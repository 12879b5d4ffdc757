"""``GET /metrics``: Prometheus text format, from a registry owned by one app.

Each application gets its own :class:`~prometheus_client.CollectorRegistry`
(nothing is registered globally, so several apps can share a process). Labels
never hold a client id or a raw path: requests are labelled by route template
(``/register/{client_id}``) and connections by close code, so the number of
series stays fixed.

Counters bumped on the hot path are plain integers (:class:`ConnectionStats`),
read when Prometheus scrapes; gauges are computed at scrape time from the live
state instead of being kept up to date on every change.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wsrelay.brokers import MemoryBroker
from wsrelay.errors import BrokerUnavailable
from wsrelay.server.connection import ConnectionStats
from wsrelay.server.keys import AUTHORIZER, CONNECTIONS, RELAY, WEBHOOKS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format, which every Prometheus version scrapes."""

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Every metric of one app."""

    def __init__(self, app: web.Application) -> None:
        self.registry = CollectorRegistry()
        self.stats = ConnectionStats()
        r = self.registry
        self.publishes = Counter(
            "wsrelay_publishes", "Publishes accepted by POST /publish on this node.", registry=r
        )
        self.deliveries = Counter(
            "wsrelay_deliveries",
            "Publications handed to connections on this node by publishes accepted here.",
            registry=r,
        )
        self.connections_opened = Counter(
            "wsrelay_connections_opened", "WebSocket connections opened.", registry=r
        )
        self.connections_closed = Counter(
            "wsrelay_connections_closed",
            "WebSocket connections closed, by close code (1006: dropped without a close "
            "frame, e.g. no answer to pings).",
            ["code"],
            registry=r,
        )
        self.requests = Histogram(
            "wsrelay_http_request_duration_seconds",
            "HTTP requests by method, route template and status (WebSocket sessions excluded).",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._latency_series: dict[tuple[str, str, int], Any] = {}
        self._live = _LiveCollector(app, self.stats)
        r.register(self._live)
        r.register(_HooksCollector(app))

    def request_latency(self, method: str, route: str, status: int) -> Any:
        """The histogram series for one (method, route, status). Cached: prometheus-client's
        ``labels()`` takes a lock and builds strings on every call, once per request."""
        key = (method, route, status)
        series = self._latency_series.get(key)
        if series is None:
            series = self._latency_series[key] = self.requests.labels(method, route, str(status))
        return series

    async def render(self) -> bytes:
        """The text exposition, after refreshing what must be awaited."""
        await self.refresh()
        return generate_latest(self.registry)

    async def refresh(self) -> None:
        """Read what collecting cannot await (the registrations count)."""
        relay = self._live.app[RELAY]
        try:
            self._live.registrations = await relay.registrations.count()
        except BrokerUnavailable:
            self._live.registrations = None


class _LiveCollector(Collector):
    """Gauges read from the app's state, and the hot-path counters."""

    def __init__(self, app: web.Application, stats: ConnectionStats) -> None:
        self.app = app
        self.stats = stats
        self.registrations: int | None = None

    def describe(self) -> list[Metric]:
        return []  # nothing to check against at registration time

    def collect(self) -> Iterator[Metric]:
        relay = self.app[RELAY]
        connections = self.app[CONNECTIONS]
        yield GaugeMetricFamily(
            "wsrelay_connections", "Open WebSocket connections.", value=len(connections)
        )
        if self.registrations is not None:
            yield GaugeMetricFamily(
                "wsrelay_registrations",
                "Registrations in the store (all nodes').",
                value=self.registrations,
            )
        yield GaugeMetricFamily(
            "wsrelay_topics",
            "Topics with at least one connected subscriber on this node.",
            value=relay.registry.topics,
        )
        yield GaugeMetricFamily(
            "wsrelay_outbox_bytes",
            "Bytes waiting to be written to clients: queued plus transport-buffered.",
            value=sum(c.buffered_bytes() for c in connections),
        )
        yield GaugeMetricFamily(
            "wsrelay_ready", "1 if this node accepts publishes (GET /ready).", value=relay.ready()
        )
        yield CounterMetricFamily(
            "wsrelay_slow_consumer_disconnects",
            "Connections closed with 4008 because their outbox passed --outbox-limit.",
            value=self.stats.slow_consumers,
        )
        yield CounterMetricFamily(
            "wsrelay_frames_sent",
            "WebSocket frames written to clients (publications and acknowledgements).",
            value=self.stats.frames_sent,
        )
        yield CounterMetricFamily(
            "wsrelay_sent_bytes", "Bytes of frames written to clients.", value=self.stats.bytes_sent
        )
        yield CounterMetricFamily(
            "wsrelay_gaps",
            "Times this node told a topic's subscribers that publications were lost "
            "(a gap frame: the topic's history was lost, or a gap could not be filled).",
            value=relay.gaps,
        )
        if isinstance(relay.broker, MemoryBroker):
            history = relay.broker.bus.history.stats
            yield GaugeMetricFamily(
                "wsrelay_history_bytes",
                "Estimated bytes the memory broker's history takes (--history-memory caps it).",
                value=history.bytes,
            )
            yield CounterMetricFamily(
                "wsrelay_history_evicted_topics",
                "Topics whose history the memory broker dropped to stay within "
                "--history-memory, least recently published first.",
                value=history.evicted_topics,
            )


class _HooksCollector(Collector):
    """The webhook sender's and the authorization hook's counters (when configured)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        webhooks = self.app.get(WEBHOOKS)
        if webhooks is not None:
            yield CounterMetricFamily(
                "wsrelay_webhook_events_sent",
                "Events delivered to --webhook-url (answered 2xx).",
                value=webhooks.sent,
            )
            yield CounterMetricFamily(
                "wsrelay_webhook_failed_attempts",
                "Webhook POSTs that failed (no 2xx answer) and are retried.",
                value=webhooks.failed,
            )
            yield CounterMetricFamily(
                "wsrelay_webhook_events_dropped",
                "Events given up: the queue was full (--webhook-queue-size), their batch "
                "failed for --webhook-retry-for, or they were left at shutdown.",
                value=webhooks.dropped,
            )
            yield GaugeMetricFamily(
                "wsrelay_webhook_queue", "Events waiting for delivery.", value=webhooks.queued
            )
        authorizer = self.app.get(AUTHORIZER)
        if authorizer is not None:
            yield CounterMetricFamily(
                "wsrelay_authorize_requests",
                "Requests sent to --authorize-url.",
                value=authorizer.asked,
            )
            yield CounterMetricFamily(
                "wsrelay_authorize_unavailable",
                "Requests to --authorize-url that gave no decision (refused: fail closed).",
                value=authorizer.unavailable,
            )
            yield CounterMetricFamily(
                "wsrelay_authorize_cached",
                "Topics decided from the --authorize-ttl cache.",
                value=authorizer.cached,
            )


METRICS = web.AppKey("metrics", Metrics)


async def metrics(request: web.Request) -> web.Response:
    body = await request.app[METRICS].render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time each HTTP request into the latency histogram, labelled by route template."""
    start = time.perf_counter()
    status = 500
    streaming = False
    try:
        response = await handler(request)
        status = response.status
        streaming = response.content_type == "text/event-stream"
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if status != 101 and not streaming:  # a WebSocket's or stream's length is no latency
            series = request.app[METRICS].request_latency(
                _method_label(request.method), _route_label(request), status
            )
            series.observe(time.perf_counter() - start)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _method_label(method: str) -> str:
    return method if method in _METHODS else "other"


def _route_label(request: web.Request) -> str:
    """The route template; every request that matched no route shares one label, so
    that clients probing random paths cannot create series (and memory) without end."""
    info = request.match_info
    resource = info.route.resource if info is not None else None
    if resource is not None and info.http_exception is None:
        return resource.canonical
    return "unmatched"
