"""How a node's Redis commands should reach Redis in a storm: a pool per command, or pipelines.

    python bench/redis_pool.py [--clients 10000] [--repeat 3]

Starts its own redis-server, makes ``--clients`` registrations, then has that many
clients "reconnect" at once, each as a node attaches a connection: ``GET`` of the
registration, then the TTL script and a ``PUBLISH`` together. It runs the storm once
per strategy (``--repeat`` times, medians):

* ``default``: redis-py's own pool (100 connections; the 101st command is refused);
* ``blocking-P``: a ``BlockingConnectionPool`` of P connections, one command per
  connection at a time, the others waiting for a connection;
* ``pipelined-K``: :class:`wsrelay.brokers.redis_client.Commands`: everything queued
  goes as one pipeline, over at most K connections at once.

Reports the storm's wall time, refusals, each client's latency (p50 and p99), the CPU
time of this process (the node's side) and of redis-server, and Redis's read events
and connections.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from private_redis import private_redis  # this directory is sys.path[0] for a script
from wsrelay.brokers.redis_client import Commands, Script, make_client
from wsrelay.brokers.redis_registrations import TOUCH_REGISTRATION_SCRIPT

TTL = 86400


def keys(i: int) -> list[str]:
    return [f"wsrelay:reg:c{i}", f"wsrelay:user-regs:u{i % 1000}"]


Attach = Callable[[int], Awaitable[None]]


async def direct(client: aioredis.Redis) -> Attach:
    touch = client.register_script(TOUCH_REGISTRATION_SCRIPT)

    async def attach(i: int) -> None:
        await client.get(keys(i)[0])
        await asyncio.gather(
            touch(keys(i), [TTL, f"c{i}"]), client.publish("wsrelay:control", f"attached c{i}")
        )

    return attach


async def pipelined(client: aioredis.Redis, lanes: int) -> tuple[Attach, Commands]:
    commands = Commands(client, lanes=lanes, timeout=5)
    touch = Script(TOUCH_REGISTRATION_SCRIPT)

    async def attach(i: int) -> None:
        await commands.call("GET", keys(i)[0])
        await asyncio.gather(
            commands.script(touch, keys(i), [TTL, f"c{i}"]),
            commands.call("PUBLISH", "wsrelay:control", f"attached c{i}"),
        )

    return attach, commands


async def storm(url: str, strategy: str, n: int) -> dict[str, Any]:
    admin = aioredis.from_url(url)
    commands: Commands | None = None
    if strategy == "default":
        client = aioredis.from_url(url)
        attach = await direct(client)
    elif strategy.startswith("blocking-"):
        client = make_client(url, pool_size=int(strategy.split("-")[1]), timeout=5)
        attach = await direct(client)
    else:
        client = make_client(url, pool_size=int(strategy.split("-")[1]), timeout=5)
        attach, commands = await pipelined(client, int(strategy.split("-")[1]))
    await attach(0)  # loads the script; connects once
    latencies: list[float] = []
    refused: list[str] = []
    peak_clients = 0

    async def one(i: int) -> None:
        started = time.monotonic()
        try:
            await attach(i)
        except Exception as exc:
            refused.append(f"{type(exc).__name__}: {exc}")
        else:
            latencies.append(time.monotonic() - started)

    async def watch() -> None:
        nonlocal peak_clients
        while True:
            info = await admin.info("clients")
            peak_clients = max(peak_clients, int(info["connected_clients"]))
            await asyncio.sleep(0.05)

    before = await admin.info()
    watcher = asyncio.create_task(watch())
    cpu0, started = time.process_time(), time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed, cpu = time.monotonic() - started, time.process_time() - cpu0
    watcher.cancel()
    after = await admin.info()
    if commands is not None:
        await commands.stop()
    await client.aclose()
    await admin.aclose()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[int(p * (len(latencies) - 1))] * 1000 if latencies else float("nan")

    return {
        "seconds": elapsed,
        "refused": len(refused),
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "node_cpu": cpu,
        "redis_cpu": (after["used_cpu_sys"] + after["used_cpu_user"])
        - (before["used_cpu_sys"] + before["used_cpu_user"]),
        "reads": after["total_reads_processed"] - before["total_reads_processed"],
        "peak_clients": peak_clients - 1,  # not the admin connection
        "first_error": refused[0] if refused else "",
    }


async def prepare(url: str, n: int) -> None:
    client = aioredis.from_url(url)
    for start in range(0, n, 1000):
        async with client.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + 1000)):
                pipe.set(keys(i)[0], b'["u", ["t"]]', ex=TTL)
                pipe.zadd(keys(i)[1], {f"c{i}": 0})
            await pipe.execute()
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--strategies",
        default="default,blocking-10,blocking-50,blocking-100,blocking-200,"
        "pipelined-1,pipelined-2,pipelined-4,pipelined-10,pipelined-50",
    )
    args = parser.parse_args()
    with private_redis() as (url, _):
        asyncio.run(prepare(url, args.clients))
        strategies = args.strategies.split(",")
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
        for _ in range(args.repeat):
            for strategy in strategies:  # taking turns: drift hits them all alike
                result = asyncio.run(storm(url, strategy, args.clients))
                runs[strategy].append(result)
                print(strategy, result, file=sys.stderr, flush=True)
        print(
            f"{args.clients} clients at once, each GET, then EVALSHA + PUBLISH together; "
            f"medians of {args.repeat}"
        )
        print(
            "| strategy | wall s | refused (each run) | p50 ms | p99 ms | node CPU s | redis CPU s "
            "| Redis reads | connections |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for strategy, results in runs.items():

            def med(key: str, results: list[dict[str, Any]] = results) -> float:
                return float(statistics.median(r[key] for r in results))

            print(
                f"| {strategy} | {med('seconds'):.2f} | "
                f"{'/'.join(str(r['refused']) for r in results)} | "
                f"{med('p50_ms'):.0f} | {med('p99_ms'):.0f} | {med('node_cpu'):.2f} | "
                f"{med('redis_cpu'):.2f} | {med('reads'):,.0f} | {med('peak_clients'):.0f} |"
            )
            errors = {r["first_error"] for r in results if r["first_error"]}
            if errors:
                print(f"|  | {'; '.join(sorted(errors))[:150]} |")


if __name__ == "__main__":
    main()
