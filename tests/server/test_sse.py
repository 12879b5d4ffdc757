"""Server-sent events with a plain HTTP client, on both stacks: ``GET /sse/<id>``,
``GET /sse?token=``, ``POST /sse/<id>``, recovery over ``Last-Event-ID``, the refusals,
keep-alive comments, the slow-consumer cut-off and the replaced stream."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, cast

import aiohttp
import jwt
import pytest

from tests.server.rawws import host_port
from tests.utils import TIMEOUT, Api, ServerProcess, stop_and_check
from wsrelay import codes
from wsrelay.config import STACKS
from wsrelay.core.sse import MAX_EVENT_ID

SECRET = "an-sse-test-secret-of-32-bytes!!"
OUTBOX = 64 * 1024


@pytest.fixture(scope="module", params=STACKS)
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    process = ServerProcess(
        [
            "--stack",
            request.param,
            "--jwt-secret",
            SECRET,
            "--outbox-limit",
            str(OUTBOX),
            "--max-message-size",
            "4096",
            "--allowed-origin",
            "http://good.example",
            "--ping-interval",
            "1",
        ]
    ).start()
    yield process
    stop_and_check(process)


class Stream:
    """One SSE stream read with aiohttp: its events, parsed as ``EventSource`` does."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.last_id = ""
        self.comments = 0

    async def event(self) -> dict[str, Any]:
        """The next event's frame (``data`` parsed); its id, if any, is kept in last_id."""
        data: list[str] = []
        while True:
            line = await asyncio.wait_for(self.response.content.readline(), TIMEOUT)
            if not line:
                raise EOFError("the stream ended")
            text = line.decode().rstrip("\n")
            if text == "":
                if data:
                    frame: dict[str, Any] = json.loads("\n".join(data))
                    return frame
                continue
            field, _, value = text.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "":
                self.comments += 1
            elif field == "data":
                data.append(value)
            elif field == "id":
                self.last_id = value

    async def until(self, kind: str) -> dict[str, Any]:
        while True:
            frame = await self.event()
            if frame["type"] == kind:
                return frame

    async def message(self) -> tuple[str, Any, int]:
        frame = await self.until("message")
        return frame["topic"], frame["message"], frame["offset"]


@asynccontextmanager
async def stream(
    http: aiohttp.ClientSession, url: str, **headers: str
) -> AsyncIterator[tuple[Stream, str]]:
    """An open stream, its opening read: the stream frame (whose id is returned) and the
    opening acknowledgement (kept in ``stream.opening``)."""
    async with http.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        events = Stream(response)
        first = await events.event()
        assert first["type"] == "stream"
        events.opening = await events.until("subscribed")  # type: ignore[attr-defined]
        yield events, first["id"]


