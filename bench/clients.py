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

A storm (``WorkerConfig.storm``) runs in two phases, each started by the parent at once in every
worker: on ``register`` the worker registers all its subscribers concurrently and reports
``registered``; on ``go`` it connects (and subscribes) all of them concurrently and reports
``connected``, with each phase's outcomes: HTTP refusals by status, failures, error frames, and
every client's time from its start to its outcome.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

# Columns of the shared counter array, one row of ``NCOUNTERS`` per worker.
CONNECTED, RECEIVED, PROBES, LAST_RECV_NS, FAILED, REGISTERED = range(6)
NCOUNTERS = 6

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_COLON = ord(":")
_PROBE = ord("p")
_BRACE = ord("{")


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
    storm: bool = False  # two phases on the parent's signal, everything at once (see above)
    subscribe: str = "register"  # storm: "register" (topic at registration) or "command"
    acks: bool = False  # the server acknowledges a subscription command (wsrelay)
    storm_inflight: int = 0  # storm: in flight per phase; 0: all of this worker's at once
    storm_timeout: float = 120.0  # storm: longest a registration, handshake or ack may take


@dataclass
class WorkerResult:
    index: int
    received: int
    probes: int
    last_recv_ns: int
    closed: int  # connections closed by the server during the run
    other: int  # unexpected messages (e.g. JSON frames: the server ignored ?format=raw)
    latencies_ns: bytes  # array('q') of receive - send times
    protocol_errors: int = 0  # frames with reserved bits set (e.g. HTTP bytes after the 101)
    error_frames: int = 0  # JSON error frames outside a storm's acknowledgement wait
    close_codes: dict[int, int] | None = None  # close frames the server sent, by code


class Refused(ConnectionError):
    """The server answered the WebSocket handshake with something other than 101."""

    def __init__(self, status: int, retry_after: str | None, line: str) -> None:
        super().__init__(f"handshake refused: {line!r}")
        self.status = status
        self.retry_after = retry_after


