"""The node's heartbeat in the node registry (``GET /nodes``).

A :class:`Beacon` writes this node's :class:`~wsrelay.core.schema.NodeInfo` (and, for a
``--workers`` group, its metrics snapshot) into the backend's
:class:`~wsrelay.brokers.base.NodeRegistry` every third of the registry's expiry, so a
live node never drops out of it and one that died does within the expiry. It removes the
entry when the node stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from wsrelay.brokers.base import NodeRegistry
from wsrelay.core.schema import NodeInfo
from wsrelay.errors import BrokerUnavailable

log = logging.getLogger("wsrelay")


class Beacon:
    """Heartbeats of one node: ``describe()`` says what it is now, ``snapshot()`` (if
    given) its metrics, sent with each heartbeat. ``interval``: seconds between them."""

    def __init__(
        self,
        registry: NodeRegistry,
        describe: Callable[[], NodeInfo],
        interval: float,
        snapshot: Callable[[], bytes] | None = None,
    ) -> None:
        self.registry = registry
        self.describe = describe
        self.snapshot = snapshot
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._node: str | None = None

    async def start(self) -> None:
        """The first heartbeat (logged, not raised, if the broker is down), then one
        every ``interval``."""
        with contextlib.suppress(BrokerUnavailable):
            await self.beat()
        if self._task is None:
            self._task = asyncio.create_task(self._beat_forever(), name="wsrelay-node-heartbeat")

    async def stop(self) -> None:
        """Stop beating and leave the registry (best effort). Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._node is not None:
            try:
                await self.registry.leave(self._node)
            except BrokerUnavailable as exc:
                log.debug("could not leave the node registry: %s", exc)
            self._node = None

    async def beat(self) -> tuple[NodeInfo, bytes | None]:
        """One heartbeat now: what was written (the metrics snapshot too, if any).

        Raises:
            BrokerUnavailable: it could not be written.
        """
        info = self.describe()
        metrics = self.snapshot() if self.snapshot is not None else None
        self._node = info.id
        try:
            await self.registry.heartbeat(info, metrics)
        except BrokerUnavailable as exc:
            log.debug("could not write this node's heartbeat: %s", exc)
            raise
        return info, metrics

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(BrokerUnavailable):
                await self.beat()