async def post(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    async with http.post(url, data=data) as response:
        return response.status, await response.json()


async def test_a_stream_carries_the_websockets_frames_and_takes_commands_by_post(
    server: ServerProcess,
) -> None:
    async with aiohttp.ClientSession() as http:
        api = Api(http, server.url)
        client_id = (await api.register(topics=["sse.cats"]))["id"]
        async with stream(http, f"{server.url}/sse/{client_id}") as (events, sid):
            assert sid == client_id
            opening = events.opening  # type: ignore[attr-defined]
            assert opening["topics"] == ["sse.cats"]
            epoch = opening["positions"]["sse.cats"]["epoch"]
            assert events.last_id == f"1;sse.cats={epoch}.0"
            await api.publish("sse.cats", "meow")
            assert await events.message() == ("sse.cats", "meow", 1)
            assert events.last_id == f"1;sse.cats={epoch}.1"
            await api.publish("sse.cats", {"json": [1, 2]})
            assert await events.message() == ("sse.cats", {"json": [1, 2]}, 2)

            status, answer = await post(
                http, f"{server.url}/sse/{client_id}", {"subscribe": ["sse.dogs"]}
            )
            assert status == 200 and answer["type"] == "subscribed", answer
            assert answer["topics"] == ["sse.cats", "sse.dogs"]
            streamed = await events.until("subscribed")
            assert streamed == answer  # the same acknowledgement, in the stream's order
            dogs = answer["positions"]["sse.dogs"]["epoch"]
            assert events.last_id == f"1;sse.cats={epoch}.2;sse.dogs={dogs}.0"
            await api.publish("sse.dogs", "woof")
            assert await events.message() == ("sse.dogs", "woof", 1)

            status, answer = await post(
                http, f"{server.url}/sse/{client_id}", {"unsubscribe": ["sse.cats"]}
            )
            assert (status, answer["topics"]) == (200, ["sse.dogs"])
            await events.until("subscribed")
            assert events.last_id == f"1;sse.dogs={dogs}.1"


async def test_last_event_id_recovers_every_topic_after_a_reconnect(server: ServerProcess) -> None:
    async with aiohttp.ClientSession() as http:
        api = Api(http, server.url)
        client_id = (await api.register(topics=["rec.a", "rec.b"]))["id"]
        url = f"{server.url}/sse/{client_id}"
        async with stream(http, url) as (events, _):
            await api.publish("rec.a", "a1")
            assert await events.message() == ("rec.a", "a1", 1)
            await api.publish("rec.b", "b1")
            assert await events.message() == ("rec.b", "b1", 1)
            last = events.last_id
        for topic, text in [("rec.a", "a2"), ("rec.b", "b2"), ("rec.a", "a3")]:
            await api.publish(topic, text)
        # A browser's reconnection: the same URL, the header with the last id.
        async with stream(http, url, **{"Last-Event-ID": last}) as (events, _):
            positions = events.opening["positions"]  # type: ignore[attr-defined]
            assert {t: p["recovered"] for t, p in positions.items()} == {
                "rec.a": True,
                "rec.b": True,
            }
            got = [await events.message() for _ in range(3)]
            assert sorted(got) == [("rec.a", "a2", 2), ("rec.a", "a3", 3), ("rec.b", "b2", 2)]
            await api.publish("rec.b", "live")
            assert await events.message() == ("rec.b", "live", 3)
            last = events.last_id
        await api.publish("rec.a", "a4")
        # The query parameter stands for the header on a first connection; the header wins.
        query = f"{url}?last_event_id={last}"
        async with stream(http, query) as (events, _):
            assert await events.message() == ("rec.a", "a4", 4)
        async with stream(http, query, **{"Last-Event-ID": events.last_id}) as (events, _):
            positions = events.opening["positions"]  # type: ignore[attr-defined]
            assert positions["rec.a"] == {**positions["rec.a"], "offset": 4, "recovered": True}
            await api.publish("rec.a", "a5")
            assert await events.message() == ("rec.a", "a5", 5)  # a4 was not sent again


async def test_a_truncated_id_answers_the_topics_it_left_out_not_recovered(
    server: ServerProcess,
) -> None:
    # Names long enough that the id cannot hold them all.
    topics = [f"trunc.{i:03d}." + "x" * 100 for i in range(12)]
    async with aiohttp.ClientSession() as http:
        api = Api(http, server.url)
        client_id = (await api.register(topics=topics))["id"]
        url = f"{server.url}/sse/{client_id}"
        async with stream(http, url) as (events, _):
            last = events.last_id
        assert len(last) <= MAX_EVENT_ID and last.endswith(";~")
        named = {part.partition("=")[0] for part in last.split(";")[1:-1]}
        assert named and named < set(topics)
        async with stream(http, url, **{"Last-Event-ID": last}) as (events, _):
            positions = events.opening["positions"]  # type: ignore[attr-defined]
            assert {t for t, p in positions.items() if p["recovered"]} == named
            assert {t for t, p in positions.items() if p["recovered"] is False} == set(
                topics
            ) - named


async def test_a_token_stream_takes_its_commands_at_its_registration(server: ServerProcess) -> None:
    token = jwt.encode(
        {"sub": "7", "topics": ["tok.a"], "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
    )
    async with aiohttp.ClientSession() as http:
        api = Api(http, server.url)
        async with stream(http, f"{server.url}/sse?token={token}") as (events, sid):
            status, answer = await post(http, f"{server.url}/sse/{sid}", {"subscribe": ["tok.b"]})
            assert (status, answer["topics"]) == (200, ["tok.a", "tok.b"])
            await api.publish("tok.b", "hi", user_id=7)
            assert await events.message() == ("tok.b", "hi", 1)
        # The registration lived as long as the stream: 409 until the server has seen the
        # end of the stream, then 404.
        deadline = time.monotonic() + TIMEOUT
        while True:
            status, body = await post(http, f"{server.url}/sse/{sid}", {"subscribe": ["tok.c"]})
            if status != 409 or time.monotonic() > deadline:
                break
        assert (status, body["error"]["code"]) == (404, "unknown_client")


REFUSED_STREAMS = [
    ("/sse/{unknown}", {}, 404, "unknown_client"),
    ("/sse/{id}?format=raw", {}, 400, "bad_request"),
    ("/sse/{id}", {"Origin": "http://evil.example"}, 403, "origin_not_allowed"),
    ("/sse/{id}", {"Last-Event-ID": "2;a=b.1"}, 400, "invalid_field"),
    ("/sse/{id}?last_event_id=1;a=b.x", {}, 400, "invalid_field"),
    ("/sse/{id}", {"Last-Event-ID": "1;" + "a=b.1;" * 300}, 400, "invalid_field"),
    ("/sse", {}, 401, "invalid_token"),
    ("/sse?token=nope", {}, 401, "invalid_token"),
]


@pytest.mark.parametrize(("path", "headers", "status", "code"), REFUSED_STREAMS)
async def test_a_refused_stream_is_a_json_error_readable_from_any_origin(
    server: ServerProcess, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    async with aiohttp.ClientSession() as http:
        client_id = (await Api(http, server.url).register())["id"]
        target = path.format(id=client_id, unknown="0" * 32)
        async with http.get(server.url + target, headers=headers) as response:
            body = await response.json()
            assert (response.status, body["error"]["code"]) == (status, code), body
            assert response.headers["Access-Control-Allow-Origin"] == "*"


async def test_refused_commands_are_json_errors(server: ServerProcess) -> None:
    async with aiohttp.ClientSession() as http:
        api = Api(http, server.url)
        client_id = (await api.register())["id"]
        url = f"{server.url}/sse/{client_id}"
        status, body = await post(http, url, {"subscribe": ["a"]})
        assert (status, body["error"]["code"]) == (409, "not_streaming"), body
        status, body = await post(http, f"{server.url}/sse/{'0' * 32}", {"subscribe": ["a"]})
        assert (status, body["error"]["code"]) == (404, "unknown_client")
        async with stream(http, url):
            for payload, expected in [
                (b"\xff{}", (400, "invalid_json")),
                (b"x" * 5000, (413, "payload_too_large")),
                ({"subscribe": ["bad topic"]}, (400, "invalid_topic")),
                ({"publish": {"topic": "a", "message": "m", "id": 3}}, (403, "forbidden_topic")),
                ({"presence": "a", "id": 4}, (400, "presence_disabled")),
            ]:
                status, body = await post(http, url, payload)
                assert (status, body["error"]["code"]) == expected, body
            async with http.post(url, data="{}", headers={"Origin": "http://evil.example"}) as r:
                error = (await r.json())["error"]
                assert (r.status, error["code"]) == (403, "origin_not_allowed")
                # The same refusal as a WebSocket's, in words true for a stream too.
                assert error["message"].startswith("connections from origin 'http://evil.example'")


async def test_an_idle_stream_gets_keep_alive_comments(server: ServerProcess) -> None:
    async with aiohttp.ClientSession() as http:
        client_id = (await Api(http, server.url).register(topics=["idle"]))["id"]
        async with stream(http, f"{server.url}/sse/{client_id}") as (events, _):
            comments = 0
            while comments < 2:  # every half ping interval: half a second here
                line = await asyncio.wait_for(events.response.content.readline(), TIMEOUT)
                assert not line.startswith((b"data:", b"id:")), line  # nothing else came
                comments += line.startswith(b":")


async def test_a_second_stream_replaces_the_first_which_ends_with_4500(
    server: ServerProcess,
) -> None:
    async with aiohttp.ClientSession() as http:
        client_id = (await Api(http, server.url).register(topics=["repl"]))["id"]
        url = f"{server.url}/sse/{client_id}"
        async with stream(http, url) as (first, _), stream(http, url):
            closed = await first.until("close")
            assert closed["code"] == codes.REPLACED
            with pytest.raises(EOFError):
                await first.event()


async def test_a_stream_that_is_not_read_is_cut_off_as_a_slow_consumer(
    server: ServerProcess,
) -> None:
    async with aiohttp.ClientSession() as http:
        api = Api(http, server.url)
        client_id = (await api.register(topics=["slow"]))["id"]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, host_port(server.url))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(f"GET /sse/{client_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200"), head
        transport = cast(asyncio.ReadTransport, writer.transport)
        transport.pause_reading()
        message = "m" * 2000
        for _ in range(2000):
            if await api.publish("slow", message) == 0:
                break  # its outbox overflowed: it is no longer a recipient
        else:
            raise AssertionError("the stream was never cut off")
        transport.resume_reading()
        data = await asyncio.wait_for(reader.read(), TIMEOUT * 4)  # to the end of the stream
        writer.close()
        last = data.rstrip(b"\r\n").split(b"data: ")[-1].split(b"\n")[0]
        assert json.loads(last)["code"] == codes.SLOW_CONSUMER, last[:200]
        assert data.endswith(b"0\r\n\r\n")  # the chunked response ended properly
        stats = await (await http.get(server.url + "/stats")).json()
        assert stats["slow_consumers"] >= 1
