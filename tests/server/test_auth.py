"""Who may call what: the API key, the Origin allowlist and signed connection tokens,
against real servers."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import InvalidStatus

from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber
from wsrelay.config import STACKS

KEYS = ("key-old-0123456789", "key-new-9876543210")
PROTECTED = [
    ("POST", "/register", {"user_id": 1}),
    ("DELETE", "/register/0123456789abcdef0123456789abcdef", None),
    ("POST", "/publish", {"topic": "t", "message": "m"}),
    ("GET", "/metrics", None),
    ("GET", "/history?topic=t", None),
]


async def refused(status_and_body: tuple[int, Any], status: int, code: str) -> None:
    got_status, body = status_and_body
    assert got_status == status, body
    assert body["error"]["code"] == code and body["error"]["message"], body


@pytest.fixture(scope="module", params=STACKS)
def keyed(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """A server with two API keys (rotation), given comma-separated in the variable; on
    each stack (the native one answers some routes itself)."""
    process = ServerProcess(
        ["--stack", request.param], env={"WSRELAY_API_KEY": ",".join(KEYS)}
    ).start()
    yield process
    assert process.stop() == 0
    assert "Traceback" not in process.log(), process.log()


# -- API key ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-key", "Basic a2V5LW9sZA==", "Bearer ", KEYS[0]]
)
async def test_protected_routes_refuse_a_missing_or_wrong_key(
    keyed: ServerProcess,
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    body: Any,
    authorization: str | None,
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    async with session.request(method, keyed.url + path, json=body, headers=headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.content_type == "application/json"
        answer = await response.json()
    assert answer["error"]["code"] == "unauthorized"


async def test_every_configured_key_works_and_open_routes_stay_open(
    keyed: ServerProcess, session: aiohttp.ClientSession, topic: str
) -> None:
    epochs: set[str] = set()
    for offset, key in enumerate(KEYS, start=1):
        api = Api(session, keyed.url)
        headers = {"Authorization": f"Bearer {key}"}
        status, reg = await api.call("POST", "/register", {"topics": [topic]}, headers=headers)
        assert status == 200, reg
        # The WebSocket needs no key: the registration id is the capability.
        sub = Subscriber(await websockets.connect(reg["url"]), reg["id"], reg["url"])
        status, body = await api.call(
            "POST", "/publish", {"topic": topic, "message": key}, headers=headers
        )
        assert status == 200, body
        assert (set(body), body["recipients"], body["offset"]) == (
            {"recipients", "offset", "epoch"},
            1,
            offset,
        )
        epochs.add(body["epoch"])
        assert await sub.frame() == {
            "type": "message",
            "topic": topic,
            "message": key,
            "offset": offset,
        }
        await sub.close()
        status, _ = await api.call("DELETE", f"/register/{reg['id']}", headers=headers)
        assert status == 200
        async with session.get(keyed.url + "/metrics", headers=headers) as response:
            assert response.status == 200
        status, page = await api.call("GET", f"/history?topic={topic}", headers=headers)
        assert status == 200, page
        assert [p["message"] for p in page["publications"]] == list(KEYS[:offset])
    assert len(epochs) == 1  # one topic, one epoch, whichever key published
    for path in ("/health", "/ready", "/openapi.json"):
        async with session.get(keyed.url + path) as response:
            assert response.status == 200, path


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsrelay", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "relay.example"])
def test_serve_refuses_a_public_address_without_a_key(host: str) -> None:
    result = serve("--host", host)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "without an API key" in result.stderr and "--insecure" in result.stderr


async def test_serve_on_a_public_address_with_insecure_or_a_key(start_server, session) -> None:
    for args, env in [(("--insecure",), {}), ((), {"WSRELAY_API_KEY": KEYS[0]})]:
        server = start_server("--host", "0.0.0.0", *args, env=env)
        async with session.get(server.url.replace("0.0.0.0", "127.0.0.1") + "/health") as r:
            assert r.status == 200


def test_an_unreadable_public_key_file_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-key.pem"
    bad.write_text("hello")
    result = serve("--jwt-public-key-file", str(bad))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    missing = serve("--jwt-public-key-file", str(tmp_path / "missing.pem"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


# -- Origin allowlist ------------------------------------------------------------------------


async def test_origin_allowlist(start_server, session: aiohttp.ClientSession) -> None:
    server = start_server(
        "--allowed-origin",
        "https://*.example.com",
        env={"WSRELAY_ALLOWED_ORIGIN": "https://app.test, http://localhost:*"},
    )
    # The flag wins over the variable: only the flag's pattern applies.
    api = Api(session, server.url)
    reg = await api.register(1)
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZQ==",
    }
    for origin in ("https://evil.test", "https://example.com.evil.test", "https://app.test"):
        async with session.get(
            reg["url"].replace("ws", "http", 1), headers={"Origin": origin, **upgrade}
        ) as response:
            assert response.status == 403, origin
            body = await response.json()
            assert body["error"]["code"] == "origin_not_allowed"
    for allowed in ("https://chat.example.com", "HTTPS://Chat.Example.com", None):
        headers = {"Origin": allowed} if allowed else {}
        ws = await websockets.connect(reg["url"], additional_headers=headers)
        await ws.close()  # a client that is not a browser sends no Origin and is let in


async def test_origin_allowlist_from_the_variable(start_server) -> None:
    server = start_server(env={"WSRELAY_ALLOWED_ORIGIN": "https://app.test, http://localhost:*"})
    async with aiohttp.ClientSession() as session:
        reg = await Api(session, server.url).register(1)
    for origin, allowed in [
        ("https://app.test", True),
        ("http://localhost:3000", True),
        ("https://app.test.evil", False),
    ]:
        if allowed:
            await (await websockets.connect(reg["url"], origin=origin)).close()  # type: ignore[arg-type]
        else:
            with pytest.raises(InvalidStatus) as info:
                await websockets.connect(reg["url"], origin=origin)  # type: ignore[arg-type]
            assert info.value.response.status_code == 403


# -- CORS: the WebSocket routes' refusals are readable from any page, nothing else is -------

WEBSOCKET_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Retry-After",
}


@pytest.mark.parametrize("stack", ["native", "aiohttp"])
async def test_websocket_refusals_carry_cors_and_no_other_route_does(start_server, stack) -> None:
    """A plain GET on /ws/<id> or /ws (wsrelay.js's check after a failed connection) is
    answered as the upgrade would be, readable by a page of any origin; an ``origin``
    query parameter is checked like the Origin header (a browser sends none with a
    same-origin GET). The API key's routes send no CORS header, and their preflight
    fails. On the native stack each request is a fresh connection's first: the native
    WebSocket driver answers it; on aiohttp, aiohttp's route does."""
    server = start_server("--stack", stack, "--allowed-origin", "https://app.test")
    open_server = start_server("--stack", stack)
    unknown = "0123456789abcdef0123456789abcdef"
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        client_id = (await Api(session, server.url).register(1))["id"]
        cases = [
            ("https://evil.test", f"/ws/{client_id}", 403, "origin_not_allowed"),
            ("https://app.test", f"/ws/{client_id}", 426, "upgrade_required"),
            ("https://app.test", f"/ws/{unknown}", 404, "unknown_client"),
            (None, f"/ws/{client_id}?origin=https%3A%2F%2Fevil.test", 403, "origin_not_allowed"),
            (None, f"/ws/{client_id}?origin=https%3A%2F%2Fapp.test", 426, "upgrade_required"),
            ("https://app.test", f"/ws/{client_id}?origin=https://evil.test", 403, None),
            ("https://evil.test", "/ws", 403, "origin_not_allowed"),
            ("https://app.test", "/ws", 404, "not_found"),  # tokens are not enabled
        ]
        for origin, path, status, code in cases:
            headers = {"Origin": origin} if origin else {}
            async with session.get(server.url + path, headers=headers) as response:
                assert response.status == status, (origin, path)
                body = await response.json()
                assert code is None or body["error"]["code"] == code, (origin, path, body)
                cors = {name: response.headers.get(name) for name in WEBSOCKET_CORS}
                assert cors == WEBSOCKET_CORS, (origin, path)
        # Without --allowed-origin there is nothing to refuse.
        open_id = (await Api(session, open_server.url).register(1))["id"]
        path = f"/ws/{open_id}?origin=https%3A%2F%2Fevil.test"
        async with session.get(open_server.url + path) as response:
            assert response.status == 426
            assert response.headers.get("Access-Control-Allow-Origin") == "*"

        from_app = {"Origin": "https://app.test"}
        others = [
            ("POST", "/register", {"user_id": 1}),
            ("POST", "/publish", {"topic": "t", "message": "m"}),
            ("POST", "/publish/batch", {"messages": [{"topic": "t", "message": "m"}]}),
            ("GET", "/stats", None),
            ("GET", "/topics", None),
            ("GET", "/metrics", None),
            ("GET", "/health", None),
            ("GET", "/register/nothing", None),  # no such route: 404 or 405
        ]
        for method, path, body in others:
            async with session.request(
                method, server.url + path, json=body, headers=from_app
            ) as response:
                assert "Access-Control-Allow-Origin" not in response.headers, (method, path)
                assert "Access-Control-Expose-Headers" not in response.headers, (method, path)
        # A page of another origin cannot send the API key: the preflight fails.
        preflight = {
            **from_app,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        for path in ("/publish", "/register", "/ws/" + client_id):
            async with session.options(server.url + path, headers=preflight) as response:
                assert response.status == 405, path
                assert "Access-Control-Allow-Origin" not in response.headers, path


# -- connection tokens ----------------------------------------------------------------------

SECRET = "test-secret-that-is-long-enough-for-hs256"


def token(claims: dict[str, Any], key: Any = SECRET, alg: str = "HS256") -> str:
    return jwt.encode({"exp": int(time.time()) + 60, **claims}, key, algorithm=alg)


async def token_status(server: ServerProcess, tok: str | None) -> tuple[int, dict[str, Any]]:
    url = server.ws_url + "/ws" + (f"?token={tok}" if tok is not None else "")
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(url)
    response = info.value.response
    return response.status_code, json.loads(response.body or b"{}")


async def test_a_signed_token_connects_without_registering(start_server, session, topic) -> None:
    server = start_server(env={"WSRELAY_JWT_SECRET": SECRET})
    api = Api(session, server.url)
    tok = token({"sub": "42", "topics": [topic]})
    ws = await websockets.connect(server.ws_url + "/ws?token=" + tok)
    sub = Subscriber(ws, "", "")
    assert await api.publish(topic, "for 42", user_id=42) == 1
    assert await sub.message() == (topic, "for 42")
    assert (await sub.subscribe(f"{topic}.more"))["topics"] == [topic, f"{topic}.more"]
    _, health = await api.call("GET", "/health")
    assert health["registrations"] == 1
    await sub.close()

    async def registration_gone() -> None:
        while (await api.call("GET", "/health"))[1]["registrations"] != 0:
            pass

    # The implicit registration lives exactly as long as its connection.
    await asyncio.wait_for(registration_gone(), TIMEOUT)


async def test_bad_tokens_are_refused_before_the_upgrade(start_server) -> None:
    server = start_server(env={"WSRELAY_JWT_SECRET": SECRET})
    expired = jwt.encode({"sub": "1", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256")
    status, body = await token_status(server, expired)
    assert status == 401 and body["error"]["code"] == "token_expired"
    cases = [
        token({"sub": "1"}, key="another-secret-of-sufficient-length!!"),  # forged
        jwt.encode({"sub": "1", "exp": int(time.time()) + 60}, "", algorithm="none"),
        jwt.encode({"sub": "1"}, SECRET, algorithm="HS256"),  # no exp
        jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256"),  # no sub
        token({"sub": "1", "topics": "cats"}),
        "not.a.token",
        "",
    ]
    for tok in cases:
        status, body = await token_status(server, tok)
        assert status == 401 and body["error"]["code"] == "invalid_token", (tok, body)
    # The expired token is reported as such only because its signature is good.
    forged_expired = jwt.encode(
        {"sub": "1", "exp": int(time.time()) - 10}, "x" * 40, algorithm="HS256"
    )
    assert (await token_status(server, forged_expired))[1]["error"]["code"] == "invalid_token"


async def test_a_token_with_unusable_topics_is_an_invalid_token(start_server) -> None:
    """The backend signed the topics: the client cannot change them, so a topic the relay
    refuses makes the whole token invalid (401, do not retry), not a bad request (400)."""
    server = start_server("--max-topics-per-client", "2", env={"WSRELAY_JWT_SECRET": SECRET})
    for topics, problem in [
        (["ok", "bad topic"], "outside"),
        (["x" * 129], "limit is 128"),
        ([""], "must not be empty"),
        (["a", "b", "c"], "at most 2"),
    ]:
        status, body = await token_status(server, token({"sub": "1", "topics": topics}))
        assert status == 401 and body["error"]["code"] == "invalid_token", (topics, body)
        assert "topics claim" in body["error"]["message"], body
        assert problem in body["error"]["message"], body
    await (
        await websockets.connect(
            server.ws_url + "/ws?token=" + token({"sub": "1", "topics": ["a", "b"]})
        )
    ).close()


async def test_a_token_living_longer_than_max_token_lifetime_is_refused(start_server) -> None:
    """exp may lie at most --max-token-lifetime (default one day) ahead: a token minted to
    last for ever is refused, not honoured until a leak is noticed."""
    server = start_server(env={"WSRELAY_JWT_SECRET": SECRET})
    now = int(time.time())
    for exp in (10**20, now + 86400 + 120):
        tok = jwt.encode({"sub": "1", "exp": exp}, SECRET, algorithm="HS256")
        status, body = await token_status(server, tok)
        assert status == 401 and body["error"]["code"] == "invalid_token", (exp, body)
        assert "max_token_lifetime" in body["error"]["message"], body
        assert "86400" in body["error"]["message"], body
    ok = jwt.encode({"sub": "1", "exp": now + 86400 - 120}, SECRET, algorithm="HS256")
    await (await websockets.connect(server.ws_url + "/ws?token=" + ok)).close()

    short = start_server("--max-token-lifetime", "60", env={"WSRELAY_JWT_SECRET": SECRET})
    status, body = await token_status(short, token({"sub": "1", "exp": now + 600}))
    assert status == 401 and "60" in body["error"]["message"], body
    await (await websockets.connect(short.ws_url + "/ws?token=" + token({"sub": "1"}))).close()

    unlimited = start_server(env={"WSRELAY_JWT_SECRET": SECRET, "WSRELAY_MAX_TOKEN_LIFETIME": "0"})
    far = jwt.encode({"sub": "1", "exp": now + 10 * 365 * 86400}, SECRET, algorithm="HS256")
    await (await websockets.connect(unlimited.ws_url + "/ws?token=" + far)).close()


async def test_tokens_are_404_when_not_configured(api: Api) -> None:
    status, body = await api.call("GET", "/ws?token=x")
    assert status == 404 and "not enabled" in body["error"]["message"]


async def test_rs256_tokens_and_no_algorithm_confusion(start_server, tmp_path: Path, topic) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(pem)
    server = start_server("--jwt-public-key-file", str(key_file))
    ws = await websockets.connect(
        server.ws_url + "/ws?token=" + token({"sub": "7", "topics": [topic]}, private, "RS256")
    )
    await ws.close()

    # HS256 "signed" with the (public) key file as the secret must not pass: the
    # classic algorithm-confusion forgery. Built by hand: PyJWT refuses to make it.
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": "7", "exp": int(time.time()) + 60}).encode())
    signature = b64(hmac.digest(pem, header + b"." + claims, "sha256"))
    status, body = await token_status(server, (header + b"." + claims + b"." + signature).decode())
    assert status == 401 and body["error"]["code"] == "invalid_token"
    assert "RS256" in body["error"]["message"]


# -- secrets stay out of logs ------------------------------------------------------------------


async def test_client_ids_and_tokens_are_never_logged_in_full(start_server, session, topic) -> None:
    server = start_server("--log-level", "debug", env={"WSRELAY_JWT_SECRET": SECRET})
    api = Api(session, server.url)
    sub = await api.connect(1, [topic])
    await sub.ws.send("not json")
    await sub.frame()
    await sub.close()
    await api.call("DELETE", f"/register/{sub.id}")
    await api.call("DELETE", f"/register/{sub.id}")  # refused: 404
    await api.call("GET", f"/ws/{sub.id}/extra")  # no such route
    tok = token({"sub": "5"})
    ws = await websockets.connect(server.ws_url + "/ws?token=" + tok)
    await ws.close()
    with pytest.raises(InvalidStatus):
        await websockets.connect(server.ws_url + "/ws?token=" + tok + "x")
    await api.call("GET", "/health")  # the log is written before this answer comes
    status = server.stop()
    log = server.log()
    assert status == 0
    assert sub.id[:8] in log  # shown shortened, so one client can be followed
    assert sub.id not in log and sub.id[:16] not in log
    assert tok.split(".")[2] not in log and "token=" not in log


async def test_api_key_flags_repeat_and_split_on_commas(start_server, session) -> None:
    server = start_server("--api-key", "flag-a", "--api-key", "flag-b,flag-c")
    for key, status in [("flag-a", 200), ("flag-b", 200), ("flag-c", 200), ("flag-b,flag-c", 401)]:
        headers = {"Authorization": f"Bearer {key}"}
        async with session.get(server.url + "/metrics", headers=headers) as response:
            assert response.status == status, key
