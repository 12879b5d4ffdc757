"""Synchronous publishers: which pooled keep-alive HTTP client costs a publish least.

    python bench/sync_publish.py --requests 3000 --threads 8 --repeat 3 --pin

For docs/decisions/0009-sync-publisher.md. One ``wsrelay serve`` (memory broker,
pinned to CPU 0 with ``--pin``) runs in a subprocess; this process (CPU 1 with
``--pin``) publishes ``POST /publish`` with each candidate in turn, every candidate
holding keep-alive connections in a pool, as ``wsrelay.client.SyncRelay`` would:

* ``urllib3``: one ``HTTPConnectionPool`` (``maxsize`` = threads, ``block=True``);
* ``httpx``: one ``httpx.Client`` (``Limits(max_connections=threads)``);
* ``http.client``: the standard library, one ``HTTPConnection`` per thread, reused; the
  floor that a hand-made pool could reach, for scale.

Two measures per candidate: **latency**, one thread publishing ``--requests`` times in a
row (median and 99th percentile of each call, as seen by the caller, encoding and
decoding included), and **throughput**, ``--threads`` threads sharing the one client
and publishing ``--requests`` each (publishes/s over the whole run, and the client
process's CPU seconds per 1,000 publishes). Candidates take turns within each
repetition; the table shows medians over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

BODY = json.dumps({"topic": "bench", "message": "x" * 64}).encode()
HEADERS = {"Content-Type": "application/json"}

Publish = Callable[[], None]


def start_server(pin: bool) -> tuple[subprocess.Popen[str], str]:
    argv = [sys.executable, "-m", "wsrelay", "serve", "--port", "0", "--log-level", "warning"]
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if pin else None,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("wsrelay listening on "):
            return process, line.split()[-1]
    raise RuntimeError("the server did not start")


class Candidate:
    """A client library: ``make(url, threads)`` returns a publish function safe to call
    from ``threads`` threads at once, and a close function."""

    def __init__(self, name: str, make: Callable[[str, int], tuple[Publish, Callable[[], None]]]):
        self.name = name
        self.make = make


def _urllib3(url: str, threads: int) -> tuple[Publish, Callable[[], None]]:
    import urllib3

    pool = urllib3.connectionpool.connection_from_url(url, maxsize=threads, block=True)

    def publish() -> None:
        response = pool.request("POST", "/publish", body=BODY, headers=HEADERS, retries=False)
        assert response.status == 200, response.data
        json.loads(response.data)

    return publish, pool.close


def _httpx(url: str, threads: int) -> tuple[Publish, Callable[[], None]]:
    import httpx

    limits = httpx.Limits(max_connections=threads, max_keepalive_connections=threads)
    client = httpx.Client(base_url=url, limits=limits)

    def publish() -> None:
        response = client.post("/publish", content=BODY, headers=HEADERS)
        assert response.status_code == 200, response.content
        json.loads(response.content)

    return publish, client.close


def _stdlib(url: str, threads: int) -> tuple[Publish, Callable[[], None]]:
    host, port = url.removeprefix("http://").split(":")
    local = threading.local()
    opened: list[http.client.HTTPConnection] = []

    def publish() -> None:
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = local.connection = http.client.HTTPConnection(host, int(port))
            opened.append(connection)
        connection.request("POST", "/publish", body=BODY, headers=HEADERS)
        response = connection.getresponse()
        data = response.read()
        assert response.status == 200, data
        json.loads(data)

    def close() -> None:
        for connection in opened:
            connection.close()

    return publish, close


CANDIDATES = [
    Candidate("urllib3", _urllib3),
    Candidate("httpx", _httpx),
    Candidate("http.client", _stdlib),
]


def latency(candidate: Candidate, url: str, requests: int) -> tuple[float, float]:
    """Median and p99 of one thread's publishes, in microseconds."""
    publish, close = candidate.make(url, 1)
    try:
        for _ in range(100):  # warm-up: connection opened, code paths hot
            publish()
        samples = []
        for _ in range(requests):
            started = time.perf_counter()
            publish()
            samples.append((time.perf_counter() - started) * 1e6)
    finally:
        close()
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def throughput(candidate: Candidate, url: str, requests: int, threads: int) -> tuple[float, float]:
    """Publishes per second with ``threads`` threads sharing the client, and the client
    process's CPU milliseconds per 1,000 publishes."""
    publish, close = candidate.make(url, threads)
    start = threading.Barrier(threads + 1)

    def work() -> None:
        start.wait()
        for _ in range(requests):
            publish()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    try:
        for _ in range(50 * threads):
            publish()
        for worker in workers:
            worker.start()
        cpu = time.process_time()
        started = time.perf_counter()
        start.wait()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
    finally:
        close()
    total = requests * threads
    return total / elapsed, cpu * 1000 / (total / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="publishes per thread")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pin", action="store_true", help="server on CPU 0, bench on CPU 1")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = parser.parse_args()
    if args.pin:
        os.sched_setaffinity(0, {1})
    process, url = start_server(args.pin)
    results: dict[str, dict[str, list[float]]] = {
        c.name: {"p50": [], "p99": [], "rps": [], "cpu": []} for c in CANDIDATES
    }
    try:
        for _ in range(args.repeat):
            for candidate in CANDIDATES:
                p50, p99 = latency(candidate, url, args.requests)
                rps, cpu = throughput(candidate, url, args.requests, args.threads)
                row = results[candidate.name]
                row["p50"].append(p50)
                row["p99"].append(p99)
                row["rps"].append(rps)
                row["cpu"].append(cpu)
    finally:
        process.terminate()
        process.wait(10)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"{args.requests} publishes per thread, {args.threads} threads, "
        f"medians of {args.repeat} run(s)\n"
    )
    print("| client | latency p50 (µs) | latency p99 (µs) | publishes/s | client CPU ms / 1000 |")
    print("|---|---:|---:|---:|---:|")
    med = statistics.median
    for name, row in results.items():
        print(
            f"| {name} | {med(row['p50']):,.0f} | {med(row['p99']):,.0f} | "
            f"{med(row['rps']):,.0f} | {med(row['cpu']):,.0f} |"
        )


if __name__ == "__main__":
    main()
