"""User-space cost of one delivery on wsrelay's fan-out path, without the kernel (issue 15).

    python bench/deliver_cost.py [--subscribers 1000] [--per-pass 1,10] [--rounds 7]
    PYTHONPATH=/tmp/compiled/src python bench/deliver_cost.py   # e.g. a mypyc-compiled copy

``deliver()`` (core/fanout.py) of ``--per-pass`` publications to ``--subscribers``
:class:`~wsrelay.server.connection.Connection` objects, then the :class:`Flusher`'s pass,
whose writes go to a transport that takes the bytes and does nothing. That is the Python
part of what the server does per delivery in ``bench/fanout.py``'s burst (about 10
publications per pass) and steady (1 per pass), with uvloop's and the kernel's part left
out. Prints CPU per delivery (best and median of ``--rounds``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import wsrelay.core.fanout as fanout
import wsrelay.core.outbox as outbox
from wsrelay.core.fanout import Publication, deliver
from wsrelay.core.registry import Client
from wsrelay.server.connection import Connection, Flusher, frame_text


class NullTransport:
    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: list[bytes]) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class Loop:
    """Enough of a loop for the Flusher: call_soon runs at the end of the pass."""

    def __init__(self) -> None:
        self.ready: list = []

    def call_soon(self, callback, *args):  # type: ignore[no-untyped-def]
        self.ready.append(callback)

    def run_pass(self) -> None:
        ready, self.ready = self.ready, []
        for callback in ready:
            callback()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--per-pass", default="1,10")
    p.add_argument("--passes", type=int, default=300)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    print(f"fanout: {fanout.__file__}\noutbox: {outbox.__file__}")
    loop = Loop()
    flusher = Flusher(loop)  # type: ignore[arg-type]
    clients = []
    for i in range(args.subscribers):
        conn = Connection(NullTransport(), raw=True, outbox_limit=1 << 20, flusher=flusher)  # type: ignore[arg-type]
        client = Client(f"c{i}", None, {"t"})
        client.sink = conn
        clients.append(client)
    message = "x" * 100
    for per_pass in (int(x) for x in args.per_pass.split(",")):
        results = []
        for _ in range(args.rounds):
            for conn in clients:  # the bound on the transport's buffer, as if measured
                conn.sink._buffered = 0  # type: ignore[union-attr]
            t0 = time.process_time()
            for _ in range(args.passes):
                for _ in range(per_pass):
                    deliver(Publication("t", message), clients, frame_text)
                loop.run_pass()
            dt = time.process_time() - t0
            results.append(dt / (args.passes * per_pass * len(clients)) * 1e6)
        print(
            f"{per_pass:3} publication(s) per pass: {min(results):.3f} us per delivery best, "
            f"{statistics.median(results):.3f} median"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
