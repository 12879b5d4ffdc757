"""Several `wsrelay serve` processes sharing one real redis-server act as one relay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.redis_server import RedisServer
from tests.server.test_sse import post as sse_post
from tests.server.test_sse import stream as sse_stream
from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber
from wsrelay import codes
from wsrelay.config import STACKS
from wsrelay.relay import FORWARD_TIMEOUT

Start = Callable[..., ServerProcess]


def nodes(
    start_server: Start, redis_server: RedisServer, count: int, *args: str
) -> list[ServerProcess]:
    return [start_server("--broker", redis_server.url, *args) for _ in range(count)]


async def connect(url: str) -> Subscriber:
    ws = await websockets.connect(url, open_timeout=TIMEOUT)
    return Subscriber(ws, url.rsplit("/", 1)[-1], url)


def on(node: ServerProcess, reg: dict[str, str]) -> str:
    """The registration's WebSocket URL, but on ``node``."""
    return node.ws_url + "/ws/" + reg["id"]


async def test_register_on_a_connect_on_b_publish_on_c(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    a, b, c = (Api(session, n.url) for n in nodes(start_server, redis_server, 3))
    node_b = b.base.replace("http", "ws")
    reg = await a.register(1, ["news"])
    sub = await connect(f"{node_b}/ws/{reg['id']}")
    await sub.subscribe("sport")  # acknowledged: B's Redis subscription is in place
    assert await c.publish("news", "from c") == 0  # no connection on C itself
    assert await c.publish("sport", "also from c") == 0
    assert await sub.message() == ("news", "from c")
    assert await sub.message() == ("sport", "also from c")
    await sub.close()


async def test_user_targeting_across_nodes(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    n1, n2 = nodes(start_server, redis_server, 2)
    a, b = Api(session, n1.url), Api(session, n2.url)
    alice = await connect(on(n2, await a.register("alice", ["t"])))
    bob = await connect(on(n1, await a.register("bob", ["t"])))
    await alice.subscribe("fence-a")
    await bob.subscribe("fence-b")
    await a.publish("t", "for alice", user_id="alice")
    await b.publish("t", "for bob", user_id="bob")
    await a.publish("t", "for all")
    assert [await alice.message(), await alice.message()] == [("t", "for alice"), ("t", "for all")]
    assert [await bob.message(), await bob.message()] == [("t", "for bob"), ("t", "for all")]
    await alice.close()
    await bob.close()


async def test_a_batch_published_on_one_node_arrives_in_order_on_another(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    n1, n2 = nodes(start_server, redis_server, 2)
    a = Api(session, n1.url)
    local = await connect(on(n1, await a.register(1, ["x", "y"])))
    remote = await connect(on(n2, await a.register(2, ["x", "y"])))
    await remote.subscribe("fence")  # acknowledged: n2's Redis subscriptions are in place
    messages = [{"topic": "xy"[i % 2], "message": str(i)} for i in range(300)]
    status, body = await a.call("POST", "/publish/batch", {"messages": messages})
    assert (status, body["recipients"]) == (200, [1] * 300)
    # Offsets count per topic: x and y each get 1..150, in the batch's order.
    assert [p["offset"] for p in body["positions"]] == [i // 2 + 1 for i in range(300)]
    expected = [("xy"[i % 2], str(i)) for i in range(300)]
    assert [await local.message() for _ in range(300)] == expected
    assert [await remote.message() for _ in range(300)] == expected
    await local.close()
    await remote.close()


async def test_unregister_on_one_node_closes_the_socket_on_another(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    n1, n2 = nodes(start_server, redis_server, 2)
    a = Api(session, n1.url)
    reg = await a.register(1, ["t"])
    sub = await connect(on(n2, reg))
    await sub.subscribe("t")
    status, _ = await a.call("DELETE", f"/register/{reg['id']}")
    assert status == 200
    assert await sub.closed() == (codes.NORMAL, "unregistered")
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(on(n2, reg))
    assert info.value.response.status_code == 404


async def test_a_connection_on_another_node_replaces_the_first(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    n1, n2 = nodes(start_server, redis_server, 2)
    a = Api(session, n1.url)
    reg = await a.register(1, ["t"])
    first = await connect(on(n1, reg))
    await first.subscribe("t")
    second = await connect(on(n2, reg))
    assert (await first.closed())[0] == codes.REPLACED
    await second.subscribe("t")
    assert await a.publish("t", "to the newer one") == 0
    assert await second.message() == ("t", "to the newer one")
    await second.close()


async def test_registrations_and_topics_survive_a_node_restart(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    (n1,) = nodes(start_server, redis_server, 1)
    api = Api(session, n1.url)
    reg = await api.register(7, ["t"])
    sub = await connect(on(n1, reg))
    await sub.subscribe("added-later")
    assert n1.stop() == 0
    assert (await sub.closed())[0] == codes.GOING_AWAY
    (n2,) = nodes(start_server, redis_server, 1)  # a new process, a new port
    again = await connect(on(n2, reg))
    await again.command({"subscribe": []})  # acknowledged once B's subscriptions are live
    assert await Api(session, n2.url).publish("added-later", "still here") == 1
    assert await again.message() == ("added-later", "still here")
    await again.close()


async def test_a_registration_that_never_connects_expires(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    (n1,) = nodes(start_server, redis_server, 1, "--registration-ttl", "1")
    api = Api(session, n1.url)
    reg = await api.register(1)

    async def gone() -> None:
        # GET without an upgrade: 426 while the registration exists, 404 once it expired
        while (await api.call("GET", f"/ws/{reg['id']}"))[0] != 404:
            await asyncio.sleep(0.1)

    await asyncio.wait_for(gone(), TIMEOUT)


async def test_workers_share_one_port_and_act_as_one_relay(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """`--workers 2`: two processes on one port; every subscriber gets every message,
    whichever process accepted its connection or the publish."""
    from tests.utils import free_port

    port = free_port()
    server = start_server("--broker", redis_server.url, "--workers", "2", "--port", str(port))

    async def both_listening() -> None:
        while server.log().count(f"listening on http://127.0.0.1:{port}") < 2:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(both_listening(), TIMEOUT * 2)
    api = Api(session, server.url)
    subs = [await connect((await api.register(i, ["t"]))["url"]) for i in range(16)]
    for sub in subs:
        await sub.command({"subscribe": []})  # each worker's Redis subscription is live
    counts = [await api.publish("t", f"m{i}") for i in range(4)]
    assert all(0 <= c <= 16 for c in counts)
    for sub in subs:
        assert [await sub.message() for _ in range(4)] == [("t", f"m{i}") for i in range(4)]
        await sub.close()


async def test_nodes_share_each_users_registration_count(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """`--max-registrations-per-user 2` on two nodes: the limit is the user's, not a node's."""
    n1, n2 = nodes(start_server, redis_server, 2, "--max-registrations-per-user", "2")
    a, b = Api(session, n1.url), Api(session, n2.url)
    first = await a.register("carol")
    await b.register("carol")
    for api in (a, b):
        status, body = await api.call("POST", "/register", {"user_id": "carol"})
        assert (status, body["error"]["code"]) == (429, "too_many_registrations")
    status, _ = await b.call("DELETE", f"/register/{first['id']}")  # made on A, deleted on B
    assert status == 200
    await a.register("carol")
    assert (await b.call("POST", "/register", {"user_id": "carol"}))[0] == 429


# -- POST /sse/<id> on a node that does not hold the stream (issue 14 item 1) -----------------


@pytest.mark.parametrize("stack", STACKS)
async def test_an_sse_command_posted_to_another_node_is_carried_out_by_the_streams(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession, stack: str
) -> None:
    """A stream open on A, its commands posted to B (``--stack`` ``stack``): B forwards
    each to A over Redis and answers with A's answer; the acknowledgement and the live
    messages go down A's stream; refusals are the same JSON errors as on A."""
    node_a = start_server("--broker", redis_server.url, "--max-message-size", "4096")
    node_b = start_server(
        "--broker", redis_server.url, "--max-message-size", "4096", "--stack", stack
    )
    a, b = Api(session, node_a.url), Api(session, node_b.url)
    client_id = (await a.register(1, ["fw.cats"]))["id"]
    on_a, on_b = f"{node_a.url}/sse/{client_id}", f"{node_b.url}/sse/{client_id}"
    async with sse_stream(session, on_a) as (events, _):
        status, answer = await sse_post(session, on_b, {"subscribe": ["fw.dogs"]})
        assert status == 200 and answer["type"] == "subscribed", answer
        assert answer["topics"] == ["fw.cats", "fw.dogs"]
        assert await events.until("subscribed") == answer  # streamed on A, in order
        await b.publish("fw.dogs", "woof")
        assert (await events.message())[:2] == ("fw.dogs", "woof")

        refused = {"publish": {"topic": "fw.cats", "message": "m", "id": 3}}
        here = await sse_post(session, on_a, refused)
        assert here[0] == 403 and here[1]["error"]["code"] == "forbidden_topic", here
        assert await sse_post(session, on_b, refused) == here  # the same refusal from B

        for payload, expected in [
            (b"\xff{}", (400, "invalid_json")),  # refused by B itself
            (b"x" * 5000, (413, "payload_too_large")),  # refused by B itself
            (b"not json", (400, "invalid_json")),  # forwarded, refused by A
            ({"subscribe": ["bad topic"]}, (400, "invalid_topic")),
            ({"nonsense": 1}, (400, "invalid_field")),
        ]:
            status, body = await sse_post(session, on_b, payload)
            assert (status, body["error"]["code"]) == expected, (payload, body)
        status, body = await sse_post(session, f"{node_b.url}/sse/{'0' * 32}", {"topics": True})
        assert (status, body["error"]["code"]) == (404, "unknown_client")

        status, answer = await sse_post(session, on_b, {"unsubscribe": ["fw.cats"]})
        assert (status, answer["topics"]) == (200, ["fw.dogs"])
        assert (await events.until("subscribed"))["topics"] == ["fw.dogs"]


async def test_an_sse_command_for_a_registration_streaming_nowhere_is_not_streaming(
    start_server: Start, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    """No node holds a connection of the registration: 409 ``not_streaming`` once the
    bounded wait passes; one holding a WebSocket of it answers 409 at once."""
    node_a, node_b = nodes(start_server, redis_server, 2)
    a = Api(session, node_a.url)
    client_id = (await a.register(1, ["fw.t"]))["id"]
    on_b = f"{node_b.url}/sse/{client_id}"
    started = time.monotonic()
    status, body = await sse_post(session, on_b, {"subscribe": ["fw.u"]})
    waited = time.monotonic() - started
    assert (status, body["error"]["code"]) == (409, "not_streaming"), body
    assert "no node sharing the broker" in body["error"]["message"]
    assert FORWARD_TIMEOUT * 0.9 <= waited < FORWARD_TIMEOUT + TIMEOUT

    sub = await connect(on(node_a, {"id": client_id}))
    await sub.subscribe("fw.fence")  # attached on A
    started = time.monotonic()
    status, body = await sse_post(session, on_b, {"subscribe": ["fw.u"]})
    assert (status, body["error"]["code"]) == (409, "not_streaming"), body
    assert "on this node" in body["error"]["message"]  # A's own answer, not B's timeout
    assert time.monotonic() - started < FORWARD_TIMEOUT
    await sub.close()
