"""The client commands of ``wsrelay``: ``pub``, ``sub`` and ``stats``.

Clients of a running relay, built on :mod:`wsrelay.client`; :mod:`wsrelay.cli`
adds them to its parser with :func:`add_client_commands`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from wsrelay.client import DEFAULT_URL


def add_client_commands(commands: Any) -> None:
    """Add ``pub``, ``sub`` and ``stats`` to an argparse subparsers object."""
    _add_pub(commands)
    _add_sub(commands)
    _add_stats(commands)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults (except empty ones: those options say what happens without them)
    and keeps the line breaks of multi-line texts (the examples)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "") or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _client_parser(commands: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, formatter_class=_HelpFormatter, **kw
    )
    parser.add_argument(
        "--url",
        default=None,
        help=f"the relay's base URL [env: WSRELAY_URL] (default: {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="sent as 'Authorization: Bearer KEY' [env: WSRELAY_API_KEY, whose first "
        "comma-separated key is used] (default: none)",
    )
    return parser


def _add_pub(commands: Any) -> None:
    pub = _client_parser(
        commands,
        "pub",
        help="publish a message, or one per line of stdin",
        description="Publish MESSAGE to TOPIC and print how many connections it reached on "
        "the node that answered (with a Redis broker, other nodes deliver it too); with "
        "--stdin, publish each line of the standard input as one message, in order, in "
        "batches of up to 1000.",
        epilog='example: wsrelay pub cats "are these cats?" --user-id 42\n'
        '         wsrelay pub orders \'{"id": 17, "items": ["tea"]}\' --json\n'
        "         seq 10000 | wsrelay pub cats --stdin\n"
        '         wsrelay pub chat:1 "hi" --as-client --user-id 42 --grant-publish "chat:*"',
    )
    pub.add_argument("topic", metavar="TOPIC")
    pub.add_argument("message", metavar="MESSAGE", nargs="?", help="the message text")
    pub.add_argument(
        "--stdin", action="store_true", help="publish each line of stdin instead of MESSAGE"
    )
    pub.add_argument(
        "--json",
        action="store_true",
        help="MESSAGE (or each line of stdin) is JSON text: publish that value (an object, "
        "array, number, true, false, null, or a quoted string) instead of the text",
    )
    pub.add_argument(
        "--user-id",
        default=None,
        help="deliver only to this user's clients (with --as-client: the client's user id)",
    )
    pub.add_argument(
        "--idempotency-key",
        default=None,
        metavar="KEY",
        help="publish once per KEY and topic within the server's idempotency window; a "
        "repeat publishes nothing and prints the first one's offset (not with --stdin)",
    )
    pub.add_argument(
        "--as-client",
        action="store_true",
        help="publish as a client would, to test namespace rules and grants: register "
        "(with --user-id and the --grant-* patterns), open a WebSocket and publish over it; "
        "prints the offset, or the refusal (forbidden_topic, rate_limited...)",
    )
    pub.add_argument(
        "--grant-publish",
        action="append",
        default=[],
        metavar="PATTERN",
        help="with --as-client: a publish grant of the registration (repeatable)",
    )
    pub.add_argument(
        "--grant-subscribe",
        action="append",
        default=[],
        metavar="PATTERN",
        help="with --as-client: a subscribe grant of the registration (repeatable)",
    )
    pub.add_argument(
        "--subscribe",
        action="store_true",
        help='with --as-client: subscribe the client to TOPIC first (publish = "subscribers")',
    )
    pub.set_defaults(run=lambda args: _run_client(_pub, args))


def _add_sub(commands: Any) -> None:
    sub = _client_parser(
        commands,
        "sub",
        help="subscribe and print messages",
        description="Register, connect and print each message published to TOPIC... "
        "(a TOPIC may be a pattern, news.* or news.>, which prefixes each line with its "
        "topic) "
        "until interrupted; reconnects by itself (notices go to stderr) and recovers what "
        "was published meanwhile, each message once; a topic that could not be recovered "
        "(the server lost its history, e.g. it restarted on the memory broker) gets a "
        "notice saying messages may have been missed. Deletes the registration on exit. "
        "When the server refuses with Retry-After (a 503 from a "
        "node shedding load), it waits that long (at most 300 s, plus a random 0 to "
        "max(20%, 0.5 s)) before trying again, the first connection included.",
        epilog="example: wsrelay sub cats dogs --json\n"
        "         wsrelay sub 'news.*'   (a pattern: every news.<one segment> topic)\n"
        "         wsrelay sub cats --user-id 42 --url http://relay.internal:8000",
    )
    sub.add_argument("topics", metavar="TOPIC", nargs="+")
    sub.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object per line: {"type":"message","topic":…,"message":…,"offset":…} '
        "(message: the string, or the JSON value, as published; without --json a JSON value "
        "prints as its JSON text)",
    )
    sub.add_argument("--user-id", default=None, help="subscribe as this user")
    sub.set_defaults(run=lambda args: _run_client(_sub, args))


def _add_stats(commands: Any) -> None:
    stats = _client_parser(
        commands,
        "stats",
        help="show a node's live counters and busiest topics",
        description="Show GET /stats (with publishes/s and deliveries/s) and the busiest "
        "topics from GET /topics, refreshed every --interval seconds until interrupted.",
        epilog="example: wsrelay stats --interval 2\n         wsrelay stats --once --top 5",
    )
    stats.add_argument(
        "--interval",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="seconds between refreshes",
    )
    stats.add_argument("--once", action="store_true", help="print one snapshot and exit")
    stats.add_argument("--top", type=int, default=10, metavar="N", help="topics to list")
    stats.add_argument("--prefix", default="", help="list only topics starting with this")
    stats.set_defaults(run=lambda args: _run_client(_stats, args))


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {raw!r}")
    return value


def _user_id(raw: str | None) -> int | str | None:
    if raw is None:
        return None
    return int(raw) if raw.lstrip("-").isdigit() else raw


def _run_client(command: Any, args: argparse.Namespace) -> int:
    """Run an async client command; a RelayError becomes a one-line message and 1,
    SIGTERM cancels the command like Ctrl-C does, so it cleans up (exit 143)."""
    from wsrelay.client import Relay, RelayError

    url = args.url or os.environ.get("WSRELAY_URL") or DEFAULT_URL
    key = args.api_key or os.environ.get("WSRELAY_API_KEY", "").split(",")[0].strip() or None
    name = command.__name__.lstrip("_")

    async def run() -> int:

        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        terminated: list[bool] = []

        def terminate() -> None:
            terminated.append(True)
            task.cancel()

        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(signal.SIGTERM, terminate)
        try:
            async with Relay(url, api_key=key) as relay:
                return int(await command(relay, args))
        except RelayError as exc:
            return _fail(name, str(exc))
        except asyncio.CancelledError:
            if terminated:
                return 143
            raise

    try:
        return asyncio.run(run())
    except BrokenPipeError:  # e.g. `wsrelay sub cats | head -3`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


async def _pub(relay: Any, args: argparse.Namespace) -> int:
    user_id = _user_id(args.user_id)
    if args.stdin == (args.message is not None):
        return _fail("pub", "give either MESSAGE or --stdin", status=2)
    if args.stdin and (args.idempotency_key or args.as_client):
        return _fail("pub", "--stdin goes without --idempotency-key and --as-client", status=2)
    if not args.as_client and (args.grant_publish or args.grant_subscribe or args.subscribe):
        return _fail(
            "pub", "--grant-publish, --grant-subscribe and --subscribe need --as-client", 2
        )
    if args.json and not args.stdin:
        try:
            args.message = _json_value(args.message)
        except ValueError as exc:
            return _fail("pub", f"--json: MESSAGE {exc}", status=2)
    if args.as_client:
        return await _pub_as_client(relay, args, user_id)
    if not args.stdin:
        recipients = await relay.publish(
            args.topic, args.message, user_id=user_id, idempotency_key=args.idempotency_key
        )
        if recipients.duplicate:
            print(f"duplicate of offset {recipients.offset}: nothing was published")
        else:
            print(f"delivered to {recipients} connection(s) on this node")
        return 0
    published = delivered = batches = 0
    async for lines in _stdin_batches():
        messages: list[Any] = list(lines)
        if args.json:
            for index, line in enumerate(lines):
                try:
                    messages[index] = _json_value(line)
                except ValueError as exc:
                    number = published + index + 1  # every line before it was published
                    return _fail("pub", f"--json: line {number} {exc}; {published} published")
        counts = await relay.publish_many([(args.topic, m, user_id) for m in messages])
        published += len(counts)
        delivered += sum(counts)
        batches += 1
    print(
        f"published {published} message(s) in {batches} batch(es); "
        f"delivered to {delivered} connection(s) on this node in total"
    )
    return 0


def _json_value(text: str) -> msgspec.Raw:
    """``text`` checked to be one JSON value, to be sent as is (the relay checks the rest).

    Raises:
        ValueError: it is not; the message says where.
    """
    try:
        return msgspec.json.decode(text, type=msgspec.Raw)
    except msgspec.DecodeError as exc:
        raise ValueError(f"is not JSON ({exc})") from None


async def _pub_as_client(relay: Any, args: argparse.Namespace, user_id: Any) -> int:
    """Publish over a client's own WebSocket, registered with ``--user-id`` and the
    grants given: what a namespace allows that client is what happens."""
    grants = {"subscribe": args.grant_subscribe, "publish": args.grant_publish}
    if args.subscribe:
        client = relay.subscribe(args.topic, user_id=user_id, grants=grants)
    else:
        client = relay.connect(user_id=user_id, grants=grants)
    async with client:
        answer = await client.publish(
            args.topic, args.message, skip_self=True, idempotency_key=args.idempotency_key
        )
    if answer.duplicate:
        print(f"duplicate of offset {answer.offset}: nothing was published")
    else:
        print(f"published as a client at offset {answer.offset} (epoch {answer.epoch})")
    return 0


async def _stdin_batches(limit: int = 1000, ahead: int = 10_000) -> AsyncIterator[list[str]]:
    """The lines of stdin (without their line ends), in batches of what has already
    arrived, up to ``limit`` each: a pipe's lines go out as they come, a file's in full
    batches. A thread reads at most ``ahead`` lines ahead of what was sent."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    room = threading.Semaphore(ahead)

    def read() -> None:
        for raw in sys.stdin.buffer:
            room.acquire()
            line = raw.decode("utf-8", "replace").removesuffix("\n").removesuffix("\r")
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, name="wsrelay-stdin", daemon=True).start()
    done = False
    while not done:
        first = await queue.get()
        if first is None:
            break
        batch = [first]
        while len(batch) < limit and not queue.empty():
            line = queue.get_nowait()
            if line is None:
                done = True
                break
            batch.append(line)
        yield batch
        room.release(len(batch))


