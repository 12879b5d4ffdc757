"""The ``wsrelay`` command: ``serve``, and ``pub``, ``sub``, ``stats`` and ``presence``.

A thin ``main(argv)`` over the public API; every option of ``serve`` comes from
:class:`wsrelay.config.Settings`, so ``--help`` always lists them all with
their defaults and environment variables. ``pub``, ``sub`` and ``stats`` live
in :mod:`wsrelay.cli_client`, ``presence`` in :mod:`wsrelay.cli_presence`, built on
:mod:`wsrelay.client`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from wsrelay import __version__
from wsrelay.cli_client import add_client_commands
from wsrelay.cli_presence import add_presence_command
from wsrelay.config import Settings, env_name, parse_value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsrelay",
        description="A real-time message relay: publish over HTTP, receive over WebSocket.",
    )
    parser.add_argument("--version", action="version", version=f"wsrelay {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    _add_serve(commands)
    add_client_commands(commands)
    add_presence_command(commands)
    return parser


# -- serve ----------------------------------------------------------------------------------


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the relay",
        description="Run the relay. Every option can also be set with the environment "
        "variable shown, or in the --config file; a flag wins over the variable, which "
        "wins over the file.",
        epilog="example: wsrelay serve --port 8000 (or: wsrelay serve --config wsrelay.toml)",
    )
    for f in dataclasses.fields(Settings):
        if f.metadata.get("file_only"):
            continue  # namespaces: tables in the --config file, no flag
        default = "" if f.default is None else f" (default: {f.default})"
        kind: dict[str, Any] = {
            "type": _parser_for(f),
            "metavar": f.metadata.get("metavar") or f.name.upper(),
        }
        if f.type in ("bool", bool):
            kind = {"action": "store_true"}
        elif f.type == "tuple[str, ...]":
            kind["action"] = "append"  # repeatable; each value may also be comma-separated
        serve.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,  # absent flags fall through to WSRELAY_* variables
            help=f"{f.metadata['help']}{default} [env: {env_name(f.name)}]",
            **kind,
        )
    serve.set_defaults(run=_serve)


def _parser_for(f: dataclasses.Field[Any]) -> Any:
    def parse(raw: str) -> Any:
        try:
            return parse_value(f, raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _serve(args: argparse.Namespace) -> int:
    # Flags given explicitly win over WSRELAY_* variables, which win over defaults.
    # The config file (--config or WSRELAY_CONFIG) is read by Settings.from_env, under both.
    explicit = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if hasattr(args, f.name)
    }
    for name, value in explicit.items():
        if isinstance(value, list):  # a repeated flag: a list of tuples
            explicit[name] = tuple(item for part in value for item in part)
    from wsrelay.server.auth import startup_problem

    try:
        settings = Settings.from_env(**explicit)
    except ValueError as exc:
        print(f"wsrelay serve: {exc}", file=sys.stderr)
        return 2
    problem = startup_problem(settings)
    if problem is not None:
        print(f"wsrelay serve: {problem}", file=sys.stderr)
        return 2
    if settings.workers > 1:
        return _supervise_workers(settings)
    _run_server(settings)
    return 0


def _run_server(settings: Settings, group: str | None = None) -> None:
    """One relay process, until SIGINT or SIGTERM; ``group`` names its ``--workers``."""
    from wsrelay.server.app import serve
    from wsrelay.server.limits import connections_allowed_by, raise_open_files_limit
    from wsrelay.server.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    open_files, _ = raise_open_files_limit()
    room = connections_allowed_by(open_files)
    if open_files and settings.max_connections > room:
        logging.getLogger("wsrelay").warning(
            "max_connections is %d but the open-files limit (%d) leaves room for about %d "
            "connections: raise it (docs/deployment.md) or lower --max-connections",
            settings.max_connections,
            open_files,
            room,
        )

    def listening(urls: list[str]) -> None:
        for url in urls:
            print(f"wsrelay listening on {url}", flush=True)

    _install_uvloop()
    asyncio.run(
        serve(settings, on_listening=listening, reuse_port=settings.workers > 1, group=group)
    )


def _supervise_workers(settings: Settings) -> int:
    """Run ``settings.workers`` relay processes on one port; SIGINT/SIGTERM stops them all.
    Returns 0 if every worker exited cleanly."""
    import multiprocessing
    import signal
    import socket

    context = multiprocessing.get_context("spawn")  # no inherited event loop or sockets
    group = f"{socket.gethostname()}:{settings.port}:{os.getpid()}"  # /stats, /metrics
    workers = [
        context.Process(target=_run_server, args=(settings, group), name=f"wsrelay-worker-{i}")
        for i in range(settings.workers)
    ]
    for worker in workers:
        worker.start()

    def stop_all(signum: int, frame: object) -> None:
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    for worker in workers:
        worker.join()
    return 0 if all(worker.exitcode == 0 for worker in workers) else 1


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # optional on platforms without it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
