"""Hold wildcard subscriptions on a relay, for the ``wsrelay-patterns`` bench target.

Opens as many JSON-mode connections as it takes to hold ``--patterns`` patterns (each
connection at most ``--per-connection``, the relay's ``max_topics_per_client``), waits
for every acknowledgement, prints ``ready N`` and stays connected until it is
terminated. The patterns never match a bench topic (``t<n>``, one segment): half are
``t<i>.*`` (the trie walks the topic's first segment and stops), half ``x<i>.>``. So
the deliveries measured are unchanged, and only what holding the patterns costs a
publish shows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import aiohttp


def patterns(count: int) -> list[str]:
    return [f"t{i // 2}.*" if i % 2 == 0 else f"x{i // 2}.>" for i in range(count)]


async def hold(url: str, wanted: list[str], per_connection: int) -> None:
    async with aiohttp.ClientSession() as session:
        sockets = []
        for start in range(0, len(wanted), per_connection):
            chunk = wanted[start : start + per_connection]
            async with session.post(f"{url}/register", json={"user_id": "bench"}) as r:
                r.raise_for_status()
                ws_url = (await r.json())["url"]
            ws = await session.ws_connect(ws_url)
            await ws.send_str(json.dumps({"subscribe": chunk}))
            ack = json.loads((await ws.receive(timeout=30)).data)
            if ack.get("type") != "subscribed":
                raise RuntimeError(f"the relay refused the patterns: {ack}")
            sockets.append(ws)
        print(f"ready {len(wanted)}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        for ws in sockets:
            await ws.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python bench/hold_patterns.py", description=__doc__)
    p.add_argument("--url", required=True, help="the relay's base URL")
    p.add_argument("--patterns", type=int, default=10000, help="patterns to hold (10000)")
    p.add_argument("--per-connection", type=int, default=256, help="patterns per connection")
    args = p.parse_args()
    asyncio.run(hold(args.url.rstrip("/"), patterns(args.patterns), args.per_connection))


if __name__ == "__main__":
    main()
