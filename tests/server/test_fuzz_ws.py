"""Hypothesis-driven WebSocket fuzzing against a real server.

One client sends random sequences of frames: valid and malformed commands,
binary, oversized, fragmented (finished or not), unmasked, with reserved bits or
opcodes, bad UTF-8, control frames that are too long or fragmented, and raw junk.
After each sequence another client, connected the whole time, must still receive
what is published; at the end the server must hold no connection and must have
logged no traceback and no error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator

import aiohttp
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.rawws import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    RawWebSocket,
    encode_frame,
)
from tests.utils import TIMEOUT, Api, ServerProcess, Subscriber
from wsrelay.config import STACKS

MAX_MESSAGE = 1024
TOPIC = "fuzz"
SETTLE = 0.5
"""Seconds the fuzzing client waits for the server's verdict on a sequence that may
legitimately leave the connection open (say, half a fragmented message) before it
hangs up itself."""


@pytest.fixture(scope="module", params=STACKS)
def fuzz_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    process = ServerProcess(
        ["--max-message-size", str(MAX_MESSAGE), "--stack", request.param]
    ).start()
    yield process
    assert process.stop() == 0
    log = process.log()
    assert "Traceback" not in log and " ERROR " not in log, log


commands = st.sampled_from(
    [
        b'{"subscribe": ["fuzz.a"]}',
        b'{"topics": ["fuzz.b", "fuzz.c"]}',
        b'{"unsubscribe": ["fuzz.a"]}',
        b'{"topics": "x"}',
        b'{"subscribe": ["bad topic"]}',
        b"{}",
        b"[]",
        b"null",
        b'{"subscribe": [' + b"[" * 2000 + b"]" * 2000 + b"]}",  # deep nesting
        b'{"subscribe": [1' + b"0" * 5000 + b"]}",  # a huge integer
        b"\xff\xfe not utf-8",
    ]
)
payloads = st.one_of(
    commands,
    st.binary(max_size=200),
    st.text(max_size=100).map(str.encode),
    st.integers(MAX_MESSAGE + 1, 4 * MAX_MESSAGE).map(lambda n: b"x" * n),  # oversized
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    opcode = draw(
        st.sampled_from([TEXT, TEXT, TEXT, BINARY, CONTINUATION, PING, PONG, CLOSE, 0x3, 0xB])
    )
    payload = draw(payloads)
    if opcode in (PING, PONG, CLOSE) and draw(st.booleans()):
        payload = payload[:125]  # usually a legal control frame; sometimes too long
    return encode_frame(
        opcode,
        payload,
        fin=draw(st.sampled_from([True, True, True, False])),
        rsv=draw(st.sampled_from([0, 0, 0, 0, 1, 4])),
        mask=draw(st.sampled_from([True, True, True, True, True, False])),
    )


@st.composite
def fragmented(draw: st.DrawFn) -> bytes:
    """A message in 2 to 5 fragments, possibly oversized in total."""
    text = draw(commands | st.integers(300, 2 * MAX_MESSAGE).map(lambda n: b'"' + b"y" * n))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), min_size=1, max_size=4)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    out = b""
    for i, piece in enumerate(pieces):
        opcode = TEXT if i == 0 else CONTINUATION
        out += encode_frame(opcode, piece, fin=i == len(pieces) - 1)
        if draw(st.booleans()):
            out += encode_frame(PING, b"mid-message ping")  # legal between fragments
    return out


sequences = st.lists(
    st.one_of(frames(), fragmented(), st.binary(min_size=1, max_size=64)),  # last: junk
    min_size=1,
    max_size=6,
)


async def run_sequence(server: ServerProcess, chunks: list[bytes], counter: list[int]) -> None:
    async with aiohttp.ClientSession() as session:
        api = Api(session, server.url)
        bystander = await api.connect(1, [TOPIC])
        reg = await api.register(2, ["fuzz.a"])
        raw = await RawWebSocket.connect(reg["url"])
        for chunk in chunks:
            raw.send(chunk)
        raw.send(encode_frame(CLOSE, (1000).to_bytes(2, "big")))
        with contextlib.suppress(TimeoutError):  # the server's verdict, if any; else hang up
            await asyncio.wait_for(raw.close_code(), SETTLE)
        raw.abort()
        counter[0] += 1
        message = f"after sequence {counter[0]}"
        assert await api.publish(TOPIC, message) == 1
        assert await bystander.message() == (TOPIC, message)
        await bystander.close()


@given(chunks=sequences)
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same sequences every run: a failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_random_frames_break_nothing(fuzz_server: ServerProcess, chunks: list[bytes]) -> None:
    asyncio.run(run_sequence(fuzz_server, chunks, COUNTER))


COUNTER = [0]


async def test_after_fuzzing_no_connection_is_left(fuzz_server: ServerProcess) -> None:
    """Runs after the fuzzing above (tests run in file order): every connection the
    fuzzer opened is gone, and the server still answers a well-behaved client."""
    async with aiohttp.ClientSession() as session:
        api = Api(session, fuzz_server.url)

        async def back_to_zero() -> None:
            while (await api.call("GET", "/health"))[1]["connections"] != 0:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(back_to_zero(), TIMEOUT)
        reg = await api.register(3, [TOPIC])
        sub = Subscriber(await websockets.connect(reg["url"]), reg["id"], reg["url"])
        await sub.ws.send(json.dumps({"subscribe": ["fuzz.z"]}))
        assert (await sub.frame())["topics"] == [TOPIC, "fuzz.z"]
        await sub.close()
