"""Every HTTP error leaves as JSON: ``{"error": {"code": ..., "message": ...}}``.

The middleware maps :class:`~wsrelay.errors.RelayError` to its status, turns
aiohttp's own 404/405/413 into the same shape, and answers anything unexpected
with a bare 500 body, logging the traceback instead of sending it.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from wsrelay.core.schema import encode
from wsrelay.errors import (
    ClientError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RelayError,
    RequestTimeout,
    ServerError,
    Unauthorized,
)
from wsrelay.server.auth import cors_headers
from wsrelay.server.keys import SETTINGS
from wsrelay.server.logs import route_of
from wsrelay.server.proxies import request_address

log = logging.getLogger("wsrelay.server")


def error_response(error: RelayError, route: str | None = None) -> web.Response:
    """``error`` as a JSON response; ``route`` is the template of the route refused."""
    response = web.Response(
        body=encode(error.to_dict()), status=error.http_status, content_type="application/json"
    )
    if isinstance(error, PayloadTooLarge | RequestTimeout):
        # The rest of the body was not read; the connection cannot be reused.
        response.force_close()
    response.headers.update(error_headers(error, route))
    return response


def error_headers(error: RelayError, route: str | None = None) -> dict[str, str]:
    """Headers an error response carries besides its JSON body, on either stack;
    ``route`` (a template of :mod:`wsrelay.server.routes`) decides the CORS headers."""
    headers: dict[str, str] = cors_headers(route) if route is not None else {}
    if isinstance(error, Unauthorized):  # RFC 6750 section 3
        challenge = 'Bearer realm="wsrelay"'
        if error.code != Unauthorized.code:  # a connection token was refused
            challenge += ', error="invalid_token"'
        headers["WWW-Authenticate"] = challenge
    if error.retry_after is not None:  # RFC 9110 10.2.3: when to try again
        headers["Retry-After"] = str(error.retry_after)
    return headers


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> RelayError:
    if isinstance(exc, web.HTTPNotFound):
        return NotFound(f"no route for {request.method} {request.path}")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowed(f"{request.method} is not allowed on {request.path}; use {allowed}")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(
            f"request body is larger than the limit of {request.app[SETTINGS].max_body_size} bytes"
        )
    error = ClientError(exc.reason, code=exc.reason.lower().replace(" ", "_"))
    error.http_status = exc.status  # type: ignore[misc]
    return error


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RelayError as exc:
        _log_refused(request, exc)
        return error_response(exc, route_of(request))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _from_http_exception(exc, request)
        _log_refused(request, error)
        response = error_response(error, route_of(request))
        if isinstance(exc, web.HTTPMethodNotAllowed):
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    except Exception:
        log.exception("unexpected error in %s %s", request.method, route_of(request))
        return error_response(ServerError("internal error; see the server log"))


def _log_refused(request: web.Request, error: RelayError) -> None:
    log_refused(request.method, route_of(request), error, request_address(request))


def log_refused(method: str, route: str, error: RelayError, peer: str | None) -> None:
    """One line per refused request; the route template, never a client id or token."""
    log.log(
        logging.WARNING if isinstance(error, ServerError) else logging.INFO,
        "refused request",
        extra={
            "event": "http_refused",
            "method": method,
            "route": route,
            "status": error.http_status,
            "code": error.code,
            "peer": peer,
        },
    )
