"""What the memory broker's history costs a publication, without the kernel or the clients.

    python bench/history_cost.py [--subscribers 1000,1] [--messages 2000] [--rounds 7]

Drives one :class:`wsrelay.relay.Relay` on the memory broker in this process (no HTTP, no
sockets): ``--subscribers`` attached clients on one topic, each with a sink that accepts
every frame and writes nothing, and ``--messages`` ``Relay.publish`` calls of 100 B. The
same is done with the history on (``--history-size`` 100, the default) and off (0), in
turns, ``--rounds`` times each; it prints the process CPU per publication and per delivery
(best and median of the rounds) and the ratio on / off.

This is the user-space part of what ``bench/fanout.py`` measures (burst and steady: 1000
subscribers) and of a ``POST /publish`` (1 subscriber), with the noise of a shared machine
left out: the difference between the two is the history's cost, whatever the kernel and
the other processes do.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from wsrelay.brokers.memory import MemoryBus
from wsrelay.config import Settings
from wsrelay.core.history import HistoryLimits
from wsrelay.relay import Relay


class Sink:
    raw = True

    def send(self, frame: bytes) -> bool:
        return True

    def close(self, code: int, reason: str) -> None:
        pass


async def one_round(history_size: int, subscribers: int, messages: int) -> float:
    """Process CPU seconds of ``messages`` publishes to ``subscribers``."""
    limits = HistoryLimits(size=history_size)
    settings = Settings(history_size=history_size, max_registrations_per_user=0)
    relay = Relay(settings, lambda payload: payload, MemoryBus(limits=limits).backend())
    await relay.start()
    for i in range(subscribers):
        client = await relay.register(f"u{i}", ["room"])
        await relay.attach(client, Sink())
    text = "x" * 100
    for _ in range(100):  # warm-up
        await relay.publish("room", text)
    started = time.process_time()
    for _ in range(messages):
        await relay.publish("room", text)
    cpu = time.process_time() - started
    await relay.stop()
    return cpu


async def run(args: argparse.Namespace) -> None:
    for subscribers in [int(s) for s in args.subscribers.split(",") if s]:
        # More publications with fewer subscribers, so no case is too short to time.
        messages = min(args.messages * 20, max(100, args.messages * 1000 // subscribers))
        cpu: dict[int, list[float]] = {100: [], 0: []}
        for _ in range(args.rounds):
            for size in (100, 0):  # in turns, so drift hits both alike
                cpu[size].append(await one_round(size, subscribers, messages))
        print(
            f"{subscribers} subscriber(s), {messages} publications a round, {args.rounds} rounds:"
        )
        for size, label in ((100, "history on (100)"), (0, "history off (0)")):
            best, med = min(cpu[size]), statistics.median(cpu[size])
            print(
                f"  {label:17s} per publication best {best / messages * 1e6:7.2f} us, median "
                f"{med / messages * 1e6:7.2f} us; per delivery median "
                f"{med / messages / subscribers * 1e6:.3f} us"
            )
        on, off = statistics.median(cpu[100]), statistics.median(cpu[0])
        print(
            f"  on / off: {on / off:.3f} (median), {min(cpu[100]) / min(cpu[0]):.3f} (best); "
            f"the history adds {(on - off) / messages * 1e6:.2f} us per publication"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", default="1000,1", help="comma-separated cases")
    p.add_argument("--messages", type=int, default=2000, help="publications per round")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
