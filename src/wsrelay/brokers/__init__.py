"""Brokers carry publications between nodes; :func:`from_url` picks one by URL scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from wsrelay.brokers.base import Broker, PublicationHandler
from wsrelay.brokers.memory import MemoryBroker, MemoryBus

__all__ = ["Broker", "MemoryBroker", "MemoryBus", "PublicationHandler", "from_url"]

SCHEMES = ("memory",)


def from_url(url: str) -> Broker:
    """The broker for ``url``; ``memory://`` is the in-process default.

    Raises:
        ValueError: the scheme is not supported.
    """
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryBroker()
    raise ValueError(
        f"unsupported broker URL {url!r}: the scheme must be one of "
        + ", ".join(s + "://" for s in SCHEMES)
    )
