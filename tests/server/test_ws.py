"""The WebSocket protocol against a real server process, with real clients."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Iterator

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber, stop_and_check
from wsrelay import codes
from wsrelay.config import STACKS
from wsrelay.core.history import EPOCH_BYTES

EPOCH = re.compile(f"[0-9a-f]{{{2 * EPOCH_BYTES}}}")
"""A topic's epoch: random, so only its shape is known."""


def message_frame(topic: str, text: str, offset: int) -> dict[str, object]:
    """A JSON-mode message frame, as decoded."""
    return {"type": "message", "topic": topic, "message": text, "offset": offset}


@pytest.fixture(scope="module", params=STACKS)
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """Every test here that uses the shared server runs once per WebSocket stack."""
    process = ServerProcess(["--stack", request.param]).start()
    yield process
    stop_and_check(process)


async def publish_until_received(api: Api, topic: str, message: str) -> None:
    """Publish until the relay reports a recipient: the way to know a raw-mode
    client's subscription (which gets no acknowledgement) is in effect."""

    async def attempt() -> None:
        while await api.publish(topic, message) == 0:
            await asyncio.sleep(0)

    await asyncio.wait_for(attempt(), TIMEOUT)


async def test_topics_command_replaces_and_is_acknowledged(api: Api, topic: str) -> None:
    sub = await api.connect(1, [f"{topic}.old"])
    ack = await sub.command({"topics": [f"{topic}.b", f"{topic}.a"]})
    positions = ack.pop("positions")
    assert ack == {"type": "subscribed", "topics": [f"{topic}.a", f"{topic}.b"]}
    assert set(positions) == {f"{topic}.a", f"{topic}.b"}  # each topic the command named
    assert all(p["offset"] == 0 and EPOCH.fullmatch(p["epoch"]) for p in positions.values())
    assert await api.publish(f"{topic}.old", "gone") == 0
    assert await api.publish(f"{topic}.a", "here") == 1
    assert await sub.frame() == message_frame(f"{topic}.a", "here", 1)
    await sub.close()


async def test_subscribe_and_unsubscribe_add_and_remove(api: Api, topic: str) -> None:
    sub = await api.connect(1)
    assert (await sub.subscribe(f"{topic}.x", f"{topic}.y"))["topics"] == [
        f"{topic}.x",
        f"{topic}.y",
    ]
    ack = await sub.command({"unsubscribe": [f"{topic}.x", f"{topic}.never"]})
    assert ack["topics"] == [f"{topic}.y"]
    assert await api.publish(f"{topic}.x", "no") == 0
    assert await api.publish(f"{topic}.y", "yes") == 1
    assert await sub.message() == (f"{topic}.y", "yes")
    await sub.close()


async def test_frames_name_their_topic(api: Api, topic: str) -> None:
    """A client on several topics can tell where each message came from."""
    sub = await api.connect(1, [f"{topic}.1", f"{topic}.2"])
    await api.publish(f"{topic}.2", "two")
    await api.publish(f"{topic}.1", "one")
    assert [await sub.message(), await sub.message()] == [
        (f"{topic}.2", "two"),
        (f"{topic}.1", "one"),
    ]
    await sub.close()


async def test_raw_format_delivers_the_message_text_only(api: Api, topic: str) -> None:
    """?format=raw behaves like the seed: the frame is the message, nothing else."""
    sub = await api.connect(1, [topic], fmt="raw")
    assert await api.publish(topic, "plain \u2603 text") == 1
    assert await sub.raw() == "plain \u2603 text"
    await sub.ws.send(json.dumps({"topics": [f"{topic}.new"]}))  # the seed's command
    await publish_until_received(api, f"{topic}.new", "after")
    assert await sub.raw() == "after"
    await sub.close()


async def test_seed_walkthrough_register_connect_subscribe_publish(api: Api, topic: str) -> None:
    """The tutorial's exact sequence: register {user_id}, connect, send {topics}, publish."""
    status, reg = await api.call("POST", "/register", {"user_id": 1})
    assert status == 200
    async with websockets.connect(reg["url"]) as ws:
        await ws.send(json.dumps({"topics": [topic]}))
        ack = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert ack["type"] == "subscribed" and ack["topics"] == [topic]
        start = ack["positions"][topic]
        assert start["offset"] == 0 and EPOCH.fullmatch(start["epoch"])
        status, body = await api.call(
            "POST", "/publish", {"topic": topic, "user_id": 1, "message": "are you there?"}
        )
        assert status == 200
        assert body == {"recipients": 1, "offset": 1, "epoch": start["epoch"]}
        frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert frame == message_frame(topic, "are you there?", 1)


