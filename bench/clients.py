"""Subscriber worker processes for bench/fanout.py.

Each worker process owns a slice of the subscribers. It registers them (``POST /register`` with the
topic in the body, so no subscription acknowledgement is needed), opens their WebSockets with
``?format=raw`` from its own loopback source address, and then only counts deliveries: every payload
starts with ``<seq>:<time.time_ns() at publish>:`` (or ``p:`` for warm-up probes), so the latency
of each delivery is ``receive time - embedded send time``.

Two WebSocket client implementations are available:

* ``raw`` (default): a minimal RFC 6455 client on a plain asyncio protocol (uvloop). Server frames
  are unmasked, so counting them is a few byte reads per frame; it answers pings and closes. This
  keeps the client's cost per delivery well below the servers' (see bench/README.md).
* ``aiohttp``: ``aiohttp.ClientSession.ws_connect`` + ``ws.receive()`` per message, the obvious
  client; it costs several times more CPU per delivery and caps what can be measured on 2 cores.

The parent reads live progress from a shared array of counters (one row per worker) and talks to the
worker over a pipe: the worker reports ``connected`` once all its clients are open; on ``stop`` it
replies with its ``result`` (counts and every latency in nanoseconds) and exits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import time
from array import array
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

# Columns of the shared counter array, one row of ``NCOUNTERS`` per worker.
CONNECTED, RECEIVED, PROBES, LAST_RECV_NS, FAILED = range(5)
NCOUNTERS = 5

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_COLON = ord(":")
_PROBE = ord("p")


class Counters(Protocol):
    """The slice of ``multiprocessing.Array('q', ...)`` used here."""

    def __getitem__(self, index: int) -> int: ...
    def __setitem__(self, index: int, value: int) -> None: ...
    def __len__(self) -> int: ...


class Conn(Protocol):
    """The slice of ``multiprocessing.connection.Connection`` used here."""

    def send(self, obj: Any) -> None: ...
    def recv(self) -> Any: ...
    def poll(self, timeout: float | None = ...) -> bool: ...
    def fileno(self) -> int: ...


@dataclass(frozen=True)
class WorkerConfig:
    index: int
    base_url: str  # http://host:port of the server under test
    user_ids: list[int]  # one per subscriber of this worker
    topics: list[str]  # topic of each subscriber (parallel to user_ids)
    source_host: str | None  # loopback source address (127.0.0.x) for this worker's sockets
    expected_each: list[int]  # measured deliveries each subscriber should see
    warmup: bool  # each subscriber gets one probe before the measurement
    client: str = "raw"  # "raw" | "aiohttp"
    concurrency: int = 64  # registrations/handshakes in flight
    cpus: frozenset[int] | None = None  # CPU affinity of the worker (--pin)


@dataclass
class WorkerResult:
    index: int
    received: int
    probes: int
    last_recv_ns: int
    closed: int  # connections closed by the server during the run
    other: int  # unexpected messages (e.g. JSON frames: the server ignored ?format=raw)
    latencies_ns: bytes  # array('q') of receive - send times


class Stats:
    """Delivery bookkeeping shared by all connections of one worker."""

    def __init__(self, counters: Counters, row: int, expected: int, expected_probes: int) -> None:
        self.counters = counters
        self.row = row
        self.expected = expected
        self.expected_probes = expected_probes
        self.received = 0
        self.probes = 0
        self.last_ns = 0
        self.closed = 0
        self.other = 0  # messages that are neither measured nor probes (should stay 0)
        self.latencies: array[int] = array("q")

    def on_text(self, text: str, now: int) -> None:
        """aiohttp path: one decoded text message."""
        if text[:1].isdigit():
            i = text.index(":")
            self.latencies.append(now - int(text[i + 1 : text.index(":", i + 1)]))
            self.received += 1
        elif text[:1] == "p":
            self.probes += 1
        else:
            self.other += 1
        self.last_ns = now
        self.check_done()

    def check_done(self) -> None:
        """Publish counters at once when this worker has everything it expects."""
        if (self.received == self.expected and self.expected) or (
            self.probes == self.expected_probes and self.expected_probes
        ):
            self.flush()

    def flush(self) -> None:
        base = self.row * NCOUNTERS
        self.counters[base + RECEIVED] = self.received
        self.counters[base + PROBES] = self.probes
        self.counters[base + LAST_RECV_NS] = self.last_ns


class RawWebSocket(asyncio.Protocol):
    """Receive-only RFC 6455 client: handshake, unmasked server frames, ping/pong, close."""

    def __init__(self, url: str, stats: Stats, opened: asyncio.Future[None]) -> None:
        parts = urlsplit(url)
        self.stats = stats
        self.opened = opened
        self.key = base64.b64encode(os.urandom(16))
        target = parts.path + ("?" + parts.query if parts.query else "")
        self.request = (
            (
                f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            ).encode()
            + b"Sec-WebSocket-Key: "
            + self.key
            + b"\r\n\r\n"
        )
        self.transport: asyncio.Transport | None = None
        self.is_open = False
        self.buf = b""
        self.fragments: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during handshake"))
        elif self.is_open:
            self.stats.closed += 1
        self.is_open = False

    def _handshake(self, data: bytes) -> bytes | None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head, rest = self.buf[:end].decode("latin-1"), self.buf[end + 4 :]
        self.buf = b""
        lines = head.split("\r\n")
        fields = (line.partition(":") for line in lines[1:])
        headers = {k.strip().lower(): v.strip() for k, _, v in fields}
        accept = base64.b64encode(hashlib.sha1(self.key + _WS_GUID).digest()).decode()
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != accept:
            self.opened.set_exception(ConnectionError(f"handshake failed: {lines[0]!r}"))
            assert self.transport is not None
            self.transport.close()
            return None
        self.is_open = True
        self.opened.set_result(None)
        return rest

    def data_received(self, data: bytes) -> None:
        if not self.is_open:
            rest = self._handshake(data)
            if not rest:
                return
            data = rest
        buf = self.buf + data if self.buf else data
        now = time.time_ns()
        stats = self.stats
        latencies = stats.latencies
        received = probes = 0
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, length = buf[pos], buf[pos + 1]
            start = pos + 2
            if length >= 126:
                if length == 126:
                    if size - pos < 4:
                        break
                    length, start = (buf[pos + 2] << 8) | buf[pos + 3], pos + 4
                elif length == 127:
                    if size - pos < 10:
                        break
                    length, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
                else:
                    raise ConnectionError("server sent a masked frame")
            end = start + length
            if end > size:
                break
            opcode = b0 & 0x0F
            if (opcode == 1 or opcode == 2) and b0 & 0x80:
                first = buf[start] if start < end else 0
                if 48 <= first <= 57:  # "<seq>:<sent ns>:..."
                    i = buf.index(_COLON, start, end)
                    latencies.append(now - int(buf[i + 1 : buf.index(_COLON, i + 1, end)]))
                    received += 1
                elif first == _PROBE:  # "p:<sent ns>:..."
                    probes += 1
                else:
                    stats.other += 1
            else:
                self._control(b0, opcode, buf[start:end], now)
            pos = end
        self.buf = buf[pos:] if pos < size else b""
        if received or probes:
            stats.received += received
            stats.probes += probes
            stats.last_ns = now
            stats.check_done()

    def _control(self, b0: int, opcode: int, payload: bytes, now: int) -> None:
        if opcode in (0, 1, 2):  # fragmented data message
            self.fragments.append(payload)
            if b0 & 0x80:
                self.stats.on_text(b"".join(self.fragments).decode(), now)
                self.fragments.clear()
        elif opcode == 9:  # ping -> pong
            self.send_frame(0xA, payload)
        elif opcode == 8:  # close -> echo and hang up
            self.send_frame(0x8, payload[:2])
            assert self.transport is not None
            self.transport.close()

    def send_frame(self, opcode: int, payload: bytes) -> None:
        """Send a (masked, as clients must) control or text frame of < 126 bytes."""
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert self.transport is not None and len(payload) < 126
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)


def raw_url(url: str) -> str:
    return url + ("&" if "?" in url else "?") + "format=raw"


class Worker:
    def __init__(self, cfg: WorkerConfig, conn: Conn, counters: Counters) -> None:
        self.cfg = cfg
        self.conn = conn
        self.counters = counters
        self.stats = Stats(counters, cfg.index, 0, 0)
        self.connected = 0
        self.failed = 0
        self.errors: list[str] = []
        self.closers: list[Any] = []  # transports / aiohttp websockets to close at the end
        self.readers: list[asyncio.Task[None]] = []

    def _row(self, column: int, value: int) -> None:
        self.counters[self.cfg.index * NCOUNTERS + column] = value

    async def run(self) -> None:
        import aiohttp

        local = (self.cfg.source_host, 0) if self.cfg.source_host else None
        connector = aiohttp.TCPConnector(limit=0, local_addr=local)
        async with aiohttp.ClientSession(connector=connector) as session:
            sem = asyncio.Semaphore(self.cfg.concurrency)
            flusher = asyncio.create_task(self._flush_loop())
            pairs = zip(self.cfg.user_ids, self.cfg.topics, strict=True)
            ok = await asyncio.gather(*(self._open(session, sem, u, t) for u, t in pairs))
            self._row(CONNECTED, self.connected)
            self._row(FAILED, self.failed)
            # Only subscribers that are connected count towards what this worker expects.
            expected = sum(e for e, good in zip(self.cfg.expected_each, ok, strict=True) if good)
            self.stats.expected = expected
            self.stats.expected_probes = self.connected if self.cfg.warmup else 0
            self.conn.send(
                {
                    "kind": "connected",
                    "connected": self.connected,
                    "failed": self.failed,
                    "expected": expected,
                    "errors": self.errors[:5],
                }
            )
            await self._wait_for_stop()
            flusher.cancel()
            self.stats.flush()
            s = self.stats
            self.conn.send(
                WorkerResult(
                    self.cfg.index,
                    s.received,
                    s.probes,
                    s.last_ns,
                    s.closed,
                    s.other,
                    s.latencies.tobytes(),
                )
            )
            for reader in self.readers:
                reader.cancel()
            for closer in self.closers:
                if hasattr(closer, "abort"):
                    closer.abort()  # raw transport: drop it, the server is stopped next anyway
                else:
                    await closer.close()

    async def _open(self, session: Any, sem: asyncio.Semaphore, user_id: int, topic: str) -> bool:
        async with sem:
            ok = False
            try:
                body = {"user_id": user_id, "topics": [topic]}
                async with session.post(self.cfg.base_url + "/register", json=body) as resp:
                    resp.raise_for_status()
                    url = raw_url((await resp.json())["url"])
                if self.cfg.client == "aiohttp":
                    ws = await session.ws_connect(url, autoping=True, max_msg_size=0)
                    self.closers.append(ws)
                    self.readers.append(asyncio.create_task(self._aiohttp_reader(ws)))
                else:
                    await self._raw_connect(url)
                self.connected += 1
                ok = True
            except Exception as exc:
                self.failed += 1
                self.errors.append(f"{type(exc).__name__}: {exc}")
            if (self.connected + self.failed) % 100 == 0:
                self._row(CONNECTED, self.connected)
                self._row(FAILED, self.failed)
            return ok

    async def _raw_connect(self, url: str) -> None:
        loop = asyncio.get_running_loop()
        parts = urlsplit(url)
        opened: asyncio.Future[None] = loop.create_future()
        local = (self.cfg.source_host, 0) if self.cfg.source_host else None
        transport, _ = await loop.create_connection(
            lambda: RawWebSocket(url, self.stats, opened),
            parts.hostname or "127.0.0.1",
            parts.port or 80,
            local_addr=local,
        )
        self.closers.append(transport)
        await asyncio.wait_for(opened, 30)

    async def _aiohttp_reader(self, ws: Any) -> None:
        import aiohttp

        stats = self.stats
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                stats.on_text(msg.data, time.time_ns())
            elif msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                stats.closed += 1
                return

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.stats.flush()

    async def _wait_for_stop(self) -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()

        def readable() -> None:
            if self.conn.poll() and self.conn.recv() == "stop" and not stop.done():
                stop.set_result(None)

        loop.add_reader(self.conn.fileno(), readable)
        try:
            await stop
        finally:
            loop.remove_reader(self.conn.fileno())
            os.set_blocking(self.conn.fileno(), True)  # the loop made it non-blocking


def worker_main(cfg: WorkerConfig, conn: Conn, counters: Counters) -> None:
    """Entry point of a worker process (multiprocessing, spawn context)."""
    import uvloop

    if cfg.cpus:
        os.sched_setaffinity(0, cfg.cpus)
    try:
        uvloop.run(Worker(cfg, conn, counters).run())
    except Exception as exc:  # report instead of dying silently
        with contextlib.suppress(Exception):
            conn.send({"kind": "error", "error": f"{type(exc).__name__}: {exc}"})
        raise
