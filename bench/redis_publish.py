"""How many publishes per second one Redis takes through wsrelay's publish script.

    python bench/redis_publish.py [--seconds 5] [--inflight 64] [--topics 100] [--processes 2]
    PYTHONPATH=/tmp/before/src python bench/redis_publish.py --repeat 3   # an older commit

Starts its own redis-server, then several processes each keep ``--inflight``
publishes in flight (the way several relay nodes would) for ``--seconds``, each through
its own :class:`~wsrelay.brokers.redis.RedisBroker` (no HTTP). ``--history-size``: the
stream length per topic (default: the code's own default setting). Runs on the broker
API before issue 12 (``history_size=``, a handler) and after it (``HistoryLimits``, a
listener), so the same bench measures both. Prints publishes/s and the redis-server's
CPU use per run, then the medians; docs/deployment.md quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import multiprocessing
import os
import statistics
import time
from typing import Any

from private_redis import private_redis  # this directory is sys.path[0] for a script
from wsrelay.brokers.redis import RedisBroker, make_client
from wsrelay.config import Settings
from wsrelay.core.fanout import Publication


class Listener:
    """Drops what the broker hands over (the issue 12 broker API)."""

    def publication(self, publication: Publication) -> None:
        pass

    def gap(self, topic: str, epoch: str, offset: int) -> None:
        pass


def make_broker(url: str, history_size: int) -> tuple[RedisBroker, Any]:
    """A broker keeping ``history_size`` per topic, and what its start() takes."""
    params = inspect.signature(RedisBroker.__init__).parameters
    if "history" in params:  # issue 12 on: HistoryLimits, a Listener
        from wsrelay.core.history import HistoryLimits

        broker = RedisBroker(make_client(url), history=HistoryLimits(size=history_size))
        return broker, Listener()
    kwargs: dict[str, Any] = {"history_size": history_size}  # before: a handler
    return RedisBroker(make_client(url), **kwargs), lambda p: None


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def publisher(url: str, seconds: float, inflight: int, topics: int, history: int) -> int:
    broker, listener = make_broker(url, history)
    await broker.start(listener, f"bench-{os.getpid()}")
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


def run_publisher(args: tuple[str, float, int, int, int], out: multiprocessing.Queue[int]) -> None:
    out.put(asyncio.run(publisher(*args)))


def run_once(args: Any) -> tuple[float, float]:
    """One fresh redis-server and one round of publishing: (publishes/s, Redis CPU share)."""
    with private_redis() as (url, redis_pid):
        out: multiprocessing.Queue[int] = multiprocessing.Queue()
        work = (url, args.seconds, args.inflight, args.topics, args.history_size)
        procs = [
            multiprocessing.Process(target=run_publisher, args=(work, out))
            for _ in range(args.processes)
        ]
        cpu0 = cpu_seconds(redis_pid)
        for p in procs:
            p.start()
        total = sum(out.get() for _ in procs)
        for p in procs:
            p.join()
        cpu = cpu_seconds(redis_pid) - cpu0
    return total / args.seconds, cpu / args.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--topics", type=int, default=100)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--history-size", type=int, default=Settings().history_size)
    parser.add_argument("--repeat", type=int, default=1, help="runs, each on a fresh Redis")
    args = parser.parse_args()
    import wsrelay

    print(
        f"bench: wsrelay from {os.path.dirname(wsrelay.__file__)}; {args.processes} "
        f"process(es) x {args.inflight} in flight, {args.topics} topics, history size "
        f"{args.history_size}, {args.seconds:g} s per run"
    )
    rates, cpus = [], []
    for run in range(args.repeat):
        rate, cpu = run_once(args)
        rates.append(rate)
        cpus.append(cpu)
        print(
            f"run {run + 1}/{args.repeat}: {rate:,.0f} publishes/s; redis-server CPU "
            f"{cpu:.0%} of one core ({cpu / rate * 1e6:.1f} us per publish)"
        )
    rate, cpu = statistics.median(rates), statistics.median(cpus)
    print(
        f"median of {args.repeat}: {rate:,.0f} publishes/s over {args.processes} processes x "
        f"{args.inflight} in flight, {args.topics} topics; redis-server CPU "
        f"{cpu:.0%} of one core"
    )


if __name__ == "__main__":
    main()
