"""Many idle WebSockets on one machine: ``wsrelay serve --workers K`` on Redis (issue 15).

    python bench/idle_many.py --connections 50000 --hold 30

What one run does:

1. Starts a private ``redis-server`` on a free port (no persistence, a temporary directory),
   then ``python -m wsrelay serve --workers K --broker redis://127.0.0.1:<port>/0`` on a free
   port of 127.0.0.1. With ``--workers`` the K relay processes listen on the same port with
   ``SO_REUSEPORT`` (the parent only supervises them, plus multiprocessing's resource tracker),
   so the kernel spreads the connections over them by a hash of each connection's addresses;
   a registration made by one worker is known to all through Redis.
2. Starts ``--client-procs`` client processes (multiprocessing, spawn), each with a slice of the
   connections, its own open-files limit (raised to the hard limit) and its own loopback source
   addresses (``--ips-per-proc`` of them, 127.0.0.x): every client socket is bound to one of
   them, so the (source address, source port) pairs do not run short. Once every process is up,
   all start at one signal; each keeps ``--concurrency`` clients in flight, and each client
   ``POST /register {"user_id": "idle-<i>"}`` (keep-alive HTTP, aiohttp), opens the returned
   ``ws://.../ws/<id>`` (JSON mode, the raw RFC 6455 client of bench/clients.py on uvloop), sends
   ``{"topics": ["idle<i % T>"]}`` and waits for its ``subscribed`` frame: only then does it count
   as connected.
3. 2 s after the last one: RSS of every server process (the parent, the resource tracker and
   the K workers, summed), open files of each worker (how the kernel spread the connections),
   redis-server's RSS and ``used_memory``, the client processes' RSS.
4. Holds everything idle for ``--hold`` seconds (the server pings every connection every
   ``--ping-interval`` s, 25 by default, and the clients answer), measuring the CPU used, then
   reads the RSS again.
5. Publishes one message to each of the ``--topics`` topics (``POST /publish``) and waits until
   every connected client has received it: the deliveries must equal the connections (0 lost).
   "deliver all" is from just before the first publish to the last client's receipt (one
   clock: ``time.time_ns()`` in every process).

What is set so that the run measures the relay, not its protective limits:

* ``--max-connections`` (per process, default 10,000) is set to the open-files hard limit less
  200 (19,800 with a limit of 20,000): with 50,000 connections over 3 workers each holds about
  16,700. K must be at least connections / that, so with a hard limit of 20,000 per process,
  50,000 connections need 3 workers (the default here is the fewest that fit with 10% to spare
  for an uneven spread, at least 2).
* ``--max-connections-per-ip`` is left at its default, 0 (no limit), and so is
  ``--max-registrations-per-user`` (100, but every client has its own user id). wsrelay has no
  registration rate limit. The bind is loopback, so no API key is needed.
* The ping interval is wsrelay's default (25 s) unless ``--ping-interval`` is given; the idle
  CPU therefore includes the pings. It also includes the Redis broker's presence heartbeat
  (every ``--presence-ttl`` / 3 = 10 s each node writes its presence entries again: with one
  user per connection, one ``EVALSHA`` per connection, 5,000/s at 50,000 connections), which
  is most of it (``--ping-interval 0`` changes it little).

Everything started here is stopped at the end (the server with SIGTERM, then SIGKILL after
30 s; Redis; the client processes). ``--json-out FILE`` writes every figure as JSON too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from clients import CONNECTED, FAILED, LAST_RECV_NS, NCOUNTERS, PROBES, RawWebSocket, Stats
from servers import REPO_ROOT, free_port

CLOSED = 5  # column of the shared counters: connections the server closed (clients' REGISTERED)
SERVER_LIMIT_SPARE = 200  # open files per server process kept for what is not a WebSocket


@dataclass(frozen=True)
class ClientConfig:
    index: int
    base_url: str
    first: int  # first connection index of this process
    count: int
    topics: int
    source_hosts: list[str]
    concurrency: int
    timeout: float


# -- client processes ------------------------------------------------------------------------


class ClientProc:
    def __init__(self, cfg: ClientConfig, conn: Any, counters: Any) -> None:
        self.cfg = cfg
        self.conn = conn
        self.counters = counters
        self.stats = Stats(counters, cfg.index, 0, 0)
        self.connected = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.transports: list[Any] = []
        self.first_done = 0.0
        self.last_done = 0.0

    def _set(self, column: int, value: int) -> None:
        self.counters[self.cfg.index * NCOUNTERS + column] = value

    async def run(self) -> None:
        import aiohttp

        cfg = self.cfg
        self.conn.send({"kind": "ready"})
        await self._wait_for("go")
        started = time.monotonic()
        sem = asyncio.Semaphore(cfg.concurrency)
        sessions = [
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, local_addr=(host, 0)),
                timeout=aiohttp.ClientTimeout(total=cfg.timeout),
            )
            for host in cfg.source_hosts
        ]
        flusher = asyncio.create_task(self._flush_loop())
        try:
            await asyncio.gather(*(self._open(sessions, sem, k) for k in range(cfg.count)))
        finally:
            for session in sessions:
                await session.close()
        self.stats.expected_probes = self.connected
        self._flush()
        self.conn.send(
            {
                "kind": "connected",
                "connected": self.connected,
                "failed": self.failed,
                "errors": sorted(self.errors.items(), key=lambda kv: -kv[1])[:5],
                "started": started,
                "first_done": self.first_done,
                "last_done": self.last_done,
            }
        )
        await self._wait_for("stop")
        flusher.cancel()
        self._flush()
        s = self.stats
        self.conn.send(
            {
                "kind": "result",
                "received": s.probes,
                "last_ns": s.last_ns,
                "closed": s.closed,
                "close_codes": dict(s.close_codes),
                "other": s.other,
                "error_frames": s.error_frames,
                "protocol_errors": s.protocol_errors,
            }
        )
        for transport in self.transports:
            transport.abort()

    async def _open(self, sessions: list[Any], sem: asyncio.Semaphore, k: int) -> None:
        cfg = self.cfg
        i = cfg.first + k
        host_index = k % len(cfg.source_hosts)
        async with sem:
            try:
                async with asyncio.timeout(cfg.timeout):
                    body = {"user_id": f"idle-{i}"}
                    url = cfg.base_url + "/register"
                    async with sessions[host_index].post(url, json=body) as resp:
                        if resp.status != 200:
                            text = (await resp.text())[:100]
                            raise RuntimeError(f"register: HTTP {resp.status} {text}")
                        ws_url = (await resp.json())["url"]
                    ws = await self._connect(ws_url, cfg.source_hosts[host_index])
                    ack = ws.expect_ack()
                    ws.send_frame(0x1, json.dumps({"topics": [f"idle{i % cfg.topics}"]}).encode())
                    outcome = await ack
                    ws.ack = None
                    if outcome != "subscribed":
                        raise RuntimeError(outcome)
                self.connected += 1
                now = time.monotonic()
                self.first_done = self.first_done or now
                self.last_done = now
            except Exception as exc:
                self.failed += 1
                key = f"{type(exc).__name__}: {exc}"[:160]
                self.errors[key] = self.errors.get(key, 0) + 1

    async def _connect(self, url: str, host: str) -> RawWebSocket:
        from urllib.parse import urlsplit

        loop = asyncio.get_running_loop()
        parts = urlsplit(url)
        opened: asyncio.Future[None] = loop.create_future()
        transport, protocol = await loop.create_connection(
            lambda: RawWebSocket(url, self.stats, opened, json_mode=True),
            parts.hostname or "127.0.0.1",
            parts.port or 80,
            local_addr=(host, 0),
        )
        try:
            await opened
        except BaseException:
            transport.abort()
            raise
        self.transports.append(transport)
        protocol.request = b""  # the handshake request is not needed any more
        return protocol

    def _flush(self) -> None:
        self.stats.flush()
        self._set(CONNECTED, self.connected)
        self._set(FAILED, self.failed)
        self._set(CLOSED, self.stats.closed)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self._flush()

    async def _wait_for(self, command: str) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def readable() -> None:
            if self.conn.poll() and self.conn.recv() == command and not done.done():
                done.set_result(None)

        loop.add_reader(self.conn.fileno(), readable)
        try:
            await done
        finally:
            loop.remove_reader(self.conn.fileno())
            os.set_blocking(self.conn.fileno(), True)


def client_main(cfg: ClientConfig, conn: Any, counters: Any) -> None:
    import uvloop

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        uvloop.run(ClientProc(cfg, conn, counters).run())
    except Exception as exc:
        with contextlib.suppress(Exception):
            conn.send({"kind": "error", "error": f"{type(exc).__name__}: {exc}"})
        raise


# -- the servers ------------------------------------------------------------------------------


class Servers:
    """The private redis-server and the ``wsrelay serve --workers K`` process tree."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="bench-idle-")
        self.redis: subprocess.Popen[bytes] | None = None
        self.relay: subprocess.Popen[bytes] | None = None
        self.redis_port = 0
        self.port = 0

    def start(self) -> None:
        self.redis_port = free_port()
        argv = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", self.tmp]
        with open(Path(self.tmp) / "redis.log", "wb") as log:
            self.redis = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while self.redis_command("PING") != "+PONG":
            if time.monotonic() > deadline or self.redis.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        self.port = free_port()
        src = Path(self.args.wsrelay_src or REPO_ROOT / "src").resolve()
        env = {**os.environ, "PYTHONPATH": str(src), "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "wsrelay", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--workers", str(self.args.workers)]
        argv += ["--broker", f"redis://127.0.0.1:{self.redis_port}/0"]
        argv += ["--max-connections", str(self.args.max_connections)]
        if self.args.ping_interval is not None:
            argv += ["--ping-interval", str(self.args.ping_interval)]
        argv += self.args.wsrelay_arg
        self.argv = argv
        with open(Path(self.tmp) / "relay.log", "wb") as log:
            self.relay = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env
            )
        deadline = time.monotonic() + 60
        while True:
            listening = self.log().count("wsrelay listening on")
            if listening >= self.args.workers and self._ready():
                return
            if time.monotonic() > deadline or self.relay.poll() is not None:
                raise RuntimeError(f"wsrelay did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def log(self) -> str:
        return (Path(self.tmp) / "relay.log").read_text(errors="replace")

    def redis_command(self, command: str) -> str:
        """One inline command; the whole reply (a bulk reply's text without its length)."""
        try:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=5) as sock:
                sock.sendall(command.encode() + b"\r\n")
                data = b""
                while True:
                    chunk = sock.recv(65536)
                    data += chunk
                    if not chunk or _complete(data):
                        break
        except OSError:
            return ""
        text = data.decode(errors="replace")
        if text.startswith("$"):
            return text.split("\r\n", 1)[1]
        return text.strip()

    def redis_info(self) -> dict[str, str]:
        info = {}
        for line in self.redis_command("INFO").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                info[key] = value.strip()
        return info

    def relay_processes(self) -> list[psutil.Process]:
        """The supervisor and everything under it (the workers, the resource tracker)."""
        assert self.relay is not None
        parent = psutil.Process(self.relay.pid)
        return [parent, *parent.children(recursive=True)]

    def worker_processes(self) -> list[psutil.Process]:
        return [p for p in self.relay_processes() if "spawn_main" in " ".join(p.cmdline())]

    def stop(self) -> None:
        if self.relay is not None and self.relay.poll() is None:
            procs = self.relay_processes()
            self.relay.send_signal(signal.SIGTERM)
            try:
                self.relay.wait(30)
            except subprocess.TimeoutExpired:
                print("bench: the relay did not stop in 30 s: killed", file=sys.stderr)
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.relay.wait(5)
        if self.redis is not None and self.redis.poll() is None:
            self.redis.kill()
            self.redis.wait()
        if self.args.keep_logs:
            os.makedirs(self.args.keep_logs, exist_ok=True)
            for name in ("relay.log", "redis.log"):
                path = Path(self.tmp) / name
                if path.exists():
                    shutil.copy(path, Path(self.args.keep_logs) / name)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _complete(data: bytes) -> bool:
    if data.startswith(b"$"):
        head, _, rest = data.partition(b"\r\n")
        return len(rest) >= int(head[1:]) + 2
    return data.endswith(b"\r\n")


