"""Tables, JSON and plots for bench/fanout.py."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
from array import array
from dataclasses import asdict
from typing import Any

from runner import RunResult
from scenarios import Scenario

# (key, label, format, lower_is_better) in table order; "%" formats a 0..1 fraction.
METRICS: list[tuple[str, str, str, bool]] = [
    # storm: phase 1, every registration at once
    ("register_s", "storm: all registered s", ".2f", True),
    ("registrations_per_s", "registrations/s", ",.0f", False),
    ("register_ok", "registrations answered 200", ",.0f", False),
    ("register_refused", "registrations refused (HTTP status)", ",.0f", True),
    ("register_failed", "registrations failed (no answer)", ",.0f", True),
    ("register_p50_ms", "registration p50 ms", ".1f", True),
    ("register_p99_ms", "registration p99 ms", ".1f", True),
    # storm: phase 2, every connection (and subscription) at once
    ("storm_s", "storm: all connected + subscribed s", ".2f", True),
    ("connections_per_s", "connections/s (subscribed / that time)", ",.0f", False),
    ("storm_ok", "subscribed", ",.0f", False),
    ("storm_refused", "upgrades refused (HTTP status)", ",.0f", True),
    ("storm_retry_after", "  of which with Retry-After", ",.0f", False),
    ("storm_failed", "connections failed (no answer, closed)", ",.0f", True),
    ("error_frames", "error frames instead of subscribed", ",.0f", True),
    ("protocol_errors", "non-frame bytes after the 101", ",.0f", True),
    ("unsubscribed", "subscribed but no probe delivered", ",.0f", True),
    ("server_logged_refusals", "'refused request' lines in the node logs", ",.0f", True),
    ("storm_p50_ms", "connect + subscribe p50 ms", ".1f", True),
    ("storm_p99_ms", "connect + subscribe p99 ms", ".1f", True),
    ("storm_max_ms", "connect + subscribe max ms", ".1f", True),
    ("server_cpu_us_per_registration", "server CPU us/registration", ".0f", True),
    ("server_cpu_us_per_connection", "server CPU us/connection", ".0f", True),
    ("storm_server_cpu_util", "server CPU busy while connecting", "%", True),
    ("storm_client_cpu_util_max", "busiest client worker CPU while connecting", "%", True),
    ("storm_clients_cpu_util", "client workers CPU while connecting", "%", True),
    ("redis_cmds_per_registration", "Redis commands/registration", ".2f", True),
    ("redis_cmds_per_connection", "Redis commands/connection", ".2f", True),
    ("redis_reads_per_connection", "Redis read events/connection", ".3f", True),
    ("redis_cpu_us_per_registration", "redis-server CPU us/registration", ".0f", True),
    ("redis_cpu_us_per_connection", "redis-server CPU us/connection", ".0f", True),
    ("storm_redis_cpu_util", "redis-server CPU busy while connecting", "%", True),
    ("redis_peak_clients", "Redis clients (peak, the nodes')", ",.0f", True),
    ("listen_overflows_register", "kernel: listen overflows, registering", ",.0f", True),
    ("listen_overflows_connect", "kernel: listen overflows, connecting", ",.0f", True),
    ("syn_retrans_register", "kernel: SYNs sent again, registering", ",.0f", True),
    ("syn_retrans_connect", "kernel: SYNs sent again, connecting", ",.0f", True),
    ("deliveries_per_s", "deliveries/s", ",.0f", False),
    ("publishes_per_s", "publishes/s", ",.0f", False),
    ("server_cpu_us_per_delivery", "server CPU us/delivery", ".2f", True),
    ("server_cpu_util", "server CPU busy", "%", True),
    ("server_sys_share", "server CPU in kernel", "%", True),
    ("latency_p50_ms", "latency p50 ms", ".2f", True),
    ("latency_p99_ms", "latency p99 ms", ".2f", True),
    ("latency_max_ms", "latency max ms", ".2f", True),
    # multi-node targets (wsrelay-redis): publishing node vs the others, and Redis itself
    ("latency_local_p50_ms", "latency p50 ms, publishing node", ".2f", True),
    ("latency_local_p99_ms", "latency p99 ms, publishing node", ".2f", True),
    ("latency_remote_p50_ms", "latency p50 ms, other node", ".2f", True),
    ("latency_remote_p99_ms", "latency p99 ms, other node", ".2f", True),
    ("redis_hop_p50_ms", "Redis hop adds, p50 ms", ".2f", True),
    ("redis_hop_p99_ms", "Redis hop adds, p99 ms", ".2f", True),
    ("redis_cpu_us_per_delivery", "redis-server CPU us/delivery", ".2f", True),
    ("redis_cpu_util", "redis-server CPU busy", "%", True),
    ("rss_before_mb", "server RSS before connect MB", ".1f", True),
    ("rss_connected_mb", "server RSS connected MB", ".1f", True),
    ("rss_end_mb", "server RSS at end MB", ".1f", True),
    ("rss_per_conn_kb", "RSS per connection KiB", ".2f", True),
    ("idle_cpu_util", "server CPU busy while idle", "%.1", True),
    ("connect_s", "connect + register time s", ".2f", True),
    ("expected", "deliveries expected", ",.0f", False),
    ("received", "deliveries received", ",.0f", False),
    ("lost", "deliveries lost", ",.0f", True),
    ("client_cpu_us_per_delivery", "client CPU us/delivery", ".2f", True),
    ("client_sys_share", "client CPU in kernel", "%", True),
    ("client_cpu_util_max", "busiest client worker CPU", "%", True),
    ("publisher_cpu_util", "publisher CPU", "%", True),
    ("client_side_cpu_util", "client workers + publisher CPU", "%", True),
]
NO_RATIO = {
    "register_ok",
    "register_refused",
    "register_failed",
    "storm_ok",
    "storm_refused",
    "storm_retry_after",
    "storm_failed",
    "error_frames",
    "protocol_errors",
    "unsubscribed",
    "server_logged_refusals",
    "storm_client_cpu_util_max",
    "storm_clients_cpu_util",
    "redis_peak_clients",
    "listen_overflows_register",
    "listen_overflows_connect",
    "syn_retrans_register",
    "syn_retrans_connect",
    "redis_hop_p50_ms",
    "redis_hop_p99_ms",
    "expected",
    "received",
    "lost",
    "rss_before_mb",
    "client_cpu_us_per_delivery",
    "server_sys_share",
    "client_sys_share",
    "client_cpu_util_max",
    "publisher_cpu_util",
    "client_side_cpu_util",
    "connect_s",
    "idle_cpu_util",
}


def median_metrics(runs: list[RunResult]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in dict.fromkeys(k for r in runs for k in r.metrics):
        values = [v for r in runs if (v := r.metrics.get(key)) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def ratios(
    medians: dict[str, dict[str, float | None]], baseline: str
) -> dict[str, dict[str, float | None]]:
    base = medians.get(baseline, {})
    out: dict[str, dict[str, float | None]] = {}
    for target, values in medians.items():
        out[target] = {}
        for key, value in values.items():
            b = base.get(key)
            out[target][key] = value / b if value is not None and b else None
    return out


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if spec.startswith("%"):
        return f"{value * 100:.{spec[2:] or 0}f}%"
    return format(value, spec)


def table(scenario: Scenario, runs: dict[str, list[RunResult]], baseline: str, repeat: int) -> str:
    medians = {t: median_metrics(rs) for t, rs in runs.items()}
    rel = ratios(medians, baseline)
    targets = list(runs)
    header = [f"metric (median of {repeat} run{'s' if repeat > 1 else ''})", *targets]
    rows: list[list[str]] = []
    for key, label, spec, _ in METRICS:
        values = [medians[t].get(key) for t in targets]
        if all(v is None for v in values):
            continue
        cells = [label]
        for t, v in zip(targets, values, strict=True):
            cell = _fmt(v, spec)
            r = rel[t].get(key)
            if key not in NO_RATIO and r is not None and t != baseline and baseline in medians:
                cell += f" ({r:.2f}x)"
            cells.append(cell)
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [scenario.describe()]
    if baseline in medians and len(targets) > 1:
        lines.append(f"(x) = ratio to {baseline}")
    lines.append(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    )
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    details = [f"{t} run {r.run}: {d}" for t, rs in runs.items() for r in rs if (d := _details(r))]
    lines += ["", "storm details:", *("  " + d for d in details)] if details else []
    notes = [f"{t} run {r.run}: {w}" for t, rs in runs.items() for r in rs for w in r.warnings]
    lines += ["", "warnings:", *("  " + n for n in notes)] if notes else []
    return "\n".join(lines)


def _details(run: RunResult) -> str:
    """A storm run's refusals by status, first errors and Redis commands by name."""
    d = run.details
    parts = []
    for phase in ("register", "connect"):
        if d.get(f"{phase}_refused"):
            parts.append(f"{phase} refused by status {d[f'{phase}_refused']}")
        if d.get(f"{phase}_errors"):
            parts.append(f"{phase} errors: {'; '.join(d[f'{phase}_errors'][:2])}")
    for phase in ("registration", "connection"):
        per = d.get(f"redis_per_{phase}")
        if per:
            parts.append(f"Redis per {phase}: " + ", ".join(f"{k} {v:g}" for k, v in per.items()))
    for phase in ("registering", "connecting"):
        failed = d.get(f"redis_failed_{phase}")
        if failed:
            parts.append(f"Redis calls failed {phase}: {failed}")
    if d.get("closed_by_server"):
        parts.append(f"closed by the server afterwards: {d['closed_by_server']}")
    return "; ".join(parts)