async def _sub(relay: Any, args: argparse.Namespace) -> int:
    from wsrelay.client import (
        NotRecovered,
        Reconnecting,
        ServerError,
        Subscribed,
        TooManyRequests,
    )

    topics = ", ".join(args.topics)

    def notice(event: Any) -> None:
        if isinstance(event, Reconnecting) and event.attempt == 1:
            why = "no close frame" if event.close_code is None else f"close {event.close_code}"
            _note(f"connection lost ({why}: {event.reason}); reconnecting in {event.delay:.1f} s")
        elif isinstance(event, Reconnecting):
            _note(
                f"reconnect attempt {event.attempt - 1} failed ({event.reason}); "
                f"retrying in {_retrying(event.delay, event.retry_after)}"
            )
        elif isinstance(event, Subscribed) and event.reconnects:
            anew = " (registered anew)" if event.registered else ""
            _note(f"reconnected{anew}; subscribed to {topics}")
        elif isinstance(event, NotRecovered):
            _note(_not_recovered(event))

    encode = msgspec.json.Encoder().encode
    # Each line names its topic when it could be one of several: a pattern matches many.
    prefixed = len(args.topics) > 1 or any("*" in t or ">" in t for t in args.topics)
    while True:
        subscription = relay.subscribe(
            *args.topics, user_id=_user_id(args.user_id), on_event=notice
        )
        try:
            await subscription.start()
            break
        except (ServerError, TooManyRequests) as exc:
            # The first connection raises at once; a server that said when to come
            # back (Retry-After) gets another try then, anything else ends the command.
            if exc.retry_after is None:
                raise
            delay = relay.backoff.after(exc.retry_after)
            _note(f"{exc}; retrying in {_retrying(delay, exc.retry_after)}")
            await asyncio.sleep(delay)
    async with subscription:
        print(f"subscribed to {topics}; waiting for messages", file=sys.stderr, flush=True)
        async for m in subscription:
            if args.json:
                line = encode(
                    {"type": "message", "topic": m.topic, "message": m.message, "offset": m.offset}
                )
                print(line.decode(), flush=True)
            else:
                # A string as its text, any other JSON value as its JSON text (one line).
                text = m.message if isinstance(m.message, str) else encode(m.message).decode()
                print(f"[{m.topic}] {text}" if prefixed else text, flush=True)
    return _fail("sub", "the subscription ended")  # only by an exception, in practice