# -- the run ----------------------------------------------------------------------------------


def rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += int(p.memory_info().rss)
    return total


def cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += float(t.user + t.system)
    return total


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.servers = Servers(args)
        self.ctx = mp.get_context("spawn")
        n = args.client_procs
        self.counters: Any = self.ctx.Array("q", n * NCOUNTERS, lock=False)
        self.procs: list[Any] = []
        self.pipes: list[Any] = []
        self.m: dict[str, Any] = {}

    def total(self, column: int) -> int:
        n = self.args.client_procs
        return sum(self.counters[w * NCOUNTERS + column] for w in range(n))

    def show(self, text: str) -> None:
        print(f"[idle_many] {text}", file=sys.stderr, flush=True)

    def _start_clients(self) -> None:
        a = self.args
        n, procs = a.connections, a.client_procs
        bounds = [n * i // procs for i in range(procs + 1)]
        for i in range(procs):
            hosts = [
                f"127.0.0.{a.source_base + i * a.ips_per_proc + j}" for j in range(a.ips_per_proc)
            ]
            cfg = ClientConfig(
                index=i,
                base_url=f"http://127.0.0.1:{self.servers.port}",
                first=bounds[i],
                count=bounds[i + 1] - bounds[i],
                topics=a.topics,
                source_hosts=hosts,
                concurrency=a.concurrency,
                timeout=a.timeout,
            )
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(target=client_main, args=(cfg, child, self.counters))
            proc.start()
            self.procs.append(proc)
            self.pipes.append(parent)

    def _gather(self, kind: str, timeout: float, progress: bool = False) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = [{} for _ in self.pipes]
        pending = set(range(len(self.pipes)))
        deadline = time.monotonic() + timeout
        shown = 0.0
        while pending:
            for i in list(pending):
                if self.pipes[i].poll():
                    msg = self.pipes[i].recv()
                    if msg.get("kind") != kind:
                        raise RuntimeError(f"client process {i}: {msg}")
                    msgs[i] = msg
                    pending.discard(i)
                elif not self.procs[i].is_alive():
                    raise RuntimeError(f"client process {i} died ({self.procs[i].exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {kind}")
            if progress and time.monotonic() - shown > 5:
                shown = time.monotonic()
                self.show(
                    f"connected {self.total(CONNECTED)}/{self.args.connections} "
                    f"(failed {self.total(FAILED)}), load {load_average()}"
                )
            time.sleep(0.02)
        return msgs

    def _memory(self, label: str) -> None:
        relay = self.servers.relay_processes()
        workers = self.servers.worker_processes()
        assert self.servers.redis is not None
        redis_proc = psutil.Process(self.servers.redis.pid)
        clients = [psutil.Process(p.pid) for p in self.procs]
        m = self.m
        m[f"server_rss_{label}_mb"] = rss(relay) / 2**20
        m[f"server_rss_each_{label}_mb"] = [round(rss([p]) / 2**20, 1) for p in relay]
        m[f"worker_open_files_{label}"] = [p.num_fds() for p in workers]
        m[f"redis_rss_{label}_mb"] = rss([redis_proc]) / 2**20
        info = self.servers.redis_info()
        m[f"redis_used_memory_{label}_mb"] = int(info.get("used_memory", 0)) / 2**20
        m[f"redis_keys_{label}"] = self.servers.redis_command("DBSIZE").lstrip(":")
        m[f"client_rss_{label}_mb"] = rss(clients) / 2**20

    def execute(self) -> dict[str, Any]:
        a, m = self.args, self.m
        m["load_average_start"] = load_average()
        self.servers.start()
        relay = self.servers.relay_processes()
        m["server_processes"] = len(relay)
        m["server_rss_empty_mb"] = rss(relay) / 2**20
        self.show(
            f"wsrelay on :{self.servers.port} ({a.workers} workers, "
            f"{m['server_rss_empty_mb']:.1f} MB), redis on :{self.servers.redis_port}"
        )
        self._start_clients()
        self._gather("ready", 60)
        assert self.servers.redis is not None
        redis_proc = [psutil.Process(self.servers.redis.pid)]
        clients = [psutil.Process(p.pid) for p in self.procs]
        c0 = (cpu(relay), cpu(redis_proc), cpu(clients))
        t0 = time.monotonic()
        for pipe in self.pipes:
            pipe.send("go")
        msgs = self._gather("connected", a.timeout * 4 + a.connections / 100, progress=True)
        c1 = (cpu(relay), cpu(redis_proc), cpu(clients))
        connected = sum(msg["connected"] for msg in msgs)
        failed = sum(msg["failed"] for msg in msgs)
        m["connected"] = connected
        m["failed"] = failed
        m["errors"] = [e for msg in msgs for e in msg["errors"]][:10]
        m["connect_all_s"] = max(msg["last_done"] for msg in msgs) - t0
        m["connections_per_s"] = connected / m["connect_all_s"] if m["connect_all_s"] else None
        # CPU seconds spent while connecting (until the last client reported), per connection
        for k, name in enumerate(("server", "redis", "client")):
            m[f"{name}_cpu_connect_ms_per_connection"] = (
                (c1[k] - c0[k]) * 1e3 / connected if connected else None
            )
            m[f"{name}_cpu_connect_cores"] = (c1[k] - c0[k]) / (time.monotonic() - t0)
        m["load_average_connected"] = load_average()
        self.show(
            f"connected {connected}/{a.connections} (failed {failed}) in "
            f"{m['connect_all_s']:.1f} s; load {m['load_average_connected']}"
        )
        time.sleep(2)
        self._memory("connected")
        self.show(f"holding {connected} idle connections for {a.hold:g} s")
        c0 = (cpu(relay), cpu(redis_proc), cpu(clients))
        time.sleep(a.hold)
        c1 = (cpu(relay), cpu(redis_proc), cpu(clients))
        m["server_cpu_idle"] = (c1[0] - c0[0]) / a.hold
        m["redis_cpu_idle"] = (c1[1] - c0[1]) / a.hold
        m["client_cpu_idle"] = (c1[2] - c0[2]) / a.hold
        m["closed_during_hold"] = self.total(CLOSED)
        self._memory("held")
        with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
            url = f"http://127.0.0.1:{self.servers.port}/stats"
            with urllib.request.urlopen(url, timeout=5) as resp:
                stats = json.load(resp)
            m["stats_connections"] = stats.get("connections")
            m["stats_workers"] = stats.get("workers")
        # Publish one message per topic; every connection is on one of them.
        self.show(f"publishing one message to each of {a.topics} topic(s)")
        first_ns = time.time_ns()
        recipients = []
        for t in range(a.topics):
            text = f"p:{time.time_ns()}:" + "x" * 64
            body = json.dumps({"topic": f"idle{t}", "message": text}).encode()
            req = urllib.request.Request(
                f"http://127.0.0.1:{self.servers.port}/publish",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                recipients.append(json.load(resp).get("recipients"))
        m["publish_http_s"] = (time.time_ns() - first_ns) / 1e9
        m["publish_recipients"] = recipients
        deadline = time.monotonic() + a.deliver_timeout
        while self.total(PROBES) < connected and time.monotonic() < deadline:
            time.sleep(0.005)
        last_ns = max(self.counters[w * NCOUNTERS + LAST_RECV_NS] for w in range(a.client_procs))
        for pipe in self.pipes:
            pipe.send("stop")
        results = self._gather("result", 60)
        received = sum(r["received"] for r in results)
        last_ns = max([last_ns] + [r["last_ns"] for r in results])
        m["delivered"] = received
        m["lost"] = connected - received
        m["deliver_all_s"] = (last_ns - first_ns) / 1e9 if received else None
        m["closed_by_server"] = sum(r["closed"] for r in results)
        codes: dict[str, int] = {}
        for r in results:
            for code, count in r["close_codes"].items():
                codes[str(code)] = codes.get(str(code), 0) + count
        m["close_codes"] = codes
        m["other_frames"] = sum(r["other"] + r["error_frames"] for r in results)
        m["load_average_end"] = load_average()
        m["server_rss_per_connection_kib"] = (
            (m["server_rss_held_mb"] - m["server_rss_empty_mb"]) * 1024 / connected
            if connected
            else None
        )
        m["client_rss_per_connection_kib"] = (
            m["client_rss_held_mb"] * 1024 / connected if connected else None
        )
        return m

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send("stop")
        self.servers.stop()
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()


def report(m: dict[str, Any], args: argparse.Namespace) -> str:
    def f(value: Any, spec: str = ",.1f") -> str:
        return "-" if value is None else format(value, spec)

    rows = [
        (
            "connections asked / established / failed",
            f"{args.connections:,} / {m['connected']:,} / {m['failed']:,}",
        ),
        (
            "time to connect all (register, upgrade, subscribe) s",
            f"{f(m['connect_all_s'], '.1f')} ({f(m['connections_per_s'], ',.0f')}/s)",
        ),
        (
            "CPU while connecting, ms per connection: server / redis / clients",
            " / ".join(
                f(m[f"{x}_cpu_connect_ms_per_connection"], ".2f")
                for x in ("server", "redis", "client")
            ),
        ),
        (
            "CPU while connecting, cores busy: server / redis / clients",
            " / ".join(
                f(m[f"{x}_cpu_connect_cores"], ".2f") for x in ("server", "redis", "client")
            ),
        ),
        ("server processes (supervisor, resource tracker, workers)", str(m["server_processes"])),
        (
            "open files per worker after connecting",
            ", ".join(f"{x:,}" for x in m["worker_open_files_connected"]),
        ),
        ("server RSS before connecting MB", f(m["server_rss_empty_mb"])),
        (
            "server RSS connected / after the hold MB",
            f"{f(m['server_rss_connected_mb'])} / {f(m['server_rss_held_mb'])}",
        ),
        (
            "server RSS per process after the hold MB",
            ", ".join(f"{x:.1f}" for x in m["server_rss_each_held_mb"]),
        ),
        (
            "server RSS per connection KiB ((held - empty) / connections)",
            f(m["server_rss_per_connection_kib"], ".2f"),
        ),
        (
            "redis-server RSS / used_memory after the hold MB",
            f"{f(m['redis_rss_held_mb'])} / {f(m['redis_used_memory_held_mb'])}",
        ),
        ("redis keys after the hold", str(m["redis_keys_held"])),
        (
            "client processes RSS after the hold MB (KiB per connection)",
            f"{f(m['client_rss_held_mb'])} ({f(m['client_rss_per_connection_kib'], '.2f')})",
        ),
        (f"server CPU while idle ({args.hold:g} s hold), cores", f(m["server_cpu_idle"], ".3f")),
        (
            "redis-server / clients CPU while idle, cores",
            f"{f(m['redis_cpu_idle'], '.3f')} / {f(m['client_cpu_idle'], '.3f')}",
        ),
        ("closed by the server during the run", f"{m['closed_by_server']:,} {m['close_codes']}"),
        (
            "/stats connections (workers)",
            f"{m.get('stats_connections')} ({m.get('stats_workers')})",
        ),
        (
            "messages published (topics) / recipients in the answer (its worker's)",
            f"{args.topics} / {m['publish_recipients']}",
        ),
        ("delivered / lost", f"{m['delivered']:,} / {m['lost']:,}"),
        ("time to deliver to all s (publish -> last receipt)", f(m["deliver_all_s"], ".3f")),
        (
            "load average start / connected / end",
            f"{m['load_average_start']} / {m['load_average_connected']} / {m['load_average_end']}",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'metric':<{width}} | value |", f"| {'-' * width} | --- |"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    if m["errors"]:
        lines.append(f"errors: {m['errors']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = hard if hard != resource.RLIM_INFINITY else 1 << 20
    p = argparse.ArgumentParser(
        prog="python bench/idle_many.py",
        description="Many idle WebSocket connections to `wsrelay serve --workers K` on a "
        "private Redis: RSS, time to connect, one message to all (see the docstring).",
    )
    p.add_argument("--connections", type=int, default=50000, help="WebSockets (default 50000)")
    p.add_argument(
        "--workers",
        type=int,
        help="wsrelay server processes (--workers); default: the fewest that hold the "
        f"connections within the open-files limit ({hard}) with 10%% to spare, at least 2",
    )
    p.add_argument(
        "--client-procs",
        type=int,
        help="client processes (default: one per 12,500 connections, at least 2)",
    )
    p.add_argument("--ips-per-proc", type=int, default=1, help="source addresses per process")
    p.add_argument(
        "--source-base",
        type=int,
        help="last octet of the first source address 127.0.0.x (default: changes every run)",
    )
    p.add_argument("--concurrency", type=int, default=100, help="clients in flight per process")
    p.add_argument("--topics", type=int, default=1, help="topics the clients are spread over")
    p.add_argument("--hold", type=float, default=30.0, help="idle seconds before publishing")
    p.add_argument(
        "--ping-interval",
        type=float,
        help="wsrelay's --ping-interval (default: wsrelay's own, 25 s)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=hard - SERVER_LIMIT_SPARE,
        help=f"wsrelay's --max-connections per process (default {hard - SERVER_LIMIT_SPARE}: "
        "the open-files hard limit less 200)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="per client: register + connect")
    p.add_argument(
        "--deliver-timeout", type=float, default=60.0, help="longest wait for the deliveries"
    )
    p.add_argument("--wsrelay-src", metavar="DIR", help="src/ directory to run (default src/)")
    p.add_argument(
        "--wsrelay-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `wsrelay serve` option (repeatable): --wsrelay-arg=--broker-pool-size=20",
    )
    p.add_argument("--json-out", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--keep-logs", metavar="DIR", help="copy the relay's and Redis's logs here")
    args = p.parse_args(argv)
    n = args.connections
    if args.workers is None:
        args.workers = max(2, math.ceil(n * 1.1 / args.max_connections))
    if args.client_procs is None:
        args.client_procs = max(2, math.ceil(n / 12500))
    per_proc = math.ceil(n / args.client_procs)
    if per_proc + 200 > hard:
        p.error(f"{per_proc} connections per client process exceed the open-files limit {hard}")
    if n / args.workers > args.max_connections:
        p.error(f"{n} connections over {args.workers} workers exceed --max-connections")
    if args.source_base is None:
        args.source_base = 2 + (int(time.time()) // 10 * 16) % 200
    if args.source_base + args.client_procs * args.ips_per_proc > 255:
        p.error("too many source addresses for 127.0.0.x: lower --source-base")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(
        f"bench: {args.connections} connections, wsrelay --workers {args.workers} "
        f"(--max-connections {args.max_connections} each), {args.client_procs} client "
        f"processes from 127.0.0.{args.source_base} on, "
        f"{args.topics} topic(s), hold {args.hold:g} s",
        file=sys.stderr,
    )
    run = Run(args)
    try:
        m = run.execute()
    finally:
        run.stop()
    m["command"] = " ".join(["python bench/idle_many.py", *(argv or sys.argv[1:])])
    m["server_argv"] = run.servers.argv[1:] if hasattr(run.servers, "argv") else None
    print(report(m, args))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(m, f, indent=2)
    return 0 if m["lost"] == 0 and m["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
