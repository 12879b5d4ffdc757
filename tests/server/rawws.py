"""A WebSocket client by hand, for tests that must misbehave where libraries won't:
never answer pings, send malformed or unmasked frames, stop mid-handshake."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tests.utils import TIMEOUT

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def encode_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
) -> bytes:
    """One frame, as a client sends it (masked) unless ``mask`` is False. Nothing is
    checked: control frames may be long or fragmented, opcodes reserved."""
    head = bytes([(0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)])
    length = len(payload)
    mask_bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@dataclass
class Frame:
    opcode: int
    payload: bytes


class RawWebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.head = b""
        """The server's answer to the handshake: status line and headers."""

    @classmethod
    async def connect(
        cls, url: str, headers: dict[str, str] | None = None, **options: Any
    ) -> RawWebSocket:
        """Open ``url`` (ws://host:port/path) and complete the upgrade; ``options``
        as for :meth:`handshake`.

        Raises:
            AssertionError: the server did not answer 101.
        """
        socket = await cls.handshake(url, headers, **options)
        assert socket.head.startswith(b"HTTP/1.1 101"), socket.head
        return socket

    @classmethod
    async def handshake(
        cls,
        url: str,
        headers: dict[str, str] | None = None,
        *,
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None,
        trickle: int = 0,
        then: bytes = b"",
        upgrade: bool = True,
    ) -> RawWebSocket:
        """Send an opening handshake for ``url`` and read the answer's head into
        ``.head``, whatever it is. ``streams``: a connection already open to use.
        ``trickle``: the first bytes of the request go one write (and one event-loop
        pass) at a time. ``then``: bytes that follow the request in the same write,
        before the answer. ``upgrade``: False leaves out the upgrade headers."""
        host, port = host_port(url)
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        reader, writer = streams or await asyncio.open_connection(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        asks = (
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            if upgrade
            else ""
        )
        request = f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n{asks}{extra}\r\n".encode()
        for i in range(min(trickle, len(request))):
            writer.write(request[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)
        writer.write(request[trickle:] + then)
        await writer.drain()
        socket = cls(reader, writer)
        socket.head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        return socket

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def frame(self) -> Frame | None:
        """The next frame from the server, or None at end of stream."""
        try:
            b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), TIMEOUT)
            length = b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await asyncio.wait_for(self.reader.readexactly(length), TIMEOUT)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return Frame(b0 & 0x0F, payload)

    async def close_code(self) -> int | None:
        """Read until the server's close frame (its code) or the end of the stream (None)."""
        while True:
            frame = await self.frame()
            if frame is None:
                return None
            if frame.opcode == CLOSE:
                return int.from_bytes(frame.payload[:2], "big") if frame.payload else 1005

    def abort(self) -> None:
        self.writer.transport.abort()
