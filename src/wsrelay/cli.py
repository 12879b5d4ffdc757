"""The ``wsrelay`` command: ``serve``, ``pub`` and ``sub``.

A thin ``main(argv)`` over the public API; every option of ``serve`` comes from
:class:`wsrelay.config.Settings`, so ``--help`` always lists them all with
their defaults and environment variables.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from wsrelay import __version__
from wsrelay.config import Settings, env_name, parse_value

DEFAULT_URL = "http://127.0.0.1:8000"


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
    _add_pub(commands)
    _add_sub(commands)
    return parser


# -- serve ----------------------------------------------------------------------------------


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the relay",
        description="Run the relay. Every option can also be set with the environment "
        "variable shown; a flag wins over the variable.",
        epilog="example: wsrelay serve --port 8000",
    )
    for f in dataclasses.fields(Settings):
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


def _run_server(settings: Settings) -> None:
    """One relay process, until SIGINT or SIGTERM."""
    from wsrelay.server.app import serve
    from wsrelay.server.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)

    def listening(urls: list[str]) -> None:
        for url in urls:
            print(f"wsrelay listening on {url}", flush=True)

    _install_uvloop()
    asyncio.run(serve(settings, on_listening=listening, reuse_port=settings.workers > 1))


def _supervise_workers(settings: Settings) -> int:
    """Run ``settings.workers`` relay processes on one port; SIGINT/SIGTERM stops them all.
    Returns 0 if every worker exited cleanly."""
    import multiprocessing
    import signal

    context = multiprocessing.get_context("spawn")  # no inherited event loop or sockets
    workers = [
        context.Process(target=_run_server, args=(settings,), name=f"wsrelay-worker-{i}")
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


# -- pub / sub ------------------------------------------------------------------------------


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("WSRELAY_URL", DEFAULT_URL),
        help="the relay's base URL [env: WSRELAY_URL]",
    )
    parser.add_argument("--user-id", default=None, help="target (pub) or act as (sub) this user id")


def _add_pub(commands: Any) -> None:
    pub = commands.add_parser(
        "pub",
        help="publish one message",
        description="Publish MESSAGE to TOPIC; prints how many connections it reached.",
        epilog='example: wsrelay pub cats "hello" --user-id 42',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pub.add_argument("topic", metavar="TOPIC")
    pub.add_argument("message", metavar="MESSAGE")
    _add_client_options(pub)
    pub.set_defaults(run=lambda args: asyncio.run(_pub(args)))


def _add_sub(commands: Any) -> None:
    sub = commands.add_parser(
        "sub",
        help="subscribe and print messages",
        description="Register, connect and print each message published to TOPIC... "
        "until interrupted; the registration is deleted on exit.",
        epilog="example: wsrelay sub cats dogs --json",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub.add_argument("topics", metavar="TOPIC", nargs="+")
    sub.add_argument("--json", action="store_true", help="print each frame as JSON")
    _add_client_options(sub)
    sub.set_defaults(run=lambda args: asyncio.run(_sub(args)))


def _user_id(raw: str | None) -> int | str | None:
    if raw is None:
        return None
    return int(raw) if raw.lstrip("-").isdigit() else raw


async def _pub(args: argparse.Namespace) -> int:
    import aiohttp

    body = {"topic": args.topic, "message": args.message, "user_id": _user_id(args.user_id)}
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(args.url.rstrip("/") + "/publish", json=body) as response,
        ):
            answer = await _json_or_fail(response, "pub")
    except (aiohttp.ClientError, OSError) as exc:
        return _fail("pub", f"cannot reach {args.url}: {exc}")
    if answer is None:
        return 1
    print(f"delivered to {answer['recipients']} connection(s)")
    return 0


async def _sub(args: argparse.Namespace) -> int:
    import aiohttp

    base = args.url.rstrip("/")
    body = {"user_id": _user_id(args.user_id), "topics": args.topics}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/register", json=body) as response:
                answer = await _json_or_fail(response, "sub")
            if answer is None:
                return 1
            try:
                return await _print_messages(session, answer["url"], args)
            finally:
                await session.delete(f"{base}/register/{answer['id']}")
    except (aiohttp.ClientError, OSError) as exc:
        return _fail("sub", f"cannot reach {args.url}: {exc}")


async def _print_messages(session: Any, url: str, args: argparse.Namespace) -> int:
    import aiohttp

    async with session.ws_connect(url) as ws:
        print(
            f"subscribed to {', '.join(args.topics)}; waiting for messages",
            file=sys.stderr,
            flush=True,
        )
        async for frame in ws:
            if frame.type is not aiohttp.WSMsgType.TEXT:
                break
            if args.json:
                print(frame.data, flush=True)
                continue
            data = json.loads(frame.data)
            if data.get("type") == "message":
                prefix = f"[{data['topic']}] " if len(args.topics) > 1 else ""
                print(prefix + data["message"], flush=True)
            elif data.get("type") == "error":
                print(f"wsrelay sub: {data['error']['message']}", file=sys.stderr, flush=True)
        code = ws.close_code
    return _fail("sub", f"connection closed by the server (code {code})")


async def _json_or_fail(response: Any, command: str) -> dict[str, Any] | None:
    try:
        answer: dict[str, Any] = await response.json(content_type=None)
    except ValueError:
        _fail(command, f"HTTP {response.status} with a body that is not JSON")
        return None
    if response.status >= 400:
        error = answer.get("error", {})
        _fail(command, f"HTTP {response.status} {error.get('code')}: {error.get('message')}")
        return None
    return answer


def _fail(command: str, message: str) -> int:
    print(f"wsrelay {command}: {message}", file=sys.stderr)
    return 1
