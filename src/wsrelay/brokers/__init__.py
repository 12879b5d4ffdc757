"""Backends carry publications and registrations between nodes.

:func:`from_url` picks one by URL scheme: ``memory://`` (the default, one
process) or ``redis://`` / ``rediss://`` (many processes and machines; needs
``pip install 'wsrelay[redis]'``). The Redis module is imported only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from wsrelay.brokers.base import Backend, Broker, Listener, RegistrationStore
from wsrelay.brokers.memory import MemoryBroker, MemoryBus, MemoryRegistrations
from wsrelay.core.history import DEFAULT_LIMITS, HistoryLimits

__all__ = [
    "Backend",
    "Broker",
    "Listener",
    "MemoryBroker",
    "MemoryBus",
    "MemoryRegistrations",
    "RegistrationStore",
    "from_url",
]

SCHEMES = ("memory", "redis", "rediss")


def from_url(
    url: str,
    *,
    registration_ttl: float = 86400.0,
    history: HistoryLimits = DEFAULT_LIMITS,
    pool_size: int = 10,
    timeout: float = 5.0,
    history_size: Callable[[str], int] | None = None,
    presence_ttl: float = 30.0,
) -> Backend:
    """The backend for ``url``. ``pool_size`` (connections for commands) and ``timeout``
    (seconds any command may take, waiting for a connection included) concern Redis only;
    ``history_size``: publications kept per topic, if not ``history.size`` for all (the
    namespaces' ``history_size``); ``presence_ttl``: seconds a presence entry (Redis) and a
    node's entry in the node registry outlive the node's last heartbeat.

    Raises:
        ValueError: the scheme is not supported.
        ImportError: ``redis://`` without the ``redis`` extra installed.
    """
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryBus(registration_ttl, history, history_size, presence_ttl).backend()
    if scheme in ("redis", "rediss"):
        from wsrelay.brokers.redis import redis_backend

        return redis_backend(
            url,
            registration_ttl=registration_ttl,
            history=history,
            pool_size=pool_size,
            timeout=timeout,
            history_size=history_size,
            presence_ttl=presence_ttl,
        )
    raise ValueError(
        f"unsupported broker URL {url!r}: the scheme must be one of "
        + ", ".join(s + "://" for s in SCHEMES)
    )
