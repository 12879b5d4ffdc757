"""Exact (``MAXLEN =``) or approximate (``MAXLEN ~``) trimming of a topic's stream?

Runs the broker's publish script on a private redis-server, each publish trimming a
full stream (10 topics, filled to ``history_size`` first), with both variants in
turn, and reports Redis's own CPU time (``INFO cpu``, user + sys) per publish, the
median of ``--repeat`` runs, and how many entries each variant leaves in a stream.

    python bench/redis_trim.py [--publishes 30000] [--repeat 5] [--sizes 100 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

import redis.asyncio as aioredis

from private_redis import private_redis  # this directory is sys.path[0] for a script
from wsrelay.brokers import redis_scripts as scripts

TOPICS = 10
PAYLOAD = b'["node",null,"' + b"x" * 100 + b'"]'


async def redis_cpu(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def publishes(client: aioredis.Redis, sha: str, size: int, count: int) -> None:
    for start in range(0, count, 500):
        pipe = client.pipeline(transaction=False)
        for i in range(start, start + 500):
            topic = f"t{i % TOPICS}"
            stream, offset, epoch = scripts.keys(topic)
            args = (PAYLOAD, "e", size, 300_000, 86_400_000, scripts.channel(topic), 300_000)
            pipe.evalsha(sha, 3, stream, offset, epoch, *args)
        await pipe.execute()


async def one_run(client: aioredis.Redis, sha: str, size: int, count: int) -> tuple[float, int]:
    """Microseconds of Redis CPU per publish once streams are full; a stream's length."""
    await client.flushall()
    await publishes(client, sha, size, size * TOPICS)
    before = await redis_cpu(client)
    await publishes(client, sha, size, count)
    spent = await redis_cpu(client) - before
    return spent / count * 1e6, await client.xlen(scripts.keys("t0")[0])


async def main(args: argparse.Namespace) -> None:
    exact = scripts.PUBLISH.source
    approximate = exact.replace("'MAXLEN', '=', size", "'MAXLEN', '~', size")
    assert approximate != exact, "the publish script no longer trims with MAXLEN ="
    with private_redis() as (url, _):
        client = aioredis.from_url(url)
        shas = {
            "exact": await client.script_load(exact),
            "~": await client.script_load(approximate),
        }
        for size in args.sizes:
            cpu: dict[str, list[float]] = {name: [] for name in shas}
            lengths: dict[str, int] = {}
            for _ in range(args.repeat):
                for name, sha in shas.items():  # interleaved: both see the same noise
                    micros, lengths[name] = await one_run(client, sha, size, args.publishes)
                    cpu[name].append(micros)
            for name, runs in cpu.items():
                print(
                    f"history_size {size:>6}  MAXLEN {name:<5}  Redis CPU "
                    f"{statistics.median(runs):5.1f} us/publish (runs: "
                    f"{', '.join(f'{r:.1f}' for r in runs)})  stream length {lengths[name]}"
                )
        await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publishes", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    asyncio.run(main(parser.parse_args()))
