"""How many publishes per second one Redis takes through wsrelay's publish script.

    python bench/redis_publish.py [--seconds 5] [--inflight 64] [--topics 100] [--processes 2]

Starts its own redis-server, then several processes each keep ``--inflight``
publishes in flight (the way several relay nodes would) for ``--seconds``.
Prints publishes/s and the redis-server's CPU use; docs/deployment.md quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time

from private_redis import private_redis  # this directory is sys.path[0] for a script
from wsrelay.brokers.redis import RedisBroker, make_client
from wsrelay.core.fanout import Publication


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def publisher(url: str, seconds: float, inflight: int, topics: int) -> int:
    broker = RedisBroker(make_client(url), history_size=1000)
    await broker.start(lambda p: None, f"bench-{os.getpid()}")
    done = 0
    deadline = time.monotonic() + seconds

    async def loop(worker: int) -> None:
        nonlocal done
        i = worker
        while time.monotonic() < deadline:
            await broker.publish(Publication(f"t{i % topics}", "x" * 100))
            done += 1
            i += inflight

    await asyncio.gather(*(loop(w) for w in range(inflight)))
    await broker.stop()
    return done


def run_publisher(args: tuple[str, float, int, int], out: multiprocessing.Queue[int]) -> None:
    out.put(asyncio.run(publisher(*args)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--topics", type=int, default=100)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    with private_redis() as (url, redis_pid):
        out: multiprocessing.Queue[int] = multiprocessing.Queue()
        procs = [
            multiprocessing.Process(
                target=run_publisher, args=((url, args.seconds, args.inflight, args.topics), out)
            )
            for _ in range(args.processes)
        ]
        cpu0 = cpu_seconds(redis_pid)
        for p in procs:
            p.start()
        total = sum(out.get() for _ in procs)
        for p in procs:
            p.join()
        cpu = cpu_seconds(redis_pid) - cpu0
        print(
            f"{total / args.seconds:,.0f} publishes/s over {args.processes} processes x "
            f"{args.inflight} in flight, {args.topics} topics; redis-server CPU "
            f"{cpu / args.seconds:.0%} of one core"
        )


if __name__ == "__main__":
    main()
