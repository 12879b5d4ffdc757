"""One measured run of one scenario against one target (used by bench/fanout.py)."""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import os
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import psutil

from clients import (
    CONNECTED,
    FAILED,
    NCOUNTERS,
    PROBES,
    RECEIVED,
    REGISTERED,
    WorkerConfig,
    WorkerResult,
    worker_main,
)
from scenarios import Publisher, Scenario, messages_per_topic, topic_name
from servers import Server, Target
from storm import RedisInfo, RedisSnapshot, kernel_tcp_counters, storm_metrics


@dataclass
class RunOptions:
    workers: int | None = None  # None: one per ~4000 subscribers, at least min_workers
    min_workers: int = 1  # e.g. one per node of a multi-node target, for every target alike
    per_worker: int = 4000
    client: str = "raw"
    drain_timeout: float = 10.0  # give up when no delivery arrives for this long
    connect_timeout: float = 300.0
    run_index: int = 0  # rotates loopback source addresses between runs
    server_cpus: frozenset[int] | None = None  # --pin: the server's cores ...
    client_cpus: frozenset[int] | None = None  # ... and those of the clients and publisher
    keep_logs: str | None = None  # a directory to keep the servers' logs in


@dataclass
class RunResult:
    target: str
    run: int
    metrics: dict[str, float | None]
    latencies_ns: array[int] = field(default_factory=lambda: array("q"), repr=False)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # storm: refusals by status etc.


