"""Fan-out benchmark: the same scenario against wsrelay and peer relays, results side by side.

    python bench/fanout.py --targets node,naive,wsrelay --scenario burst --repeat 3

Each target is started as a subprocess on a free loopback port (or given as a URL of a running
server), subscribers are spread over client worker processes that connect with ``?format=raw``,
and publications go over keep-alive HTTP. See bench/README.md for what every number means.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys

# Run as a script, so this directory (which holds the helper modules) is sys.path[0].
from report import as_json, plot, table
from runner import RunOptions, RunResult, run_once
from scenarios import PRESETS, SCENARIO_HELP, Scenario, build_scenario
from servers import BUILTIN, resolve_target


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    presets = "; ".join(f"{k}: {v}" for k, v in SCENARIO_HELP.items())
    p = argparse.ArgumentParser(
        prog="python bench/fanout.py",
        description="WebSocket fan-out benchmark for wsrelay and peer relays.",
        epilog=f"Scenarios -- {presets}. Explicit knobs override the preset's values.",
    )
    t = p.add_argument_group("targets")
    t.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME|URL",
        help=f"server to measure: {', '.join(BUILTIN)} or an http:// URL (repeatable)",
    )
    t.add_argument("--targets", default="", metavar="LIST", help="comma-separated targets")
    t.add_argument("--server-pid", type=int, help="pid of a URL target (enables its CPU/RSS)")
    t.add_argument(
        "--baseline",
        help="target that ratios refer to (default node; storm: wsrelay, the memory backend "
        "issue 11's target compares with; else the first target)",
    )
    t.add_argument(
        "--wsrelay-src",
        metavar="DIR",
        help="src/ directory the wsrelay targets run (default: this checkout's src/), "
        "e.g. an exported older commit",
    )
    t.add_argument(
        "--wsrelay-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra option for every wsrelay target's serve (repeatable): "
        "--wsrelay-arg=--broker-pool-size=100",
    )
    s = p.add_argument_group("scenario")
    s.add_argument("--scenario", choices=sorted(PRESETS), help="named preset (default: burst)")
    s.add_argument("--clients", type=int, help="subscribers (WebSocket connections)")
    s.add_argument("--topics", type=int, help="topics the subscribers are spread over")
    s.add_argument("--messages", type=int, help="publications to send")
    s.add_argument("--size", type=int, help="message text size in bytes")
    pace = s.add_mutually_exclusive_group()
    pace.add_argument("--inflight", type=int, help="publish as fast as possible, K in flight")
    pace.add_argument("--rate", type=float, help="publish at R messages per second")
    s.add_argument("--hold", type=float, help="seconds to hold connections idle before publishing")
    s.add_argument(
        "--subscribe",
        choices=["register", "command"],
        help="storm: subscribe with the topic in POST /register (default; ?format=raw, live at "
        'the 101) or with {"topics": [t]} after the 101 in JSON mode, awaiting wsrelay\'s '
        "acknowledgement (node sends none)",
    )
    s.add_argument(
        "--storm-inflight",
        type=int,
        help="storm: registrations / connections in flight per worker (default 0: all at once)",
    )
    s.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_const",
        const=False,
        help="skip the warm-up probe round (it also checks every subscriber is live)",
    )
    r = p.add_argument_group("run")
    r.add_argument("--repeat", type=int, default=1, help="runs per target, alternating; medians")
    r.add_argument("--workers", type=int, help="client worker processes (default: 1 per 4000)")
    r.add_argument(
        "--client",
        choices=["raw", "aiohttp"],
        default="raw",
        help="subscriber WebSocket client implementation (default raw)",
    )
    r.add_argument(
        "--pin",
        action="store_true",
        help="pin the server to CPU 0 and clients + publisher to the other CPUs",
    )
    r.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="stop waiting when no delivery arrives for this long (s)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print JSON results instead of a table")
    o.add_argument("--json-out", metavar="FILE", help="also write the JSON results to FILE")
    o.add_argument("--plot", metavar="FILE.png", help="write latency CDF + throughput plot")
    o.add_argument("--keep-logs", metavar="DIR", help="keep the servers' logs in DIR")
    args = p.parse_args(argv)
    args.target_list = args.target + [x for x in args.targets.split(",") if x]
    if not args.target_list:
        p.error("give at least one --target (wsrelay, node, naive or a URL)")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if (args.subscribe or args.storm_inflight is not None) and args.scenario != "storm":
        p.error("--subscribe and --storm-inflight go with --scenario storm")
    return args


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if needed > want:
        print(
            f"bench: warning: {needed} connections need more than the open-file limit {want}",
            file=sys.stderr,
        )


async def run_all(args: argparse.Namespace, scenario: Scenario) -> dict[str, list[RunResult]]:
    connections = scenario.clients + 100
    extra = tuple(args.wsrelay_arg)
    targets = [
        resolve_target(spec, args.server_pid, connections, args.wsrelay_src, extra)
        for spec in args.target_list
    ]
    # Every target gets as many client workers as the one with the most nodes needs, so the
    # client side is the same for all of them; a storm comes from several processes.
    min_workers = max([t.nodes for t in targets] + [2 if scenario.storm else 1])
    runs: dict[str, list[RunResult]] = {t.name: [] for t in targets}
    counter = 0
    server_cpus = client_cpus = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        server_cpus, client_cpus = frozenset(cpus[:1]), frozenset(cpus[1:])
        os.sched_setaffinity(0, client_cpus)  # this process publishes
    for rep in range(args.repeat):
        for target in targets:  # alternate targets so drift on a noisy machine hits all alike
            opts = RunOptions(
                workers=args.workers,
                min_workers=min_workers,
                client=args.client,
                drain_timeout=args.drain_timeout,
                run_index=counter,
                server_cpus=server_cpus,
                client_cpus=client_cpus,
                keep_logs=args.keep_logs,
            )
            label = f"{target.name} {rep + 1}/{args.repeat}"
            try:
                result = await run_once(target, scenario, opts, label)
            except (RuntimeError, OSError) as exc:  # one broken target must not sink the rest
                print(f"[{label}] failed: {exc}", file=sys.stderr)
                first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                result = RunResult(target.name, counter, {}, warnings=[f"failed: {first_line}"])
            result.run = rep + 1
            runs[target.name].append(result)
            counter += 1
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        # Say so now, not after minutes of measuring.
        print("bench: --plot needs matplotlib: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    scenario = build_scenario(
        args.scenario,
        clients=args.clients,
        topics=args.topics,
        messages=args.messages,
        size=args.size,
        inflight=args.inflight,
        rate=args.rate,
        hold=args.hold,
        warmup=args.warmup,
        subscribe=args.subscribe,
        storm_inflight=args.storm_inflight,
    )
    raise_fd_limit(scenario.clients + 1000)
    print(
        f"bench: {scenario.describe()}; targets {', '.join(args.target_list)}; "
        f"{args.repeat} run(s) each",
        file=sys.stderr,
    )
    if args.wsrelay_src or args.wsrelay_arg:
        print(
            f"bench: wsrelay from {args.wsrelay_src or 'src/'}, "
            f"extra options {' '.join(args.wsrelay_arg) or 'none'}",
            file=sys.stderr,
        )
    import uvloop

    runs = uvloop.run(run_all(args, scenario))
    # Ratios refer to --baseline (node; storm: wsrelay) when it ran, else to the first target.
    wanted = args.baseline or ("wsrelay" if scenario.storm else "node")
    baseline = wanted if wanted in runs else next(iter(runs))
    result = as_json(scenario, runs, baseline)
    result["wsrelay"] = {"src": args.wsrelay_src or "src/", "extra_args": args.wsrelay_arg}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(scenario, runs, baseline, args.repeat))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot(args.plot, scenario, runs)
        print(f"bench: plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
