"""The authorization hook: asking your backend about ``"backend"`` namespaces' topics.

:class:`HttpAuthorizer` is the node's :class:`~wsrelay.core.events.Authorizer` when
``--authorize-url`` is set. For one command it sends one ``POST <url>``::

    {"action": "subscribe", "user": "42", "client": "<public id>", "topics": ["doc:1", "doc:2"]}

signed like the webhooks when ``--webhook-secret`` is set, and expects ``200
{"topics": {"doc:1": true, "doc:2": false}}`` (a topic missing is denied). Answers are
kept ``--authorize-ttl`` seconds per (user, or the client if anonymous; topic; action),
at most :data:`MAX_CACHED` of them. No answer within ``--authorize-timeout``, another
status, or a body that is not such a decision: :class:`AuthorizationUnavailable`
(fail closed), and nothing is cached.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Sequence
from typing import Final

import aiohttp
import msgspec

from wsrelay.core.events import Action
from wsrelay.errors import AuthorizationUnavailable
from wsrelay.webhooks import SIGNATURE_HEADER, read_at_most, shown, sign

log = logging.getLogger("wsrelay.authorize")

MAX_CACHED: Final = 100_000
"""Answers kept at most; past it the oldest go first."""
MAX_ANSWER: Final = 1024 * 1024
"""Largest answer body read, in bytes."""


class _Request(msgspec.Struct):
    action: str
    user: str | None
    client: str
    topics: list[str]


class _Answer(msgspec.Struct):
    topics: dict[str, bool]


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Answer).decode


class HttpAuthorizer:
    """See the module docstring. Counters for ``/metrics``: ``asked`` (POSTs),
    ``unavailable`` (POSTs that gave no decision), ``cached`` (topics answered from the
    cache)."""

    def __init__(
        self, url: str, *, ttl: float = 60.0, timeout: float = 2.0, secret: str | None = None
    ) -> None:
        self.url = url
        self.ttl = ttl
        self.timeout = timeout
        self.secret = secret
        self.asked = 0
        self.unavailable = 0
        self.cached = 0
        self._cache: collections.OrderedDict[tuple[str, str, str], tuple[float, bool]] = (
            collections.OrderedDict()
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def authorize(
        self, action: Action, user: str | None, client: str, topics: Sequence[str]
    ) -> dict[str, bool]:
        who = f"user:{user}" if user is not None else f"client:{client}"
        now = time.monotonic()
        decided: dict[str, bool] = {}
        ask: list[str] = []
        for topic in topics:
            hit = self._cache.get((who, topic, action))
            if hit is not None and hit[0] > now:
                decided[topic] = hit[1]
                self.cached += 1
            else:
                ask.append(topic)
        if ask:
            answer = await self._ask(_Request(action, user, client, ask))
            expires = now + self.ttl
            for topic in ask:
                allowed = answer.get(topic) is True
                decided[topic] = allowed
                if self.ttl > 0:
                    self._remember((who, topic, action), (expires, allowed))
        return decided

    def _remember(self, key: tuple[str, str, str], value: tuple[float, bool]) -> None:
        cache = self._cache
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > MAX_CACHED:
            cache.popitem(last=False)

    async def _ask(self, request: _Request) -> dict[str, bool]:
        if self._session is None:
            raise AuthorizationUnavailable("the authorization hook is not started")
        self.asked += 1
        body = _encode(request)
        headers = {"Content-Type": "application/json"}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        problem: str
        try:
            async with self._session.post(
                self.url, data=body, headers=headers, allow_redirects=False
            ) as response:  # a redirect is "another status": no decision
                data = await read_at_most(response, MAX_ANSWER + 1)
                if response.status != 200:
                    problem = f"it answered {response.status}"
                elif len(data) > MAX_ANSWER:
                    problem = "its answer is too large"
                else:
                    try:
                        return _decode(data).topics
                    except msgspec.DecodeError:
                        problem = 'its answer is not {"topics": {"<topic>": true|false}}'
        except TimeoutError:
            problem = f"it did not answer within {self.timeout:g} s (--authorize-timeout)"
        except (aiohttp.ClientError, OSError) as exc:
            problem = f"it could not be reached ({exc or type(exc).__name__})"
        self.unavailable += 1
        log.warning("authorization hook %s: %s", shown(self.url), problem)
        raise AuthorizationUnavailable(
            f"the authorization backend could not decide {', '.join(request.topics)}: "
            f"{problem}; try again later"
        )
