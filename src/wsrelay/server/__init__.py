"""The HTTP and WebSocket adapter over :class:`wsrelay.relay.Relay` (aiohttp)."""

from wsrelay.server.app import create_app, serve

__all__ = ["create_app", "serve"]
