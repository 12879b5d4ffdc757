"""``wsrelay presence TOPIC``: who is subscribed to a topic, on every node.

Built on :meth:`wsrelay.client.Relay.presence` and ``presence_stats`` (``GET
/presence`` and ``GET /presence/stats``, which need the API key where the server has
one); added to the parser by :mod:`wsrelay.cli`.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from typing import Any

import msgspec

from wsrelay.cli_client import _client_parser, _duration, _run_client


def add_presence_command(commands: Any) -> None:
    """Add ``presence`` to an argparse subparsers object."""
    presence = _client_parser(
        commands,
        "presence",
        help="list the connections subscribed to a topic",
        description="List every connection subscribed to TOPIC, on every node (GET /presence): "
        "its public id, user, node and when it connected, oldest first, after a line with "
        "the counts. The topic's namespace must have presence = true.",
        epilog="example: wsrelay presence chat:1\n"
        "         wsrelay presence chat:1 --stats\n"
        "         wsrelay presence chat:1 --json",
    )
    presence.add_argument("topic", metavar="TOPIC")
    presence.add_argument(
        "--stats",
        action="store_true",
        help="print only the counts: connections and distinct users (GET /presence/stats)",
    )
    presence.add_argument(
        "--json", action="store_true", help="print the server's answer as one JSON object"
    )
    presence.set_defaults(run=lambda args: _run_client(_presence, args))


async def _presence(relay: Any, args: argparse.Namespace) -> int:
    encode = msgspec.json.Encoder().encode
    if args.stats:
        stats = await relay.presence_stats(args.topic)
        if args.json:
            print(encode(stats).decode())
        else:
            print(_counts(stats.topic, stats.num_clients, stats.num_users))
        return 0
    presence = await relay.presence(args.topic)
    if args.json:
        print(encode(presence).decode())
        return 0
    print(_counts(presence.topic, len(presence.clients), len(presence.users)))
    now = time.time()
    for entry in presence.clients:
        user = "-" if entry.user is None else entry.user
        since = datetime.fromtimestamp(entry.connected_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        ago = _duration(max(0.0, now - entry.connected_at))
        print(f"  {entry.client}  user {user}  node {entry.node}  since {since} UTC ({ago})")
    return 0


def _counts(topic: str, clients: int, users: int) -> str:
    return f"{topic}: {clients} connection(s), {users} user(s)"
