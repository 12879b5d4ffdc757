"""Offsets, history and recovery on a real server, on both WebSocket stacks (memory broker,
and Redis where a test says so).

The Redis broker's part is in tests/brokers/test_redis_history.py (what it keeps and
tells a node that missed something), tests/test_redis_order.py (pub/sub losses filled
or reported as gaps), tests/test_redis_outage.py and tests/test_redis_faults.py (Redis
killed or stalled under nodes), tests/test_node_failover.py (a node dies under its
clients) and tests/test_redis_recovery_attacks.py; the clients' automatic recovery in
tests/test_client_recovery.py (Python), tests/test_cli.py (`wsrelay sub`) and
tests/server/test_console_browser.py (wsrelay.js and the console).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import websockets

from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber, stop_and_check
from wsrelay.brokers.redis_scripts import keys
from wsrelay.config import STACKS
from wsrelay.core.history import MAX_REPLAY


@pytest.fixture(scope="module", params=STACKS)
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    process = ServerProcess(["--stack", request.param, "--history-size", "2000"]).start()
    yield process
    stop_and_check(process)


async def publish(api: Api, topic: str, message: str, **extra: Any) -> dict[str, Any]:
    status, body = await api.call("POST", "/publish", {"topic": topic, "message": message, **extra})
    assert status == 200, body
    return dict(body)


async def open_ws(url: str, recover: bool = True) -> Subscriber:
    ws = await websockets.connect(url + ("?recover=true" if recover else ""), open_timeout=TIMEOUT)
    return Subscriber(ws, url.rsplit("/", 1)[-1], url)


async def messages(sub: Subscriber, count: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len(got) < count:
        frame = await sub.frame()
        assert frame["type"] == "message", frame
        got.append(frame)
    return got


async def test_publications_get_consecutive_offsets_in_one_epoch(api: Api, topic: str) -> None:
    sub = await api.connect(1, [topic])
    ack = await sub.subscribe(topic)
    start = ack["positions"][topic]
    answers = [await publish(api, topic, f"m{i}") for i in range(3)]
    assert [a["offset"] for a in answers] == [start["offset"] + i for i in (1, 2, 3)]
    assert {a["epoch"] for a in answers} == {start["epoch"]}
    got = await messages(sub, 3)
    assert [(m["message"], m["offset"]) for m in got] == [
        (f"m{i}", a["offset"]) for i, a in enumerate(answers)
    ]
    await sub.close()


async def test_a_client_that_reconnects_gets_what_it_missed_then_the_live_stream(
    api: Api, topic: str
) -> None:
    reg = await api.register(1, [topic])
    sub = await open_ws(reg["url"])
    ack = await sub.command({"topics": [topic]})
    epoch = ack["positions"][topic]["epoch"]
    await publish(api, topic, "seen")
    [seen] = await messages(sub, 1)
    await sub.close()
    missed = [await publish(api, topic, f"missed {i}") for i in range(5)]

    sub = await open_ws(reg["url"])
    since = {topic: {"offset": seen["offset"], "epoch": epoch}}
    ack = await sub.command({"topics": [topic], "since": since})
    assert ack["type"] == "subscribed"
    assert ack["positions"][topic] == {**since[topic], "recovered": True}
    replayed = await messages(sub, 5)
    assert [m["message"] for m in replayed] == [f"missed {i}" for i in range(5)]
    assert [m["offset"] for m in replayed] == [a["offset"] for a in missed]
    live = await publish(api, topic, "live")
    [after] = await messages(sub, 1)
    assert (after["message"], after["offset"]) == ("live", live["offset"])
    await sub.close()


async def test_the_seam_between_replay_and_live_has_no_gap_and_no_duplicate(
    api: Api, topic: str
) -> None:
    """Publishing never stops while the client reconnects and recovers: it still sees
    every offset once, in order."""
    await check_seam(api, topic)


async def test_the_seam_has_no_gap_and_no_duplicate_on_redis_either(
    redis_server: Any, start_server: Any, session: aiohttp.ClientSession, topic: str
) -> None:
    """With Redis a node's own publications come back over pub/sub while the replay is
    read: some arrive during the hold, some after it (the floor drops those)."""
    await check_seam(Api(session, start_server("--broker", redis_server.url).url), topic)


async def check_seam(api: Api, topic: str) -> None:
    reg = await api.register(None, [topic])
    sub = await open_ws(reg["url"])
    ack = await sub.command({"topics": [topic]})
    epoch, last = ack["positions"][topic]["epoch"], ack["positions"][topic]["offset"]
    stop = asyncio.Event()
    published: list[int] = []

    async def publisher() -> None:
        i = 0
        while not stop.is_set():
            published.append((await publish(api, topic, str(i)))["offset"])
            i += 1

    task = asyncio.create_task(publisher())
    seen: list[int] = []
    try:
        for _ in range(3):
            while len(seen) < 20 * (_ + 1):
                frame = await sub.frame()
                if frame["type"] == "message":
                    seen.append(frame["offset"])
            await sub.close()
            sub = await open_ws(reg["url"])
            ack = await sub.command(
                {"topics": [topic], "since": {topic: {"offset": seen[-1], "epoch": epoch}}}
            )
            assert ack["positions"][topic]["recovered"] is True, ack
        stop.set()
        await asyncio.wait_for(task, TIMEOUT)
        while not seen or seen[-1] < published[-1]:
            frame = await sub.frame()
            assert frame["type"] == "message", frame
            seen.append(frame["offset"])
    finally:
        stop.set()
        await sub.close()
    assert seen == list(range(last + 1, published[-1] + 1))


async def test_recovery_replays_only_what_the_clients_user_may_see(api: Api, topic: str) -> None:
    reg = await api.register(7, [topic])
    sub = await open_ws(reg["url"])
    position = (await sub.command({"topics": [topic]}))["positions"][topic]
    await sub.close()
    await publish(api, topic, "for 8", user_id=8)
    mine = await publish(api, topic, "for 7", user_id=7)
    everyone = await publish(api, topic, "for everyone")
    sub = await open_ws(reg["url"])
    ack = await sub.command({"topics": [topic], "since": {topic: position}})
    assert ack["positions"][topic]["recovered"] is True
    got = await messages(sub, 2)
    assert [(m["message"], m["offset"]) for m in got] == [
        ("for 7", mine["offset"]),
        ("for everyone", everyone["offset"]),
    ]
    fence = await publish(api, topic, "fence")
    assert (await messages(sub, 1))[0]["offset"] == fence["offset"]
    await sub.close()


async def test_a_subscribe_command_recovers_too(api: Api, topic: str) -> None:
    first = await publish(api, topic, "one")
    await publish(api, topic, "two")
    sub = await api.connect(1)
    since = {topic: {"offset": first["offset"], "epoch": first["epoch"]}}
    ack = await sub.command({"subscribe": [topic], "since": since})
    assert ack["positions"][topic]["recovered"] is True
    assert [m["message"] for m in await messages(sub, 1)] == ["two"]
    await sub.close()


async def test_a_changed_epoch_or_a_position_from_the_future_is_not_recovered(
    api: Api, topic: str
) -> None:
    top = await publish(api, topic, "one")
    sub = await api.connect(1)
    for since in (
        {"offset": top["offset"], "epoch": "another-epoch"},
        {"offset": top["offset"] + 10, "epoch": top["epoch"]},
    ):
        ack = await sub.command({"subscribe": [topic], "since": {topic: since}})
        assert ack["positions"][topic] == {
            "offset": top["offset"],
            "epoch": top["epoch"],
            "recovered": False,
        }
    live = await publish(api, topic, "live")
    assert (await messages(sub, 1))[0]["offset"] == live["offset"]
    await sub.close()


async def test_more_than_a_replays_worth_missed_is_not_recovered(api: Api, topic: str) -> None:
    first = await publish(api, topic, "first")
    batch = [{"topic": topic, "message": str(i)} for i in range(MAX_REPLAY)]
    status, body = await api.call("POST", "/publish/batch", {"messages": batch})
    assert status == 200, body
    sub = await api.connect(1)
    since = {topic: {"offset": first["offset"] - 1, "epoch": first["epoch"]}}
    ack = await sub.command({"subscribe": [topic], "since": since})
    assert ack["positions"][topic]["recovered"] is False
    assert ack["positions"][topic]["offset"] == body["positions"][-1]["offset"]
    # One fewer missed is within the bound: recovered.
    since[topic]["offset"] += 1
    ack = await sub.command({"subscribe": [topic], "since": since})
    assert ack["positions"][topic]["recovered"] is True
    assert len(await messages(sub, MAX_REPLAY)) == MAX_REPLAY
    await sub.close()


@pytest.mark.parametrize(
    ("command", "error"),
    [
        ({"topics": ["a"], "since": {"b": {"offset": 1, "epoch": "e"}}}, "does not: b"),
        ({"unsubscribe": ["a"], "since": {"a": {"offset": 1, "epoch": "e"}}}, "unsubscribe"),
        ({"subscribe": ["a"], "since": {"a": {"offset": -1, "epoch": "e"}}}, "since[...].offset"),
        ({"subscribe": ["a"], "since": {"a": {"offset": "1", "epoch": "e"}}}, "since[...].offset"),
        ({"subscribe": ["a"], "since": {"a": {"offset": 1}}}, "epoch"),
        ({"subscribe": ["a"], "since": {"a": {"offset": 1, "epoch": "e" * 65}}}, "epoch"),
        ({"subscribe": ["a"], "since": ["a"]}, "since"),
    ],
)
async def test_a_malformed_since_is_an_error_frame_and_changes_nothing(
    api: Api, command: dict[str, Any], error: str
) -> None:
    sub = await api.connect(1, ["kept"])
    answer = await sub.command(command)
    assert answer["type"] == "error", answer
    assert answer["error"]["code"] == "invalid_field"
    assert error in answer["error"]["message"]
    ack = await sub.command({"subscribe": []})
    assert ack["topics"] == ["kept"]
    await sub.close()


@pytest.mark.parametrize(
    ("query", "problem"),
    [("recover=maybe", "recover must be"), ("recover=true&format=raw", "needs format=json")],
)
async def test_a_bad_recover_parameter_is_refused_with_400(
    api: Api, query: str, problem: str
) -> None:
    reg = await api.register(1, ["t"])
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(reg["url"] + "?" + query, open_timeout=TIMEOUT)
    response = refused.value.response
    assert response.status_code == 400
    assert problem in json.loads(response.body)["error"]["message"]


async def test_held_publications_are_sent_if_no_command_comes(api: Api, topic: str) -> None:
    """``recover=true`` holds the topics' publications for the first command; a client
    that never sends one still gets them, a few seconds late."""
    reg = await api.register(1, [topic])
    sub = await open_ws(reg["url"])
    sent = await publish(api, topic, "held")
    frame = await asyncio.wait_for(sub.frame(), TIMEOUT * 2)
    assert (frame["message"], frame["offset"]) == ("held", sent["offset"])
    await sub.close()


async def test_an_idempotency_key_publishes_once(api: Api, topic: str) -> None:
    sub = await api.connect(1, [topic])
    await sub.subscribe(topic)
    first = await publish(api, topic, "once", idempotency_key="k1")
    again = await publish(api, topic, "once", idempotency_key="k1")
    assert "duplicate" not in first
    assert again == {**first, "recipients": 0, "duplicate": True}
    status, body = await api.call(
        "POST",
        "/publish/batch",
        {
            "messages": [
                {"topic": topic, "message": "once", "idempotency_key": "k1"},
                {"topic": topic, "message": "twice", "idempotency_key": "k2"},
            ]
        },
    )
    assert status == 200, body
    assert body["positions"][0] == {"offset": first["offset"], "epoch": first["epoch"]}
    assert body["positions"][1]["offset"] == first["offset"] + 1
    assert body["recipients"] == [0, 1]
    got = await messages(sub, 2)
    assert [m["message"] for m in got] == ["once", "twice"]
    await sub.close()


async def test_an_empty_or_oversized_idempotency_key_is_refused(api: Api, topic: str) -> None:
    for key in ("", "k" * 201, 7):
        status, body = await api.call(
            "POST", "/publish", {"topic": topic, "message": "m", "idempotency_key": key}
        )
        assert status == 400, body
        assert "idempotency_key" in body["error"]["message"]


async def test_history_pages_forward_and_backward(api: Api, topic: str) -> None:
    sent = [await publish(api, topic, f"m{i}", user_id=i % 2 or None) for i in range(5)]
    offsets = [s["offset"] for s in sent]
    status, page = await api.call(
        "GET", "/history", params={"topic": topic, "since": str(offsets[1]), "limit": "2"}
    )
    assert status == 200, page
    assert page["topic"] == topic and page["epoch"] == sent[0]["epoch"]
    assert page["offset"] == offsets[-1]
    assert page["publications"] == [
        {"offset": offsets[2], "message": "m2", "user_id": None},
        {"offset": offsets[3], "message": "m3", "user_id": "1"},
    ]
    status, newest = await api.call(
        "GET", "/history", params={"topic": topic, "limit": "2", "reverse": "true"}
    )
    assert status == 200, newest
    assert [p["message"] for p in newest["publications"]] == ["m4", "m3"]
    status, position = await api.call("GET", "/history", params={"topic": topic, "limit": "0"})
    assert status == 200, position
    assert position["publications"] == [] and position["offset"] == offsets[-1]


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({}, "topic is required"),
        ({"topic": "bad topic"}, "topic"),
        ({"topic": "t", "since": "-1"}, "since must be"),
        ({"topic": "t", "since": "x"}, "since must be"),
        ({"topic": "t", "limit": "1001"}, "limit must be"),
        ({"topic": "t", "reverse": "yes"}, "reverse must be"),
    ],
)
async def test_bad_history_queries_are_400_naming_the_problem(
    api: Api, params: dict[str, str], problem: str
) -> None:
    status, body = await api.call("GET", "/history", params=params)
    assert status == 400, body
    assert problem in body["error"]["message"]


async def test_history_size_bounds_recovery(
    start_server: Any, session: aiohttp.ClientSession, topic: str
) -> None:
    api = Api(session, start_server("--history-size", "3").url)
    first = await publish(api, topic, "0")
    for i in range(1, 6):
        await publish(api, topic, str(i))
    status, page = await api.call("GET", "/history", params={"topic": topic})
    assert status == 200, page
    assert [p["message"] for p in page["publications"]] == ["3", "4", "5"]
    sub = await api.connect(1)
    lost = {topic: {"offset": first["offset"], "epoch": first["epoch"]}}
    ack = await sub.command({"subscribe": [topic], "since": lost})
    assert ack["positions"][topic] == {"offset": 6, "epoch": first["epoch"], "recovered": False}
    kept = {topic: {"offset": 3, "epoch": first["epoch"]}}
    ack = await sub.command({"subscribe": [topic], "since": kept})
    assert ack["positions"][topic]["recovered"] is True
    assert [m["message"] for m in await messages(sub, 3)] == ["3", "4", "5"]
    await sub.close()


@pytest.mark.parametrize("broker", ["memory", "redis"])
async def test_history_size_0_keeps_positions_and_no_history_so_nothing_missed_is_recovered(
    start_server: Any,
    session: aiohttp.ClientSession,
    topic: str,
    broker: str,
    request: pytest.FixtureRequest,
) -> None:
    """``--history-size 0`` (README: no history, no recovery; docs/decisions/0008:
    offsets and epochs are still given): publishes answer consecutive offsets in one
    epoch and are delivered with them; ``/history`` answers the topic's position and no
    publication; a subscribe whose ``since`` is behind is ``recovered: false`` with the
    current position and replays nothing, one that missed nothing is ``recovered:
    true``."""
    args = ["--history-size", "0"]
    if broker == "redis":
        args += ["--broker", request.getfixturevalue("redis_server").url]
    api = Api(session, start_server(*args).url)
    live = await api.connect(1, [topic])
    ack = await live.subscribe(topic)
    assert ack["positions"][topic]["offset"] == 0  # (an empty position: its epoch may go)
    sent = [await publish(api, topic, f"m{i}") for i in (1, 2, 3)]
    epoch = sent[0]["epoch"]
    assert [(s["offset"], s["epoch"]) for s in sent] == [(1, epoch), (2, epoch), (3, epoch)]
    got = await messages(live, 3)
    assert [(m["message"], m["offset"]) for m in got] == [("m1", 1), ("m2", 2), ("m3", 3)]

    for params in ({"topic": topic}, {"topic": topic, "since": "1"}):
        status, page = await api.call("GET", "/history", params=params)
        assert status == 200, page
        assert page == {"topic": topic, "epoch": epoch, "offset": 3, "publications": []}

    behind = await api.connect(2)
    ack = await behind.command(
        {"subscribe": [topic], "since": {topic: {"offset": 1, "epoch": epoch}}}
    )
    assert ack["positions"][topic] == {"offset": 3, "epoch": epoch, "recovered": False}, ack
    current = await api.connect(3)
    ack = await current.command(
        {"subscribe": [topic], "since": {topic: {"offset": 3, "epoch": epoch}}}
    )
    assert ack["positions"][topic] == {"offset": 3, "epoch": epoch, "recovered": True}, ack
    await publish(api, topic, "m4")
    for sub in (live, behind, current):  # the next frame is m4: nothing was replayed
        assert [(m["message"], m["offset"]) for m in await messages(sub, 1)] == [("m4", 4)]
        await sub.close()
    if broker == "redis":  # no stream at all
        admin = aioredis.from_url(request.getfixturevalue("redis_server").url)
        try:
            assert await admin.exists(keys(topic)[0]) == 0
        finally:
            await admin.aclose()


async def test_a_restarted_memory_server_has_a_new_epoch(
    start_server: Any, session: aiohttp.ClientSession, topic: str
) -> None:
    before = await publish(Api(session, start_server().url), topic, "before")
    api = Api(session, start_server().url)  # a new process: its history is empty
    sub = await api.connect(1)
    since = {topic: {"offset": before["offset"], "epoch": before["epoch"]}}
    ack = await sub.command({"subscribe": [topic], "since": since})
    position = ack["positions"][topic]
    assert position["recovered"] is False and position["epoch"] != before["epoch"]
    assert position["offset"] == 0
    await sub.close()


@pytest.mark.parametrize("fmt", ["raw", "json"])
async def test_a_client_loses_nothing_while_its_commands_run_on_redis(
    redis_server: Any, start_server: Any, session: aiohttp.ClientSession, topic: str, fmt: str
) -> None:
    """While a command runs its topics' publications are held back (Redis calls take real
    time); they follow its acknowledgement (none in raw mode), in order, once each."""
    api = Api(session, start_server("--broker", redis_server.url).url)
    reg = await api.register(None, [topic])
    ws = await websockets.connect(reg["url"] + f"?format={fmt}", open_timeout=TIMEOUT)
    sent = [str(i) for i in range(300)]
    got: list[str] = []
    try:
        for i, message in enumerate(sent):
            # A command on its way with every publish: they overlap on the server.
            command = {"topics": [topic]} if i % 2 else {"subscribe": [topic, f"other{i}"]}
            await ws.send(json.dumps(command))
            await publish(api, topic, message)
        with contextlib.suppress(TimeoutError):
            while len(got) < len(sent):
                data = await asyncio.wait_for(ws.recv(), TIMEOUT)
                assert isinstance(data, str)
                if fmt == "raw":
                    got.append(data)
                elif (frame := json.loads(data))["type"] == "message":
                    got.append(frame["message"])
                else:
                    assert frame["type"] == "subscribed", frame
    finally:
        await ws.close()
    assert got == sent


async def test_a_replay_larger_than_the_outbox_is_not_recovered_rather_than_cut(
    start_server: Any, session: aiohttp.ClientSession, topic: str
) -> None:
    """A replay is queued at once; one that would pass the outbox limit would close the
    client as a slow consumer (4008), and it would reconnect to ask for it again, forever.
    Topics past half the limit are answered not recovered instead; the connection lives."""
    api = Api(session, start_server("--outbox-limit", "64KiB").url)
    small, big = topic + ".small", topic + ".big"
    starts = {t: await publish(api, t, "first") for t in (small, big)}
    await publish(api, small, "s" * 1000)
    for _ in range(40):
        await publish(api, big, "b" * 1000)  # 40 KB: more than half of 64 KiB
    sub = await api.connect(1)
    since = {t: {"offset": p["offset"], "epoch": p["epoch"]} for t, p in starts.items()}
    ack = await sub.command({"subscribe": [small, big], "since": since})
    assert ack["positions"][small]["recovered"] is True
    assert ack["positions"][big]["recovered"] is False
    assert [m["message"] for m in await messages(sub, 1)] == ["s" * 1000]
    live = await publish(api, big, "live")
    assert (await messages(sub, 1))[0]["offset"] == live["offset"]
    await sub.close()
