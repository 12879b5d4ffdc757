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
from wsrelay.core.payload import MAX_DEPTH
from wsrelay.core.topics import TOPIC_ALPHABET

_REF = "#/components/schemas/{name}"


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(name=name)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "Invalid JSON, a missing or wrongly typed field, an invalid topic, or more than "
        "one Authorization header (code bad_request); on the presence routes, a topic whose "
        "namespace keeps no presence (code presence_disabled).",
        401: "Missing or wrong credentials (code unauthorized, token_expired or invalid_token); "
        "the answer carries WWW-Authenticate: Bearer.",
        403: "The page's Origin is not in the allowlist (code origin_not_allowed), or a "
        "namespace does not let this client subscribe to one of its initial topics (code "
        "forbidden_topic; the message names the topic and the rule).",
        404: "No such registration.",
        408: "The body did not arrive within request_timeout.",
        409: "No SSE stream of this registration is open (code not_streaming): not on this "
        "node and, with a shared broker, no node holding one answered within 5 s (a command "
        "posted to a node that does not hold the stream is forwarded to the one that does); "
        "open GET /sse/<id> first.",
        413: "The body is larger than max_body_size.",
        426: "Not a WebSocket upgrade request.",
        429: "The user already holds max_registrations_per_user registrations "
        "(code too_many_registrations); delete one first. Or, on a WebSocket upgrade, the "
        "client's address holds max_connections_per_ip connections (code "
        "too_many_connections_per_ip); retry after the Retry-After header's seconds.",
        431: "Headers that never end (code headers_too_large; on a publisher's connection "
        "served by the native driver).",
        503: "A capacity limit was reached (too_many_connections), or the broker is "
        "unreachable (broker_unavailable: nothing was done), or a topic's namespace asks the "
        "authorization backend and it did not decide in time (authorization_unavailable: "
        "refused, fail closed); retry after the Retry-After header's seconds. A publish "
        "may also answer publish_outcome_unknown: the broker "
        "stopped answering after the publish was sent, so it may have been published; "
        "retry with the same idempotency_key to publish it exactly once.",
    }
    return {str(s): {"description": reasons[s], "content": _json("ErrorBody")} for s in statuses}


def _topic_schema(settings: Settings) -> dict[str, Any]:
    return {
        "description": f"A topic name: 1 to {settings.max_topic_length} characters from "
        f"{TOPIC_ALPHABET}.",
        "type": "string",
        "minLength": 1,
        "maxLength": settings.max_topic_length,
        "pattern": r"^[A-Za-z0-9_\-.:/@]+$",
    }


def _constrain(components: dict[str, Any], settings: Settings) -> None:
    """State the rules the structs cannot know (they depend on settings) in the schemas."""
    schemas = components
    topic = _topic_schema(settings)
    schemas["PublishRequest"]["properties"]["topic"] = topic
    schemas["HistoryResponse"]["properties"]["topic"] = topic
    schemas["PresenceResponse"]["properties"]["topic"] = topic
    schemas["PresenceStatsResponse"]["properties"]["topic"] = topic
    topics = schemas["RegisterRequest"]["properties"]["topics"]
    topics["items"] = topic
    topics["description"] = (
        f"Initial subscriptions; at most {settings.max_topics_per_client} distinct topics."
    )


_last_event_id: dict[str, Any] = {
    "name": "last_event_id",
    "in": "query",
    "required": False,
    "schema": {"type": "string"},
    "description": "Resume from this event id (as the Last-Event-ID header does, which wins "
    "when both are given): for a first connection, which cannot set the header.",
}


