"""Typed keys for what the application object carries (one app, no globals)."""

from __future__ import annotations

from aiohttp import web

from wsrelay.authorize import HttpAuthorizer
from wsrelay.config import Settings
from wsrelay.relay import Relay
from wsrelay.server.connection import Connection, Flusher
from wsrelay.webhooks import WebhookSender

SETTINGS = web.AppKey("settings", Settings)
RELAY = web.AppKey("relay", Relay)
FLUSHER = web.AppKey("flusher", Flusher)
CONNECTIONS: web.AppKey[set[Connection]] = web.AppKey("connections")
WEBHOOKS = web.AppKey("webhooks", WebhookSender)
"""Present only with --webhook-url."""
AUTHORIZER = web.AppKey("authorizer", HttpAuthorizer)
"""Present only with --authorize-url."""
