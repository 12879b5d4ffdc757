"""Namespaces, grants and client publishing on a real server, on both WebSocket stacks
(memory broker; two nodes on Redis: tests/test_multinode_rules.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import jwt
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber, stop_and_check
from wsrelay import codes
from wsrelay.config import STACKS

SECRET = "rules-test-secret-of-at-least-32-bytes"

CONFIG = """
history_size = 100

[[namespace]]
pattern = "chat:*"
subscribe = "granted"
publish = "subscribers"
max_message_size = 16
history_size = 3

[[namespace]]
pattern = "inbox:*"
subscribe = "granted"
publish = "granted"

[[namespace]]
pattern = "room.>"
publish = "granted"

[[namespace]]
pattern = "burst:*"
publish = "subscribers"
publish_burst = 3
publish_rate = 0.001
"""


@pytest.fixture(scope="module", params=STACKS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("rules") / "wsrelay.toml"
    config.write_text(CONFIG)
    process = ServerProcess(
        ["--stack", request.param, "--config", str(config), "--jwt-secret", SECRET]
    ).start()
    yield process
    stop_and_check(process)


async def register(
    api: Api, user: Any = None, topics: list[str] | None = None, grants: Any = None
) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"user_id": user, "topics": topics or []}
    if grants is not None:
        body["grants"] = grants
    status, answer = await api.call("POST", "/register", body)
    return status, dict(answer)


async def connect(
    api: Api, user: Any = None, grants: Any = None, topics: list[str] | None = None, **query: str
) -> Subscriber:
    status, reg = await register(api, user, topics, grants)
    assert status == 200, reg
    suffix = "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""
    ws = await websockets.connect(reg["url"] + suffix, open_timeout=TIMEOUT)
    return Subscriber(ws, reg["id"], reg["url"])


def token(claims: dict[str, Any]) -> str:
    return jwt.encode({"exp": int(time.time()) + 60, **claims}, SECRET, algorithm="HS256")


async def connect_token(server: ServerProcess, claims: dict[str, Any]) -> Subscriber:
    ws = await websockets.connect(f"{server.ws_url}/ws?token={token(claims)}", open_timeout=TIMEOUT)
    return Subscriber(ws, "", "")


async def publish_as(
    sub: Subscriber, publish: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Send a client publish; its answer (a ``published`` or error frame with its id),
    and the message frames that came before it: the publisher's own copy (without
    skip_self) may arrive before or after the answer."""
    await sub.ws.send(json.dumps({"publish": publish}))
    before: list[dict[str, Any]] = []
    while True:
        frame = await sub.frame()
        if frame["type"] != "message":
            assert frame.get("id") == publish.get("id"), frame
            return frame, before
        before.append(frame)


async def own_copy(sub: Subscriber, before: list[dict[str, Any]]) -> dict[str, Any]:
    """The publisher's own copy of what it published: already read, or next."""
    return before.pop(0) if before else await sub.frame()


def forbidden(frame: dict[str, Any], topic: str, pattern: str) -> None:
    assert frame["type"] == "error", frame
    assert frame["error"]["code"] == "forbidden_topic", frame
    assert repr(topic) in frame["error"]["message"], frame
    assert repr(pattern) in frame["error"]["message"], frame


CHAT = {"subscribe": ["chat:*"]}
INBOX = {"subscribe": ["inbox:{user}"], "publish": ["inbox:{user}"]}

# (user, grants, topic, namespace pattern when refused or None when allowed)
TABLE = [
    (None, None, "cats", None),
    (1, None, "chat:1", "chat:*"),
    (1, CHAT, "chat:1", None),
    (1, {"subscribe": ["chat:2"]}, "chat:1", "chat:*"),
    (1, {"publish": ["chat:*"]}, "chat:1", "chat:*"),
    (42, INBOX, "inbox:42", None),
    (42, INBOX, "inbox:43", "inbox:*"),
    (None, INBOX, "inbox:42", "inbox:*"),
    ("ann", {"subscribe": ["inbox:*"]}, "inbox:bob", None),
    (1, None, "room.eu.fr", None),
]


