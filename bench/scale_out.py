"""Scale-out on Redis: deliveries per second of one node against two (issue 15).

    python bench/scale_out.py --nodes 1,2 --subscribers 4000 --duration 5 --repeat 3 \
        --quiet-wait 300 --max-others 0.3

Issue 15 asks that two nodes on Redis deliver at least 1.8x the messages per second of one.
``bench/fanout.py --targets wsrelay-redis1,wsrelay-redis`` cannot show that: with ``--pin``
it puts every node and Redis on the same core (so two nodes share what one had), without it
the nodes, Redis and the clients share the cores freely, it publishes only to the first node,
and its publisher is open loop (a fixed number of messages with K in flight), so a run is
either limited by the publisher or too short to be a rate. This script runs the experiment
where a node's CPU is the limit:

* A private ``redis-server`` (free port, no persistence) and N ``python -m wsrelay serve
  --broker redis://...`` nodes, each its own process on its own port (as N machines would
  be), with ``--ping-interval 0`` (no pings: the clients count bytes, see below) and
  ``--max-connections`` raised to the subscriber count.
* ``--subscribers`` S WebSockets, spread evenly over the nodes, from ``--client-procs``
  processes (each on its own loopback source address, 127.0.0.x). Subscriber ``j`` registers
  on topic ``t<j % T>`` (``POST /register {"user_id", "topics"}``: subscribed at the 101) and
  connects with ``?format=raw``. The subscribers do not parse frames: every message has the
  same size, so a subscriber's deliveries are its bytes / the frame's size (``--size`` + 2).
  That keeps the client side cheap (one ``recv`` and a few Python operations per read, however
  many frames it holds), so that the nodes, not the clients, are the limit. At the end every
  connection's byte count is checked: a multiple of the frame, and exactly the messages
  published to its topic (0 lost, none extra).
* The publisher (this process, aiohttp, keep-alive) sends ``POST /publish/batch`` requests of
  ``--batch`` messages (message ``k`` to topic ``t<k % T>``) to the nodes in turn (so each node
  takes the same share of the HTTP publishes), ``--requests`` of them in flight, closed loop:
  it never has more than ``--window`` messages published but not yet delivered to every
  subscriber, so no outbox (``--outbox-limit``, 1 MiB) nor Redis's pub/sub output buffer
  overflows, and the nodes always have work queued.
* A run: connect, warm up (``--warmup`` s of publishing, then everything delivered), then
  ``--duration`` s of publishing; deliveries/s is the deliveries counted by the subscribers
  between the start and the end of that window / its length. Then publishing stops, and the
  bench waits until every subscriber has every message. CPU time of every node, Redis, the
  client processes and the publisher over the window come from psutil.

Pinning (``--pin``, on a 2-core machine): ``nodes`` (default) pins node ``i`` to CPU ``i``;
Redis, the client processes and the publisher go on the CPUs no node holds, or anywhere when
the nodes hold them all. So one node gets a core of its own and everything else the other
core; two nodes get a core each, and Redis, the clients and the publisher share the two cores
with them: the two-node runs carry the whole client side on the nodes' cores, which the
one-node runs do not. ``none``: no pinning at all. ``--repeat R`` alternates the
configurations (1, 2, 1, 2, ...) and the table shows medians and each run's figures.

A shared machine: the table shows each core's use and the CPU that processes other than this
bench's took during each run's window. Two nodes fill both cores, so whatever else runs takes
from them directly, where one node leaves most of a core free to absorb it: other load
lowers the two-node figure more. ``--quiet-wait S`` waits (up to S s) before each run until
others use less than ``--quiet-below`` cores, and ``--max-others C`` runs again (up to
``--retries`` times) a run in which they used more than C cores during the window; the
discarded runs are listed under the table and kept in the JSON.

``--node-cpu F`` caps each node at F of a core with a cgroup (v1 ``cpu`` controller, CFS
quota in 10 ms periods, root only; the cgroups are removed at the end), so that one node and
two nodes have the same CPU per node and the clients have spare CPU in both. It does not
shield a node from its neighbours, though: under other load a capped node still got its 50%
but spent 0.5 to 1.3 us per delivery (caches and the core's state shared with the others),
so it needs a quiet machine just as much.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import psutil

from servers import REPO_ROOT, free_port

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")  # cgroup v1 cpu controller (--node-cpu)
CFS_PERIOD_US = 10000

# Columns of the shared counters, one row per client process.
BYTES, CONNECTED, FAILED, CLOSED = range(4)
NCOLS = 4


def frame_size(size: int) -> int:
    """Bytes of one unmasked server text frame carrying ``size`` bytes."""
    return size + (2 if size < 126 else 4 if size < 65536 else 10)


def make_message(seq: int, size: int) -> str:
    head = f"{seq}:"
    return head + "x" * (size - len(head))


# -- subscribers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientConfig:
    index: int
    node_url: str
    user_ids: list[int]
    topics: list[str]
    source_host: str
    concurrency: int
    cpus: frozenset[int] | None


class Tally:
    """Bytes received by all the subscribers of one process."""

    __slots__ = ("nbytes",)

    def __init__(self) -> None:
        self.nbytes = 0


class ByteCounter(asyncio.Protocol):
    """A WebSocket subscriber that counts the bytes after the 101 and nothing else."""

    __slots__ = (
        "buf",
        "counters",
        "is_open",
        "nbytes",
        "opened",
        "request",
        "row",
        "tally",
        "topic",
        "transport",
    )

    def __init__(
        self,
        url: str,
        opened: asyncio.Future[None],
        counters: Any,
        row: int,
        topic: int,
        tally: Tally,
    ) -> None:
        parts = urlsplit(url)
        target = parts.path + ("?" + parts.query if parts.query else "")
        self.request = (
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ).encode()
        self.opened = opened
        self.counters = counters
        self.row = row
        self.tally = tally
        self.topic = topic
        self.transport: asyncio.Transport | None = None
        self.is_open = False
        self.buf = b""
        self.nbytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)
        self.request = b""

    def data_received(self, data: bytes) -> None:
        if not self.is_open:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.buf.split(b"\r\n", 1)[0]
            data, self.buf = self.buf[end + 4 :], b""
            if b" 101 " not in status:
                self.opened.set_exception(ConnectionError(status.decode(errors="replace")))
                assert self.transport is not None
                self.transport.close()
                return
            self.is_open = True
            self.opened.set_result(None)
            if not data:
                return
        n = len(data)
        self.nbytes += n
        self.tally.nbytes += n  # the process's total, copied to the shared counters every 2 ms

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        elif self.is_open:
            self.counters[self.row * NCOLS + CLOSED] += 1
        self.is_open = False


async def _client(cfg: ClientConfig, conn: Any, counters: Any) -> None:
    import aiohttp

    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(cfg.concurrency)
    subscribers: list[ByteCounter] = []
    errors: Counter[str] = Counter()
    base = cfg.index * NCOLS
    tally = Tally()

    async def flush() -> None:
        while True:
            counters[base + BYTES] = tally.nbytes
            await asyncio.sleep(0.002)

    flusher = asyncio.create_task(flush())
    parts = urlsplit(cfg.node_url)
    connector = aiohttp.TCPConnector(limit=0, local_addr=(cfg.source_host, 0))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(user: int, topic: str) -> None:
            async with sem:
                try:
                    body = {"user_id": f"s{user}", "topics": [topic]}
                    async with session.post(cfg.node_url + "/register", json=body) as resp:
                        resp.raise_for_status()
                        url = (await resp.json())["url"] + "?format=raw"
                    opened: asyncio.Future[None] = loop.create_future()
                    row = cfg.index
                    _, sub = await loop.create_connection(
                        lambda: ByteCounter(url, opened, counters, row, int(topic[1:]), tally),
                        parts.hostname,
                        parts.port,
                        local_addr=(cfg.source_host, 0),
                    )
                    async with asyncio.timeout(30):
                        await opened
                    subscribers.append(sub)
                    counters[base + CONNECTED] += 1
                except Exception as exc:
                    counters[base + FAILED] += 1
                    errors[f"{type(exc).__name__}: {exc}"[:160]] += 1

        await asyncio.gather(*(one(u, t) for u, t in zip(cfg.user_ids, cfg.topics, strict=True)))
    conn.send({"kind": "connected", "errors": errors.most_common(5)})
    stop = loop.create_future()

    def readable() -> None:
        if conn.poll() and conn.recv() == "stop" and not stop.done():
            stop.set_result(None)

    loop.add_reader(conn.fileno(), readable)
    await stop
    loop.remove_reader(conn.fileno())
    os.set_blocking(conn.fileno(), True)
    flusher.cancel()
    counters[base + BYTES] = tally.nbytes
    conn.send({"kind": "result", "bytes": [(s.topic, s.nbytes) for s in subscribers]})
    for sub in subscribers:
        sub.is_open = False  # closed here, not by the node: not counted as closed
        if sub.transport is not None:
            sub.transport.abort()


def client_main(cfg: ClientConfig, conn: Any, counters: Any) -> None:
    import uvloop

    if cfg.cpus:
        os.sched_setaffinity(0, cfg.cpus)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        uvloop.run(_client(cfg, conn, counters))
    except Exception as exc:
        with contextlib.suppress(Exception):
            conn.send({"kind": "error", "error": f"{type(exc).__name__}: {exc}"})
        raise


# -- servers -------------------------------------------------------------------------------------


class Cluster:
    """A private redis-server and ``nodes`` wsrelay processes on it."""

    def __init__(self, args: argparse.Namespace, nodes: int) -> None:
        self.args = args
        self.nodes = nodes
        self.tmp = tempfile.mkdtemp(prefix="bench-scale-")
        self.redis: subprocess.Popen[bytes] | None = None
        self.relays: list[subprocess.Popen[bytes]] = []
        self.urls: list[str] = []
        self.cgroups: list[Path] = []
        cpus = sorted(os.sched_getaffinity(0))
        self.node_cpus: list[frozenset[int] | None] = [None] * nodes
        self.other_cpus: frozenset[int] | None = None
        if args.pin == "nodes":
            self.node_cpus = [frozenset([cpus[i % len(cpus)]]) for i in range(nodes)]
            held = set().union(*(c for c in self.node_cpus if c))
            self.other_cpus = frozenset(set(cpus) - held) or frozenset(cpus)

    def _popen(
        self,
        argv: list[str],
        name: str,
        cpus: frozenset[int] | None,
        env: Any = None,
        cgroup: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        log = open(Path(self.tmp) / f"{name}.log", "wb")  # noqa: SIM115 (closed with the dir)

        def before_exec() -> None:  # in the child: pinned and in its cgroup before it starts
            if cpus:
                os.sched_setaffinity(0, cpus)
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO_ROOT,
            preexec_fn=before_exec if cpus or cgroup else None,
        )

    def _cgroup(self, i: int) -> Path | None:
        """``--node-cpu F``: a cgroup (v1 ``cpu`` controller) that lets node ``i`` use at most F
        of a core (CFS quota, 10 ms periods), with 10x the default weight, so that other
        processes on its core do not take its share either."""
        if not self.args.node_cpu:
            return None
        path = CGROUP_CPU / f"wsrelay-bench-{os.getpid()}-node{i}"
        path.mkdir()
        self.cgroups.append(path)
        (path / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (path / "cpu.cfs_quota_us").write_text(str(int(self.args.node_cpu * CFS_PERIOD_US)))
        (path / "cpu.shares").write_text("10240")
        return path

    def throttled(self) -> list[tuple[int, int]]:
        """(CFS periods, periods throttled) of each node's cgroup so far."""
        out = []
        for path in self.cgroups:
            stat = dict(line.split() for line in (path / "cpu.stat").read_text().splitlines())
            out.append((int(stat["nr_periods"]), int(stat["nr_throttled"])))
        return out

    def start(self) -> None:
        port = free_port()
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", self.tmp]
        self.redis = self._popen(argv, "redis", self.other_cpus)
        deadline = time.monotonic() + 20
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=1) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    break
            if time.monotonic() > deadline or self.redis.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        src = Path(self.args.wsrelay_src or REPO_ROOT / "src").resolve()
        env = {**os.environ, "PYTHONPATH": str(src), "PYTHONUNBUFFERED": "1"}
        for i in range(self.nodes):
            node_port = free_port()
            argv = [sys.executable, "-m", "wsrelay", "serve", "--host", "127.0.0.1"]
            argv += ["--port", str(node_port), "--broker", f"redis://127.0.0.1:{port}/0"]
            argv += ["--ping-interval", "0"]
            argv += ["--max-connections", str(self.args.subscribers + 100)]
            argv += self.args.wsrelay_arg
            cgroup = self._cgroup(i)
            self.relays.append(self._popen(argv, f"node{i}", self.node_cpus[i], env, cgroup))
            self.urls.append(f"http://127.0.0.1:{node_port}")
        deadline = time.monotonic() + 60
        for url, proc in zip(self.urls, self.relays, strict=True):
            while True:
                with (
                    contextlib.suppress(OSError, urllib.error.URLError),
                    urllib.request.urlopen(url + "/ready", timeout=2) as resp,
                ):
                    if resp.status == 200:
                        break
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"node {url} did not start:\n{self.log_tail()}")
                time.sleep(0.1)

    def log_tail(self) -> str:
        out = []
        for path in sorted(Path(self.tmp).glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-10:]
            out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def log_warnings(self) -> list[str]:
        found = []
        for path in sorted(Path(self.tmp).glob("node*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if " WARNING " in line or " ERROR " in line or "Traceback" in line:
                    found.append(f"{path.stem}: {line[:200]}")
        return found[:10]

    def stop(self) -> None:
        procs = [*self.relays, *([self.redis] if self.redis else [])]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for path in self.cgroups:
            with contextlib.suppress(OSError):
                path.rmdir()
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- one run -------------------------------------------------------------------------------------


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += float(t.user + t.system)
    return total


class Run:
    def __init__(self, args: argparse.Namespace, nodes: int, index: int) -> None:
        self.args = args
        self.nodes = nodes
        self.index = index
        self.cluster = Cluster(args, nodes)
        self.ctx = mp.get_context("spawn")
        self.nprocs = args.client_procs
        self.counters: Any = self.ctx.Array("q", self.nprocs * NCOLS, lock=False)
        self.procs: list[Any] = []
        self.pipes: list[Any] = []
        self.frame = frame_size(args.size)
        self.per_message = args.subscribers // args.topics  # subscribers of each topic
        self.published = 0  # messages sent (requests may still be in flight)
        self.answered = 0  # messages in answered requests
        self.errors: Counter[str] = Counter()

    def col(self, column: int) -> int:
        return sum(self.counters[i * NCOLS + column] for i in range(self.nprocs))

    def delivered(self) -> int:
        return self.col(BYTES) // self.frame

    def _start_clients(self) -> None:
        a = self.args
        n = a.subscribers
        bounds = [n * i // self.nprocs for i in range(self.nprocs + 1)]
        for i in range(self.nprocs):
            ids = list(range(bounds[i], bounds[i + 1]))
            octet = a.source_base + (self.index * self.nprocs + i) % (250 - a.source_base)
            cfg = ClientConfig(
                index=i,
                node_url=self.cluster.urls[i % self.nodes],
                user_ids=ids,
                topics=[f"t{j % a.topics}" for j in ids],
                source_host=f"127.0.0.{octet}",
                concurrency=100,
                cpus=self.cluster.other_cpus,
            )
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(target=client_main, args=(cfg, child, self.counters))
            proc.start()
            self.procs.append(proc)
            self.pipes.append(parent)

    def _gather(self, kind: str, timeout: float) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = [{} for _ in self.pipes]
        pending = set(range(len(self.pipes)))
        deadline = time.monotonic() + timeout
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
            time.sleep(0.02)
        return msgs

    async def _publish(self, session: Any, until: float) -> None:
        """Publish until ``until`` (loop time), at most ``--window`` messages undelivered."""
        a = self.args
        loop = asyncio.get_running_loop()
        batches = 0

        async def lane() -> None:
            nonlocal batches
            while loop.time() < until:
                if self.published - self.delivered() // self.per_message + a.batch > a.window:
                    await asyncio.sleep(0.0005)
                    continue
                first = self.published
                self.published += a.batch
                url = self.cluster.urls[batches % self.nodes] + "/publish/batch"
                batches += 1
                messages = [
                    {"topic": f"t{k % a.topics}", "message": make_message(k, a.size)}
                    for k in range(first, first + a.batch)
                ]
                try:
                    async with session.post(url, json={"messages": messages}) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"HTTP {resp.status}")
                    self.answered += a.batch
                except Exception as exc:
                    self.errors[f"{type(exc).__name__}: {exc}"[:160]] += 1

        await asyncio.gather(*(lane() for _ in range(a.requests)))

    async def _drain(self, timeout: float) -> bool:
        """Until every published message reached every subscriber of its topic."""
        goal = self.answered * self.per_message
        last, last_change = -1, time.monotonic()
        while True:
            got = self.delivered()
            if got >= goal:
                return True
            now = time.monotonic()
            if got != last:
                last, last_change = got, now
            elif now - last_change > timeout:
                return False
            await asyncio.sleep(0.01)

    async def _measure(self) -> dict[str, Any]:
        import aiohttp

        a, m = self.args, {}
        loop = asyncio.get_running_loop()
        nodes = [psutil.Process(p.pid) for p in self.cluster.relays]
        assert self.cluster.redis is not None
        redis = [psutil.Process(self.cluster.redis.pid)]
        clients = [psutil.Process(p.pid) for p in self.procs]
        me = [psutil.Process()]
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            # Warm-up: publish, then wait until everything is delivered.
            await self._publish(session, loop.time() + a.warmup)
            if not await self._drain(a.drain_timeout):
                raise RuntimeError(
                    f"warm-up: {self.delivered()}/{self.answered * self.per_message} delivered"
                )
            m0 = psutil.cpu_times(percpu=True)
            th0 = self.cluster.throttled()
            t0, d0 = time.monotonic(), self.delivered()
            p0 = self.answered
            c0 = [cpu_seconds([n]) for n in nodes] + [cpu_seconds(x) for x in (redis, clients, me)]
            task = asyncio.create_task(self._publish(session, loop.time() + a.duration))
            backlog: list[float] = []  # messages published but not yet delivered to all
            end = loop.time() + a.duration
            while loop.time() < end:
                await asyncio.sleep(min(0.05, max(0.0, end - loop.time())))
                backlog.append(self.published - self.delivered() / self.per_message)
            t1, d1 = time.monotonic(), self.delivered()
            c1 = [cpu_seconds([n]) for n in nodes] + [cpu_seconds(x) for x in (redis, clients, me)]
            m1 = psutil.cpu_times(percpu=True)
            th1 = self.cluster.throttled()
            await task
            p1 = self.answered
            drained = await self._drain(a.drain_timeout)
        wall = t1 - t0
        deliveries = d1 - d0
        cpu = [(y - x) / wall for x, y in zip(c0, c1, strict=True)]
        node_cpu = cpu[: self.nodes]
        m["deliveries_per_s"] = deliveries / wall
        m["messages_published_per_s"] = (p1 - p0) / wall
        m["node_cpu_busy"] = node_cpu
        m["node_cpu_us_per_delivery"] = sum(node_cpu) * 1e6 / m["deliveries_per_s"]
        m["redis_cpu_busy"], m["clients_cpu_busy"], m["publisher_cpu_busy"] = cpu[self.nodes :]
        m["clients_cpu_us_per_delivery"] = m["clients_cpu_busy"] * 1e6 / m["deliveries_per_s"]
        m["window_s"] = wall
        # --node-cpu: the share of CFS periods in which each node used up its quota
        m["node_throttled"] = [
            (b[1] - a_[1]) / (b[0] - a_[0]) if b[0] > a_[0] else 0.0
            for a_, b in zip(th0, th1, strict=True)
        ]
        # The whole machine over the window: each core's busy share, and what processes other
        # than this bench's took (other agents, the system): the noise on a shared machine.
        busy = []
        for x, y in zip(m0, m1, strict=True):
            idle = (y.idle + y.iowait) - (x.idle + x.iowait)
            total = sum(y) - sum(x)
            busy.append((total - idle) / total if total else 0.0)
        m["core_busy"] = busy
        machine = (
            sum(
                sum(y) - sum(x) - (y.idle + y.iowait - x.idle - x.iowait)
                for x, y in zip(m0, m1, strict=True)
            )
            / wall
        )
        m["others_cpu_busy"] = max(0.0, machine - sum(cpu))
        m["backlog_messages"] = statistics.mean(backlog) if backlog else 0.0
        # Little's law: the time a message waits, publish to the last subscriber, on average
        m["backlog_ms"] = m["backlog_messages"] * self.per_message / m["deliveries_per_s"] * 1e3
        m["drained"] = drained
        return m

    def execute(self) -> dict[str, Any]:
        a = self.args
        m: dict[str, Any] = {"nodes": self.nodes, "load_average_start": os.getloadavg()}
        self.cluster.start()
        try:
            self._start_clients()
            msgs = self._gather("connected", 300)
            m["connected"] = self.col(CONNECTED)
            m["failed"] = self.col(FAILED)
            if m["failed"]:
                raise RuntimeError(f"{m['failed']} subscribers failed: {msgs[0]['errors']}")
            import uvloop

            m |= uvloop.run(self._measure())
            for pipe in self.pipes:
                pipe.send("stop")
            results = self._gather("result", 60)
            # every subscriber must hold exactly the messages answered for its topic
            answered = self.answered
            want = [answered // a.topics + (t < answered % a.topics) for t in range(a.topics)]
            lost = extra = partial = received = subscribers = 0
            for r in results:
                for topic, nbytes in r["bytes"]:
                    got, rest = divmod(nbytes, self.frame)
                    subscribers += 1
                    received += got
                    partial += rest != 0
                    lost += max(0, want[topic] - got)
                    extra += max(0, got - want[topic])
            m["subscribers"] = subscribers
            m["messages_published"] = answered
            m["deliveries_expected"] = sum(want) * self.per_message
            m["deliveries_received"] = received
            m["lost"] = lost
            m["extra"] = extra
            m["not_whole_frames"] = partial
            m["closed_by_server"] = self.col(CLOSED)
            m["publish_errors"] = dict(self.errors)
            m["node_log_warnings"] = self.cluster.log_warnings()
            m["load_average_end"] = os.getloadavg()
        finally:
            for pipe in self.pipes:
                with contextlib.suppress(OSError):
                    pipe.send("stop")
            for proc in self.procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
            self.cluster.stop()
        return m


# -- report --------------------------------------------------------------------------------------


def table(runs: dict[int, list[dict[str, Any]]]) -> str:
    configs = sorted(runs)
    base = configs[0]

    def med(n: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[n])

    rows: list[tuple[str, list[str]]] = []
    dps = {n: med(n, "deliveries_per_s") for n in configs}
    rows.append(
        (
            "deliveries/s (median)",
            [
                f"{dps[n]:,.0f}" + (f" ({dps[n] / dps[base]:.2f}x)" if n != base else "")
                for n in configs
            ],
        )
    )
    rows.append(
        (
            "deliveries/s, each run",
            [", ".join(f"{r['deliveries_per_s']:,.0f}" for r in runs[n]) for n in configs],
        )
    )
    rows.append(
        (
            "messages published/s (median)",
            [f"{med(n, 'messages_published_per_s'):,.0f}" for n in configs],
        )
    )
    rows.append(
        (
            "messages in flight (mean) / as time, ms",
            [f"{med(n, 'backlog_messages'):,.0f} / {med(n, 'backlog_ms'):,.0f}" for n in configs],
        )
    )
    rows.append(
        (
            "node CPU busy, each node (median)",
            [
                ", ".join(
                    f"{statistics.median(r['node_cpu_busy'][i] for r in runs[n]):.0%}"
                    for i in range(n)
                )
                for n in configs
            ],
        )
    )
    if any(r["node_throttled"] for rs in runs.values() for r in rs):
        rows.append(
            (
                "CFS periods throttled, each node (median)",
                [
                    ", ".join(
                        f"{statistics.median(r['node_throttled'][i] for r in runs[n]):.0%}"
                        for i in range(n)
                    )
                    for n in configs
                ],
            )
        )
    rows.append(
        (
            "node CPU us/delivery (all nodes)",
            [f"{med(n, 'node_cpu_us_per_delivery'):.2f}" for n in configs],
        )
    )
    for key, label in (
        ("redis_cpu_busy", "redis-server CPU busy"),
        ("clients_cpu_busy", "subscriber processes CPU busy (all)"),
        ("publisher_cpu_busy", "publisher CPU busy"),
    ):
        rows.append((label, [f"{med(n, key):.0%}" for n in configs]))
    rows.append(
        (
            "each core busy (whole machine, median)",
            [
                ", ".join(
                    f"{statistics.median(r['core_busy'][i] for r in runs[n]):.0%}"
                    for i in range(len(runs[n][0]["core_busy"]))
                )
                for n in configs
            ],
        )
    )
    rows.append(
        (
            "other processes' CPU (not this bench), each run",
            [", ".join(f"{r['others_cpu_busy']:.0%}" for r in runs[n]) for n in configs],
        )
    )
    rows.append(
        (
            "subscriber CPU us/delivery",
            [f"{med(n, 'clients_cpu_us_per_delivery'):.2f}" for n in configs],
        )
    )
    for key, label in (
        ("deliveries_received", "deliveries received (sum of runs)"),
        ("lost", "lost (sum of runs)"),
        ("extra", "extra (sum of runs)"),
        ("not_whole_frames", "connections with a partial frame (sum)"),
        ("closed_by_server", "connections closed by a node (sum)"),
    ):
        rows.append((label, [f"{sum(r[key] for r in runs[n]):,}" for n in configs]))
    header = ["metric", *(f"{n} node{'s' if n > 1 else ''}" for n in configs)]
    width = max(len(r[0]) for r in rows)
    lines = ["| " + " | ".join([header[0].ljust(width), *header[1:]]) + " |"]
    lines.append("| " + " | ".join(["-" * width, *("---" for _ in configs)]) + " |")
    lines += ["| " + " | ".join([name.ljust(width), *vals]) + " |" for name, vals in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/scale_out.py",
        description="Deliveries/s of N wsrelay nodes on one Redis against one node "
        "(see the docstring for the setup).",
    )
    p.add_argument("--nodes", default="1,2", help="node counts to compare (default 1,2)")
    p.add_argument("--subscribers", type=int, default=4000, help="WebSockets, all nodes together")
    p.add_argument("--topics", type=int, default=1, help="topics (subscriber j on t<j %% T>)")
    p.add_argument("--size", type=int, default=100, help="message size in bytes (default 100)")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument("--batch", type=int, default=50, help="messages per POST /publish/batch")
    p.add_argument("--requests", type=int, default=8, help="publish requests in flight")
    p.add_argument(
        "--window",
        type=int,
        default=1000,
        help="most messages published but not yet delivered to all (default 1000)",
    )
    p.add_argument(
        "--client-procs",
        type=int,
        default=2,
        help="subscriber processes (a multiple of every node count; default 2)",
    )
    p.add_argument("--pin", choices=["nodes", "none"], default="nodes", help="see the docstring")
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration (medians)")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="stall time that ends a run")
    p.add_argument("--source-base", type=int, default=20, help="first source 127.0.0.x octet")
    p.add_argument("--wsrelay-src", metavar="DIR", help="src/ directory to run (default src/)")
    p.add_argument(
        "--wsrelay-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `wsrelay serve` option for every node (repeatable)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for the machine to be quiet "
        "(default 0: do not wait); the table shows what other processes used anyway",
    )
    p.add_argument(
        "--quiet-below",
        type=float,
        default=0.15,
        help="quiet: other processes use less than this many cores (default 0.15)",
    )
    p.add_argument(
        "--max-others",
        type=float,
        help="discard a run (and run it again, --retries times) in which other processes "
        "used more than this many cores during the measured window (default: keep all)",
    )
    p.add_argument("--retries", type=int, default=3, help="with --max-others (default 3)")
    p.add_argument(
        "--node-cpu",
        type=float,
        help="cap each node at this fraction of a core (a cgroup v1 cpu quota, needs root); "
        "default: no cap",
    )
    p.add_argument("--json-out", metavar="FILE", help="also write every run's figures as JSON")
    args = p.parse_args(argv)
    if args.node_cpu and not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        p.error(f"--node-cpu needs the cgroup v1 cpu controller at {CGROUP_CPU}")
    args.node_counts = [int(x) for x in args.nodes.split(",") if x]
    if any(args.client_procs % n for n in args.node_counts):
        p.error("--client-procs must be a multiple of every node count")
    if args.subscribers % args.topics or args.subscribers % args.client_procs:
        p.error("--subscribers must be a multiple of --topics and of --client-procs")
    if args.batch > args.window:
        p.error("--batch must not exceed --window")
    return args


def wait_for_quiet(threshold: float, longest: float) -> float:
    """Wait (at most ``longest`` s) until the machine's CPU use over 2 s is under
    ``threshold`` cores: between runs none of this bench's processes run, so it is what the
    others use. Returns the last figure."""
    deadline = time.monotonic() + longest
    while True:
        before = psutil.cpu_times()
        time.sleep(2)
        after = psutil.cpu_times()
        idle = (after.idle + after.iowait) - (before.idle + before.iowait)
        busy = (sum(after) - sum(before) - idle) / 2
        if busy < threshold or time.monotonic() > deadline:
            return busy
        print(f"[scale_out] others use {busy:.2f} cores: waiting", file=sys.stderr, flush=True)
        time.sleep(8)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in args.node_counts}
    discarded: list[dict[str, Any]] = []
    index = 0
    for rep in range(args.repeat):
        for n in args.node_counts:
            label = f"{n} node(s) {rep + 1}/{args.repeat}"
            for attempt in range(args.retries + 1):
                quiet = None
                if args.quiet_wait:
                    quiet = wait_for_quiet(args.quiet_below, args.quiet_wait)
                print(f"[scale_out] {label}: load {os.getloadavg()}", file=sys.stderr, flush=True)
                m = Run(args, n, index).execute()
                index += 1
                if args.max_others is None or m["others_cpu_busy"] <= args.max_others:
                    break
                if attempt == args.retries:  # kept, flagged in the JSON
                    m["others_over_limit"] = True
                    print(
                        f"[scale_out] {label}: kept after {attempt + 1} attempts although "
                        f"other processes used {m['others_cpu_busy']:.2f} cores",
                        file=sys.stderr,
                        flush=True,
                    )
                    break
                m["others_cpu_before"] = quiet
                discarded.append(m)
                print(
                    f"[scale_out] {label}: discarded, other processes used "
                    f"{m['others_cpu_busy']:.2f} cores (attempt {attempt + 1})",
                    file=sys.stderr,
                    flush=True,
                )
            print(
                f"[scale_out] {label}: {m['deliveries_per_s']:,.0f} deliveries/s, node CPU "
                f"{', '.join(f'{x:.0%}' for x in m['node_cpu_busy'])}, clients "
                f"{m['clients_cpu_busy']:.0%}, redis {m['redis_cpu_busy']:.0%}, others "
                f"{m['others_cpu_busy']:.0%}, lost {m['lost']}, "
                f"load {m['load_average_end']}",
                file=sys.stderr,
                flush=True,
            )
            m["others_cpu_before"] = quiet
            runs[n].append(m)
    print(table(runs))
    if discarded:
        print(
            f"{len(discarded)} run(s) discarded (other processes used more than "
            f"{args.max_others} cores): "
            + ", ".join(
                f"{d['nodes']} node(s) {d['deliveries_per_s']:,.0f}/s with "
                f"{d['others_cpu_busy']:.2f}"
                for d in discarded
            )
        )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "discarded": discarded}, f, indent=2)
    bad = sum(r["lost"] + r["extra"] + r["not_whole_frames"] for rs in runs.values() for r in rs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
