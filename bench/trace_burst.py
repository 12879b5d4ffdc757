"""Attach a tracer or profiler to one relay server during a fan-out burst (issue 15).

    python bench/trace_burst.py --target wsrelay --tool perf-syscalls --messages 1500
    python bench/trace_burst.py --target uws --tool strace
    python bench/trace_burst.py --target wsrelay --tool py-spy --out /tmp/wsrelay.speedscope

The server runs pinned to CPU 0; ``bench/fanout.py`` drives it from CPU 1 as a URL target
with an idle hold, and the tool is attached once every subscriber is connected and the
warm-up probe is through, so what it records is the hold (next to nothing) and the burst.
Tools: ``strace`` (``strace -c -f``: calls per system call, slow: ptrace stops every call),
``perf-syscalls`` (``perf stat`` on the syscall tracepoints: counts, next to no overhead),
``perf-trace`` (``perf trace -s``), ``py-spy`` (``py-spy record --native``, speedscope or
raw output), ``strace-k:CALL,...`` (the native stack of each such call),
``perf-record:CALL`` (``perf record`` with dwarf call graphs of one system call), ``signals``
(SIGUSR2 to the server at the start, SIGUSR1 at the end: for a probe loaded with
``PYTHONPATH=<dir with a sitecustomize.py>``), ``none``.
Counts are printed per delivery (subscribers x messages).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SYSCALLS = [
    "write",
    "writev",
    "sendto",
    "sendmsg",
    "read",
    "readv",
    "recvfrom",
    "recvmsg",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "getpid",
    "newfstatat",
    "statx",
    "futex",
    "accept4",
    "close",
    "ioctl",
    "mmap",
    "munmap",
    "brk",
    "madvise",
    "clock_gettime",
    "getsockopt",
    "setsockopt",
    "lseek",
    "openat",
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(target: str, port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    if target == "wsrelay":
        argv = [sys.executable, "-m", "wsrelay", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(port), *extra]
        path = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    else:
        script = BENCH / "peers" / target / "relay.js"
        argv = ["node", str(script), "--host", "127.0.0.1", "--port", str(port), *extra]
        env = dict(os.environ)
    log = open(f"/tmp/trace-burst-{target}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(
        ["taskset", "-c", "0", *argv], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
    )


def wait_health(port: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("server did not come up")


def established(port: int) -> int:
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
    ).stdout
    return len(out.splitlines())


def tool_argv(tool: str, pid: int, out: str) -> list[str]:
    if tool == "strace":
        return ["strace", "-c", "-f", "-p", str(pid), "-o", out]
    if tool.startswith("strace-k:"):  # strace-k:getpid,newfstatat: native stacks of these calls
        return ["strace", "-f", "-k", "-e", f"trace={tool[9:]}", "-p", str(pid), "-o", out]
    if tool == "perf-syscalls":
        events = ",".join(
            ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{n}" for n in SYSCALLS]
        )
        return ["perf", "stat", "-e", events, "-p", str(pid), "-o", out]
    if tool.startswith("perf-record:"):  # perf-record:getpid: call graphs of one syscall
        event = f"syscalls:sys_enter_{tool[12:]}"
        return [
            "perf",
            "record",
            "-e",
            event,
            "--call-graph",
            "dwarf,16384",
            "-p",
            str(pid),
            "-o",
            out,
        ]
    if tool == "perf-trace":
        return ["perf", "trace", "-s", "-p", str(pid), "-o", out]
    if tool == "py-spy":
        fmt = "speedscope" if out.endswith(".speedscope") else "raw"
        return ["py-spy", "record", "--native", "-r", "250", "--pid", str(pid), "-o", out,
                "--format", fmt]  # fmt: skip
    raise SystemExit(f"unknown tool {tool}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="wsrelay", help="wsrelay, uws or node")
    p.add_argument("--tool", default="perf-syscalls")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--messages", type=int, default=1500)
    p.add_argument("--inflight", type=int, default=16)
    p.add_argument("--rate", type=float, help="publish at R messages/s instead (steady)")
    p.add_argument("--hold", type=float, default=4.0)
    p.add_argument("--out", help="the tool's output file (default /tmp/trace-<target>.<tool>)")
    p.add_argument("--server-arg", action="append", default=[])
    args = p.parse_args()
    out = args.out or f"/tmp/trace-{args.target}.{args.tool}"
    port = free_port()
    server = start_server(args.target, port, args.server_arg)
    tool = None
    try:
        wait_health(port)
        bench = [sys.executable, str(BENCH / "fanout.py"), "--target", f"http://127.0.0.1:{port}"]
        bench += ["--server-pid", str(server.pid), "--clients", str(args.clients)]
        pace = ["--rate", str(args.rate)] if args.rate else ["--inflight", str(args.inflight)]
        bench += ["--messages", str(args.messages), *pace]
        bench += ["--hold", str(args.hold), "--scenario", "burst", "--pin"]
        fanout = subprocess.Popen(bench, stdout=subprocess.PIPE, text=True)
        while established(port) < args.clients:
            time.sleep(0.05)
            if fanout.poll() is not None:
                raise SystemExit("fanout.py ended before every subscriber connected")
        time.sleep(1.0)  # the warm-up probe, then the hold begins
        if args.tool == "signals":  # SIGUSR2 now, SIGUSR1 after: for a probe in sitecustomize
            os.kill(server.pid, signal.SIGUSR2)
        elif args.tool != "none":
            # taskset'd server: its pid is taskset's, which exec'd the server in place.
            tool = subprocess.Popen(tool_argv(args.tool, server.pid, out), cwd=ROOT)
        report, _ = fanout.communicate()
        if args.tool == "signals":
            os.kill(server.pid, signal.SIGUSR1)
            time.sleep(0.5)
        if tool is not None:
            tool.send_signal(signal.SIGINT)
            tool.wait(60)
        print(report)
        deliveries = args.clients * args.messages
        if args.tool in ("perf-syscalls", "strace") and os.path.exists(out):
            text = Path(out).read_text()
            print(text)
            print(f"per {deliveries} deliveries:")
            if args.tool == "perf-syscalls":
                pairs = re.findall(r"^\s*([\d,]+)\s+\w*syscalls:sys_enter_?(\w*)", text, re.M)
            else:
                # strace -c: % time, seconds, usecs/call, calls, [errors], syscall
                row = r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$"
                pairs = re.findall(row, text, re.M)
            for count, name in pairs:
                n = int(count.replace(",", ""))
                if n:
                    print(f"  {name:14} {n:>9}  {n / deliveries * 1000:8.2f} per 1000 deliveries")
    finally:
        if tool is not None and tool.poll() is None:
            tool.kill()
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
