"""Adversarial HTTP against both stacks: each input gets the same answer from the native
publish driver (``--stack native``, server/native_http.py) as from aiohttp (``--stack
aiohttp``), with the limits of server/limits.py.

Every request here is a ``POST /publish``, so on the native stack the native driver
parses it (when it is the connection's first request, the front door may pass a very long
first line to aiohttp instead, which must answer the same). aiohttp's own parser errors
answer its plain-text 400; everything wsrelay answers itself is JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.server.rawws import host_port
from tests.server.test_native_http import Answer, answer
from tests.utils import TIMEOUT, ServerProcess, stop_and_check
from wsrelay.config import STACKS
from wsrelay.server.limits import MAX_FIELD_SIZE, MAX_HEADERS, MAX_URL_SIZE

KEY = "parity-key"
AUTH = f"Authorization: Bearer {KEY}"
BODY = b'{"topic": "t.parity", "message": "hi"}'


def request(*headers: str, target: str = "/publish", body: bytes = BODY) -> bytes:
    """A publish with exactly ``headers`` (no Host or Content-Length unless given)."""
    head = f"POST {target} HTTP/1.1\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n"
    return head.encode("latin-1") + body


def publish(*extra: str, target: str = "/publish") -> bytes:
    """A valid publish (Host, Content-Length, the API key) plus ``extra`` headers."""
    return request("Host: relay", f"Content-Length: {len(BODY)}", AUTH, *extra, target=target)


def with_header_count(count: int) -> bytes:
    """A valid publish carrying ``count`` header fields in all."""
    return publish(*(f"X-Filler-{i}: v" for i in range(count - 3)))


def with_value_size(size: int) -> bytes:
    """A valid publish with one header whose value takes ``size`` bytes."""
    return publish(f"X-Big: {'b' * size}")


def with_name_size(size: int) -> bytes:
    """A valid publish with one header whose name takes ``size`` bytes."""
    return publish(f"X-{'n' * (size - 2)}: v")


async def send(url: str, data: bytes, *, after_a_publish: bool) -> Answer:
    """``data`` on a new connection, alone or after a publish (which makes the connection
    the native driver's on the native stack); the answer to ``data``."""
    reader, writer = await asyncio.open_connection(*host_port(url))
    try:
        if after_a_publish:
            writer.write(publish())
            first = await answer(reader)
            assert first.status == 200, first
        writer.write(data)
        with contextlib.suppress(ConnectionError):  # refused before the end: fine
            await writer.drain()
        return await answer(reader)
    finally:
        writer.transport.abort()


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ServerProcess]]:
    """One server per stack, with an API key; checked for tracebacks at the end."""
    started: dict[str, ServerProcess] = {}
    try:
        for stack in STACKS:
            started[stack] = ServerProcess(["--stack", stack], {"WSRELAY_API_KEY": KEY}).start()
        yield started
    finally:
        for process in started.values():
            stop_and_check(process)


@dataclass(frozen=True)
class Case:
    name: str
    data: Callable[[], bytes]
    status: int
    code: str | None = None  # the JSON error code, when wsrelay answers
    by_app: bool = False  # answered by wsrelay's code on aiohttp too (JSON), not its parser


