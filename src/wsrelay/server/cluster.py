"""One view of many processes: ``GET /nodes``, and ``/stats`` and ``/metrics`` for a
``--workers`` group (docs/decisions/0011).

Every node writes its :class:`~wsrelay.core.schema.NodeInfo` into the backend's node
registry on a heartbeat (:class:`wsrelay.nodes.Beacon`), every third of
``--presence-ttl``. The workers of one ``wsrelay serve --workers N`` share a *group*;
each also leaves its metrics snapshot with its heartbeat. A worker answering ``/stats``
or ``/metrics`` first writes its own heartbeat (and snapshot), then reads its group's
and answers for all of them, each worker's values as of its last heartbeat: since every
value answered is one a worker wrote, and the answering worker's own is written first,
a counter never goes back whichever worker answers the next request.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Iterator

import msgspec
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from wsrelay import __version__
from wsrelay.core.schema import NodeInfo, NodesResponse
from wsrelay.errors import BrokerUnavailable
from wsrelay.nodes import Beacon
from wsrelay.server.keys import RELAY
from wsrelay.server.metrics import CONTENT_TYPE, METRICS

BEACON = web.AppKey("beacon", Beacon)
GROUP = web.AppKey("group", str)
"""Set on the workers of a ``--workers`` group only."""

NODE_LABEL = "node"
"""The label every series of a group's ``/metrics`` carries: the worker's node id."""


def describe(app: web.Application) -> NodeInfo:
    """This node now."""
    relay = app[RELAY]
    now = time.time()
    uptime = time.monotonic() - relay.started_at
    return NodeInfo(
        id=relay.node_id,
        host=_HOST,
        pid=os.getpid(),
        version=__version__,
        group=app.get(GROUP),
        started_at=round(now - uptime, 3),
        uptime=round(uptime, 3),
        last_heartbeat=round(now, 3),
        connections=relay.registry.connections,
        topics=relay.registry.topics,
        publishes=relay.published,
        deliveries=relay.delivered,
        slow_consumers=app[METRICS].stats.slow_consumers,
    )


_HOST = socket.gethostname()


async def nodes(request: web.Request) -> web.Response:
    """``GET /nodes``: every node sharing the broker, as its last heartbeat said."""
    app = request.app
    found = await app[BEACON].registry.nodes()
    return _json(NodesResponse(node=app[RELAY].node_id, nodes=found))


def _json(body: msgspec.Struct) -> web.Response:
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")


async def group_members(app: web.Application) -> list[NodeInfo]:
    """This worker's group, its own entry freshly written first; just this node (now)
    outside a group, or when the broker is down."""
    beacon = app[BEACON]
    group = app.get(GROUP)
    if group is None:
        return [describe(app)]
    try:
        own, _ = await beacon.beat()
        members = [n for n in await beacon.registry.nodes() if n.group == group]
    except BrokerUnavailable:
        return [describe(app)]
    return members if any(n.id == own.id for n in members) else [own, *members]


# -- metrics of a group -----------------------------------------------------------------------


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics`` on a worker of a group: every worker's series (see
    :func:`group_metrics`)."""
    body = generate_latest(await group_metrics(request.app))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


class _Family(msgspec.Struct, array_like=True):
    name: str
    type: str
    help: str
    samples: list[tuple[str, dict[str, str], float]]


_encode_families = msgspec.json.Encoder().encode
_decode_families = msgspec.json.Decoder(list[_Family]).decode


def snapshot(app: web.Application) -> bytes:
    """This node's metrics now, encoded for the node registry (the registrations gauge
    as of the last scrape)."""
    families = [
        _Family(
            m.name, m.type, m.documentation, [(s.name, s.labels, float(s.value)) for s in m.samples]
        )
        for m in app[METRICS].registry.collect()
    ]
    return _encode_families(families)


async def group_metrics(app: web.Application) -> Collector:
    """What ``GET /metrics`` exposes for a group: every live worker's series, labelled
    ``node``. The answering worker's snapshot is written before the others' are read."""
    beacon = app[BEACON]
    await app[METRICS].refresh()
    try:
        own, mine = await beacon.beat()
        members = [n.id for n in await beacon.registry.nodes() if n.group == own.group]
        snapshots = await beacon.registry.metrics(members)
    except BrokerUnavailable:
        own, mine = describe(app), snapshot(app)
        snapshots = {}
    assert mine is not None
    snapshots[own.id] = mine
    merged = []
    for node, raw in sorted(snapshots.items()):
        try:
            merged.append((node, _decode_families(raw)))
        except msgspec.DecodeError:
            continue  # a node of another version: its series are left out
    return _Merged(merged)


class _Merged(Collector):
    def __init__(self, snapshots: Iterable[tuple[str, list[_Family]]]) -> None:
        self.snapshots = list(snapshots)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for node, snapshot in self.snapshots:
            for family in snapshot:
                metric = families.get(family.name)
                if metric is None:
                    metric = families[family.name] = Metric(family.name, family.help, family.type)
                for name, labels, value in family.samples:
                    metric.add_sample(name, {**labels, NODE_LABEL: node}, value)
        return iter(families.values())

    def describe(self) -> list[Metric]:
        return []