@pytest.mark.parametrize(("user", "grants", "topic", "refused_by"), TABLE)
async def test_who_may_subscribe(
    api: Api, user: Any, grants: Any, topic: str, refused_by: str | None
) -> None:
    sub = await connect(api, user, grants)
    frame = await sub.command({"subscribe": [topic]})
    if refused_by is None:
        assert frame["type"] == "subscribed" and frame["topics"] == [topic], frame
    else:
        forbidden(frame, topic, refused_by)
    # the same rule at POST /register, for the initial topics
    status, answer = await register(api, user, [topic], grants)
    if refused_by is None:
        assert status == 200, answer
    else:
        assert status == 403 and answer["error"]["code"] == "forbidden_topic", answer
        assert repr(topic) in answer["error"]["message"]
    await sub.close()


async def test_a_forbidden_topics_command_changes_nothing(api: Api, topic: str) -> None:
    sub = await connect(api, 1, CHAT)
    await sub.subscribe(topic, "chat:1")
    for command in ({"topics": ["other", "inbox:1"]}, {"subscribe": ["new", "inbox:1"]}):
        forbidden(await sub.command(command), "inbox:1", "inbox:*")
    await api.publish(topic, "still here")
    assert await sub.message() == (topic, "still here")
    frame = await sub.command({"subscribe": []})
    assert frame["topics"] == sorted([topic, "chat:1"])
    await sub.close()


async def test_a_connection_token_carries_grants(server: ServerProcess, api: Api) -> None:
    sub = await connect_token(server, {"sub": "7", "grants": INBOX, "topics": ["inbox:7"]})
    forbidden(await sub.command({"subscribe": ["inbox:8"]}), "inbox:8", "inbox:*")
    frame = await sub.command({"subscribe": ["chat:1"]})
    forbidden(frame, "chat:1", "chat:*")
    answer, before = await publish_as(sub, {"topic": "inbox:7", "message": "note", "id": 1})
    assert answer["type"] == "published" and answer["id"] == 1, answer
    own = await own_copy(sub, before)
    assert (own["topic"], own["message"]) == ("inbox:7", "note")
    await sub.close()
    # no grant for the initial topic: refused at the handshake, 403
    with pytest.raises(InvalidStatus) as caught:
        await connect_token(server, {"sub": "7", "topics": ["inbox:7"]})
    assert caught.value.response.status_code == 403
    assert b"forbidden_topic" in caught.value.response.body
    # a malformed grants claim is an invalid token
    bad: list[Any] = [{"subscribe": "inbox:7"}, {"read": []}, {"publish": ["a b"]}, ["x"]]
    for grants in bad:
        with pytest.raises(InvalidStatus) as caught:
            await connect_token(server, {"sub": "7", "grants": grants})
        assert caught.value.response.status_code == 401, grants
        assert b"invalid_token" in caught.value.response.body


async def test_post_register_validates_grants(api: Api) -> None:
    status, answer = await register(api, 1, [], {"subscribe": ["ok", "a.>.b"]})
    assert status == 400 and answer["error"]["code"] == "invalid_topic", answer
    assert "grants.subscribe[1]" in answer["error"]["message"]
    status, answer = await register(api, 1, [], {"read": []})
    assert status == 400 and answer["error"]["code"] == "invalid_field", answer


