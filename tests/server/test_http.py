"""The HTTP API against a real server process, with a real HTTP client."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.utils import TIMEOUT, Api, ServerProcess, stop_and_check
from wsrelay.config import STACKS
from wsrelay.server.app import create_app


@pytest.fixture(scope="module", params=STACKS)
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """Every test here that uses the shared server runs once per stack (the native
    one serves a connection whose first request is a publish)."""
    process = ServerProcess(["--stack", request.param]).start()
    yield process
    stop_and_check(process)


async def test_health_answers_200_with_status(api: Api) -> None:
    status, body = await api.call("GET", "/health")
    assert status == 200
    assert body["status"] == "ok"
    assert {"connections", "registrations", "topics", "version"} <= body.keys()


async def test_register_returns_id_and_ws_url_from_the_host_header(api: Api) -> None:
    """The url is built from the Host the client used (seed: ws://host:port/ws/<id>)."""
    status, body = await api.call(
        "POST", "/register", {"user_id": 1}, headers={"Host": "relay.test:9999"}
    )
    assert status == 200
    assert body["url"] == f"ws://relay.test:9999/ws/{body['id']}"
    assert len(body["id"]) == 32 and int(body["id"], 16) >= 0  # 128 bits, hex


async def test_register_accepts_string_and_absent_user_ids(api: Api) -> None:
    for user_id in ("alice", None):
        status, body = await api.call("POST", "/register", {"user_id": user_id})
        assert status == 200, body
    status, _ = await api.call("POST", "/register", {})
    assert status == 200


async def test_public_url_overrides_the_host(start_server, session: aiohttp.ClientSession) -> None:
    server = start_server("--public-url", "wss://relay.example.com/")
    status, body = await Api(session, server.url).call("POST", "/register", {"user_id": 1})
    assert status == 200
    assert body["url"] == f"wss://relay.example.com/ws/{body['id']}"


async def test_unregister_then_unknown(api: Api) -> None:
    reg = await api.register(1)
    status, body = await api.call("DELETE", f"/register/{reg['id']}")
    assert status == 200 and body == {"id": reg["id"], "unregistered": True}
    status, body = await api.call("DELETE", f"/register/{reg['id']}")
    assert status == 404 and body["error"]["code"] == "unknown_client"


async def test_publish_reports_zero_recipients_for_an_empty_topic(api: Api, topic: str) -> None:
    assert await api.publish(topic, "nobody listens") == 0


BAD_REQUESTS = [
    # (method, path, raw body, status, error code, fragment of the message)
    ("POST", "/publish", b"{not json", 400, "invalid_json", "not valid JSON"),
    ("POST", "/publish", b"", 400, "invalid_json", "not valid JSON"),
    ("POST", "/publish", b'{"message": "m"}', 400, "invalid_field", "`topic`"),
    ("POST", "/publish", b'{"topic": "t"}', 400, "invalid_field", "`message`"),
    ("POST", "/publish", b'{"topic": 5, "message": "m"}', 400, "invalid_field", "$.topic"),
    # Any JSON value is a message (tests/server/test_json_payloads.py), nested 128 deep at most.
    (
        "POST",
        "/publish",
        b'{"topic": "t", "message": ' + b"[" * 129 + b"]" * 129 + b"}",
        400,
        "invalid_field",
        "at most 128",
    ),
    (
        "POST",
        "/publish",
        b'{"topic": "t", "message": "m", "user_id": []}',
        400,
        "invalid_field",
        "$.user_id",
    ),
    ("POST", "/publish", b'{"topic": "t", "message": "m", "usr": 1}', 400, "invalid_field", "usr"),
    (
        "POST",
        "/publish",
        b'{"topic": "no spaces", "message": "m"}',
        400,
        "invalid_topic",
        "character",
    ),
    ("POST", "/publish", b'{"topic": "", "message": "m"}', 400, "invalid_topic", "empty"),
    (
        "POST",
        "/publish",
        b'{"topic": "' + b"x" * 129 + b'", "message": "m"}',
        400,
        "invalid_topic",
        "limit is 128",
    ),
    ("POST", "/publish", b"[1, 2]", 400, "invalid_field", "object"),
    ("POST", "/publish", b'"just a string"', 400, "invalid_field", "object"),
    ("POST", "/publish", b'{"topic": "t", "message": "\xff\xfe"}', 400, "invalid_json", "UTF-8"),
    ("POST", "/register", b'{"user_id": true}', 400, "invalid_field", "$.user_id"),
    ("POST", "/register", b'{"user_id": 1, "topics": "cats"}', 400, "invalid_field", "$.topics"),
    (
        "POST",
        "/register",
        b'{"user_id": 1, "topics": ["ok", "not ok"]}',
        400,
        "invalid_topic",
        "not ok",
    ),
    (
        "POST",
        "/register",
        b'{"user_id": 1, "topics": [' + b",".join(b'"t%d"' % i for i in range(257)) + b"]}",
        400,
        "too_many_topics",
        "at most 256",
    ),
    ("GET", "/no/such/route", b"", 404, "not_found", "/no/such/route"),
    ("GET", "/publish", b"", 405, "method_not_allowed", "POST"),
    ("PUT", "/register", b"", 405, "method_not_allowed", "POST"),
    ("POST", "/health", b"", 405, "method_not_allowed", "GET"),
    ("DELETE", "/register/0123456789abcdef", b"", 404, "unknown_client", "no registration"),
    ("GET", "/ws/unknown-id", b"", 404, "unknown_client", "no registration"),
]


@pytest.mark.parametrize(
    ("method", "path", "raw", "status", "code", "fragment"),
    BAD_REQUESTS,
    ids=[f"{m} {p} {c}-{i}" for i, (m, p, _, _, c, _) in enumerate(BAD_REQUESTS)],
)
async def test_bad_requests_get_a_json_error_naming_the_problem(
    api: Api, method: str, path: str, raw: bytes, status: int, code: str, fragment: str
) -> None:
    """Every malformed request is a 4xx whose JSON body names the problem."""
    async with api.session.request(method, api.base + path, data=raw) as response:
        assert response.status == status
        assert response.content_type == "application/json"
        body = await response.json()
    assert body["error"]["code"] == code
    assert fragment in body["error"]["message"]


async def test_405_lists_the_allowed_methods(api: Api) -> None:
    async with api.session.get(api.base + "/publish") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"


async def test_ws_endpoint_without_upgrade_is_426(api: Api) -> None:
    reg = await api.register(1)
    async with api.session.get(api.base + f"/ws/{reg['id']}") as response:
        assert response.status == 426
        assert (await response.json())["error"]["code"] == "upgrade_required"


async def test_ws_endpoint_rejects_an_unknown_format(api: Api) -> None:
    reg = await api.register(1)
    async with api.session.get(api.base + f"/ws/{reg['id']}?format=xml") as response:
        assert response.status == 400
        assert "format" in (await response.json())["error"]["message"]


async def test_oversized_body_is_refused_before_it_is_read(server) -> None:
    """A declared 2 MiB body gets 413 after only the headers were sent."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2097152\r\n\r\n" + b"{" * 1000
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 413")
    writer.close()


async def test_oversized_chunked_body_is_refused(start_server, session) -> None:
    """Without a Content-Length the limit still holds; the server stops reading past it."""
    server = start_server("--max-body-size", "1KiB")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"x" * 1024

    async with session.post(server.url + "/publish", data=chunks()) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "payload_too_large"


async def test_body_at_the_limit_is_accepted(start_server, session) -> None:
    server = start_server("--max-body-size", "200")
    body = b'{"topic": "t", "message": "' + b"m" * 100 + b'"}'
    body += b" " * (200 - len(body))
    async with session.post(server.url + "/publish", data=body) as response:
        assert response.status == 200


async def test_garbage_on_the_socket_does_not_disturb_the_server(api: Api, server) -> None:
    """Junk bytes and a half-sent request on one connection; the API still answers."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as junk:
        junk.sendall(b"\x00\xff NOT HTTP \r\n\r\n")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as half:
            half.sendall(b"POST /publish HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            status, _ = await api.call("GET", "/health")
            assert status == 200


async def test_openapi_document_describes_every_route(api: Api) -> None:
    status, doc = await api.call("GET", "/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.")
    routes = {
        (resource.canonical, route.method.lower())
        for resource in create_app().router.resources()
        for route in resource
        if route.method != "HEAD" and resource.canonical != "/openapi.json"
    }
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == routes
    schemas = doc["components"]["schemas"]
    assert schemas["PublishRequest"]["required"] == ["topic", "message"]
    assert set(schemas["PublishRequest"]["properties"]) == {
        "topic",
        "message",
        "user_id",
        "idempotency_key",
        "skip_client",
    }
    assert schemas["PublishResponse"]["required"] == ["recipients", "offset", "epoch"]


async def test_in_memory_a_registration_expires_once_its_connection_is_gone(
    start_server, session: aiohttp.ClientSession
) -> None:
    """Registrations nobody uses must not pile up: in memory too they expire
    ``--registration-ttl`` seconds after they were made or their connection closed."""
    api = Api(session, start_server("--registration-ttl", "1").url)
    unused = await api.register(1)
    sub = await api.connect(2, ["t"])

    async def gone(client_id: str) -> None:
        # GET without an upgrade: 426 while the registration exists, 404 once it expired
        while (await api.call("GET", f"/ws/{client_id}"))[0] != 404:
            await asyncio.sleep(0.1)

    await asyncio.wait_for(gone(unused["id"]), TIMEOUT)
    # the connected one outlived its TTL: connected registrations do not expire
    assert await api.publish("t", "still here") == 1
    assert await sub.message() == ("t", "still here")
    await sub.close()
    await asyncio.wait_for(gone(sub.id), TIMEOUT)
