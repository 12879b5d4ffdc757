"""The OpenAPI 3.1 document served at ``/openapi.json``.

Schemas come from the msgspec structs that validate requests
(:mod:`wsrelay.core.schema`); only the paths are written here.
"""

from __future__ import annotations

from typing import Any

import msgspec

from wsrelay import __version__
from wsrelay.config import Settings
from wsrelay.core import schema
from wsrelay.core.topics import TOPIC_ALPHABET

_REF = "#/components/schemas/{name}"


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(name=name)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "Invalid JSON, a missing or wrongly typed field, or an invalid topic.",
        404: "No such registration.",
        413: "The body is larger than max_body_size.",
        426: "Not a WebSocket upgrade request.",
    }
    return {str(s): {"description": reasons[s], "content": _json("ErrorBody")} for s in statuses}


def document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document for a server running with ``settings``."""
    _, components = msgspec.json.schema_components(
        [
            schema.RegisterRequest,
            schema.RegisterResponse,
            schema.UnregisterResponse,
            schema.PublishRequest,
            schema.PublishResponse,
            schema.HealthResponse,
            schema.ErrorBody,
        ],
        ref_template=_REF,
    )
    client_id = {
        "name": "client_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "The id returned by POST /register.",
    }
    topic_rule = (
        f"Topics are 1 to {settings.max_topic_length} characters from {TOPIC_ALPHABET}; "
        f"a client may hold at most {settings.max_topics_per_client}."
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "wsrelay",
            "version": __version__,
            "description": "Publish over HTTP, receive over WebSocket. " + topic_rule,
        },
        "paths": {
            "/health": {
                "get": {
                    "summary": "Liveness and counters",
                    "responses": {
                        "200": {"description": "Up.", "content": _json("HealthResponse")}
                    },
                }
            },
            "/register": {
                "post": {
                    "summary": "Register a client; returns its WebSocket URL",
                    "requestBody": {"required": True, "content": _json("RegisterRequest")},
                    "responses": {
                        "200": {"description": "Registered.", "content": _json("RegisterResponse")},
                        **_errors(400, 413),
                    },
                }
            },
            "/register/{client_id}": {
                "delete": {
                    "summary": "Delete a registration and close its connection (code 1000)",
                    "parameters": [client_id],
                    "responses": {
                        "200": {
                            "description": "Deleted.",
                            "content": _json("UnregisterResponse"),
                        },
                        **_errors(404),
                    },
                }
            },
            "/publish": {
                "post": {
                    "summary": "Publish a message to a topic, optionally to one user only",
                    "requestBody": {"required": True, "content": _json("PublishRequest")},
                    "responses": {
                        "200": {
                            "description": "Handed to `recipients` connections on this node.",
                            "content": _json("PublishResponse"),
                        },
                        **_errors(400, 413),
                    },
                }
            },
            "/ws/{client_id}": {
                "get": {
                    "summary": "Open the client's WebSocket (see README: WebSocket protocol)",
                    "parameters": [
                        client_id,
                        {
                            "name": "format",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": ["json", "raw"]},
                            "description": "json (default): envelopes; raw: message text only.",
                        },
                    ],
                    "responses": {
                        "101": {"description": "Switching to WebSocket."},
                        **_errors(400, 404, 426),
                    },
                }
            },
        },
        "components": {"schemas": components},
    }
