"""wsrelay: a real-time message relay. Publish over HTTP, receive over WebSocket."""

from __future__ import annotations

__version__ = "0.1.0"

from wsrelay.config import Settings
from wsrelay.server.app import create_app, serve

__all__ = ["Settings", "__version__", "create_app", "serve"]
