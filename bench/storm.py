"""Storm scenario helpers for bench/fanout.py: Redis's own counters, the kernel's, and the
metrics of a storm's two phases (registration, then connect and subscribe).

Redis is read with ``INFO`` over a plain connection of its own (no redis-py, so the bench
does not depend on the broker's client). The INFO commands the bench sends are counted and
taken off Redis's totals, so the figures are the relay nodes' alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from array import array
from dataclasses import dataclass
from typing import Any

CpuTimes = tuple[float, float]  # (user, system) seconds, as runner.cpu_times returns

# /proc/net/netstat TcpExt counters (system-wide) that show connections the kernel made wait:
# an accept queue that overflowed (the client's ACK is dropped and retried, 1 s later and up)
# and SYNs the clients had to send again.
KERNEL_COUNTERS = ("ListenOverflows", "ListenDrops", "SyncookiesSent", "TCPSynRetrans")


def kernel_tcp_counters() -> dict[str, int]:
    try:
        with open("/proc/net/netstat") as f:
            lines = [line.split() for line in f if line.startswith("TcpExt:")]
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    values = dict(zip(lines[0][1:], lines[1][1:], strict=False))
    return {k: int(values[k]) for k in KERNEL_COUNTERS if k in values}


@dataclass
class RedisSnapshot:
    # Both count the commands Lua scripts call too (Redis 7: an EVALSHA calling 3 commands
    # counts 4); commandstats leaves out the bench's INFO, total_commands_processed does not.
    commands: int  # total_commands_processed
    all_commands: int  # the calls in commandstats, INFO left out
    reads: int  # total_reads_processed: read events on client sockets (~ round trips)
    cpu: float  # used_cpu_user + used_cpu_sys, seconds
    by_command: dict[str, int]
    info_calls: int  # INFO commands the bench had sent when this was taken, this one included
    failed: dict[str, int]  # commandstats failed_calls + rejected_calls (errors, NOSCRIPT)


@dataclass
class RedisDelta:
    commands: int
    all_commands: int
    reads: int
    cpu: float
    by_command: dict[str, int]
    failed: dict[str, int]


def redis_delta(before: RedisSnapshot, after: RedisSnapshot) -> RedisDelta:
    """What the nodes cost Redis between two snapshots.

    A command counts once it has run, a read as it happens: ``after``'s totals include the
    INFO that took ``before`` and every INFO since, not ``after``'s own (commands); they
    include ``after``'s read and not ``before``'s (reads). Either way that is
    ``after.info_calls - before.info_calls`` of the bench's own, taken off here.
    """
    ours = after.info_calls - before.info_calls
    names = set(before.by_command) | set(after.by_command)
    by_command = {
        n: after.by_command.get(n, 0) - before.by_command.get(n, 0)
        for n in sorted(names)
        if after.by_command.get(n, 0) != before.by_command.get(n, 0)
    }
    failed = {
        n: after.failed.get(n, 0) - before.failed.get(n, 0)
        for n in sorted(set(before.failed) | set(after.failed))
        if after.failed.get(n, 0) != before.failed.get(n, 0)
    }
    return RedisDelta(
        after.commands - before.commands - ours,
        after.all_commands - before.all_commands,
        after.reads - before.reads - ours,
        after.cpu - before.cpu,
        by_command,
        failed,
    )


class RedisInfo:
    """``INFO`` from the bench's private redis-server, and a sampler of its client count."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.calls = 0
        self._main: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._sampler: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._sampling = True

    async def _info(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], section: str
    ) -> dict[str, str]:
        reader, writer = conn
        arg = section.encode()
        writer.write(b"*2\r\n$4\r\nINFO\r\n$%d\r\n%s\r\n" % (len(arg), arg))
        self.calls += 1
        head = await reader.readline()
        if not head.startswith(b"$"):
            raise RuntimeError(f"redis INFO: {head!r}")
        body = await reader.readexactly(int(head[1:]) + 2)
        out: dict[str, str] = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#") and ":" in line:
                key, _, value = line.partition(":")
                out[key] = value
        return out

    async def snapshot(self) -> RedisSnapshot:
        if self._main is None:
            self._main = await asyncio.open_connection("127.0.0.1", self.port)
        info = await self._info(self._main, "everything")
        by_command, failed = {}, {}
        for key, value in info.items():
            if key.startswith("cmdstat_") and key != "cmdstat_info":
                fields = dict(f.split("=", 1) for f in value.split(","))
                name = key.removeprefix("cmdstat_")
                by_command[name] = int(fields["calls"])
                failed[name] = int(fields.get("failed_calls", 0)) + int(
                    fields.get("rejected_calls", 0)
                )
        return RedisSnapshot(
            int(info["total_commands_processed"]),
            sum(by_command.values()),
            int(info["total_reads_processed"]),
            float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
            by_command,
            self.calls,
            failed,
        )

    async def peak_clients(self, interval: float = 0.05) -> int:
        """Most clients connected to Redis (the nodes' connections: not the bench's two)
        until :meth:`stop_sampling`."""
        self._sampler = await asyncio.open_connection("127.0.0.1", self.port)
        peak = 0
        while self._sampling:
            info = await self._info(self._sampler, "clients")
            peak = max(peak, int(info["connected_clients"]) - 2)
            await asyncio.sleep(interval)
        return peak

    def stop_sampling(self) -> None:
        self._sampling = False

    async def close(self) -> None:
        for conn in (self._main, self._sampler):
            if conn is not None:
                conn[1].close()
                with contextlib.suppress(OSError):
                    await conn[1].wait_closed()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def _cpu(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    if before is None or after is None:
        return None
    return max(0.0, after[0] + after[1] - before[0] - before[1])


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _phase(msgs: list[dict[str, Any]], started: float, prefix: str) -> dict[str, float | None]:
    """A phase's outcomes over all workers: counts, the time until the last outcome, and
    the per-client durations' percentiles (successes only)."""
    durations: array[float] = array("d")
    for msg in msgs:
        durations.frombytes(msg["durations"])
    ordered = sorted(durations)
    last = max((msg["last"] for msg in msgs if msg["last"]), default=0.0)
    ms = {q: _pct(ordered, q / 100) for q in (50, 99)}
    return {
        f"{prefix}_s": last - started if last else None,
        f"{prefix}_ok": float(sum(msg["ok"] for msg in msgs)),
        f"{prefix}_refused": float(sum(sum(msg["refused"].values()) for msg in msgs)),
        f"{prefix}_retry_after": float(sum(msg["retry_after"] for msg in msgs)),
        f"{prefix}_failed": float(sum(msg["failed"] for msg in msgs)),
        f"{prefix}_p50_ms": ms[50] * 1e3 if ms[50] is not None else None,
        f"{prefix}_p99_ms": ms[99] * 1e3 if ms[99] is not None else None,
        f"{prefix}_max_ms": ordered[-1] * 1e3 if ordered else None,
    }


def _by_status(msgs: list[dict[str, Any]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for msg in msgs:
        for status, count in msg["refused"].items():
            out[status] = out.get(status, 0) + count
    return dict(sorted(out.items()))


def _errors(msgs: list[dict[str, Any]]) -> list[str]:
    counts: dict[str, int] = {}
    for msg in msgs:
        for text, count in msg["errors"]:
            counts[text] = counts.get(text, 0) + count
    return [f"{c} x {t}" for t, c in sorted(counts.items(), key=lambda kv: -kv[1])[:5]]


def storm_metrics(
    clients: int,
    times: list[float],
    registered: list[dict[str, Any]],
    connected: list[dict[str, Any]],
    snaps: list[RedisSnapshot | None],
    cpu: list[tuple[CpuTimes | None, list[CpuTimes | None]]],
    tcp: list[dict[str, int]],
    details: dict[str, Any],
) -> dict[str, float | None]:
    """The metrics of one storm. ``times``, ``snaps``, ``cpu`` (server, then each client
    worker) and ``tcp`` were sampled before the registrations, before the connections and
    after the last connection's outcome."""
    reg = _phase(registered, times[0], "register")
    con = _phase(connected, times[1], "storm")
    m: dict[str, float | None] = {**reg, **con}
    m["error_frames"] = float(sum(msg["error_frames"] for msg in connected))
    m["connections_per_s"] = _div(con["storm_ok"], con["storm_s"])
    m["registrations_per_s"] = _div(reg["register_ok"], reg["register_s"])
    con_wall = times[2] - times[1]
    server_reg = _cpu(cpu[0][0], cpu[1][0])
    server_con = _cpu(cpu[1][0], cpu[2][0])
    m["server_cpu_us_per_registration"] = _div(
        server_reg * 1e6 if server_reg is not None else None, reg["register_ok"]
    )
    m["server_cpu_us_per_connection"] = _div(
        server_con * 1e6 if server_con is not None else None, con["storm_ok"]
    )
    m["storm_server_cpu_util"] = _div(server_con, con_wall)
    workers = [_cpu(b, a) or 0.0 for b, a in zip(cpu[1][1], cpu[2][1], strict=True)]
    m["storm_client_cpu_util_max"] = _div(max(workers, default=0.0), con_wall)
    m["storm_clients_cpu_util"] = _div(sum(workers), con_wall)
    for name, (before, after) in (("register", (tcp[0], tcp[1])), ("connect", (tcp[1], tcp[2]))):
        if before and after:
            m[f"listen_overflows_{name}"] = float(
                after["ListenOverflows"] - before["ListenOverflows"]
            )
            m[f"syn_retrans_{name}"] = float(after["TCPSynRetrans"] - before["TCPSynRetrans"])
    details["register_refused"] = _by_status(registered)
    details["connect_refused"] = _by_status(connected)
    details["register_errors"] = _errors(registered)
    details["connect_errors"] = _errors(connected)
    if snaps[0] is not None and snaps[1] is not None and snaps[2] is not None:
        on_reg, on_con = redis_delta(snaps[0], snaps[1]), redis_delta(snaps[1], snaps[2])
        n_reg, n_con = reg["register_ok"], con["storm_ok"]
        m["redis_cmds_per_registration"] = _div(on_reg.commands, n_reg)
        m["redis_cmds_per_connection"] = _div(on_con.commands, n_con)
        m["redis_reads_per_connection"] = _div(on_con.reads, n_con)
        m["redis_cpu_us_per_connection"] = _div(on_con.cpu * 1e6, n_con)
        m["storm_redis_cpu_util"] = _div(on_con.cpu, con_wall)
        m["redis_cpu_us_per_registration"] = _div(on_reg.cpu * 1e6, n_reg)
        details["redis_per_registration"] = {
            k: round(v / n_reg, 3) for k, v in on_reg.by_command.items() if n_reg
        }
        details["redis_per_connection"] = {
            k: round(v / n_con, 3) for k, v in on_con.by_command.items() if n_con
        }
        # Calls Redis answered with an error (e.g. NOSCRIPT: an EVALSHA before the script
        # was loaded, counted in the calls above as well).
        details["redis_failed_registering"] = on_reg.failed
        details["redis_failed_connecting"] = on_con.failed
    details["attempted"] = clients
    return m