async def test_a_client_publish_reaches_subscribers_with_offsets(api: Api) -> None:
    room = f"chat:{time.monotonic_ns()}"
    alice, bob = await connect(api, "alice", CHAT), await connect(api, "bob", CHAT)
    start = (await alice.subscribe(room))["positions"][room]["offset"]
    await bob.subscribe(room)
    answer, before = await publish_as(alice, {"topic": room, "message": "hello", "id": 7})
    assert answer == {
        "type": "published",
        "id": 7,
        "offset": start + 1,
        "epoch": answer["epoch"],
    }
    expected = {"type": "message", "topic": room, "message": "hello", "offset": start + 1}
    assert await own_copy(alice, before) == expected  # without skip_self, the publisher too
    assert await bob.frame() == expected
    # the same path as POST /publish: offsets continue, history holds both
    status, body = await api.call("POST", "/publish", {"topic": room, "message": "from api"})
    assert status == 200 and body["offset"] == start + 2
    assert await bob.message() == (room, "from api")
    assert await alice.message() == (room, "from api")
    status, history = await api.call("GET", f"/history?topic={room}")
    assert [p["message"] for p in history["publications"]] == ["hello", "from api"]
    # idempotency: a repeat with the key publishes nothing and answers the first position
    publish = {"topic": room, "message": "once", "id": "a", "idempotency_key": "k1"}
    first, before = await publish_as(bob, publish)
    assert (await own_copy(bob, before))["message"] == "once"
    again, before = await publish_as(bob, {**publish, "id": "b"})
    assert again == {**first, "id": "b", "duplicate": True} and before == []
    assert await alice.message() == (room, "once")
    await api.publish(room, "fence")
    assert await bob.message() == (room, "fence")  # the repeat sent nothing
    await api.publish(room, "fence")
    assert await alice.message() == (room, "fence")
    await alice.close()
    await bob.close()


async def test_skip_self_leaves_the_publisher_out(api: Api) -> None:
    room = f"chat:skip{time.monotonic_ns()}"
    alice, bob = await connect(api, "alice", CHAT), await connect(api, "bob", CHAT)
    await alice.subscribe(room)
    await bob.subscribe(room)
    answer, before = await publish_as(
        alice, {"topic": room, "message": "not to me", "id": 1, "skip_self": True}
    )
    assert answer["type"] == "published" and before == [], (answer, before)
    assert await bob.message() == (room, "not to me")
    await api.publish(room, "fence")
    assert await alice.message() == (room, "fence")  # not "not to me" first
    assert await bob.message() == (room, "fence")
    await alice.close()
    await bob.close()


async def test_post_publish_skip_client_leaves_that_client_out(api: Api, topic: str) -> None:
    alice, bob = await connect(api, topics=[topic]), await connect(api, topics=[topic])
    await alice.subscribe(topic)
    await bob.subscribe(topic)
    status, body = await api.call(
        "POST", "/publish", {"topic": topic, "message": "one", "skip_client": alice.id}
    )
    assert status == 200 and body["recipients"] == 1, body
    batch = [
        {"topic": topic, "message": "two", "skip_client": bob.id},
        {"topic": topic, "message": "three"},
    ]
    status, body = await api.call("POST", "/publish/batch", {"messages": batch})
    assert status == 200 and body["recipients"] == [1, 2], body
    assert [await alice.message(), await alice.message()] == [(topic, "two"), (topic, "three")]
    assert [await bob.message(), await bob.message()] == [(topic, "one"), (topic, "three")]
    await alice.close()
    await bob.close()


async def test_publish_refusals_carry_the_id_and_keep_the_connection(api: Api) -> None:
    room = f"chat:refuse{time.monotonic_ns()}"
    sub = await connect(api, 5, {**CHAT, "publish": ["room.eu.*"]})
    cases = [
        ({"topic": room, "message": "x", "id": 1}, "forbidden_topic", "not subscribed"),
        ({"topic": "cats", "message": "x", "id": 2}, "forbidden_topic", 'publish = "none"'),
        ({"topic": "room.us.ny", "message": "x", "id": 3}, "forbidden_topic", "grant"),
        ({"topic": "bad topic", "message": "x", "id": 4}, "invalid_topic", "topic"),
        ({"topic": "cats", "id": 5}, "invalid_field", "message"),
        # Any JSON value is a message; one nested deeper than 128 is not.
        (
            {"topic": "cats", "message": json.loads("[" * 129 + "]" * 129), "id": 6},
            "invalid_field",
            "at most 128",
        ),
    ]
    for publish, code, fragment in cases:
        frame = await sub.command({"publish": publish})
        assert frame["type"] == "error" and frame["id"] == publish["id"], frame
        assert frame["error"]["code"] == code and fragment in frame["error"]["message"], frame
    frame = await sub.command({"publish": {"topic": "cats", "message": "x"}, "subscribe": []})
    assert frame["error"]["code"] == "invalid_field" and "id" not in frame, frame
    await sub.subscribe(room)
    ok, _ = await publish_as(sub, {"topic": "room.eu.fr", "message": "x", "id": 9})
    assert ok["type"] == "published" and ok["id"] == 9, ok
    await sub.close()


