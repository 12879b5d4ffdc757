"""What one topic's history takes: the memory broker's and the Redis broker's.

    python bench/history_memory.py [--publications 100] [--sizes 100,1024]

Memory broker: publishes ``--publications`` messages of each size to one topic of a
:class:`wsrelay.core.history.MemoryHistory` (``--history-size`` = the number published, so
all are kept) under ``tracemalloc``, the messages made inside the measured window as a
request's decoded body would be; prints the bytes allocated and still held, per topic and
per publication, against what the history counts (``ENTRY_OVERHEAD`` + the message's
length per publication, ``TOPIC_OVERHEAD`` per topic: the ``wsrelay_history_bytes``
metric and the ``--history-memory`` cap).

Redis broker: starts a private redis-server and one ``wsrelay serve --broker`` node on it,
``POST /publish``-es the same messages to one topic, and prints ``MEMORY USAGE ...
SAMPLES 0`` of the topic's stream, offset and epoch keys.
"""

from __future__ import annotations

import argparse
import gc
import json
import socket
import sys
import tracemalloc
import urllib.request

from servers import Server, resolve_target  # this directory is sys.path[0] for a script
from wsrelay.core import history as h
from wsrelay.core.fanout import Publication


def memory_broker(n: int, size: int) -> dict[str, float]:
    store = h.MemoryHistory(size=n, ttl=300.0, memory_limit=1 << 30)
    topic = "room-1"
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    store.position(topic)  # the topic alone: epoch, offset, an empty deque
    empty = tracemalloc.get_traced_memory()[0] - base
    for i in range(n):
        # A fresh str per message, like the text decoded from a publish request (the
        # history holds the only reference once the fan-out is done).
        message = (f"{i:06d}" + "x" * size)[:size]
        store.append(Publication(topic, message))
        del message
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    text = n * size
    counted = store.stats.bytes
    return {
        "size": size,
        "publications": n,
        "topic_bytes": held,
        "empty_topic_bytes": empty,
        "per_publication": (held - empty) / n,
        "per_publication_besides_text": (held - empty - text) / n,
        "counted_bytes": counted,
        "counted_over_measured": counted / held,
    }


def empty_topics(count: int = 1000) -> float:
    """Bytes per topic that has a position and no publication, over ``count`` topics (so
    the topics dict's growth is spread over them), each name a fresh string."""
    store = h.MemoryHistory(size=100, ttl=300.0, memory_limit=1 << 30)
    names = [f"room-{i:06d}" for i in range(count)]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for name in names:
        store.position(name)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return held / count


def redis_command(port: int, *args: str) -> bytes:
    """One command over a plain socket (RESP), the raw reply."""
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        b = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(b), b)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(out)
        return sock.recv(65536)


def redis_int(port: int, *args: str) -> int:
    reply = redis_command(port, *args)
    if not reply.startswith(b":"):
        raise RuntimeError(f"{' '.join(args)}: {reply!r}")
    return int(reply[1:].split(b"\r\n", 1)[0])


def redis_broker(n: int, sizes: list[int]) -> list[dict[str, float]]:
    server = Server(resolve_target("wsrelay-redis1"))
    server.start()
    try:
        port = server.redis_port
        assert port is not None
        results = []
        for size in sizes:
            topic = f"room-{size}"
            for i in range(n):
                message = (f"{i:06d}" + "x" * size)[:size]
                body = json.dumps({"topic": topic, "message": message}).encode()
                request = urllib.request.Request(
                    server.base_url + "/publish",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=10) as resp:
                    resp.read()
            base = f"wsrelay:{{{topic}}}"
            stream = redis_int(port, "MEMORY", "USAGE", f"{base}:stream", "SAMPLES", "0")
            offset = redis_int(port, "MEMORY", "USAGE", f"{base}:offset", "SAMPLES", "0")
            epoch = redis_int(port, "MEMORY", "USAGE", f"{base}:epoch", "SAMPLES", "0")
            length = redis_int(port, "XLEN", f"{base}:stream")
            results.append(
                {
                    "size": size,
                    "publications": n,
                    "stream_entries": length,
                    "stream_bytes": stream,
                    "offset_and_epoch_bytes": offset + epoch,
                    "per_publication": stream / max(1, length),
                    "per_publication_besides_text": (stream - length * size) / max(1, length),
                }
            )
        return results
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--publications", type=int, default=100)
    p.add_argument("--sizes", default="100,1024", help="message sizes in bytes, comma-separated")
    p.add_argument("--no-redis", action="store_true", help="the memory broker only")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(f"ENTRY_OVERHEAD {h.ENTRY_OVERHEAD}, TOPIC_OVERHEAD {h.TOPIC_OVERHEAD}")
    print("memory broker (tracemalloc, bytes held):")
    for size in sizes:
        r = memory_broker(args.publications, size)
        print(
            f"  {r['publications']} x {size} B: topic {r['topic_bytes']:,} B "
            f"(empty topic {r['empty_topic_bytes']:,}), per publication "
            f"{r['per_publication']:.0f} B = text + {r['per_publication_besides_text']:.0f}; "
            f"the history counts {r['counted_bytes']:,} B "
            f"({r['counted_over_measured']:.2f}x measured)"
        )
    print(
        f"  a topic with no publication, over 1000 topics: {empty_topics():.0f} B "
        "(its name not included)"
    )
    if not args.no_redis:
        print("Redis broker (MEMORY USAGE ... SAMPLES 0, one node, POST /publish):")
        for r in redis_broker(args.publications, sizes):
            print(
                f"  {r['publications']} x {r['size']} B: stream {r['stream_bytes']:,} B "
                f"({r['stream_entries']} entries; per publication {r['per_publication']:.0f} B "
                f"= text + {r['per_publication_besides_text']:.0f}), offset + epoch keys "
                f"{r['offset_and_epoch_bytes']:,} B"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
