"""The redis-py client both Redis modules share, and how its failures are reported."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from wsrelay.errors import BrokerUnavailable

HEALTH_CHECK_INTERVAL = 2
"""Idle connections are pinged before use after this many seconds, so that a
Redis restart costs few failed commands."""


def make_client(url: str) -> aioredis.Redis:
    """A client for ``url`` (password, ``rediss://`` TLS and ``/<db>`` as redis-py reads
    them) that never retries on its own: failures must reach us."""
    return aioredis.from_url(
        url,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=HEALTH_CHECK_INTERVAL,
        socket_connect_timeout=2,
    )


def unavailable(exc: BaseException) -> BrokerUnavailable:
    """The error a caller sees when Redis failed with ``exc`` (a 503 over HTTP)."""
    return BrokerUnavailable(f"Redis is unreachable ({type(exc).__name__}: {exc}); try again")