class Phase:
    """Outcomes of one storm phase in one worker: successes with their durations, refusals
    by HTTP status (and how many carried Retry-After), failures and error frames."""

    def __init__(self) -> None:
        self.ok = 0
        self.durations: array[float] = array("d")  # seconds, start -> outcome, successes
        self.refused: Counter[int] = Counter()
        self.retry_after = 0
        self.failed = 0
        self.error_frames = 0
        self.errors: Counter[str] = Counter()
        self.last = 0.0  # time.monotonic() of the last outcome, whatever it was

    def outcomes(self) -> int:
        return self.ok + sum(self.refused.values()) + self.failed + self.error_frames

    def _end(self) -> None:
        self.last = time.monotonic()

    def done(self, started: float) -> None:
        self._end()
        self.ok += 1
        self.durations.append(self.last - started)

    def refuse(self, status: int, retry_after: str | None, detail: str) -> None:
        self._end()
        self.refused[status] += 1
        self.retry_after += retry_after is not None
        self.errors[f"HTTP {status}: {detail}"[:160]] += 1

    def fail(self, exc: BaseException) -> None:
        self._end()
        self.failed += 1
        self.errors[f"{type(exc).__name__}: {exc}"[:160]] += 1

    def error_frame(self, detail: str) -> None:
        self._end()
        self.error_frames += 1
        self.errors[detail[:160]] += 1

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "refused": dict(self.refused),
            "retry_after": self.retry_after,
            "failed": self.failed,
            "error_frames": self.error_frames,
            "errors": self.errors.most_common(5),
            "durations": self.durations.tobytes(),
            "last": self.last,
        }


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
        self.protocol_errors = 0
        self.error_frames = 0
        self.close_codes: Counter[int] = Counter()
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
    """Receive-only RFC 6455 client: handshake, unmasked server frames, ping/pong, close.

    ``json_mode``: JSON frames are parsed too (a storm's ``command`` mode): publications are
    counted like raw ones, and the first ``subscribed`` or ``error`` frame answers
    :meth:`expect_ack`. A frame with reserved bits set (which is what HTTP bytes written
    after the 101 look like) counts as a protocol error and drops the connection."""

    def __init__(
        self, url: str, stats: Stats, opened: asyncio.Future[None], json_mode: bool = False
    ) -> None:
        parts = urlsplit(url)
        self.stats = stats
        self.opened = opened
        self.json_mode = json_mode
        self.ack: asyncio.Future[str] | None = None
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
        if self.ack is not None and not self.ack.done():
            self.ack.set_exception(exc or ConnectionError("closed before the acknowledgement"))
        self.is_open = False

    def expect_ack(self) -> asyncio.Future[str]:
        """The outcome of the next subscription command: ``subscribed`` or ``error ...``."""
        self.ack = asyncio.get_running_loop().create_future()
        return self.ack

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
            status = lines[0].split(" ", 2)[1] if lines[0].count(" ") else ""
            if status.isdigit() and status != "101":
                error: Exception = Refused(int(status), headers.get("retry-after"), lines[0])
            else:
                error = ConnectionError(f"handshake failed: {lines[0]!r}")
            self.opened.set_exception(error)
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
            if b0 & 0x70:  # reserved bits: not a frame (no extension was negotiated)
                self._protocol_error(buf[pos : pos + 40])
                return
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
                elif first == _BRACE and self.json_mode:
                    self._json(buf[start:end], now)
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

    def _protocol_error(self, data: bytes) -> None:
        self.stats.protocol_errors += 1
        error = ConnectionError(f"not a WebSocket frame after the 101: {data!r}")
        if self.ack is not None and not self.ack.done():
            self.ack.set_exception(error)
        self.is_open = False  # not "closed by the server": counted here instead
        assert self.transport is not None
        self.transport.abort()

    def _json(self, payload: bytes, now: int) -> None:
        """JSON mode: a publication, or the answer to a subscription command."""
        try:
            frame = json.loads(payload)
            kind = frame.get("type")
        except (ValueError, AttributeError):
            self.stats.other += 1
            return
        if kind == "message":
            self.stats.on_text(str(frame.get("message", "")), now)
        elif kind in ("subscribed", "error"):
            error = frame.get("error") or {}
            outcome = (
                "subscribed"
                if kind == "subscribed"
                else f"error frame {error.get('code')}: {error.get('message')}"
            )
            if self.ack is not None and not self.ack.done():
                self.ack.set_result(outcome)
            elif kind == "error":
                self.stats.error_frames += 1
        else:
            self.stats.other += 1

    def _control(self, b0: int, opcode: int, payload: bytes, now: int) -> None:
        if opcode in (0, 1, 2):  # fragmented data message
            self.fragments.append(payload)
            if b0 & 0x80:
                self.stats.on_text(b"".join(self.fragments).decode(), now)
                self.fragments.clear()
        elif opcode == 9:  # ping -> pong
            self.send_frame(0xA, payload)
        elif opcode == 8:  # close -> echo and hang up
            self.stats.close_codes[int.from_bytes(payload[:2], "big") if payload else 1005] += 1
            self.send_frame(0x8, payload[:2])
            assert self.transport is not None
            self.transport.close()

    def send_frame(self, opcode: int, payload: bytes) -> None:
        """Send a (masked, as clients must) control or text frame of < 64 KiB."""
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert self.transport is not None and len(payload) < 65536
        n = len(payload)
        head = bytes([0x80 | opcode, 0x80 | n]) if n < 126 else bytes([0x80 | opcode, 0xFE])
        if n >= 126:
            head += n.to_bytes(2, "big")
        self.transport.write(head + mask + masked)


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
        self.storm: dict[str, Any] = {}  # a storm's connect phase, for the parent

    def _row(self, column: int, value: int) -> None:
        self.counters[self.cfg.index * NCOUNTERS + column] = value

    async def run(self) -> None:
        import aiohttp

        local = (self.cfg.source_host, 0) if self.cfg.source_host else None
        connector = aiohttp.TCPConnector(limit=0, local_addr=local)
        async with aiohttp.ClientSession(connector=connector) as session:
            flusher = asyncio.create_task(self._flush_loop())
            if self.cfg.storm:
                ok = await self._storm()
            else:
                sem = asyncio.Semaphore(self.cfg.concurrency)
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
                    "storm": self.storm,
                }
            )
            await self._wait_for("stop")
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
                    s.protocol_errors,
                    s.error_frames,
                    dict(s.close_codes),
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

    async def _raw_connect(
        self, url: str, json_mode: bool = False, timeout: float = 30.0
    ) -> RawWebSocket:
        loop = asyncio.get_running_loop()
        parts = urlsplit(url)
        opened: asyncio.Future[None] = loop.create_future()
        local = (self.cfg.source_host, 0) if self.cfg.source_host else None
        transport, protocol = await asyncio.wait_for(
            loop.create_connection(
                lambda: RawWebSocket(url, self.stats, opened, json_mode),
                parts.hostname or "127.0.0.1",
                parts.port or 80,
                local_addr=local,
            ),
            timeout,
        )
        self.closers.append(transport)
        try:
            await asyncio.wait_for(opened, timeout)
        except BaseException:
            transport.abort()
            raise
        return protocol

    async def _storm(self) -> list[bool]:
        """Both phases of a storm (see the module docstring); which subscribers are open."""
        import aiohttp

        cfg, n = self.cfg, len(self.cfg.user_ids)
        command = cfg.subscribe == "command"
        sem = asyncio.Semaphore(cfg.storm_inflight or max(n, 1))
        urls: list[str | None] = [None] * n
        reg, con = Phase(), Phase()
        self.conn.send({"kind": "ready"})
        await self._wait_for("register")

        local = (cfg.source_host, 0) if cfg.source_host else None
        # One connection per registration, closed after it (N clients, each registering
        # once); none is left open to count against the server's open files later.
        connector = aiohttp.TCPConnector(limit=0, local_addr=local, force_close=True)
        timeout = aiohttp.ClientTimeout(total=cfg.storm_timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def register(k: int) -> None:
                body = {"user_id": cfg.user_ids[k], "topics": [] if command else [cfg.topics[k]]}
                async with sem:
                    started = time.monotonic()
                    try:
                        async with session.post(cfg.base_url + "/register", json=body) as resp:
                            data = await resp.read()
                            if resp.status != 200:
                                detail = data[:100].decode(errors="replace")
                                reg.refuse(resp.status, resp.headers.get("Retry-After"), detail)
                            else:
                                urls[k] = json.loads(data)["url"]
                                reg.done(started)
                    except Exception as exc:
                        reg.fail(exc)
                if reg.outcomes() % 100 == 0:
                    self._row(REGISTERED, reg.ok)

            await asyncio.gather(*(register(k) for k in range(n)))
        self._row(REGISTERED, reg.ok)
        self.conn.send({"kind": "registered", **reg.summary()})
        await self._wait_for("go")

        ok = [False] * n

        async def connect(k: int) -> None:
            url = urls[k]
            if url is None:
                return
            async with sem:
                started = time.monotonic()
                try:
                    ws = await self._raw_connect(
                        url if command else raw_url(url), command, cfg.storm_timeout
                    )
                    if command:
                        ack = ws.expect_ack() if cfg.acks else None
                        ws.send_frame(0x1, json.dumps({"topics": [cfg.topics[k]]}).encode())
                        outcome = await asyncio.wait_for(ack, cfg.storm_timeout) if ack else ""
                        if ack and outcome != "subscribed":
                            con.error_frame(outcome)
                            return
                    con.done(started)
                    ok[k] = True
                    self.connected += 1
                except Refused as exc:
                    con.refuse(exc.status, exc.retry_after, str(exc))
                except Exception as exc:
                    con.fail(exc)
                finally:
                    self.failed = con.outcomes() - con.ok
            if con.outcomes() % 100 == 0:
                self._row(CONNECTED, self.connected)
                self._row(FAILED, self.failed)

        await asyncio.gather(*(connect(k) for k in range(n)))
        self.failed = n - self.connected  # never registered counts as failed to connect
        self.errors = [f"{count} x {text}" for text, count in con.errors.most_common(5)]
        self.storm = con.summary()
        return ok

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

    async def _wait_for(self, command: str) -> None:
        """Until the parent sends ``command`` (``register``, ``go``, ``stop``)."""
        loop = asyncio.get_running_loop()
        stop = loop.create_future()

        def readable() -> None:
            if self.conn.poll() and self.conn.recv() == command and not stop.done():
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
