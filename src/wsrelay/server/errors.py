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
    ServerError,
)
from wsrelay.server.keys import SETTINGS

log = logging.getLogger("wsrelay.server")


def error_response(error: RelayError) -> web.Response:
    response = web.Response(
        body=encode(error.to_dict()), status=error.http_status, content_type="application/json"
    )
    if isinstance(error, PayloadTooLarge):
        # The rest of the body was not read; the connection cannot be reused.
        response.force_close()
    return response


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
        if isinstance(exc, ServerError):
            log.warning("%s %s: %s", request.method, request.path, exc.message)
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(_from_http_exception(exc, request))
        if isinstance(exc, web.HTTPMethodNotAllowed):
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(ServerError("internal error; see the server log"))
