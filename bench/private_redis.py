"""A throwaway redis-server for the Redis micro-benchmarks (``bench/redis_*.py``)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator


@contextlib.contextmanager
def private_redis() -> Iterator[tuple[str, int]]:
    """A redis-server on a free port of 127.0.0.1, keeping nothing on disk, in a temporary
    directory: yields ``(url, pid)`` once it accepts connections, and kills it after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    redis = subprocess.Popen(
        [*argv, "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL
    )
    try:
        for _ in range(1000):  # waiting for the port to open
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.01)
        yield f"redis://127.0.0.1:{port}/0", redis.pid
    finally:
        redis.kill()
        redis.wait()
        shutil.rmtree(workdir, ignore_errors=True)
