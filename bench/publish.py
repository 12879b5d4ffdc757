"""HTTP publish throughput: wrk POSTs publishes to a topic with one subscriber, per target.

    python bench/publish.py --targets node,naive,wsrelay --batch 100 --repeat 3 --pin

For each target a fresh server starts on a free port and one subscriber (the raw client of
bench/clients.py, in its own process) registers on topic ``t0`` and connects with
``?format=raw``. Then ``wrk`` (Debian package ``wrk``; ``bench/publish.lua`` sets the POST body)
keeps ``--connections`` keep-alive connections busy POSTing ``/publish`` with one small message
for ``--duration`` seconds. With ``--batch K`` wsrelay runs once more, POSTing
``/publish/batch`` with K messages per request. Targets take turns within each repetition, and
the table shows medians and ratios to node's single publishes.

Throughput only counts if the messages arrived: after wrk stops, the bench waits until the
subscriber has received (requests answered) x (messages per request) deliveries, and reports
what is missing as lost. Requests still in flight when wrk stops may have been published
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
TOPIC = "t0"


@dataclass(frozen=True)
class Mode:
    label: str  # column name
    target: str  # wsrelay, node, naive
    batch: int  # 0: POST /publish; K: POST /publish/batch with K messages


def body(mode: Mode, size: int) -> bytes:
    # "<seq>:<ns>:" is the payload format the raw client counts as a measured delivery; the
    # embedded time is 0 here (wrk sends one fixed body), so its latencies mean nothing.
    text = "0:0:" + "x" * max(0, size - 4)
    one = {"topic": TOPIC, "message": text, "user_id": None}
    if not mode.batch:
        return json.dumps(one).encode()
    return json.dumps({"messages": [one] * mode.batch}).encode()


class Subscriber:
    """One raw WebSocket subscriber on TOPIC in a worker process; counts deliveries."""

    def __init__(self, base_url: str, cpus: frozenset[int] | None, run_index: int) -> None:
        ctx = mp.get_context("spawn")
        self.counters: Any = ctx.Array("q", NCOUNTERS, lock=False)
        self.pipe, child = ctx.Pipe()
        cfg = WorkerConfig(
            index=0,
            base_url=base_url,
            user_ids=[0],
            topics=[TOPIC],
            source_host=f"127.0.0.{2 + run_index % 250}",
            expected_each=[0],
            warmup=False,
            cpus=cpus,
        )
        self.process = ctx.Process(target=worker_main, args=(cfg, child, self.counters))
        self.process.daemon = True
        self.process.start()
        if not self.pipe.poll(60):
            raise RuntimeError("the subscriber did not connect within 60 s")
        msg = self.pipe.recv()
        if msg.get("kind") == "error" or msg.get("connected") != 1:
            raise RuntimeError(f"the subscriber could not connect: {msg}")
        self.ps = psutil.Process(self.process.pid)

    @property
    def received(self) -> int:
        return int(self.counters[RECEIVED])

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
        if self.process.is_alive():
            self.pipe.send("stop")
            if self.pipe.poll(30):
                msg = self.pipe.recv()
                assert isinstance(msg, WorkerResult) or msg.get("kind") == "error"
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        if self.counters[FAILED]:
            raise RuntimeError("the subscriber failed")


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
    server = Server(resolve_target(mode.target))
    server.start(cpus=set(args.server_cpus or ()))
    sub: Subscriber | None = None
    fd, body_file = tempfile.mkstemp(prefix="bench-publish-", suffix=".json")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body(mode, args.size))
        sub = Subscriber(server.base_url, args.client_cpus, run_index)
        path = "/publish/batch" if mode.batch else "/publish"
        url = server.base_url + path
        if args.warmup:  # JIT, caches, connection set-up; its deliveries are not counted
            run_wrk(url, body_file, args, args.warmup)
        base = sub.settle()
        sproc = [psutil.Process(pid) for pid in server.pids]
        s0, sub0, wrk0 = cpu_times(sproc), cpu_times(sub.ps), children_cpu()
        t0 = time.monotonic()
        w = run_wrk(url, body_file, args, args.duration)
        wall = time.monotonic() - t0
        s1, sub1, wrk1 = cpu_times(sproc), cpu_times(sub.ps), children_cpu()
        per_request = mode.batch or 1
        expected = w["requests"] * per_request
        received = sub.wait_for(base + expected, args.drain_timeout) - base
    finally:
        os.unlink(body_file)
        if sub is not None:
            sub.stop()
        server.stop()
    seconds = w["duration_us"] / 1e6
    server_cpu = s1[0] + s1[1] - s0[0] - s0[1] if s0 and s1 else None
    sub_cpu = sub1[0] + sub1[1] - sub0[0] - sub0[1] if sub0 and sub1 else None
    messages = expected or None
    return {
        "requests_per_s": w["requests"] / seconds,
        "messages_per_s": expected / seconds,
        "server_cpu_us_per_message": server_cpu * 1e6 / messages
        if server_cpu is not None and messages
        else None,
        "server_cpu_util": server_cpu / wall if server_cpu is not None else None,
        "http_p50_ms": w["p50_us"] / 1e3,
        "http_p99_ms": w["p99_us"] / 1e3,
        "requests": float(w["requests"]),
        "errors": float(w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"]),
        "status_errors": float(w["status_errors"]),
        "expected": float(expected),
        "received": float(received),
        "lost": float(max(0, expected - received)),
        "in_flight_extra": float(max(0, received - expected)),
        "subscriber_cpu_util": sub_cpu / wall if sub_cpu is not None else None,
        "wrk_cpu_util": (wrk1 - wrk0) / wall,
    }


# (key, label, format, ratio to the baseline?)
ROWS: list[tuple[str, str, str, bool]] = [
    ("requests_per_s", "requests/s", ",.0f", True),
    ("messages_per_s", "messages/s", ",.0f", True),
    ("server_cpu_us_per_message", "server CPU us/message", ".2f", True),
    ("server_cpu_util", "server CPU busy", "%", False),
    ("http_p50_ms", "HTTP latency p50 ms", ".2f", True),
    ("http_p99_ms", "HTTP latency p99 ms", ".2f", True),
    ("requests", "requests answered", ",.0f", False),
    ("status_errors", "non-2xx answers", ",.0f", False),
    ("errors", "socket errors + timeouts", ",.0f", False),
    ("expected", "deliveries expected", ",.0f", False),
    ("received", "deliveries received", ",.0f", False),
    ("lost", "deliveries lost", ",.0f", False),
    ("in_flight_extra", "extra (in flight at stop)", ",.0f", False),
    ("subscriber_cpu_util", "subscriber CPU busy", "%", False),
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
    p.add_argument("--pin", action="store_true", help="server on CPU 0, wrk + subscriber others")
    p.add_argument("--drain-timeout", type=float, default=10.0)
    p.add_argument("--json", action="store_true", help="print every run's metrics as JSON")
    args = p.parse_args(argv)
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
        f"(/publish/batch: {args.batch} per request) for {args.duration} s; "
        f"{', '.join(m.label for m in modes)}; {args.repeat} run(s) each; repo {REPO_ROOT}",
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
                    f"messages/s, lost {m['lost']:,.0f}, non-2xx {m['status_errors']:,.0f}",
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
