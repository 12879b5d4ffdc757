"""Presence, join/leave, users and the ban against real servers, on both stacks
(memory broker): ``GET /presence[/stats]``, the WebSocket ``presence`` and
``presence_stats`` commands, ``join``/``leave`` frames, ``GET /users/<id>`` and
``DELETE /users/<id>/connections`` (4503)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets

from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber, stop_and_check

CONFIG = """
[[namespace]]
pattern = "room:*"
presence = true
join_leave = true

[[namespace]]
pattern = "quiet:*"
presence = true

[[namespace]]
pattern = "secret:*"
subscribe = "granted"
presence = true
join_leave = true
"""


@pytest.fixture(scope="module", params=["native", "aiohttp"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("presence") / "wsrelay.toml"
    config.write_text(CONFIG)
    process = ServerProcess(["--stack", request.param, "--config", str(config)]).start()
    yield process
    stop_and_check(process)


@pytest.fixture
async def api(server: ServerProcess) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, server.url)


def public(client_id: str) -> str:
    return hashlib.sha256(client_id.encode()).hexdigest()[:32]


async def connect(
    api: Api, user: Any = None, topics: tuple[str, ...] = (), query: str = "", grants: Any = None
) -> Subscriber:
    body: dict[str, Any] = {"user_id": user, "topics": list(topics)}
    if grants is not None:
        body["grants"] = grants
    status, reg = await api.call("POST", "/register", body)
    assert status == 200, reg
    url = reg["url"] + query
    return Subscriber(await websockets.connect(url, open_timeout=TIMEOUT), reg["id"], reg["url"])


async def next_of(sub: Subscriber, kind: str) -> dict[str, Any]:
    """The next frame, which must be of type ``kind``."""
    frame = await sub.frame()
    assert frame["type"] == kind, frame
    return frame


async def fence(api: Api, sub: Subscriber, topic: str) -> None:
    """Publish to ``topic`` and check that ``sub``'s next frame is that message: nothing
    (no join, no leave) came before it."""
    marker = f"fence-{time.monotonic_ns()}"
    await api.publish(topic, marker)
    frame = await sub.frame()
    assert frame == {**frame, "type": "message", "message": marker}, frame


async def test_get_presence_lists_every_subscriber_by_its_public_id(api: Api) -> None:
    a = await connect(api, 1)
    b = await connect(api, "two")
    anonymous = await connect(api)
    before = time.time()
    for sub in (a, b, anonymous):
        await sub.subscribe("quiet:list")
    status, stats = await api.call("GET", "/stats")
    assert status == 200, stats
    status, body = await api.call("GET", "/presence", params={"topic": "quiet:list"})
    assert status == 200, body
    assert body["topic"] == "quiet:list"
    clients = {entry["client"]: entry for entry in body["clients"]}
    assert set(clients) == {public(a.id), public(b.id), public(anonymous.id)}
    assert a.id not in json.dumps(body)  # never the registration id: it is a capability
    assert clients[public(a.id)]["user"] == "1"
    assert clients[public(b.id)]["user"] == "two"
    assert clients[public(anonymous.id)]["user"] is None
    for entry in body["clients"]:
        assert entry["node"] == stats["node"]
        assert before - 60 < entry["connected_at"] <= time.time() + 1
    status, counts = await api.call("GET", "/presence/stats", params={"topic": "quiet:list"})
    assert status == 200, counts
    assert counts == {"topic": "quiet:list", "num_clients": 3, "num_users": 2}
    await a.command({"unsubscribe": ["quiet:list"]})
    status, body = await api.call("GET", "/presence", params={"topic": "quiet:list"})
    assert status == 200, body
    assert {e["client"] for e in body["clients"]} == {public(b.id), public(anonymous.id)}
    for sub in (a, b, anonymous):
        await sub.close()


async def test_a_connection_with_initial_topics_is_present_from_the_upgrade(api: Api) -> None:
    sub = await connect(api, 5, topics=("quiet:initial", "other:topic"))
    status, body = await api.call("GET", "/presence", params={"topic": "quiet:initial"})
    assert status == 200, body
    assert [e["client"] for e in body["clients"]] == [public(sub.id)]
    await sub.close()


async def test_join_and_leave_reach_the_other_subscribers_not_the_joiner(api: Api) -> None:
    watcher = await connect(api, "w")
    await watcher.subscribe("room:a")
    joiner = await connect(api, "j")
    await joiner.subscribe("room:a")
    assert await next_of(watcher, "join") == {
        "type": "join",
        "topic": "room:a",
        "user": "j",
        "client": public(joiner.id),
    }
    await fence(api, joiner, "room:a")  # no join for itself
    await next_of(watcher, "message")
    await joiner.command({"unsubscribe": ["room:a"]})
    leave = await next_of(watcher, "leave")
    assert leave == {"type": "leave", "topic": "room:a", "user": "j", "client": public(joiner.id)}
    # A connection that closes leaves too; one that connects with the topic joins.
    again = await connect(api, "k", topics=("room:a",))
    assert (await next_of(watcher, "join"))["client"] == public(again.id)
    await fence(api, again, "room:a")  # no join for itself either
    await next_of(watcher, "message")
    await again.close()
    assert (await next_of(watcher, "leave"))["client"] == public(again.id)
    status, body = await api.call("GET", "/presence", params={"topic": "room:a"})
    assert status == 200, body
    assert [e["client"] for e in body["clients"]] == [public(watcher.id)]
    await watcher.close()
    await joiner.close()


async def test_no_join_leave_without_join_leave_nor_in_raw_mode(api: Api) -> None:
    quiet = await connect(api, "q")
    await quiet.subscribe("quiet:b")
    raw = await connect(api, "r", topics=("room:b",), query="?format=raw")
    other = await connect(api, "o")
    await other.subscribe("quiet:b", "room:b")
    await fence(api, quiet, "quiet:b")  # a join_leave = false namespace: no join
    marker = "raw-fence"
    await api.publish("room:b", marker)
    assert await raw.raw() == marker  # raw mode carries messages only
    await other.close()
    await quiet.close()
    await raw.close()


async def test_presence_over_the_websocket(api: Api) -> None:
    a = await connect(api, "a", topics=("room:ws",))
    b = await connect(api, "b", topics=("room:ws",))
    await next_of(a, "join")
    answer = await a.command({"presence": "room:ws", "id": 3})
    assert answer["type"] == "presence" and answer["id"] == 3, answer
    assert answer["topic"] == "room:ws" and answer["total"] == 2
    assert {e["client"] for e in answer["clients"]} == {public(a.id), public(b.id)}
    assert set(answer["clients"][0]) == {"client", "user", "node", "connected_at"}
    stats = await a.command({"presence_stats": "room:ws", "id": "s"})
    assert stats == {
        "type": "presence_stats",
        "topic": "room:ws",
        "num_clients": 2,
        "num_users": 2,
        "id": "s",
    }
    # Any client that may subscribe to the topic may ask, subscribed or not.
    c = await connect(api, "c")
    assert (await c.command({"presence_stats": "room:ws"}))["num_clients"] == 2
    for sub in (a, b, c):
        await sub.close()


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ({"presence": "plain", "id": 1}, "presence_disabled"),
        ({"presence_stats": "secret:x", "id": 2}, "forbidden_topic"),
        ({"presence": "room.*", "id": 3}, "invalid_topic"),
        ({"presence": "bad topic!", "id": 4}, "invalid_topic"),
        ({"presence": "room:x", "presence_stats": "room:x", "id": 5}, "invalid_field"),
        ({"presence": "room:x", "subscribe": ["room:x"], "id": 6}, "invalid_field"),
        ({"presence": 7, "id": 7}, "invalid_field"),
        ({"subscribe": ["room:x"], "id": 8}, "invalid_field"),
    ],
)
async def test_presence_commands_refused_with_a_code(
    api: Api, command: dict[str, Any], code: str
) -> None:
    sub = await connect(api, "refused")
    answer = await sub.command(command)
    assert answer["type"] == "error", answer
    assert answer["error"]["code"] == code, answer
    assert answer["id"] == command["id"]
    assert (await sub.subscribe("room:ok"))["topics"] == ["room:ok"]  # the connection stays
    await sub.close()


async def test_a_granted_client_may_ask_for_a_granted_topic(api: Api) -> None:
    sub = await connect(api, "g", grants={"subscribe": ["secret:*"]})
    answer = await sub.command({"presence": "secret:y", "id": 1})
    assert answer == {"type": "presence", "topic": "secret:y", "clients": [], "total": 0, "id": 1}
    await sub.close()


async def test_a_raw_client_asking_for_presence_is_closed(api: Api) -> None:
    sub = await connect(api, "raw", query="?format=raw")
    await sub.ws.send(json.dumps({"presence": "room:raw"}))
    code, reason = await sub.closed()
    assert code == 1008, (code, reason)
    assert "format=raw" in (reason or "")


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/presence", {}, 400, "invalid_field"),
        ("/presence/stats", {"topic": ""}, 400, "invalid_field"),
        ("/presence", {"topic": "plain"}, 400, "presence_disabled"),
        ("/presence/stats", {"topic": "plain"}, 400, "presence_disabled"),
        ("/presence", {"topic": "room:*"}, 400, "invalid_topic"),
        ("/presence", {"topic": "x" * 200}, 400, "invalid_topic"),
        ("/presence", {"topic": "a b"}, 400, "invalid_topic"),
    ],
)
async def test_presence_routes_refuse_malformed_requests(
    api: Api, path: str, params: dict[str, str], status: int, code: str
) -> None:
    got, body = await api.call("GET", path, params=params)
    assert got == status, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]


async def test_users_online_and_ban(api: Api) -> None:
    status, body = await api.call("GET", "/users/nobody")
    assert (status, body) == (200, {"user_id": "nobody", "online": False, "connections": 0})
    first = await connect(api, 77)
    second = await connect(api, "77", topics=("room:ban",))
    bystander = await connect(api, 78, topics=("room:ban",))
    status, body = await api.call("GET", "/users/77")
    assert (status, body) == (200, {"user_id": "77", "online": True, "connections": 2})
    await next_of(second, "join")  # the bystander's
    status, body = await api.call("DELETE", "/users/77/connections")
    assert status == 200, body
    assert body == {"user_id": "77", "connections": 2, "registrations": 2}
    for sub in (first, second):
        code, reason = await sub.closed()
        assert code == 4503, (code, reason)
    # Their registrations are gone: connecting again is refused.
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(first.url, open_timeout=TIMEOUT)
    assert refused.value.response.status_code == 404
    # The bystander saw the banned connection leave and stays connected.
    leave = await next_of(bystander, "leave")
    assert leave["client"] == public(second.id)
    await fence(api, bystander, "room:ban")
    status, body = await api.call("GET", "/users/77")
    assert status == 200, body
    assert body["connections"] == 0 and body["online"] is False
    status, body = await api.call("DELETE", "/users/77/connections")
    assert (status, body) == (200, {"user_id": "77", "connections": 0, "registrations": 0})
    await bystander.close()


async def test_user_routes_need_the_api_key(start_server: Any, tmp_path: Path) -> None:
    server = start_server("--api-key", "k" * 16)
    async with aiohttp.ClientSession() as session:
        api = Api(session, server.url)
        for method, path in [
            ("GET", "/users/1"),
            ("DELETE", "/users/1/connections"),
            ("GET", "/presence?topic=a"),
            ("GET", "/presence/stats?topic=a"),
        ]:
            status, body = await api.call(method, path)
            assert status == 401 and body["error"]["code"] == "unauthorized", (path, body)
        status, body = await api.call(
            "GET", "/users/1", headers={"Authorization": "Bearer " + "k" * 16}
        )
        assert status == 200, body


async def test_openapi_documents_the_presence_routes(api: Api) -> None:
    status, doc = await api.call("GET", "/openapi.json")
    assert status == 200, doc
    paths = doc["paths"]
    for path, method, schema in [
        ("/presence", "get", "PresenceResponse"),
        ("/presence/stats", "get", "PresenceStatsResponse"),
        ("/users/{user_id}", "get", "UserResponse"),
        ("/users/{user_id}/connections", "delete", "DisconnectUserResponse"),
    ]:
        answer = paths[path][method]["responses"]["200"]
        assert answer["content"]["application/json"]["schema"]["$ref"].endswith(schema)
    assert "presence_disabled" in paths["/presence"]["get"]["responses"]["400"]["description"]
    assert "4503" in paths["/users/{user_id}/connections"]["delete"]["summary"]
    schemas = doc["components"]["schemas"]
    assert set(schemas["PresenceClient"]["properties"]) == {
        "client",
        "user",
        "node",
        "connected_at",
    }
    assert set(schemas["PresenceStatsResponse"]["properties"]) == {
        "topic",
        "num_clients",
        "num_users",
    }


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/users/", 404, "not_found"),
        ("DELETE", "/users/1", 405, "method_not_allowed"),
        ("GET", "/users/1/connections", 405, "method_not_allowed"),
        ("POST", "/presence?topic=room:1", 405, "method_not_allowed"),
        ("DELETE", "/users//connections", 404, "not_found"),
    ],
)
async def test_user_and_presence_routes_answer_json_errors(
    api: Api, method: str, path: str, status: int, code: str
) -> None:
    got, body = await api.call(method, path)
    assert got == status, body
    assert body["error"]["code"] == code, body
