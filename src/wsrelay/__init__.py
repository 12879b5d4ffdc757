"""wsrelay: a real-time message relay. Publish over HTTP, receive over WebSocket.

``create_app`` and ``serve`` are imported on first use, so that ``wsrelay.client``
(the client library) does not load the server and its dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from wsrelay.config import Settings

if TYPE_CHECKING:
    from wsrelay.server.app import create_app, serve

__all__ = ["Settings", "__version__", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "serve"):
        from wsrelay.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'wsrelay' has no attribute {name!r}")
