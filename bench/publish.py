"""HTTP publish throughput: wrk POSTs publishes to topics with one subscriber each, per target.

    python bench/publish.py --targets node,naive,wsrelay --batch 100 --repeat 3 --pin
    python bench/publish.py --targets node,wsrelay --batch 500 --subscribers 4 --pin
    python bench/publish.py --targets wsrelay-redis1 --repeat 3 --pin --wsrelay-src /tmp/before/src

For each target a fresh server starts on a free port and one subscriber (the raw client of
bench/clients.py, in its own process) registers on topic ``t0`` and connects with
``?format=raw``. Then ``wrk`` (Debian package ``wrk``; ``bench/publish.lua`` sets the POST body)
keeps ``--connections`` keep-alive connections busy POSTing ``/publish`` with one small message
for ``--duration`` seconds. With ``--batch K`` wsrelay runs once more, POSTing
``/publish/batch`` with K messages per request. Targets take turns within each repetition, and
the table shows medians and ratios to node's single publishes.

``--subscribers N`` (default 1) spreads the publishes over N topics ``t0`` .. ``t{N-1}``, each
with one subscriber in its own worker process, for when one subscriber gets disconnected as a
slow consumer (close code 4008: more than the server's outbox limit waited for it; large batches
over many connections reach that in bursts, see bench/README.md). Single publishes then cycle
over the N topics (each wrk thread sends the N bodies in turn), and every batch carries its K
messages round-robin over the N topics (message j goes to ``t{j % N}``), so a request still
publishes K messages.

Any target of bench/servers.py works: ``wsrelay-nohistory`` (``--history-size 0``) beside
``wsrelay`` shows what the history costs a publish, and ``wsrelay-redis1`` is one node on a
private redis-server (on a free port) that the bench starts and pins with the node.

Throughput only counts if the messages arrived: after wrk stops, the bench waits until the
subscribers together have received (requests answered) x (messages per request) deliveries, and
reports what is missing as lost. Requests still in flight when wrk stops may have been published
without wrk counting them, so up to ``--connections`` x K extra deliveries are normal.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import psutil

from clients import FAILED, NCOUNTERS, RECEIVED, WorkerConfig, WorkerResult, worker_main
from report import _fmt
from runner import cpu_times
from servers import REPO_ROOT, Server, resolve_target

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def topic(i: int) -> str:
    return f"t{i}"


@dataclass(frozen=True)
class Mode:
    label: str  # column name
    target: str  # wsrelay, node, naive
    batch: int  # 0: POST /publish; K: POST /publish/batch with K messages


def bodies(mode: Mode, size: int, topics: int) -> list[bytes]:
    """The request bodies wrk sends in turn: one per topic, or one batch over all topics."""
    # "<seq>:<ns>:" is the payload format the raw client counts as a measured delivery; the
    # embedded time is 0 here (wrk sends fixed bodies), so its latencies mean nothing.
    text = "0:0:" + "x" * max(0, size - 4)
    ones = [{"topic": topic(i), "message": text, "user_id": None} for i in range(topics)]
    if not mode.batch:
        return [json.dumps(one).encode() for one in ones]
    batch = [ones[j % topics] for j in range(mode.batch)]
    return [json.dumps({"messages": batch}).encode()]


class Subscribers:
    """Raw WebSocket subscribers on topics t0..t{N-1}, one per worker process; counts them all."""

    def __init__(self, base_url: str, cpus: frozenset[int] | None, run_index: int, n: int) -> None:
        ctx = mp.get_context("spawn")
        # One row of counters per worker (WorkerConfig.index); RECEIVED is summed over them.
        self.n = n
        self.counters: Any = ctx.Array("q", NCOUNTERS * n, lock=False)
        self.pipes: list[Any] = []
        self.processes: list[Any] = []
        self.closed = 0  # connections the server closed (a slow consumer gets 4008)
        for i in range(n):
            pipe, child = ctx.Pipe()
            cfg = WorkerConfig(
                index=i,
                base_url=base_url,
                user_ids=[i],
                topics=[topic(i)],
                source_host=f"127.0.0.{2 + run_index % 250}",
                expected_each=[0],
                warmup=False,
                cpus=cpus,
            )
            process = ctx.Process(target=worker_main, args=(cfg, child, self.counters))
            process.daemon = True
            process.start()
            self.pipes.append(pipe)
            self.processes.append(process)
        try:
            for i, pipe in enumerate(self.pipes):  # all start at once; then each must connect
                if not pipe.poll(60):
                    raise RuntimeError(f"subscriber {i} did not connect within 60 s")
                try:
                    msg = pipe.recv()
                except EOFError:
                    raise RuntimeError(f"subscriber {i} exited before connecting") from None
                if msg.get("kind") == "error" or msg.get("connected") != 1:
                    raise RuntimeError(f"subscriber {i} could not connect: {msg}")
        except BaseException:
            for process in self.processes:
                process.kill()
                process.join()
            raise
        self.ps = [psutil.Process(p.pid) for p in self.processes]

    @property
    def received(self) -> int:
        c = self.counters
        return sum(int(c[i * NCOUNTERS + RECEIVED]) for i in range(self.n))

    def settle(self, quiet: float = 0.5, timeout: float = 30.0) -> int:
        """Wait until no delivery arrived for ``quiet`` seconds; the count then."""
        last, since, deadline = -1, time.monotonic(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            now_count = self.received
            if now_count != last:
                last, since = now_count, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
            time.sleep(0.05)
        return last

    def wait_for(self, goal: int, drain_timeout: float) -> int:
        """Wait until ``goal`` deliveries, or none for ``drain_timeout`` s; then settle."""
        last, since = -1, time.monotonic()
        while self.received < goal and time.monotonic() - since < drain_timeout:
            if self.received != last:
                last, since = self.received, time.monotonic()
            time.sleep(0.01)
        return self.settle()

    def stop(self) -> None:
        for process, pipe in zip(self.processes, self.pipes, strict=True):
            if process.is_alive():
                pipe.send("stop")
        for process, pipe in zip(self.processes, self.pipes, strict=True):
            if process.is_alive():
                if pipe.poll(30):
                    msg = pipe.recv()
                    if isinstance(msg, WorkerResult):
                        self.closed += msg.closed
                    else:
                        assert msg.get("kind") == "error"
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        failed = [i for i in range(self.n) if self.counters[i * NCOUNTERS + FAILED]]
        if failed:
            raise RuntimeError(f"subscriber(s) {failed} failed")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_wrk(url: str, body_file: str, args: argparse.Namespace, seconds: int) -> dict[str, Any]:
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s"]
    argv += ["--timeout", "10s", "-s", os.path.join(BENCH_DIR, "publish.lua"), url]
    cpus = args.client_cpus
    proc = subprocess.run(
        argv,
        env={**os.environ, "PUBLISH_BODY_FILE": body_file},
        capture_output=True,
        text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        timeout=seconds + 60,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH-JSON ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(line.removeprefix("BENCH-JSON "))
    return result


def run_once(mode: Mode, args: argparse.Namespace, run_index: int) -> dict[str, float | None]:
    server = Server(resolve_target(mode.target, wsrelay_src=args.wsrelay_src))
    server.start(cpus=set(args.server_cpus or ()))
    sub: Subscribers | None = None
    fd, body_file = tempfile.mkstemp(prefix="bench-publish-", suffix=".json")
    try:
        with os.fdopen(fd, "wb") as f:
            # One body per line (json.dumps leaves no newline inside); publish.lua cycles them.
            f.write(b"\n".join(bodies(mode, args.size, args.subscribers)))
        sub = Subscribers(server.base_url, args.client_cpus, run_index, args.subscribers)
        path = "/publish/batch" if mode.batch else "/publish"
        url = server.base_url + path
        if args.warmup:  # JIT, caches, connection set-up; its deliveries are not counted
            run_wrk(url, body_file, args, args.warmup)
        base = sub.settle()
        sproc = [psutil.Process(pid) for pid in server.pids]
        rproc = psutil.Process(server.redis_pid) if server.redis_pid else None
        sub_each0 = [cpu_times(p) for p in sub.ps]
        s0, sub0, wrk0 = cpu_times(sproc), cpu_times(sub.ps), children_cpu()
        r0 = cpu_times(rproc)
        t0 = time.monotonic()
        w = run_wrk(url, body_file, args, args.duration)
        wall = time.monotonic() - t0
        s1, sub1, wrk1 = cpu_times(sproc), cpu_times(sub.ps), children_cpu()
        r1 = cpu_times(rproc)
        sub_each = [cpu_times(p) for p in sub.ps]
        per_request = mode.batch or 1
        expected = w["requests"] * per_request
        received = sub.wait_for(base + expected, args.drain_timeout) - base
    finally:
        os.unlink(body_file)
        try:
            if sub is not None:
                sub.stop()
        finally:
            server.stop()
    seconds = w["duration_us"] / 1e6
    server_cpu = s1[0] + s1[1] - s0[0] - s0[1] if s0 and s1 else None
    sub_cpu = sub1[0] + sub1[1] - sub0[0] - sub0[1] if sub0 and sub1 else None
    redis_cpu = r1[0] + r1[1] - r0[0] - r0[1] if r0 and r1 else None
    busiest = max(
        (b[0] + b[1] - a[0] - a[1] for a, b in zip(sub_each0, sub_each, strict=True) if a and b),
        default=None,
    )
    messages = expected or None
    return {
        "requests_per_s": w["requests"] / seconds,
        "messages_per_s": expected / seconds,
        "server_cpu_us_per_message": server_cpu * 1e6 / messages
        if server_cpu is not None and messages
        else None,
        "server_cpu_util": server_cpu / wall if server_cpu is not None else None,
        "redis_cpu_us_per_message": redis_cpu * 1e6 / messages
        if redis_cpu is not None and messages
        else None,
        "redis_cpu_util": redis_cpu / wall if redis_cpu is not None else None,
        "http_p50_ms": w["p50_us"] / 1e3,
        "http_p99_ms": w["p99_us"] / 1e3,
        "requests": float(w["requests"]),
        "errors": float(w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"]),
        "status_errors": float(w["status_errors"]),
        "expected": float(expected),
        "received": float(received),
        "lost": float(max(0, expected - received)),
        "in_flight_extra": float(max(0, received - expected)),
        "subscribers_closed": float(sub.closed),
        "subscriber_cpu_util": sub_cpu / wall if sub_cpu is not None else None,
        "busiest_subscriber_cpu_util": busiest / wall if busiest is not None else None,
        "wrk_cpu_util": (wrk1 - wrk0) / wall,
    }


# (key, label, format, ratio to the baseline?)
ROWS: list[tuple[str, str, str, bool]] = [
    ("requests_per_s", "requests/s", ",.0f", True),
    ("messages_per_s", "messages/s", ",.0f", True),
    ("server_cpu_us_per_message", "server CPU us/message", ".2f", True),
    ("server_cpu_util", "server CPU busy", "%", False),
    ("redis_cpu_us_per_message", "redis-server CPU us/message", ".2f", False),
    ("redis_cpu_util", "redis-server CPU busy", "%", False),
    ("http_p50_ms", "HTTP latency p50 ms", ".2f", True),
    ("http_p99_ms", "HTTP latency p99 ms", ".2f", True),
    ("requests", "requests answered", ",.0f", False),
    ("status_errors", "non-2xx answers", ",.0f", False),
    ("errors", "socket errors + timeouts", ",.0f", False),
    ("expected", "deliveries expected", ",.0f", False),
    ("received", "deliveries received", ",.0f", False),
    ("lost", "deliveries lost", ",.0f", False),
    ("in_flight_extra", "extra (in flight at stop)", ",.0f", False),
    ("subscribers_closed", "subscribers closed by server", ",.0f", False),
    ("subscriber_cpu_util", "subscriber CPU busy (all)", "%", False),
    ("busiest_subscriber_cpu_util", "busiest subscriber CPU busy", "%", False),
    ("wrk_cpu_util", "wrk CPU busy", "%", False),
]


def table(runs: dict[str, list[dict[str, float | None]]], baseline: str, repeat: int) -> str:
    med: dict[str, dict[str, float | None]] = {}
    for label, rs in runs.items():
        med[label] = {}
        for key, *_ in ROWS:
            values = [v for r in rs if (v := r.get(key)) is not None]
            med[label][key] = statistics.median(values) if values else None
    header = [f"metric (median of {repeat})", *runs]
    rows = []
    for key, name, spec, with_ratio in ROWS:
        cells = [name]
        for label in runs:
            value, base = med[label].get(key), med.get(baseline, {}).get(key)
            cell = _fmt(value, spec)
            if with_ratio and label != baseline and value is not None and base:
                # Messages/s of every target against the baseline's messages/s (single
                # publishes: one message per request), so a batch compares to node's requests.
                cell += f" ({value / base:.2f}x)"
            cells.append(cell)
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"(x) = ratio to {baseline}" if baseline in runs else ""]
    for r in [header, ["-" * w for w in widths], *rows]:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python bench/publish.py", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--targets", default="node,naive,wsrelay", help="comma-separated targets")
    p.add_argument("--batch", type=int, default=0, help="also run wsrelay's /publish/batch, K each")
    p.add_argument("--connections", type=int, default=32, help="wrk keep-alive connections")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--duration", type=int, default=10, help="whole seconds of measured publishing")
    p.add_argument("--warmup", type=int, default=2, help="whole seconds of unmeasured wrk first")
    p.add_argument("--size", type=int, default=100, help="message text size in bytes")
    p.add_argument("--repeat", type=int, default=1, help="runs per target, alternating; medians")
    p.add_argument(
        "--subscribers",
        type=int,
        default=1,
        help="topics t0..t{N-1}, one subscriber process each; publishes spread over them",
    )
    p.add_argument("--pin", action="store_true", help="server on CPU 0, wrk + subscribers others")
    p.add_argument("--drain-timeout", type=float, default=10.0)
    p.add_argument(
        "--wsrelay-src",
        metavar="DIR",
        help="src/ directory the wsrelay targets run (default: this checkout's src/), "
        "e.g. an exported older commit",
    )
    p.add_argument("--json", action="store_true", help="print every run's metrics as JSON")
    args = p.parse_args(argv)
    if args.subscribers < 1:
        p.error("--subscribers must be at least 1")
    if shutil.which("wrk") is None:
        p.error("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    args.server_cpus = args.client_cpus = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            p.error("--pin needs at least 2 CPUs")
        args.server_cpus, args.client_cpus = frozenset(cpus[:1]), frozenset(cpus[1:])
        os.sched_setaffinity(0, args.client_cpus)
    modes = [Mode(t, t, 0) for t in args.targets.split(",") if t]
    if args.batch:
        modes.append(Mode(f"wsrelay batch {args.batch}", "wsrelay", args.batch))
    print(
        f"bench: {args.connections} connections POST one {args.size} B message "
        f"(/publish/batch: {args.batch} per request) for {args.duration} s to "
        f"{args.subscribers} topic(s), one subscriber each; "
        f"{', '.join(m.label for m in modes)}; {args.repeat} run(s) each; repo {REPO_ROOT}, "
        f"wsrelay from {args.wsrelay_src or 'src/'}",
        file=sys.stderr,
    )
    runs: dict[str, list[dict[str, float | None]]] = {m.label: [] for m in modes}
    counter = 0
    for rep in range(args.repeat):
        for mode in modes:
            label = f"[{mode.label} {rep + 1}/{args.repeat}]"
            try:
                m = run_once(mode, args, counter)
            except (RuntimeError, OSError) as exc:
                print(f"{label} failed: {exc}", file=sys.stderr)
                m = {}
            else:
                print(
                    f"{label} {m['requests_per_s']:,.0f} requests/s, {m['messages_per_s']:,.0f} "
                    f"messages/s, lost {m['lost']:,.0f}, non-2xx {m['status_errors']:,.0f}, "
                    f"subscribers closed by server {m['subscribers_closed']:,.0f}",
                    file=sys.stderr,
                )
            runs[mode.label].append(m)
            counter += 1
    baseline = "node" if "node" in runs else modes[0].label
    if args.json:
        print(json.dumps({"baseline": baseline, "runs": runs}, indent=2))
    else:
        print(table(runs, baseline, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
