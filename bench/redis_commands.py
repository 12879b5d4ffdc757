"""What one connection and one subscription change cost Redis, through wsrelay's Relay.

    python bench/redis_commands.py [--clients 50] [--storm 10000] [--pool-size N]

Starts its own redis-server and drives one :class:`wsrelay.relay.Relay` on it (no HTTP,
no WebSocket: only what the node asks of Redis). Each operation is first done for
``--clients`` clients one after the other, so that nothing is pipelined across clients,
and reported per client from Redis's own counters (``INFO``):

* ``commands``: every command Redis ran (``commandstats``), those a Lua script ran
  included (an ``EVALSHA`` counts once, and so does each command inside it);
* ``reads``: read events on client sockets (``total_reads_processed``): commands sent
  together on one connection are one.

With ``--delay-ms D`` the node reaches Redis through a proxy that holds every reply
for D ms, and the table adds each operation's time in units of D: the round trips one
client waits for, one after the other (requests sent together on two connections, such
as a command and a ``SUBSCRIBE``, count once).

Then a storm: ``--storm`` registered clients reconnect at once (lookup, attach, and the
topic set sent again, all concurrently; ``--wave N``: N at a time) and the same counters
are reported per client, with Redis's CPU time, the wall time, and how many failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from private_redis import private_redis  # this directory is sys.path[0] for a script
from wsrelay.brokers import Backend, from_url
from wsrelay.config import Settings
from wsrelay.core.registry import Client
from wsrelay.relay import Relay


class Sink:
    raw = False

    def send(self, frame: bytes) -> bool:
        return True

    def close(self, code: int, reason: str) -> None:
        pass


@dataclass
class Counters:
    all_commands: int
    reads: int
    cpu: float
    by_command: dict[str, int]

    def __sub__(self, other: Counters) -> Counters:
        names = set(self.by_command) | set(other.by_command)
        return Counters(
            self.all_commands - other.all_commands,
            self.reads - other.reads - 1,  # the INFO that took ``self``
            self.cpu - other.cpu,
            {
                n: self.by_command.get(n, 0) - other.by_command.get(n, 0)
                for n in names
                if self.by_command.get(n, 0) != other.by_command.get(n, 0)
            },
        )


async def counters(admin: aioredis.Redis) -> Counters:
    info: dict[str, Any] = await admin.execute_command(  # type: ignore[no-untyped-call]
        "INFO", "stats", "commandstats", "cpu"
    )
    by_command = {
        key.removeprefix("cmdstat_"): int(value["calls"])
        for key, value in info.items()
        if key.startswith("cmdstat_") and key != "cmdstat_info"
    }
    return Counters(
        sum(by_command.values()),
        int(info["total_reads_processed"]),
        float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
        by_command,
    )


def row(name: str, delta: Counters, n: int, trips: str) -> str:
    detail = ", ".join(f"{c} {v / n:.2g}" for c, v in sorted(delta.by_command.items()))
    return f"| {name} | {delta.all_commands / n:.2f} | {delta.reads / n:.2f} | {trips} | {detail} |"


DELAY = 0.0


async def measure(
    admin: aioredis.Redis, name: str, clients: list[Client], op: Callable[[Client], Awaitable[Any]]
) -> None:
    await asyncio.sleep(0.05 + DELAY * 2)  # let background work (confirmations) settle
    before = await counters(admin)
    started = time.monotonic()
    for client in clients:
        await op(client)
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.05 + DELAY * 2)
    trips = f"{elapsed / len(clients) / DELAY:.1f}" if DELAY else "-"
    print(row(name, await counters(admin) - before, len(clients), trips))


async def delaying_proxy(target_port: int, delay: float) -> int:
    """A TCP proxy to 127.0.0.1:``target_port`` that holds what Redis sends for ``delay``
    seconds (in order); returns its port."""

    async def pipe_delayed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    writer.close()
                    return
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)

        task = asyncio.create_task(forward())
        while True:
            data = await reader.read(65536)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await task

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target_port)
        with contextlib.suppress(OSError):
            await asyncio.gather(
                pipe(reader, upstream_writer), pipe_delayed(upstream_reader, writer)
            )

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    return port


async def run(
    url: str, n: int, storm: int, wave: int, pool_size: int | None, delay_ms: float
) -> None:
    global DELAY
    admin = aioredis.from_url(url)
    if delay_ms:
        DELAY = delay_ms / 1000
        port = await delaying_proxy(int(url.rsplit(":", 1)[1].split("/")[0]), DELAY)
        url = f"redis://127.0.0.1:{port}/0"
    settings = Settings(broker=url, max_registrations_per_user=0)
    # (--pool-size only on code that has it: the bench also measures the code before it.)
    options: dict[str, Any] = {} if pool_size is None else {"pool_size": pool_size}

    def backend() -> Backend:
        return from_url(url, registration_ttl=settings.registration_ttl, **options)

    relay = Relay(settings, lambda payload: payload, backend())
    await relay.start()
    sinks: dict[str, Sink] = {}

    print("| operation, per client | commands | reads | round trips | commands by name |")
    print("|---|---:|---:|---:|---|")
    # Each client has a topic of its own and one shared with all: attaching the first
    # client subscribes the shared one, every attach subscribes its own.
    clients: list[Client] = []

    async def register(i: int) -> None:
        clients.append(await relay.register(f"u{i}", ["shared", f"own{i}"]))

    await measure(
        admin, "register (user, 2 topics)", [Client("", None, set())] * n, _counted(register)
    )
    await relay.lookup(clients[0].id)  # warm up: the scripts are loaded once per node

    async def lookup(client: Client) -> None:
        await relay.lookup(client.id)

    await measure(admin, "lookup (before the upgrade)", clients, lookup)

    async def attach(client: Client) -> None:
        sink = sinks[client.id] = Sink()
        await relay.attach(client, sink)

    await measure(admin, "attach (1 new topic here, 1 not)", clients, attach)

    async def same_topics(client: Client) -> None:
        await relay.set_topics(client, set(client.topics))

    await measure(admin, "topics: the same set again", clients, same_topics)

    async def subscribe_new(client: Client) -> None:
        await relay.subscribe(client, [f"extra-{client.id}"])

    await measure(admin, "subscribe: a topic new here", clients, subscribe_new)

    async def subscribe_shared(client: Client) -> None:
        await relay.subscribe(client, ["shared2"])

    await measure(admin, "subscribe: a topic subscribed here", clients[1:], subscribe_shared)

    async def unsubscribe(client: Client) -> None:
        await relay.unsubscribe(client, [f"extra-{client.id}"])

    await measure(admin, "unsubscribe: the last subscriber here", clients, unsubscribe)

    async def detach(client: Client) -> None:
        await relay.detach(client, sinks.pop(client.id))

    await measure(admin, "detach (1 topic vacated here)", clients, detach)

    if storm:
        await relay.stop()
        relay = Relay(settings, lambda payload: payload, backend())
        await relay.start()
        topics = [f"room{i % 100}" for i in range(storm)]
        made: list[Client] = []
        for start in range(0, storm, 90):  # under redis-py's default pool of 100
            made += await asyncio.gather(
                *(
                    relay.register(f"s{i}", [topics[i]])
                    for i in range(start, min(storm, start + 90))
                )
            )
        failures: list[str] = []

        async def reconnect(client: Client) -> None:
            try:
                loaded = await relay.lookup(client.id)
                await relay.attach(loaded, Sink())
                await relay.set_topics(loaded, set(loaded.topics))
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

        await asyncio.sleep(0.1)
        before = await counters(admin)
        started = time.monotonic()
        for start in range(0, storm, wave or storm):
            await asyncio.gather(*(reconnect(c) for c in made[start : start + (wave or storm)]))
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.1)
        delta = await counters(admin) - before
        print()
        how = f"{wave} at a time" if wave else "at once"
        print(
            f"storm: {storm} clients (100 topics) reconnect {how}: {elapsed:.2f} s, "
            f"{len(failures)} failed{' (' + failures[0] + ')' if failures else ''}; "
            f"per client {delta.all_commands / storm:.2f} commands, "
            f"{delta.reads / storm:.3f} reads; redis-server CPU {delta.cpu * 1000:.0f} ms "
            f"({delta.cpu / storm * 1e6:.1f} µs/client)"
        )
        print("   ", ", ".join(f"{c} {v}" for c, v in sorted(delta.by_command.items())))
    await relay.stop()
    await admin.aclose()


def _counted(register: Callable[[int], Awaitable[None]]) -> Callable[[Client], Awaitable[None]]:
    count = 0

    async def op(_: Client) -> None:
        nonlocal count
        await register(count)
        count += 1

    return op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--storm", type=int, default=10_000)
    parser.add_argument("--wave", type=int, default=0)
    parser.add_argument("--pool-size", type=int, default=None)
    parser.add_argument("--delay-ms", type=float, default=0)
    args = parser.parse_args()
    with private_redis() as (url, _):
        asyncio.run(run(url, args.clients, args.storm, args.wave, args.pool_size, args.delay_ms))


if __name__ == "__main__":
    main()