class Progress:
    """Progress lines on stderr: rewritten in place on a terminal, throttled otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def show(self, text: str, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < (0.2 if self.tty else 2.0):
            return
        self.last = now
        line = f"[{self.label}] {text}"
        if self.tty:
            sys.stderr.write("\r\x1b[K" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


CpuTimes = tuple[float, float]  # (user, system) seconds


def cpu_times(proc: psutil.Process | list[psutil.Process] | None) -> CpuTimes | None:
    """User and system CPU seconds of a process, or summed over a group (all nodes)."""
    if proc is None or (isinstance(proc, list) and not proc):
        return None
    user = system = 0.0
    for p in proc if isinstance(proc, list) else [proc]:
        t = p.cpu_times()
        user, system = user + float(t.user), system + float(t.system)
    return user, system


def _delta(before: CpuTimes | None, after: CpuTimes | None, scale: float = 1.0) -> float | None:
    """CPU seconds (user + system) spent between two samples, times ``scale``."""
    if before is None or after is None:
        return None
    # max(): the float sums can come out a hair below zero for an idle process.
    return max(0.0, after[0] + after[1] - before[0] - before[1]) * scale


def _sys_share(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    total = _delta(before, after)
    if before is None or after is None or not total:
        return None
    return (after[1] - before[1]) / total


def _sys_share_many(before: list[CpuTimes | None], after: list[CpuTimes | None]) -> float | None:
    pairs = [(b, a) for b, a in zip(before, after, strict=True) if b is not None and a is not None]
    total = sum(a[0] + a[1] - b[0] - b[1] for b, a in pairs)
    return sum(a[1] - b[1] for b, a in pairs) / total if total else None


def _mul(value: float | None, factor: float | None) -> float | None:
    return None if value is None or factor is None else value * factor


def rss_bytes(procs: list[psutil.Process]) -> int | None:
    """Resident memory of the server, summed over its nodes."""
    return sum(int(p.memory_info().rss) for p in procs) if procs else None


def percentile(sorted_values: list[int], q: float) -> float | None:
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[idx])


class Run:
    def __init__(self, target: Target, scenario: Scenario, opts: RunOptions, label: str) -> None:
        self.target = target
        self.scenario = scenario
        self.opts = opts
        self.progress = Progress(label)
        self.server = Server(target)
        self.warnings: list[str] = []
        n = scenario.clients
        self.nworkers = opts.workers or max(opts.min_workers, math.ceil(n / opts.per_worker))
        self.ctx = mp.get_context("spawn")
        self.counters: Any = self.ctx.Array("q", self.nworkers * NCOUNTERS, lock=False)
        self.procs: list[Any] = []
        self.pipes: list[Any] = []
        self.storm_connects: list[dict[str, Any]] = []

    def node_of_worker(self, index: int) -> str:
        urls = self.server.node_urls
        return urls[index % len(urls)]

    def total(self, column: int) -> int:
        return sum(self.counters[w * NCOUNTERS + column] for w in range(self.nworkers))

    def _start_workers(self) -> None:
        s, n, w = self.scenario, self.scenario.clients, self.nworkers
        bounds = [n * i // w for i in range(w + 1)]
        per_topic = messages_per_topic(s)
        for i in range(w):
            ids = range(bounds[i], bounds[i + 1])
            # A fresh 127.0.0.x per worker and per run: ephemeral ports never run short, and
            # TIME_WAIT sockets of a previous run do not collide.
            host_octet = 2 + (self.opts.run_index * w + i) % 250
            cfg = WorkerConfig(
                index=i,
                # Workers take turns over the nodes of a multi-node target.
                base_url=self.node_of_worker(i),
                user_ids=list(ids),
                topics=[topic_name(c % s.topics) for c in ids],
                source_host=f"127.0.0.{host_octet}",
                expected_each=[per_topic[c % s.topics] for c in ids],
                warmup=s.warmup,
                client=self.opts.client,
                cpus=self.opts.client_cpus,
                storm=s.storm,
                subscribe=s.subscribe,
                acks=self.target.acks,
                storm_inflight=s.storm_inflight,
            )
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(
                target=worker_main, args=(cfg, child, self.counters), daemon=True
            )
            proc.start()
            self.procs.append(proc)
            self.pipes.append(parent)

    async def _gather(self, kind: str, what: str, poll: float = 0.05) -> list[dict[str, Any]]:
        """One message of ``kind`` from every worker (progress from the shared counters)."""
        msgs: list[dict[str, Any]] = [{} for _ in range(self.nworkers)]
        pending = set(range(self.nworkers))
        deadline = time.monotonic() + self.opts.connect_timeout
        while pending:
            for i in list(pending):
                if self.pipes[i].poll():
                    msg = self.pipes[i].recv()
                    if msg.get("kind") == "error":
                        raise RuntimeError(f"client worker {i}: {msg['error']}")
                    if msg.get("kind") != kind:
                        raise RuntimeError(f"client worker {i}: {msg.get('kind')}, not {kind}")
                    pending.discard(i)
                    msgs[i] = msg
                elif not self.procs[i].is_alive():
                    raise RuntimeError(f"client worker {i} died (exit {self.procs[i].exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out {what}")
            if what == "registering":
                self.progress.show(f"registering {self.total(REGISTERED)}/{self.scenario.clients}")
            elif what == "connecting":
                self.progress.show(
                    f"connecting {self.total(CONNECTED)}/{self.scenario.clients}"
                    f" (failed {self.total(FAILED)})"
                )
            await asyncio.sleep(poll)
        return msgs

    async def _wait_connected(self, poll: float = 0.05) -> tuple[int, int, int, list[str]]:
        msgs = await self._gather("connected", "connecting", poll)
        connected = sum(msg["connected"] for msg in msgs)
        failed = sum(msg["failed"] for msg in msgs)
        expected = sum(msg["expected"] for msg in msgs)
        errors = [e for msg in msgs for e in msg["errors"]]
        self.storm_connects = [msg["storm"] for msg in msgs]
        self.progress.show(
            f"connected {connected}/{self.scenario.clients} (failed {failed})", final=True
        )
        return connected, failed, expected, errors

    async def _storm(
        self, sproc: list[psutil.Process], m: dict[str, float | None], details: dict[str, Any]
    ) -> tuple[int, int, int, list[str]]:
        """Both phases of a storm: every worker registers all its subscribers at once, then
        (on one signal to all) connects and subscribes them at once. Fills ``m`` and
        ``details`` (see storm.storm_metrics) and returns what _wait_connected does."""
        await self._gather("ready", "starting workers")
        wprocs = [psutil.Process(p.pid) for p in self.procs]
        port = self.server.redis_port
        info = RedisInfo(port) if port else None
        snaps: list[RedisSnapshot | None] = []
        cpu: list[tuple[CpuTimes | None, list[CpuTimes | None]]] = []
        tcp: list[dict[str, int]] = []

        times: list[float] = []

        async def sample() -> None:
            snaps.append(await info.snapshot() if info else None)
            cpu.append((cpu_times(sproc), [cpu_times(p) for p in wprocs]))
            tcp.append(kernel_tcp_counters())
            times.append(time.monotonic())

        await sample()
        for pipe in self.pipes:
            pipe.send("register")
        registered = await self._gather("registered", "registering", 0.01)
        self.progress.show(
            f"registered {sum(r['ok'] for r in registered)}/{self.scenario.clients}", final=True
        )
        await asyncio.sleep(0.5)  # the registrations' connections close
        await sample()
        for pipe in self.pipes:
            pipe.send("go")
        peak = asyncio.create_task(info.peak_clients()) if info else None
        result = await self._wait_connected(0.01)
        if info and peak:
            info.stop_sampling()
            m["redis_peak_clients"] = float(await peak)
        await sample()
        m |= storm_metrics(
            self.scenario.clients,
            times,
            registered,
            self.storm_connects,
            snaps,
            cpu,
            tcp,
            details,
        )
        if info:
            await info.close()
        if self.target.name.startswith("wsrelay"):
            m["server_logged_refusals"] = float(self.server.log_count("refused request"))
        return result

    async def _wait_for(
        self, column: int, goal: int, what: str, publishing: asyncio.Task[None]
    ) -> None:
        """Poll the shared counters until ``goal`` is reached or deliveries stall."""
        last, last_change = -1, time.monotonic()
        while True:
            got = self.total(column)
            now = time.monotonic()
            if got != last or not publishing.done():
                last, last_change = got, now
            if got >= goal:
                break
            if now - last_change > self.opts.drain_timeout:
                self.warnings.append(f"{what}: stalled at {got}/{goal} deliveries")
                break
            self.progress.show(f"{what} {got}/{goal} delivered")
            await asyncio.sleep(0.005)
        self.progress.show(f"{what} {got}/{goal} delivered", final=True)

    async def execute(self) -> RunResult:
        s = self.scenario
        m: dict[str, float | None] = {}
        self.server.start(cpus=set(self.opts.server_cpus or ()))
        try:
            sproc = [psutil.Process(pid) for pid in self.server.pids]
            rproc = psutil.Process(self.server.redis_pid) if self.server.redis_pid else None
            rss_before = rss_bytes(sproc)
            t_connect = time.monotonic()
            self._start_workers()
            details: dict[str, Any] = {}
            if s.storm:
                connected, failed, expected, errors = await self._storm(sproc, m, details)
            else:
                connected, failed, expected, errors = await self._wait_connected()
                m["connect_s"] = time.monotonic() - t_connect
            if not connected:
                raise RuntimeError(f"no subscriber could connect: {errors[:3]}")
            if failed:
                self.warnings.append(f"{failed} subscribers failed to connect: {errors[:3]}")
            await asyncio.sleep(0.5)  # let the server settle before reading its RSS
            rss_connected = rss_bytes(sproc)
            async with Publisher(self.server.base_url, s) as pub:
                if s.warmup:
                    task = asyncio.create_task(pub.probes())
                    await self._wait_for(PROBES, connected, "warm-up", task)
                    await task
                    if s.storm:
                        # Every subscriber the storm counted as subscribed got its probe?
                        m["unsubscribed"] = float(max(0, connected - self.total(PROBES)))
                if s.hold:
                    self.progress.show(
                        f"holding {connected} idle connections for {s.hold:g} s", final=True
                    )
                    c0 = cpu_times(sproc)
                    await asyncio.sleep(s.hold)
                    m["idle_cpu_util"] = _delta(c0, cpu_times(sproc), 1 / s.hold)
                procs = [sproc, psutil.Process(), *(psutil.Process(p.pid) for p in self.procs)]
                before = [cpu_times(p) for p in procs]  # just before the first publish
                redis_before = cpu_times(rproc)
                task = asyncio.create_task(pub.run())
                await self._wait_for(RECEIVED, expected, "publishing", task)
                after = [cpu_times(p) for p in procs]  # just after the last delivery
                redis_after = cpu_times(rproc)
                await task
                rss_end = rss_bytes(sproc)
            results = self._collect()
        finally:
            self._shutdown()
            self.server.stop(self.opts.keep_logs)
        received = sum(r.received for r in results)
        lat: array[int] = array("q")
        for r in results:
            lat.frombytes(r.latencies_ns)
        last_recv = max((r.last_recv_ns for r in results), default=0)
        wall = (last_recv - pub.first_ns) / 1e9 if received and pub.first_ns else None
        per_delivery = 1e6 / received if received else None
        per_second = 1 / wall if wall else None
        server_cpu = _delta(before[0], after[0])
        clients = [_delta(b, a) or 0.0 for b, a in zip(before[2:], after[2:], strict=True)]
        srt = sorted(lat)
        m |= {
            "subscribers": float(connected),
            "published": float(pub.sent),
            "expected": float(expected),
            "received": float(received),
            "lost": float(expected - received),
            "duration_s": wall,
            "deliveries_per_s": received * per_second if per_second else None,
            "publishes_per_s": pub.sent * per_second if per_second else None,
            "server_cpu_us_per_delivery": _mul(server_cpu, per_delivery),
            "server_cpu_util": _mul(server_cpu, per_second),
            "server_sys_share": _sys_share(before[0], after[0]) if received else None,
            "client_cpu_us_per_delivery": _mul(sum(clients), per_delivery),
            "client_sys_share": _sys_share_many(before[2:], after[2:]) if received else None,
            "client_cpu_util_max": _mul(max(clients), per_second),
            "publisher_cpu_util": _mul(_delta(before[1], after[1]), per_second),
            "client_side_cpu_util": _mul(
                sum(clients) + (_delta(before[1], after[1]) or 0.0), per_second
            ),
            "latency_p50_ms": _mul(percentile(srt, 0.50), 1e-6),
            "latency_p99_ms": _mul(percentile(srt, 0.99), 1e-6),
            "latency_max_ms": _mul(float(srt[-1]) if srt else None, 1e-6),
            "rss_before_mb": _mul(rss_before, 2**-20),
            "rss_connected_mb": _mul(rss_connected, 2**-20),
            "rss_end_mb": _mul(rss_end, 2**-20),
            "rss_per_conn_kb": (rss_connected - rss_before) / connected / 1024
            if rss_before is not None and rss_connected is not None
            else None,
        }
        if len(self.server.node_urls) > 1:
            m |= self._per_node(results, per_delivery, per_second, redis_before, redis_after)
        elif rproc is not None:
            m["redis_cpu_us_per_delivery"] = _mul(_delta(redis_before, redis_after), per_delivery)
            m["redis_cpu_util"] = _mul(_delta(redis_before, redis_after), per_second)
        if s.storm and not s.messages:
            for key in ("published", "expected", "received", "lost"):
                m.pop(key, None)
        if pub.errors:
            self.warnings.append(f"{pub.errors} publishes failed: {pub.last_error}")
        other = sum(r.other for r in results)
        if other:
            self.warnings.append(f"{other} unexpected messages (not raw benchmark payloads)")
        closed = sum(r.closed for r in results)
        if closed:
            codes: dict[int, int] = {}
            for r in results:
                for code, count in (r.close_codes or {}).items():
                    codes[code] = codes.get(code, 0) + count
            self.warnings.append(
                f"{closed} connections were closed by the server during the run "
                f"(close codes {codes or 'none'})"
            )
        bad = sum(r.protocol_errors for r in results)
        if bad:
            self.warnings.append(
                f"{bad} connections read bytes that are not WebSocket frames after the 101"
            )
        late = sum(r.error_frames for r in results)
        if late:
            self.warnings.append(f"{late} error frames after the subscription")
        if s.storm:
            m["protocol_errors"] = float(bad)
            details["closed_by_server"] = closed
        self._check_clients(m)
        result = RunResult(self.target.name, self.opts.run_index, m, lat, self.warnings)
        result.details = details
        return result

    def _per_node(
        self,
        results: list[WorkerResult],
        per_delivery: float | None,
        per_second: float | None,
        redis_before: CpuTimes | None,
        redis_after: CpuTimes | None,
    ) -> dict[str, float | None]:
        """Multi-node target: Redis's CPU, and latency on the publishing node (the first)
        vs the others; the difference is what the hop through Redis adds."""
        first = self.server.node_urls[0]
        local = sorted(v for r in results if self.node_of_worker(r.index) == first for v in _lat(r))
        remote = sorted(
            v for r in results if self.node_of_worker(r.index) != first for v in _lat(r)
        )
        m: dict[str, float | None] = {
            "redis_cpu_us_per_delivery": _mul(_delta(redis_before, redis_after), per_delivery),
            "redis_cpu_util": _mul(_delta(redis_before, redis_after), per_second),
        }
        for name, values in (("local", local), ("remote", remote)):
            for q in (50, 99):
                m[f"latency_{name}_p{q}_ms"] = _mul(percentile(values, q / 100), 1e-6)
        for q in (50, 99):
            lo, re = m[f"latency_local_p{q}_ms"], m[f"latency_remote_p{q}_ms"]
            m[f"redis_hop_p{q}_ms"] = re - lo if lo is not None and re is not None else None
        return m

    def _check_clients(self, m: dict[str, float | None]) -> None:
        """Warn when the client side, not the server, may have set the pace."""
        busiest, total = m["client_cpu_util_max"], m["client_side_cpu_util"]
        # Cores left for clients + publisher: the pinned ones, else all but the server's one.
        cores = len(self.opts.client_cpus or ()) or max(1, (os.cpu_count() or 2) - 1)
        if (busiest is not None and busiest > 0.85) or (total is not None and total > 0.9 * cores):
            self.warnings.append(
                f"client side busy (busiest worker {busiest or 0:.0%}, workers + publisher "
                f"{total or 0:.0%} of {cores} core(s)): deliveries/s and latency may be "
                "limited by the clients, not the server"
            )

    def _collect(self) -> list[WorkerResult]:
        for pipe in self.pipes:
            pipe.send("stop")
        results: list[WorkerResult] = []
        for i, pipe in enumerate(self.pipes):
            if not pipe.poll(60):
                raise RuntimeError(f"client worker {i} did not report its results")
            msg = pipe.recv()
            if not isinstance(msg, WorkerResult):
                raise RuntimeError(f"client worker {i}: {msg}")
            results.append(msg)
        return results

    def _shutdown(self) -> None:
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _lat(result: WorkerResult) -> array[int]:
    values: array[int] = array("q")
    values.frombytes(result.latencies_ns)
    return values


async def run_once(target: Target, scenario: Scenario, opts: RunOptions, label: str) -> RunResult:
    return await Run(target, scenario, opts, label).execute()
