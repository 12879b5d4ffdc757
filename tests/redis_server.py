"""A real redis-server on a free port, in a temporary directory, that tests may kill.

Where no ``redis-server`` binary exists the Redis tests skip, saying how to
enable them, unless ``WSRELAY_REQUIRE_REDIS=1`` (set by ``.ci/run``) makes that
a failure: in CI, nothing the Redis issue asks for may be skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from tests.utils import TIMEOUT

REQUIRED = os.environ.get("WSRELAY_REQUIRE_REDIS") == "1"


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        message = (
            "redis-server is not installed; install it (Debian: apt-get install redis-server) "
            "to run the Redis tests"
        )
        if REQUIRED:
            pytest.fail(message + " — WSRELAY_REQUIRE_REDIS=1 makes this a failure")
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One redis-server; :meth:`kill` and :meth:`start` again keep the port."""

    def __init__(self, *extra: str) -> None:
        self.binary = redis_binary()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="wsrelay-redis-")
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.02)  # polling for the port to open, not waiting for delivery
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: the crash a node must survive."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
