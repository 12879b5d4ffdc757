"""Shared test helpers: a real server in a subprocess, and real clients.

Timeouts are multiples of ``TIMEOUT``, scaled by ``WSRELAY_TESTS_TIMEOUT_FACTOR``
on slow machines. Nothing here sleeps to wait for delivery: every wait is on
the awaited event itself, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import websockets
from websockets.asyncio.client import ClientConnection

TIMEOUT = 5.0 * float(os.environ.get("WSRELAY_TESTS_TIMEOUT_FACTOR", "1"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for servers that must be
    restarted on the same port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """``wsrelay serve`` running in a subprocess on a free port."""

    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    url: str = ""
    process: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)

    def start(self) -> ServerProcess:
        # Warnings printed (once per place) so that the fixtures can fail a test whose
        # server warned: a deprecation on every request is a cost nobody sees otherwise.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "default", **self.env}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wsrelay", "serve", "--port", "0", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        ready = threading.Event()
        self._pump_thread = threading.Thread(target=self._pump, args=(ready,), daemon=True)
        self._pump_thread.start()
        if not ready.wait(TIMEOUT * 4) or not self.url:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.output))
        return self

    def _pump(self, ready: threading.Event) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if not self.url and line.startswith("wsrelay listening on "):
                self.url = line.split()[-1]
                ready.set()
        ready.set()

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http")

    def stop(self) -> int | None:
        """SIGTERM, wait, and return the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(TIMEOUT * 4)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._pump_thread.join(TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def log(self) -> str:
        return "".join(self.output)


def stop_and_check(server: ServerProcess) -> None:
    """Stop ``server``; fail if it logged a traceback or a warning, or exited badly."""
    status = server.stop()
    log = server.log()
    assert "Traceback" not in log, f"the server logged a traceback:\n{log}"
    assert "Warning:" not in log, f"the server printed a warning:\n{log}"
    assert status == 0, f"the server exited with {status}:\n{log}"


class Subscriber:
    """A real WebSocket client of the relay."""

    def __init__(self, ws: ClientConnection, client_id: str, url: str) -> None:
        self.ws = ws
        self.id = client_id
        self.url = url

    async def command(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send a command and return the server's answer (ack or error frame)."""
        await self.ws.send(json.dumps(body))
        return await self.frame()

    async def subscribe(self, *topics: str) -> dict[str, Any]:
        answer = await self.command({"subscribe": list(topics)})
        assert answer["type"] == "subscribed", answer
        return answer

    async def frame(self) -> dict[str, Any]:
        data = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        assert isinstance(data, str)
        result: dict[str, Any] = json.loads(data)
        return result

    async def message(self) -> tuple[str, Any]:
        """The next publication as ``(topic, message)`` (a string, or the JSON value)."""
        frame = await self.frame()
        assert frame["type"] == "message", frame
        return frame["topic"], frame["message"]

    async def raw(self) -> str:
        data = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        assert isinstance(data, str)
        return data

    async def closed(self) -> tuple[int | None, str | None]:
        """Wait for the server to close; returns (code, reason)."""
        await asyncio.wait_for(self.ws.wait_closed(), TIMEOUT)
        rcvd = self.ws.close_code, self.ws.close_reason
        return rcvd

    async def close(self) -> None:
        await self.ws.close()


class Api:
    """HTTP calls to one server."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        async with self.session.request(method, self.base + path, json=body, **kw) as response:
            return response.status, await response.json(content_type=None)

    async def register(
        self, user_id: int | str | None = None, topics: Sequence[str] = ()
    ) -> dict[str, Any]:
        status, body = await self.call(
            "POST", "/register", {"user_id": user_id, "topics": list(topics)}
        )
        assert status == 200, body
        return dict(body)

    async def publish(self, topic: str, message: Any, user_id: int | str | None = None) -> int:
        status, body = await self.call(
            "POST", "/publish", {"topic": topic, "message": message, "user_id": user_id}
        )
        assert status == 200, body
        return int(body["recipients"])

    async def connect(
        self,
        user_id: int | str | None = None,
        topics: Sequence[str] = (),
        fmt: str | None = None,
        **kw: Any,
    ) -> Subscriber:
        """Register and connect; with ``topics`` subscribed at registration."""
        reg = await self.register(user_id, topics)
        url = reg["url"] + (f"?format={fmt}" if fmt else "")
        ws = await websockets.connect(url, open_timeout=TIMEOUT, **kw)
        return Subscriber(ws, reg["id"], reg["url"])
