"""How many publications cross-node delivery loses when the subscriber's Redis
connection drops: plain redis-py pub/sub against wsrelay's Redis broker.

    python bench/redis_faults.py [--messages 3000] [--fault-at 1000]

Starts its own redis-server on a free port. For each fault (CLIENT KILL of the
pub/sub connections; kill -9 and restart of Redis) it publishes sequence-numbered
messages, injects the fault, and counts what the subscriber side received:
lost, duplicated, out of order. The figures are in docs/decisions/0002.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from wsrelay.brokers.redis import RedisBroker, make_client
from wsrelay.core.fanout import Publication
from wsrelay.errors import BrokerUnavailable


class Redis:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.01)

    def kill(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


Fault = Callable[[Redis], Awaitable[None]]


async def client_kill(redis: Redis) -> None:
    admin = aioredis.from_url(redis.url)
    await admin.client_kill_filter(_type="pubsub")
    await admin.aclose()


async def kill_restart(redis: Redis) -> None:
    """kill -9 now, restart (empty) 0.5 s later while publishing goes on."""
    redis.kill()

    async def restart() -> None:
        await asyncio.sleep(0.5)
        redis.start()

    _background.append(asyncio.create_task(restart()))


_background: list[asyncio.Task[None]] = []


def tally(received: list[int], accepted: list[int]) -> str:
    lost = len(set(accepted) - set(received))
    dup = len(received) - len(set(received))
    ordered = received == sorted(received)
    return f"accepted {len(accepted):5}  received {len(received):5}  lost {lost:5}  dup {dup}  " + (
        "in order" if ordered else "OUT OF ORDER"
    )


async def run_pubsub(redis: Redis, fault: Fault, n: int, at: int) -> str:
    """Plain pub/sub through redis-py with its default retries (what most adapters do)."""
    pub, sub = aioredis.from_url(redis.url), aioredis.from_url(redis.url)
    ps = sub.pubsub(ignore_subscribe_messages=True)
    await ps.subscribe("t")
    received: list[int] = []

    async def listen() -> None:
        while True:
            with contextlib.suppress(Exception):
                async for m in ps.listen():
                    received.append(int(m["data"]))
            await asyncio.sleep(0.05)

    task = asyncio.create_task(listen())
    accepted: list[int] = []
    for i in range(n):
        if i == at:
            await fault(redis)
        with contextlib.suppress(Exception):
            await pub.publish("t", str(i))
            accepted.append(i)
    await asyncio.sleep(2)  # a benchmark, not a test: give stragglers time
    task.cancel()
    return tally(received, accepted)


async def run_wsrelay(redis: Redis, fault: Fault, n: int, at: int) -> str:
    """wsrelay's broker: offsets, stream catch-up, no silent retries."""
    a = RedisBroker(make_client(redis.url), history_size=10_000)
    b = RedisBroker(make_client(redis.url), history_size=10_000)
    received: list[int] = []
    await a.start(lambda p: None, "a")
    await b.start(lambda p: received.append(int(p.message)), "b")
    await b.subscribe("t")
    accepted: list[int] = []
    for i in range(n):
        if i == at:
            await fault(redis)
        try:
            await a.publish(Publication("t", str(i)))
            accepted.append(i)
        except BrokerUnavailable:
            await asyncio.sleep(0.01)
    await asyncio.sleep(2)
    await a.stop()
    await b.stop()
    return tally(received, accepted)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--fault-at", type=int, default=1000)
    args = parser.parse_args()
    for fault in (client_kill, kill_restart):
        for name, run in (("redis-py pub/sub", run_pubsub), ("wsrelay broker", run_wsrelay)):
            redis = Redis()
            redis.start()
            try:
                result = await run(redis, fault, args.messages, args.fault_at)
            finally:
                redis.stop()
            print(f"{fault.__name__:12} {name:17} {result}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
