"""The web console (``GET /console``) and the browser client (``GET /client/wsrelay.js``).

Both are static files shipped in the package (``static/``): no build step, nothing
loaded from elsewhere at run time. The page holds no secret, so it is public; the
API it calls stays protected, and on a 401 the page asks for the key, keeps it in
``sessionStorage`` and sends it as ``Authorization: Bearer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

from wsrelay.config import Settings
from wsrelay.errors import NotFound
from wsrelay.server.keys import SETTINGS

STATIC: Final = Path(__file__).with_name("static")

HTML: Final = "text/html; charset=utf-8"
JAVASCRIPT: Final = "text/javascript; charset=utf-8"
CSS: Final = "text/css; charset=utf-8"

ASSETS: Final = {"console.js": JAVASCRIPT, "console.css": CSS}
"""The files served under ``/console/``, with their content types."""

CACHE_CONTROL: Final = "no-cache"
"""Keep a copy but revalidate it (ETag / Last-Modified, answered 304): the names carry
no version, so a cached copy must never outlive an upgrade of the server."""


def content_security_policy(settings: Settings) -> str:
    """The console's CSP: its own scripts, styles and API only; no inline code, no frames.
    WebSockets go to the page's origin, or to ``public_url`` when that is set."""
    connect = ["'self'"]
    if settings.public_url:
        parts = urlsplit(settings.public_url)
        if parts.scheme and parts.netloc:
            connect.append(f"{parts.scheme}://{parts.netloc}")
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src {' '.join(connect)}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def _file(name: str, content_type: str) -> web.FileResponse:
    return web.FileResponse(
        STATIC / name,
        headers={
            "Content-Type": content_type,
            "Cache-Control": CACHE_CONTROL,
            "X-Content-Type-Options": "nosniff",
        },
    )


async def page(request: web.Request) -> web.FileResponse:
    """``GET /console``: the console page."""
    response = _file("console.html", HTML)
    response.headers["Content-Security-Policy"] = content_security_policy(request.app[SETTINGS])
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    return response


async def asset(request: web.Request) -> web.FileResponse:
    """``GET /console/<asset>``: the console's script and stylesheet."""
    name = request.match_info["asset"]
    content_type = ASSETS.get(name)
    if content_type is None:
        raise NotFound(f"no console asset {name!r}; there are {', '.join(sorted(ASSETS))}")
    return _file(name, content_type)


async def client_script(request: web.Request) -> web.FileResponse:
    """``GET /client/wsrelay.js``: the browser client, an ES module."""
    response = _file("wsrelay.js", JAVASCRIPT)
    # Pages on other origins may import it (a module script is fetched with CORS).
    response.headers["Access-Control-Allow-Origin"] = "*"
    return response
