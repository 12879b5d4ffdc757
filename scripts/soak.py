"""Soak test: minutes of connect/subscribe/publish/disconnect churn against one relay.

Starts ``wsrelay serve`` on a free port (or uses ``--url`` and ``--pid``), then runs
``--clients`` concurrent client loops. Each loop registers, connects, subscribes,
receives a few publications and leaves in one of four ways (close, abort the TCP
connection, DELETE while connected, stop answering so the server's outbox or ping
check drops it), then deletes its registration and starts again. A publisher
publishes to the churned topics throughout.

Every ``--every`` seconds it prints the server's RSS and open file descriptors and
its /health counters; at the end it waits for the clients to be gone and checks
that connections, registrations and topics are back to zero. Exit status 1 if
they are not.

    python scripts/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import psutil


@dataclass
class Counts:
    cycles: int = 0
    publishes: int = 0
    received: int = 0
    errors: int = 0


SERVER_PROBLEMS: list[str] = []
"""Lines of the server's log at ERROR or with a traceback."""


def start_server(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "wsrelay", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("wsrelay listening on "):
            threading.Thread(target=drain, args=(process.stdout,), daemon=True).start()
            return process, line.split()[-1]
    raise RuntimeError("the server did not start")


def drain(stream: Any) -> None:
    """Read the server's log so that it never blocks writing it; keep the problems."""
    for line in stream:
        if " ERROR " in line or "Traceback" in line:
            SERVER_PROBLEMS.append(line.rstrip())


async def client_loop(
    session: aiohttp.ClientSession, base: str, topics: list[str], counts: Counts, stop: float
) -> None:
    rng = random.Random()
    while time.monotonic() < stop:
        try:
            mine = rng.sample(topics, 3)
            async with session.post(
                base + "/register", json={"user_id": rng.randrange(100), "topics": mine[:1]}
            ) as r:
                reg = await r.json()
            ws = await session.ws_connect(reg["url"], heartbeat=None)
            await ws.send_json({"subscribe": mine[1:]})
            ending = rng.choice(["close", "abort", "delete", "stall"])
            wanted = rng.randrange(1, 20)
            deadline = time.monotonic() + 2
            while wanted and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    msg = await asyncio.wait_for(ws.receive(), 0.5)
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        break
                    if '"message"' in msg.data:
                        counts.received += 1
                        wanted -= 1
            if ending == "close":
                await ws.close()
            elif ending == "abort":
                ws._response.connection.transport.abort()  # type: ignore[union-attr]
                await ws.close()
            elif ending == "stall":
                await asyncio.sleep(rng.uniform(0, 1))  # not reading
                await ws.close()
            async with session.delete(base + f"/register/{reg['id']}") as r:
                await r.read()
            if ending != "delete":
                await ws.close()
            counts.cycles += 1
        except (aiohttp.ClientError, OSError, KeyError, TimeoutError):
            counts.errors += 1
            await asyncio.sleep(0.1)


async def publisher(
    session: aiohttp.ClientSession, base: str, topics: list[str], counts: Counts, stop: float
) -> None:
    rng = random.Random()
    while time.monotonic() < stop:
        body = {"topic": rng.choice(topics), "message": "x" * rng.randrange(10, 2000)}
        try:
            async with session.post(base + "/publish", json=body) as r:
                await r.read()
                counts.publishes += 1
        except (aiohttp.ClientError, OSError):
            counts.errors += 1
        await asyncio.sleep(0.002)


async def health(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(base + "/health") as r:
        result: dict[str, Any] = await r.json()
        return result


def sample(proc: psutil.Process) -> tuple[float, int]:
    return proc.memory_info().rss / 2**20, proc.num_fds()


async def soak(args: argparse.Namespace) -> int:
    server = None
    if args.url:
        base, proc = args.url.rstrip("/"), psutil.Process(args.pid)
    else:
        server, base = start_server(args.server_args)
        proc = psutil.Process(server.pid)
    topics = [f"soak.{i}" for i in range(args.topics)]
    counts = Counts()
    start = time.monotonic()
    stop = start + args.minutes * 60
    connector = aiohttp.TCPConnector(limit=0)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            rss0, fds0 = sample(proc)
            print(f"server pid {proc.pid} at {base}: rss {rss0:.1f} MiB, fds {fds0}", flush=True)
            tasks = [
                asyncio.create_task(client_loop(session, base, topics, counts, stop))
                for _ in range(args.clients)
            ]
            tasks.append(asyncio.create_task(publisher(session, base, topics, counts, stop)))
            peak = rss0
            while time.monotonic() < stop:
                await asyncio.sleep(min(args.every, max(0.0, stop - time.monotonic())))
                rss, fds = sample(proc)
                peak = max(peak, rss)
                h = await health(session, base)
                print(
                    f"t={time.monotonic() - start:5.0f}s rss={rss:6.1f}MiB fds={fds:4d} "
                    f"connections={h['connections']:4d} registrations={h['registrations']} "
                    f"topics={h['topics']:3d} cycles={counts.cycles} publishes={counts.publishes} "
                    f"received={counts.received} errors={counts.errors}",
                    flush=True,
                )
            await asyncio.gather(*tasks)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                h = await health(session, base)
                if (h["connections"], h["registrations"] or 0, h["topics"]) == (0, 0, 0):
                    break
                await asyncio.sleep(0.2)
        # The client's pooled keep-alive sockets close just now; give the server a moment.
        settle = time.monotonic() + 5
        while (fds := sample(proc)[1]) > fds0 and time.monotonic() < settle:
            await asyncio.sleep(0.1)
        rss, fds = sample(proc)
        leaked = (h["connections"], h["registrations"] or 0, h["topics"]) != (0, 0, 0)
        print(
            f"end: rss {rss:.1f} MiB (start {rss0:.1f}, peak {peak:.1f}), fds {fds} "
            f"(start {fds0}); connections {h['connections']}, registrations "
            f"{h['registrations']}, topics {h['topics']}: {'LEAK' if leaked else 'back to zero'}; "
            f"{len(SERVER_PROBLEMS)} error lines in the server log",
            flush=True,
        )
        for line in SERVER_PROBLEMS[:20]:
            print("  server:", line)
        return 1 if leaked or SERVER_PROBLEMS else 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=100, help="concurrent client loops")
    parser.add_argument("--topics", type=int, default=50)
    parser.add_argument("--every", type=float, default=10, help="seconds between reports")
    parser.add_argument("--url", help="an already running relay (needs --pid)")
    parser.add_argument("--pid", type=int, help="its process id, for RSS and fds")
    parser.add_argument("server_args", nargs="*", help="extra `wsrelay serve` arguments (after --)")
    args = parser.parse_args()
    if args.url and args.pid is None:
        parser.error("--url needs --pid")
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