async def test_unknown_id_is_refused_before_the_upgrade(api: Api) -> None:
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(api.base.replace("http", "ws") + "/ws/" + "0" * 32)
    assert info.value.response.status_code == 404


async def test_a_second_connection_replaces_the_first(api: Api, topic: str) -> None:
    first = await api.connect(1, [topic])
    second = Subscriber(await websockets.connect(first.url), first.id, first.url)
    assert await first.closed() == (codes.REPLACED, "replaced by a newer connection")
    assert await api.publish(topic, "m") == 1
    assert await second.message() == (topic, "m")
    await second.close()


async def test_unregister_closes_the_live_socket_normally(api: Api, topic: str) -> None:
    sub = await api.connect(1, [topic])
    status, _ = await api.call("DELETE", f"/register/{sub.id}")
    assert status == 200
    assert await sub.closed() == (codes.NORMAL, "unregistered")
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(sub.url)
    assert info.value.response.status_code == 404
    assert await api.publish(topic, "m") == 0


async def test_reconnect_after_disconnect_keeps_registration_and_topics(
    api: Api, topic: str
) -> None:
    sub = await api.connect(1, [topic])
    await sub.subscribe(f"{topic}.later")
    await sub.close()
    again = Subscriber(await websockets.connect(sub.url), sub.id, sub.url)
    await publish_until_received(api, f"{topic}.later", "welcome back")
    assert await again.message() == (f"{topic}.later", "welcome back")
    await again.close()


async def test_user_targeting_reaches_only_that_users_clients(api: Api, topic: str) -> None:
    alice = [await api.connect(42, [topic]) for _ in range(2)]
    alice_by_string = await api.connect("42", [topic])  # 42 and "42" are one user
    bob = await api.connect(7, [topic])
    anonymous = await api.connect(None, [topic])
    assert await api.publish(topic, "for alice", user_id=42) == 3
    assert await api.publish(topic, "for everyone") == 5
    for sub in [*alice, alice_by_string]:
        assert await sub.message() == (topic, "for alice")
    for sub in [*alice, alice_by_string, bob, anonymous]:
        assert await sub.message() == (topic, "for everyone")  # bob's first is the fence
        await sub.close()


async def test_many_subscribers_get_every_message_once_in_order(api: Api, topic: str) -> None:
    """60 subscribers x 100 messages: none lost, none duplicated, publish order kept."""
    subs = await asyncio.gather(*(api.connect(i, [topic], fmt="raw") for i in range(60)))
    for i in range(100):
        assert await api.publish(topic, f"m{i}") == 60

    async def drain(sub: Subscriber) -> list[str]:
        return [await sub.raw() for _ in range(100)]

    received = await asyncio.gather(*(drain(s) for s in subs))
    expected = [f"m{i}" for i in range(100)]
    assert all(r == expected for r in received)
    assert await api.publish(topic, "fence") == 60
    assert [await s.raw() for s in subs] == ["fence"] * 60  # no duplicate came before it
    await asyncio.gather(*(s.close() for s in subs))


async def test_concurrent_publishes_arrive_once_each_in_accepted_order(
    api: Api, topic: str
) -> None:
    """16 publishes in flight: each client sees each message once, all in one order."""
    subs = await asyncio.gather(*(api.connect(i, [topic], fmt="raw") for i in range(10)))
    sem = asyncio.Semaphore(16)

    async def pub(i: int) -> None:
        async with sem:
            assert await api.publish(topic, str(i)) == 10

    await asyncio.gather(*(pub(i) for i in range(200)))
    orders = [[await s.raw() for _ in range(200)] for s in subs]
    assert sorted(orders[0], key=int) == [str(i) for i in range(200)]
    assert all(order == orders[0] for order in orders)
    await asyncio.gather(*(s.close() for s in subs))


BAD_COMMANDS = [
    ("not json", "invalid_json"),
    ('{"topics": "cats"}', "invalid_field"),
    ('{"topics": [1]}', "invalid_field"),
    ("{}", "invalid_field"),
    ('{"topics": [], "subscribe": []}', "invalid_field"),
    ('{"publish": "x"}', "invalid_field"),
    ("[]", "invalid_field"),
    ('{"subscribe": ["bad topic"]}', "invalid_topic"),
    ('{"subscribe": [' + ",".join(f'"x{i}"' for i in range(300)) + "]}", "too_many_topics"),
]