async def test_max_message_size_of_the_namespace(api: Api) -> None:
    room = f"chat:size{time.monotonic_ns()}"
    sub = await connect(api, 1, CHAT)
    await sub.subscribe(room)
    frame = await sub.command({"publish": {"topic": room, "message": "é" * 8 + "x", "id": 1}})
    assert frame["error"]["code"] == "message_too_large" and frame["id"] == 1, frame
    assert "17 bytes" in frame["error"]["message"] and "at most 16" in frame["error"]["message"]
    ok, before = await publish_as(sub, {"topic": room, "message": "é" * 8, "id": 2})
    assert ok["type"] == "published", ok
    assert (await own_copy(sub, before))["message"] == "é" * 8
    await sub.close()


async def test_the_publish_rate_refuses_past_the_burst_without_closing(api: Api) -> None:
    room = f"burst:{time.monotonic_ns()}"
    sub = await connect(api, 1)
    await sub.subscribe(room)
    for i in range(3):
        answer, before = await publish_as(sub, {"topic": room, "message": str(i), "id": i})
        assert answer["type"] == "published", answer
        assert (await own_copy(sub, before))["message"] == str(i)
    frame, _ = await publish_as(sub, {"topic": room, "message": "3", "id": 3})
    assert frame["type"] == "error" and frame["id"] == 3, frame
    assert frame["error"]["code"] == "rate_limited", frame
    # the limit is per connection: another one publishes, this one still receives
    other = await connect(api, 2)
    await other.subscribe(room)
    answer, _ = await publish_as(other, {"topic": room, "message": "other", "id": 1})
    assert answer["type"] == "published", answer
    assert await sub.message() == (room, "other")
    await sub.close()
    await other.close()


async def test_a_namespace_history_size_bounds_the_history(api: Api) -> None:
    room = f"chat:history{time.monotonic_ns()}"
    for i in range(5):
        status, _ = await api.call("POST", "/publish", {"topic": room, "message": str(i)})
        assert status == 200
    status, history = await api.call("GET", f"/history?topic={room}")
    assert [p["message"] for p in history["publications"]] == ["2", "3", "4"]
    elsewhere = f"elsewhere-{time.monotonic_ns()}"  # the history_size setting: 100
    for i in range(5):
        await api.call("POST", "/publish", {"topic": elsewhere, "message": str(i)})
    status, history = await api.call("GET", f"/history?topic={elsewhere}")
    assert len(history["publications"]) == 5


async def test_raw_clients_publish_and_are_closed_on_a_refusal(api: Api) -> None:
    room = f"chat:raw{time.monotonic_ns()}"
    listener = await connect(api, 1, CHAT)
    await listener.subscribe(room)
    raw = await connect(api, 2, CHAT, [room], format="raw")
    await raw.ws.send(json.dumps({"publish": {"topic": room, "message": "raw says", "id": 1}}))
    assert await raw.raw() == "raw says"  # no acknowledgement, then its own message
    assert await listener.message() == (room, "raw says")
    await raw.ws.send(json.dumps({"publish": {"topic": "cats", "message": "no", "id": 2}}))
    code, reason = await raw.closed()
    assert code == codes.POLICY_VIOLATION and reason is not None and "'cats'" in reason
    await listener.close()


async def test_openapi_documents_grants_and_skip_client(
    session: aiohttp.ClientSession, server: ServerProcess
) -> None:
    async with session.get(server.url + "/openapi.json") as response:
        doc = await response.json()
    schemas = doc["components"]["schemas"]
    assert set(schemas["GrantsBody"]["properties"]) == {"subscribe", "publish"}
    assert "grants" in schemas["RegisterRequest"]["properties"]
    assert "skip_client" in schemas["PublishRequest"]["properties"]
    assert "403" in doc["paths"]["/register"]["post"]["responses"]
