"""Who may call what: the API key, the WebSocket Origin allowlist, connection tokens.

* **API key** (``--api-key``): the routes a backend calls (``POST /register``,
  ``DELETE /register/<id>``, ``POST /publish``, ``GET /metrics``) require
  ``Authorization: Bearer <key>``. Each configured key is compared in constant
  time, and all of them always are, so the time taken says nothing about which
  key nearly matched.
* **Origin allowlist** (``--allowed-origin``): a browser sends the page's
  ``Origin`` with every WebSocket handshake; a listed pattern must match it.
  Clients that are not browsers send none and are let through: the check exists
  against cross-site WebSocket hijacking, which needs a browser.
* **Connection tokens** (``--jwt-secret`` / ``--jwt-public-key-file``): a
  backend signs ``{"sub": user_id, "topics": [...], "grants": {"subscribe": [...],
  "publish": [...]}, "exp": ...}`` (``topics`` and ``grants`` optional) and the
  browser connects to ``/ws?token=...`` with no registration step.
* **CORS** (:func:`cors_headers`): a page of any origin may read the plain-HTTP
  answers of the two WebSocket routes (``GET /ws/<id>`` and ``GET /ws``), never
  those of the routes behind the API key.

See docs/security.md for the threat model these answer.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, Final

import jwt
from aiohttp import web

from wsrelay.config import Settings
from wsrelay.core.rules import NO_GRANTS, Grants
from wsrelay.core.topics import validate_topics
from wsrelay.errors import (
    BadRequest,
    Forbidden,
    InvalidToken,
    InvalidTopic,
    TokenExpired,
    TooManyTopics,
    Unauthorized,
)
from wsrelay.server import routes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API_KEYS: web.AppKey[tuple[bytes, ...]] = web.AppKey("api_keys")

MIN_PUBLIC_KEY_LENGTH = 16
"""Shortest API key ``serve`` accepts on an address other machines can reach."""


# -- startup ----------------------------------------------------------------------------------


def startup_problem(settings: Settings) -> str | None:
    """Why ``wsrelay serve`` must not start with ``settings``, in one line, or None."""
    if not settings.api_key and not settings.insecure and not is_loopback(settings.host):
        return (
            f"refusing to listen on {settings.host} without an API key: anyone who can reach "
            "it could register and publish. Set WSRELAY_API_KEY (or --api-key), or pass "
            "--insecure if something in front of the relay authenticates"
        )
    short = [
        str(i) for i, key in enumerate(settings.api_key, 1) if len(key) < MIN_PUBLIC_KEY_LENGTH
    ]
    if short and not settings.insecure and not is_loopback(settings.host):
        return (
            f"refusing to listen on {settings.host} with an API key shorter than "
            f"{MIN_PUBLIC_KEY_LENGTH} characters (key {', '.join(short)} of "
            f"{len(settings.api_key)}): it could be guessed over the network. Set "
            "WSRELAY_API_KEY to longer keys, e.g. from python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(32))', or pass --insecure if something in front "
            "of the relay authenticates"
        )
    if settings.jwt_public_key_file is not None:
        try:
            load_public_key(settings.jwt_public_key_file)
        except (OSError, ValueError) as exc:
            return f"jwt_public_key_file: cannot use {settings.jwt_public_key_file!r}: {exc}"
    return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, or "" (every interface)
        return False


# -- API key ----------------------------------------------------------------------------------


def api_keys(settings: Settings) -> tuple[bytes, ...]:
    return tuple(key.encode() for key in settings.api_key)


def check_api_key(request: web.Request) -> None:
    """Raises Unauthorized unless the request carries one of the configured keys
    (BadRequest if it carries several ``Authorization`` headers)."""
    keys: tuple[bytes, ...] = request.app[API_KEYS]
    if keys:
        check_authorization(request.headers.getall("Authorization", ()), keys)


def check_authorization(values: Sequence[str], keys: tuple[bytes, ...]) -> None:
    """Raises unless ``values``, the request's ``Authorization`` header values in
    order, are one ``Bearer <key>`` with one of ``keys`` (nothing is checked without
    ``keys``).

    Raises:
        BadRequest: there are several ``Authorization`` headers. Which one would count
            depends on the parser (aiohttp's ``headers.get`` gives the first, a callback
            parser such as httptools' the last) and on every proxy on the way, so none
            does.
        Unauthorized: there is none, or its key is not one of ``keys``.
    """
    if not keys:
        return
    if len(values) > 1:
        raise BadRequest(f"the request has {len(values)} Authorization headers; send exactly one")
    scheme, _, given = (values[0] if values else "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized("this endpoint needs 'Authorization: Bearer <API key>'")
    candidate = given.strip().encode()
    matched = False
    for key in keys:  # every key, every time: no early exit
        matched |= hmac.compare_digest(candidate, key)
    if not matched:
        raise Unauthorized("the API key is not valid")


def protected(handler: Handler) -> Handler:
    """``handler``, answering 401 before it runs unless the API key is given."""

    @wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        check_api_key(request)
        return await handler(request)

    return guarded


# -- Origin -----------------------------------------------------------------------------------


def check_origin(origin: str | None, patterns: tuple[str, ...]) -> None:
    """Raises Forbidden if ``patterns`` is not empty, a handshake names an
    ``origin``, and no pattern matches it (case-insensitively)."""
    if not patterns or origin is None:
        return
    if not any(fnmatch.fnmatchcase(origin.lower(), p.lower()) for p in patterns):
        raise Forbidden(
            f"connections from origin {origin[:200]!r} are not allowed",
            code="origin_not_allowed",
        )


# -- CORS -------------------------------------------------------------------------------------

WEBSOCKET_CORS: Final = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Retry-After",
}
"""What every plain-HTTP answer of a WebSocket route carries (docs/security.md, "CORS").

Such an answer is always a refusal: 403 ``origin_not_allowed``, 404 (no such
registration), 401 (the token), 400, 426 (not an upgrade), 503 with ``Retry-After``.
wsrelay.js reads it after a failed connection, because a browser shows a page nothing
of a refused handshake but a close 1006: a 404 means "register again", a 403 "stop".
It holds nothing the page could not learn by connecting: the id or token in the URL
is the capability, and a disallowed origin only ever gets the 403 (the Origin is
checked first). ``*`` rather than the request's Origin: the same for every origin, so
nothing varies by Origin for a cache, and a browser never lets a page read a ``*``
answer to a request sent with cookies, which the relay ignores anyway. No other route
sends a CORS header (``/client/wsrelay.js`` aside, a public file): a page of another
origin can read none of the API key's routes' answers, nor send them an
``Authorization`` header (its preflight, an ``OPTIONS``, gets a 405 without CORS)."""


def cors_headers(route: str) -> dict[str, str]:
    """The CORS headers of an answer on ``route`` (a template of :mod:`routes`): those of
    :data:`WEBSOCKET_CORS` for the WebSocket and SSE routes (a stream and its commands are
    read by pages of any origin: the registration id or token in the URL is the
    capability, never a cookie, and ``--allowed-origin`` is checked), none for any other."""
    if route in (
        routes.WEBSOCKET_BY_ID,
        routes.WEBSOCKET_BY_TOKEN,
        routes.SSE_BY_ID,
        routes.SSE_BY_TOKEN,
    ):
        return dict(WEBSOCKET_CORS)
    return {}


# -- connection tokens ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a valid connection token grants: a user, its initial topics, and the topic
    patterns it may subscribe and publish to where a namespace asks for a grant."""

    user: str
    topics: tuple[str, ...]
    grants: Grants = NO_GRANTS


_DEFAULTS = Settings()


def load_public_key(path: str) -> Any:
    """The RSA public key in PEM file ``path``.

    Raises:
        OSError: the file cannot be read.
        ValueError: it holds no RSA public key.
    """
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, RSAPublicKey):
        raise ValueError("the key is not an RSA public key")
    return key