def machine_info() -> dict[str, str]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    node = ""
    if shutil.which("node"):
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    load = ""
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {
        "load_average_at_end": load,
        "cpus": str(os.cpu_count()),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": node,
    }


def as_json(scenario: Scenario, runs: dict[str, list[RunResult]], baseline: str) -> dict[str, Any]:
    medians = {t: median_metrics(rs) for t, rs in runs.items()}
    rel = ratios(medians, baseline)
    return {
        "scenario": asdict(scenario),
        "machine": machine_info(),
        "baseline": baseline,
        "targets": {
            t: {
                "median": medians[t],
                "ratio_to_baseline": rel[t],
                "runs": [r.metrics for r in rs],
                "details": [r.details for r in rs],
                "warnings": [w for r in rs for w in r.warnings],
            }
            for t, rs in runs.items()
        },
    }


def plot(path: str, scenario: Scenario, runs: dict[str, list[RunResult]]) -> None:
    """Latency CDF per target (all runs pooled) and deliveries/s per run (or RSS per connection)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.5))
    for target, rs in runs.items():
        pooled: array[int] = array("q")
        for r in rs:
            pooled.extend(r.latencies_ns)
        if not pooled:
            continue
        values = sorted(pooled)
        step = max(1, len(values) // 5000)
        xs = [v / 1e6 for v in values[::step]] + [values[-1] / 1e6]
        ys = [i * step / len(values) for i in range(len(xs) - 1)] + [1.0]
        ax_lat.plot(xs, ys, label=target)
    ax_lat.set_xscale("log")
    ax_lat.set_xlabel("end-to-end latency (ms, log scale)")
    ax_lat.set_ylabel("fraction of deliveries")
    ax_lat.set_title("latency CDF")
    ax_lat.grid(True, which="both", alpha=0.3)
    if ax_lat.lines:
        ax_lat.legend()
    key, label = ("deliveries_per_s", "deliveries/s")
    if scenario.messages == 0:
        key, label = ("rss_per_conn_kb", "RSS per connection (KiB)")
    names = list(runs)
    meds = [median_metrics(runs[t]).get(key) or 0.0 for t in names]
    ax_bar.bar(names, meds, color="#9ab", label="median")
    for i, t in enumerate(names):
        points = [v for r in runs[t] if (v := r.metrics.get(key)) is not None]
        ax_bar.scatter([i] * len(points), points, color="black", s=12, zorder=3)
    ax_bar.set_ylabel(label)
    ax_bar.set_title(f"{label}: median (bar) and each run (dots)")
    fig.suptitle(scenario.describe(), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