def document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document for a server running with ``settings``."""
    _, components = msgspec.json.schema_components(
        [
            schema.RegisterRequest,
            schema.RegisterResponse,
            schema.UnregisterResponse,
            schema.PublishRequest,
            schema.PublishResponse,
            schema.BatchPublishRequest,
            schema.BatchPublishResponse,
            schema.StatsResponse,
            schema.NodesResponse,
            schema.TopicsResponse,
            schema.HistoryResponse,
            schema.PresenceResponse,
            schema.PresenceStatsResponse,
            schema.UserResponse,
            schema.DisconnectUserResponse,
            schema.HealthResponse,
            schema.ReadyResponse,
            schema.ErrorBody,
        ],
        ref_template=_REF,
    )
    _constrain(components, settings)
    client_id = {
        "name": "client_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "The id returned by POST /register.",
    }
    fmt = {
        "name": "format",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["json", "raw"]},
        "description": "json (default): envelopes, whose message is the string or the JSON "
        "value published; raw: the message alone (a string's text, any other value's "
        "compact JSON text).",
    }
    recover = {
        "name": "recover",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
        "description": "true: hold back publications on the registration's topics until "
        "the first command (at most 5 s), which recovers them with since (json format only).",
    }
    origin = {
        "name": "origin",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "An origin (scheme://host[:port]) checked against --allowed-origin "
        "like the Origin header: wsrelay.js names its page's origin on its check, a plain "
        "GET after a failed connection, because a browser sends no Origin header with a "
        "same-origin GET. It can only make a request refused (403 origin_not_allowed). "
        "Refusals on this route carry Access-Control-Allow-Origin: * so that a page of any "
        "origin can read them.",
    }
    topic_rule = (
        f"Topics are 1 to {settings.max_topic_length} characters from {TOPIC_ALPHABET}; "
        f"a client may hold at most {settings.max_topics_per_client}."
    )
    presence_topic = {
        "name": "topic",
        "in": "query",
        "required": True,
        "schema": _topic_schema(settings),
        "description": "A topic (not a pattern) whose namespace has presence = true.",
    }
    user_id = {
        "name": "user_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": 'A user id (42 and "42" are the same user).',
    }
    # With an API key, the backend's routes require it (and may answer 401).
    keyed: dict[str, Any] = {}
    unauthorized: tuple[int, ...] = ()
    if settings.api_key:
        keyed = {"security": [{"apiKey": []}]}
        unauthorized = (401,)
    # Registering (POST /register, or /ws?token=) may hit the per-user limit, if one is set.
    limited: tuple[int, ...] = (429,) if settings.max_registrations_per_user else ()
    # An upgrade may hit the per-address limit, if one is set.
    per_ip: tuple[int, ...] = (429,) if settings.max_connections_per_ip else ()
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
                    "summary": "Liveness and counters (of the worker that answered)",
                    "responses": {
                        "200": {"description": "Up.", "content": _json("HealthResponse")}
                    },
                }
            },
            "/ready": {
                "get": {
                    "summary": "Readiness: whether this node accepts publishes",
                    "responses": {
                        "200": {"description": "Ready.", "content": _json("ReadyResponse")},
                        "503": {
                            "description": "Not ready (the broker is unreachable).",
                            "content": _json("ReadyResponse"),
                        },
                    },
                }
            },
            "/register": {
                "post": {
                    "summary": "Register a client; returns its WebSocket URL",
                    **keyed,
                    "requestBody": {"required": True, "content": _json("RegisterRequest")},
                    "responses": {
                        "200": {"description": "Registered.", "content": _json("RegisterResponse")},
                        **_errors(400, *unauthorized, 403, 408, 413, *limited, 503),
                    },
                }
            },
            "/register/{client_id}": {
                "delete": {
                    "summary": "Delete a registration and close its connection (code 1000)",
                    **keyed,
                    "parameters": [client_id],
                    "responses": {
                        "200": {
                            "description": "Deleted.",
                            "content": _json("UnregisterResponse"),
                        },
                        **_errors(*unauthorized, 404, 503),
                    },
                }
            },
            "/publish": {
                "post": {
                    "summary": "Publish a message to a topic, optionally to one user only",
                    "description": "The message is a string or any JSON value (nested at most "
                    f"{MAX_DEPTH} deep); subscribers receive that value, embedded as is in "
                    "their envelopes. A string holding JSON text stays a string. Size limits "
                    "count the value's compact JSON text.",
                    **keyed,
                    "requestBody": {"required": True, "content": _json("PublishRequest")},
                    "responses": {
                        "200": {
                            "description": "Published at `offset` in the topic's `epoch`; "
                            "`recipients` connections on this node are subscribed to it. With "
                            "`duplicate`, an earlier publish with the same idempotency_key "
                            "was given this position and nothing was published.",
                            "content": _json("PublishResponse"),
                        },
                        **_errors(400, *unauthorized, 408, 413, 431, 503),
                    },
                }
            },
            "/publish/batch": {
                "post": {
                    "summary": f"Publish up to {schema.MAX_BATCH_MESSAGES} messages in one "
                    "request, in order",
                    "description": "Every topic is checked before anything is published. On a "
                    "503 the error message says how many were published before the failure.",
                    **keyed,
                    "requestBody": {"required": True, "content": _json("BatchPublishRequest")},
                    "responses": {
                        "200": {
                            "description": "Each message's recipient count on this node and "
                            "position.",
                            "content": _json("BatchPublishResponse"),
                        },
                        **_errors(400, *unauthorized, 408, 413, 431, 503),
                    },
                }
            },
            "/stats": {
                "get": {
                    "summary": "This node's live counters (JSON)",
                    "description": "With --workers N: the workers' counters added up, each "
                    "as of its last heartbeat (workers says how many).",
                    **keyed,
                    "responses": {
                        "200": {"description": "Counters.", "content": _json("StatsResponse")},
                        **_errors(*unauthorized),
                    },
                }
            },
            "/topics": {
                "get": {
                    "summary": "Topics with subscribers on this node, most subscribers first",
                    **keyed,
                    "parameters": [
                        {
                            "name": "prefix",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "Only topics starting with this.",
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                            "description": "At most this many topics (default 100).",
                        },
                    ],
                    "responses": {
                        "200": {"description": "Topics.", "content": _json("TopicsResponse")},
                        **_errors(400, *unauthorized),
                    },
                }
            },
            "/history": {
                "get": {
                    "summary": "A topic's kept publications and its current position",
                    "description": f"At most history_size ({settings.history_size}) "
                    f"publications per topic are kept, each for history_ttl "
                    f"({settings.history_ttl:g}) seconds. Page forward with since = the last "
                    "offset of the previous page.",
                    **keyed,
                    "parameters": [
                        {
                            "name": "topic",
                            "in": "query",
                            "required": True,
                            "schema": _topic_schema(settings),
                        },
                        {
                            "name": "since",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 0},
                            "description": "Only publications with a higher offset.",
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 0,
                                "maximum": schema.MAX_HISTORY_PAGE,
                            },
                            "description": "At most this many (default 100; 0: only the position).",
                        },
                        {
                            "name": "reverse",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
                            "description": "Newest first (default false: oldest first).",
                        },
                    ],
                    "responses": {
                        "200": {"description": "History.", "content": _json("HistoryResponse")},
                        **_errors(400, *unauthorized, 503),
                    },
                }
            },
            "/presence": {
                "get": {
                    "summary": "Every connection subscribed to a topic, on every node",
                    "description": "Connections subscribed by name (not through a pattern), "
                    "oldest first, each with its public id (the first 32 hex digits of the "
                    "SHA-256 of its registration id), user, node and connected_at. With "
                    f"Redis, a node that died drops out within presence_ttl "
                    f"({settings.presence_ttl:g}) seconds.",
                    **keyed,
                    "parameters": [presence_topic],
                    "responses": {
                        "200": {"description": "Presence.", "content": _json("PresenceResponse")},
                        **_errors(400, *unauthorized, 503),
                    },
                }
            },
            "/presence/stats": {
                "get": {
                    "summary": "How many connections and distinct users are subscribed to a topic",
                    **keyed,
                    "parameters": [presence_topic],
                    "responses": {
                        "200": {
                            "description": "Counts (anonymous connections are clients, not users).",
                            "content": _json("PresenceStatsResponse"),
                        },
                        **_errors(400, *unauthorized, 503),
                    },
                }
            },
            "/users/{user_id}": {
                "get": {
                    "summary": "Whether a user is online, and on how many connections",
                    "description": "Counts the user's open connections on every node, "
                    "whatever their topics.",
                    **keyed,
                    "parameters": [user_id],
                    "responses": {
                        "200": {"description": "The user.", "content": _json("UserResponse")},
                        **_errors(*unauthorized, 503),
                    },
                }
            },
            "/users/{user_id}/connections": {
                "delete": {
                    "summary": "Disconnect a user everywhere (a ban): close 4503, registrations "
                    "deleted",
                    "description": "Every connection of the user, on every node, is closed "
                    "with 4503 (the clients do not reconnect), and the user's registrations "
                    "are deleted, so their URLs answer 404. A user connected with a "
                    "connection token can come back while the token is valid: stop issuing "
                    "tokens (and registrations) to a user you ban.",
                    **keyed,
                    "parameters": [user_id],
                    "responses": {
                        "200": {
                            "description": "Closing; how many connections were open and how "
                            "many registrations were deleted (0 and 0 for an unknown user).",
                            "content": _json("DisconnectUserResponse"),
                        },
                        **_errors(*unauthorized, 503),
                    },
                }
            },
            "/ws/{client_id}": {
                "get": {
                    "summary": "Open the client's WebSocket (see README: WebSocket protocol)",
                    "parameters": [client_id, fmt, recover, origin],
                    "responses": {
                        "101": {"description": "Switching to WebSocket."},
                        **_errors(400, 403, 404, 426, *per_ip, 503),
                    },
                }
            },
            "/sse/{client_id}": {
                "get": {
                    "summary": "Server-sent events: the frames a JSON-mode WebSocket gets, one "
                    "event each (see README: Server-sent events)",
                    "description": 'The first event is {"type":"stream","id":...}, '
                    "then the acknowledgement of the registration's topics. Each event that "
                    "moves a position has the id 1;topic=epoch.offset;... (at most 1024 "
                    "characters, ';~' when topics were left out); sent back as Last-Event-ID "
                    "(or ?last_event_id=), it recovers every topic as a WebSocket's since. "
                    'The stream ends with {"type":"close","code":...} where a '
                    "WebSocket would be closed (4008 slow consumer...).",
                    "parameters": [client_id, _last_event_id, origin],
                    "responses": {
                        "200": {
                            "description": "The stream (text/event-stream, chunked).",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_errors(400, 403, 404, *per_ip, 503),
                    },
                },
                "post": {
                    "summary": "A command for the registration's SSE stream (the JSON a "
                    "WebSocket sends as a frame: topics, subscribe, unsubscribe, publish, "
                    "presence, presence_stats)",
                    "description": "Answered with the frame a WebSocket would get; a "
                    "subscription's acknowledgement and replay also go down the stream. At "
                    "most --max-message-size bytes. The registration id is the capability.",
                    "parameters": [client_id],
                    "requestBody": {
                        "required": True,
                        "content": {"text/plain": {"schema": {"type": "object"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "The answer frame (subscribed, published, "
                            "presence or presence_stats).",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_errors(400, 403, 404, 409, 413, 429, 503),
                    },
                },
            },
            "/sse": {
                "get": {
                    "summary": "Server-sent events with a signed connection token (the stream's "
                    "first event names the registration made for it, to post commands to)",
                    "parameters": [
                        {
                            "name": "token",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string"},
                            "description": "A connection token, as for GET /ws.",
                        },
                        _last_event_id,
                        origin,
                    ],
                    "responses": {
                        "200": {
                            "description": "The stream (text/event-stream, chunked).",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_errors(400, 401, 403, 404, *sorted({*limited, *per_ip}), 503),
                    },
                }
            },
            "/ws": {
                "get": {
                    "summary": "Open a WebSocket with a signed connection token (no registration)",
                    "parameters": [
                        {
                            "name": "token",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string"},
                            "description": "A JWT (HS256 or RS256) with claims sub (the user "
                            'id), exp and optionally topics and grants ({"subscribe": '
                            '[patterns], "publish": [patterns]}, as in POST /register).',
                        },
                        fmt,
                        recover,
                        origin,
                    ],
                    "responses": {
                        "101": {"description": "Switching to WebSocket."},
                        **_errors(400, 401, 403, 404, 426, *sorted({*limited, *per_ip}), 503),
                    },
                }
            },
            "/nodes": {
                "get": {
                    "summary": "Every node sharing the broker, as its last heartbeat said",
                    "description": "A node writes its entry every third of --presence-ttl; "
                    "one that stopped doing so (killed) is gone within --presence-ttl.",
                    **keyed,
                    "responses": {
                        "200": {"description": "The nodes.", "content": _json("NodesResponse")},
                        **_errors(*unauthorized, 503),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text exposition format)",
                    "description": "With --workers N: every worker's series, labelled node.",
                    **keyed,
                    "responses": {
                        "200": {
                            "description": "Metrics.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_errors(*unauthorized),
                    },
                }
            },
            "/console": {
                "get": {
                    "summary": "The web console (HTML): live counters, topics, subscribe, publish",
                    "description": "Public; the page asks for the API key when the API needs "
                    "one and keeps it in sessionStorage.",
                    "responses": {
                        "200": {
                            "description": "The page.",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/console/{asset}": {
                "get": {
                    "summary": "The console's script and stylesheet",
                    "parameters": [
                        {
                            "name": "asset",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "enum": ["console.css", "console.js"]},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "The file.",
                            "content": {
                                "text/css": {"schema": {"type": "string"}},
                                "text/javascript": {"schema": {"type": "string"}},
                            },
                        },
                        "404": {"description": "No such asset.", "content": _json("ErrorBody")},
                    },
                }
            },
            "/client/wsrelay.js": {
                "get": {
                    "summary": "The browser client, an ES module (see README: Web console)",
                    "responses": {
                        "200": {
                            "description": "The module.",
                            "content": {"text/javascript": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "One of the keys given with --api-key / WSRELAY_API_KEY.",
                }
            },
        },
    }