class TokenVerifier:
    """Verifies connection tokens: HS256 with the secret, RS256 with the public key.

    The key is chosen by the token's ``alg`` among those configured, and only
    those: an RS256 public key is never tried as an HS256 secret (the classic
    algorithm-confusion forgery), and ``none`` is never accepted. A token whose
    ``exp`` lies more than ``max_lifetime`` seconds ahead (0: no limit), or whose
    topics the relay would refuse, is invalid: the backend signed it, so the
    client cannot fix it.
    """

    def __init__(
        self,
        secret: str | None,
        public_key: Any,
        *,
        max_lifetime: int = _DEFAULTS.max_token_lifetime,
        max_topic_length: int = _DEFAULTS.max_topic_length,
        max_topics: int = _DEFAULTS.max_topics_per_client,
    ) -> None:
        self._max_lifetime = max_lifetime
        self._max_topic_length = max_topic_length
        self._max_topics = max_topics
        self._keys: dict[str, Any] = {}
        if secret is not None:
            self._keys["HS256"] = secret
        if public_key is not None:
            self._keys["RS256"] = public_key

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier | None:
        if settings.jwt_secret is None and settings.jwt_public_key_file is None:
            return None
        public_key = None
        if settings.jwt_public_key_file is not None:
            public_key = load_public_key(settings.jwt_public_key_file)
        return cls(
            settings.jwt_secret,
            public_key,
            max_lifetime=settings.max_token_lifetime,
            max_topic_length=settings.max_topic_length,
            max_topics=settings.max_topics_per_client,
        )

    def verify(self, token: str) -> TokenClaims:
        """The claims of ``token``.

        Raises:
            TokenExpired: the signature is valid but ``exp`` has passed.
            InvalidToken: anything else is wrong with it.
        """
        try:
            alg = jwt.get_unverified_header(token).get("alg")
            key = self._keys.get(alg) if isinstance(alg, str) else None
            if key is None or not isinstance(alg, str):
                raise InvalidToken(
                    f"the token's algorithm must be {' or '.join(self._keys)}, not {alg!r}"
                )
            claims = jwt.decode(token, key, algorithms=[alg], options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise TokenExpired("the token has expired; get a new one and reconnect") from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"the token is not valid: {exc}") from None
        # PyJWT has checked that int(exp) works and that it has not passed.
        if self._max_lifetime and int(claims["exp"]) - time.time() > self._max_lifetime:
            raise InvalidToken(
                f"the token's exp lies more than {self._max_lifetime} seconds ahead, the "
                "limit (max_token_lifetime); mint tokens that expire sooner"
            )
        topics = claims.get("topics", [])
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise InvalidToken("the token's topics claim must be a list of strings")
        try:
            validate_topics(topics, self._max_topic_length, self._max_topics)
        except (InvalidTopic, TooManyTopics) as exc:
            raise InvalidToken(f"the token's topics claim is not usable: {exc.message}") from None
        return TokenClaims(
            user=claims["sub"], topics=tuple(topics), grants=self._grants(claims.get("grants"))
        )

    def _grants(self, claim: Any) -> Grants:
        """The ``grants`` claim, checked like the rest of the token (InvalidToken)."""
        if claim is None:
            return NO_GRANTS
        lists = claim if isinstance(claim, dict) else None
        if (
            lists is None
            or not set(lists) <= {"subscribe", "publish"}
            or not all(
                isinstance(v, list) and all(isinstance(p, str) for p in v) for v in lists.values()
            )
        ):
            raise InvalidToken(
                'the token\'s grants claim must be {"subscribe": [patterns], "publish": '
                "[patterns]} (both optional)"
            )
        try:
            return Grants.checked(
                lists.get("subscribe", ()), lists.get("publish", ()), self._max_topic_length
            )
        except InvalidTopic as exc:
            raise InvalidToken(f"the token's grants claim is not usable: {exc.message}") from None


TOKENS: web.AppKey[TokenVerifier | None] = web.AppKey("token_verifier")