@pytest.mark.parametrize(("text", "code"), BAD_COMMANDS)
async def test_bad_commands_get_an_error_frame_and_the_connection_lives(
    api: Api, topic: str, text: str, code: str
) -> None:
    bystander = await api.connect(2, [topic])
    sub = await api.connect(1, [topic])
    await sub.ws.send(text)
    frame = await sub.frame()
    assert frame["type"] == "error" and frame["error"]["code"] == code, frame
    assert frame["error"]["message"]
    assert (await sub.subscribe(f"{topic}.still-works"))["type"] == "subscribed"
    assert await api.publish(topic, "after") == 2
    assert await sub.message() == (topic, "after")
    assert await bystander.message() == (topic, "after")
    await sub.close()
    await bystander.close()


async def test_binary_frames_get_an_error_frame(api: Api, topic: str) -> None:
    sub = await api.connect(1, [topic])
    await sub.ws.send(b"\x00\x01")
    frame = await sub.frame()
    assert frame["error"]["code"] == "unsupported_frame"
    await sub.close()


async def test_raw_mode_closes_on_a_bad_command_with_the_reason(api: Api, topic: str) -> None:
    """In raw mode an error frame would read as a message, so the close carries it."""
    sub = await api.connect(1, [topic], fmt="raw")
    await sub.ws.send('{"topics": ["bad topic"]}')
    code, reason = await sub.closed()
    assert code == codes.POLICY_VIOLATION and reason and "bad topic" in reason
    raw_binary = await api.connect(1, [topic], fmt="raw")
    await raw_binary.ws.send(b"\x00")
    assert (await raw_binary.closed())[0] == codes.UNSUPPORTED_DATA


async def test_oversized_message_closes_that_client_only(start_server, session, topic: str) -> None:
    server = start_server("--max-message-size", "1024")
    api = Api(session, server.url)
    bystander = await api.connect(2, [topic])
    sub = await api.connect(1, [topic])
    await sub.ws.send(json.dumps({"topics": ["x" * 2000]}))
    assert (await sub.closed())[0] == codes.MESSAGE_TOO_BIG
    assert await api.publish(topic, "still here") == 1
    assert await bystander.message() == (topic, "still here")
    await bystander.close()


async def test_fragmented_command_is_reassembled(api: Api, topic: str) -> None:
    sub = await api.connect(1)
    text = json.dumps({"subscribe": [topic]})
    await sub.ws.send(iter([text[:5], text[5:11], text[11:]]))
    assert (await sub.frame())["topics"] == [topic]
    await sub.close()


async def test_slow_consumer_is_disconnected_and_others_get_everything(
    start_server, session, topic: str
) -> None:
    """A client that stops reading passes its outbox limit and is closed with 4008;
    a fast client on the same topic receives every message that was accepted."""
    server = start_server("--outbox-limit", "64KiB")
    api = Api(session, server.url)
    fast = await api.connect(1, [topic], fmt="raw")
    reg = await api.register(2, [topic])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    sock.connect((host, int(port)))
    slow = await websockets.connect(reg["url"], sock=sock, max_queue=1)  # stops reading when full

    received: list[str] = []

    async def read_fast() -> None:
        while True:
            received.append(await fast.raw())

    reader = asyncio.create_task(read_fast())
    payload = "x" * 16384
    published = 0
    while True:
        recipients = await api.publish(topic, f"{published}:{payload}")
        published += 1
        if recipients == 1:
            break
        assert recipients == 2
        assert published < 5000, "the slow client was never disconnected"

    async def fast_got_all() -> None:
        while len(received) < published:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(fast_got_all(), TIMEOUT)
    reader.cancel()
    assert [m.split(":", 1)[0] for m in received] == [str(i) for i in range(published)]

    async def slow_until_closed() -> None:
        with pytest.raises(ConnectionClosed):
            while True:
                await slow.recv()

    await asyncio.wait_for(slow_until_closed(), TIMEOUT)
    assert slow.close_code == codes.SLOW_CONSUMER
    await fast.close()


async def test_shutdown_tells_clients_going_away(start_server, session, topic: str) -> None:
    server = start_server()
    sub = await Api(session, server.url).connect(1, [topic])
    assert server.stop() == 0
    assert (await sub.closed())[0] == codes.GOING_AWAY