CASES = [
    Case("url_100k", lambda: publish(target="/publish?x=" + "a" * 100_000), 400, "bad_http"),
    Case("url_at_the_limit", lambda: publish(target="/publish?" + "a" * (MAX_URL_SIZE - 9)), 200),
    Case(
        "url_one_over",
        lambda: publish(target="/publish?" + "a" * (MAX_URL_SIZE - 8)),
        400,
        "bad_http",
    ),
    Case("headers_10000", lambda: with_header_count(10_000), 400, "bad_http"),
    Case("headers_at_the_limit", lambda: with_header_count(MAX_HEADERS), 200),
    Case("headers_one_over", lambda: with_header_count(MAX_HEADERS + 1), 400, "bad_http"),
    Case("header_100k", lambda: publish("X-Big: " + "b" * 100_000), 400, "bad_http"),
    Case("value_at_the_limit", lambda: with_value_size(MAX_FIELD_SIZE), 200),
    Case("value_one_over", lambda: with_value_size(MAX_FIELD_SIZE + 1), 400, "bad_http"),
    # aiohttp's C parser adds the previous field's name to a name's size, so a name at
    # exactly the limit is not the same on both; half of it is.
    Case("name_of_half_the_limit", lambda: with_name_size(MAX_FIELD_SIZE // 2), 200),
    Case("name_one_over", lambda: with_name_size(MAX_FIELD_SIZE + 1), 400, "bad_http"),
    Case(
        "a_1_mb_head",  # fields within every reading of the limits: no total applies
        lambda: publish(
            *(f"X{i:03}{'n' * 3996}: {'v' * (MAX_FIELD_SIZE - 4000)}" for i in range(125))
        ),
        200,
    ),
    Case(
        "authorization_wrong_then_right",
        lambda: request(
            "Host: relay",
            f"Content-Length: {len(BODY)}",
            "Authorization: Bearer wrong",
            AUTH,
        ),
        400,
        "bad_request",
        by_app=True,
    ),
    Case(
        "authorization_right_then_wrong",
        lambda: request(
            "Host: relay",
            f"Content-Length: {len(BODY)}",
            AUTH,
            "Authorization: Bearer wrong",
        ),
        400,
        "bad_request",
        by_app=True,
    ),
    Case(
        "authorization_right_twice",
        lambda: request("Host: relay", f"Content-Length: {len(BODY)}", AUTH, AUTH),
        400,
        "bad_request",
        by_app=True,
    ),
    Case(
        "authorization_wrong",
        lambda: request("Host: relay", f"Content-Length: {len(BODY)}", "Authorization: Bearer no"),
        401,
        "unauthorized",
        by_app=True,
    ),
]


@pytest.mark.parametrize("after_a_publish", [True, False], ids=["second_request", "first_request"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_both_stacks_answer_alike(
    servers: dict[str, ServerProcess], case: Case, after_a_publish: bool
) -> None:
    data = case.data()
    answers = {
        stack: await send(server.url, data, after_a_publish=after_a_publish)
        for stack, server in servers.items()
    }
    statuses = {stack: answer.status for stack, answer in answers.items()}
    assert statuses == dict.fromkeys(STACKS, case.status), answers
    native, aiohttp = answers["native"], answers["aiohttp"]
    if after_a_publish:  # the connection was the native driver's
        assert native.native, native
    for stack_answer in (native, aiohttp):
        if case.code is None:
            continue
        if stack_answer.native or case.by_app:
            assert stack_answer.is_json, stack_answer
            assert stack_answer.error_code() == case.code, stack_answer
        else:  # aiohttp's own parser refused it: its plain-text 400
            assert stack_answer.status == 400 and not stack_answer.is_json, stack_answer


# -- the header timeout -------------------------------------------------------------------------

HEADER_TIMEOUT = 2.0


async def trickle(url: str, first_line_pieces: int) -> tuple[float, bytes]:
    """Open a connection and send a publish's head a few bytes at a time, never ending it:
    the first line in ``first_line_pieces`` pieces over most of the header timeout, then one
    header byte every 50 ms. Returns the seconds from the first byte sent until the server
    answered or closed, and what it answered."""
    reader, writer = await asyncio.open_connection(*host_port(url))
    loop = asyncio.get_running_loop()
    line = b"POST /publish HTTP/1.1\r\n"
    step = -(-len(line) // first_line_pieces)
    pause = HEADER_TIMEOUT * 0.75 / first_line_pieces

    async def feed() -> None:
        with contextlib.suppress(ConnectionError):
            for start in range(0, len(line), step):
                writer.write(line[start : start + step])
                await asyncio.sleep(pause)  # pacing the client, not waiting for the server
            writer.write(b"Host: relay\r\nX-Slow: ")
            while True:
                writer.write(b"x")
                await asyncio.sleep(0.05)

    started = loop.time()
    feeding = asyncio.create_task(feed())
    try:
        try:
            answer = await asyncio.wait_for(reader.read(), HEADER_TIMEOUT + TIMEOUT)
        except ConnectionResetError:
            answer = b""
        return loop.time() - started, answer
    finally:
        feeding.cancel()
        writer.transport.abort()


def assert_cut_in_time(elapsed: float, answer: bytes) -> None:
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
    assert elapsed >= HEADER_TIMEOUT * 0.9, f"closed after {elapsed:.2f} s: not the timeout"
    # From the first byte, never restarted: a clock started again once the first line was
    # complete would take 0.75 * HEADER_TIMEOUT more.
    assert elapsed < HEADER_TIMEOUT * 1.35, f"headers held {elapsed:.2f} s"


@pytest.mark.parametrize("stack", STACKS)
async def test_trickled_headers_are_cut_at_the_timeout_from_the_first_byte(
    start_server: Callable[..., ServerProcess], stack: str
) -> None:
    server = start_server("--stack", stack, "--request-timeout", str(HEADER_TIMEOUT))
    assert_cut_in_time(*await trickle(server.url, first_line_pieces=1))


@pytest.mark.parametrize("stack", STACKS)
async def test_a_trickled_first_line_counts_toward_the_header_timeout(
    start_server: Callable[..., ServerProcess], stack: str
) -> None:
    server = start_server("--stack", stack, "--request-timeout", str(HEADER_TIMEOUT))
    assert_cut_in_time(*await trickle(server.url, first_line_pieces=6))


# -- resets ---------------------------------------------------------------------------------------


def reset(url: str, data: bytes) -> None:
    """Connect, send ``data``, and close with a TCP reset (SO_LINGER 0)."""
    with socket.create_connection(host_port(url), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def metrics(url: str) -> str:
    reader, writer = await asyncio.open_connection(*host_port(url))
    writer.write(
        f"GET /metrics HTTP/1.1\r\nHost: relay\r\n{AUTH}\r\nConnection: close\r\n\r\n".encode()
    )
    text = (await asyncio.wait_for(reader.read(), TIMEOUT)).decode()
    writer.close()
    assert text.startswith("HTTP/1.1 200"), text[:200]
    return text


@pytest.mark.parametrize("stack", STACKS)
async def test_a_reset_mid_request_is_not_a_server_error(
    start_server: Callable[..., ServerProcess], stack: str
) -> None:
    server = start_server("--stack", stack, env={"WSRELAY_API_KEY": KEY})
    head = f"POST /publish HTTP/1.1\r\nHost: relay\r\n{AUTH}\r\n".encode()
    partial = [
        head[:30],  # in the headers
        head + b"Content-Length: 100\r\n\r\n" + BODY[:10],  # in the body
        head + b"Transfer-Encoding: chunked\r\n\r\n5\r\n" + BODY[:5] + b"\r\n",  # between chunks
        publish() + head,  # in a second request, after a whole one
        publish() * 50,  # whole requests whose answers are never read
        b"POST /register HTTP/1.1\r\nHost: relay\r\n" + AUTH.encode() + b"\r\n"
        b"Content-Length: 100\r\n\r\n{",  # in the body of a request for aiohttp
    ]
    loop = asyncio.get_running_loop()
    for data in partial:
        await loop.run_in_executor(None, reset, server.url, data)
    # The server handled the resets before this publish's connection (one event loop, in
    # order of arrival); the publish itself is the barrier.
    reader, writer = await asyncio.open_connection(*host_port(server.url))
    writer.write(publish())
    assert (await answer(reader)).status == 200
    writer.close()
    text = await metrics(server.url)
    assert 'status="500"' not in text, text
    assert "Traceback" not in server.log(), server.log()
    # start_server's teardown stops the server and fails on any traceback logged meanwhile.