def _not_recovered(event: Any) -> str:
    """The notice for a :class:`~wsrelay.client.NotRecovered` event."""
    why = {
        "epoch_changed": "the server lost its history (e.g. it restarted on the memory broker)",
        "too_far_behind": "the server's history no longer reaches back that far",
        "gap": "the server lost publications on their way to this client",
    }.get(event.reason, event.reason)
    return (
        f"{event.topic}: not recovered, messages may have been missed: {why}; "
        f"continuing after offset {event.position.offset} of epoch {event.position.epoch}"
    )


def _note(text: str) -> None:
    print(f"wsrelay sub: {text}", file=sys.stderr, flush=True)


def _retrying(delay: float, retry_after: float | None) -> str:
    """``"1.1 s"``, and why when the server set it:
    ``"1.1 s, as the server asked (Retry-After: 1 s)"``."""
    if retry_after is None:
        return f"{delay:.1f} s"
    return f"{delay:.1f} s, as the server asked (Retry-After: {retry_after:g} s)"


async def _stats(relay: Any, args: argparse.Namespace) -> int:
    from wsrelay.client import RelayError

    tty = sys.stdout.isatty()
    previous: tuple[float, Any] | None = None
    while True:
        now = time.monotonic()
        try:
            stats = await relay.stats()
            topics = await relay.topics(args.prefix, max(1, min(args.top, 1000)))
        except RelayError as exc:
            if previous is None:
                raise
            print(f"wsrelay stats: {exc}; retrying", file=sys.stderr, flush=True)
        else:
            rates = None
            if previous is not None and stats.uptime >= previous[1].uptime:  # not restarted
                elapsed = max(now - previous[0], 1e-9)
                rates = (
                    (stats.publishes - previous[1].publishes) / elapsed,
                    (stats.deliveries - previous[1].deliveries) / elapsed,
                )
            text = _stats_text(relay.url, stats, topics, rates, args.top)
            if args.once:
                print(text)
                return 0
            print(("\x1b[H\x1b[2J" if tty else "") + text + ("" if tty else "\n"), flush=True)
            previous = (now, stats)
        await asyncio.sleep(args.interval)


def _stats_text(
    url: str, stats: Any, topics: Any, rates: tuple[float, float] | None, top: int
) -> str:
    def rate(index: int) -> str:
        return f"  ({rates[index]:,.1f}/s)" if rates is not None else ""

    registrations = "?" if stats.registrations is None else f"{stats.registrations:,}"
    lines = [
        f"{url}  node {stats.node}  version {stats.version}  "
        f"up {_duration(stats.uptime)}  broker {stats.broker}",
        f"connections     {stats.connections:>12,}",
        f"registrations   {registrations:>12}",
        f"topics          {stats.topics:>12,}",
        f"publishes       {stats.publishes:>12,}{rate(0)}",
        f"deliveries      {stats.deliveries:>12,}{rate(1)}",
        f"slow consumers  {stats.slow_consumers:>12,}",
    ]
    if top > 0:
        shown = topics.topics[:top]
        lines.append(f"top topics ({len(shown)} of {topics.total}), by subscribers:")
        lines += [f"  {t.subscribers:>10,}  {t.topic}" for t in shown]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{s:02d}s"
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"


def _fail(command: str, message: str, status: int = 1) -> int:
    print(f"wsrelay {command}: {message}", file=sys.stderr)
    return status
