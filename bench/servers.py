"""Starting and stopping the servers under test for bench/fanout.py.

Built-in targets, each started as a subprocess on a free loopback port:

* ``wsrelay``: ``python -m wsrelay serve`` from this repository (``src/`` is put on PYTHONPATH, so
  an editable install is not required; its dependencies must be importable by this interpreter);
* ``node``: ``bench/peers/node/relay.js`` (``npm install`` runs first if node_modules is missing);
* ``naive``: ``bench/peers/naive_aiohttp.py``, the seed design on aiohttp.

Any other target must be a URL (``http://127.0.0.1:8000``) of a server that is already running;
its CPU and memory are only measured when its pid is given (``--server-pid``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
NODE_DIR = BENCH_DIR / "peers" / "node"
BUILTIN = ("wsrelay", "node", "naive")


@dataclass(frozen=True)
class Target:
    name: str
    argv: tuple[str, ...] = ()  # command with "{port}" placeholder; empty for a URL target
    url: str | None = None  # base URL of an already running server
    pid: int | None = None  # pid of an already running server, when known
    env: dict[str, str] = field(default_factory=dict)


def resolve_target(spec: str, server_pid: int | None = None) -> Target:
    """Turn ``wsrelay`` / ``node`` / ``naive`` / a URL into a :class:`Target`."""
    py = sys.executable
    if spec == "wsrelay":
        src = str(REPO_ROOT / "src")
        path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
        argv = (py, "-m", "wsrelay", "serve", "--host", "127.0.0.1", "--port", "{port}")
        return Target("wsrelay", argv, env={"PYTHONPATH": path})
    if spec == "node":
        script = str(NODE_DIR / "relay.js")
        return Target("node", ("node", script, "--host", "127.0.0.1", "--port", "{port}"))
    if spec == "naive":
        script = str(BENCH_DIR / "peers" / "naive_aiohttp.py")
        return Target("naive", (py, script, "--host", "127.0.0.1", "--port", "{port}"))
    if spec.startswith(("http://", "https://")):
        return Target(spec, url=spec.rstrip("/"), pid=server_pid)
    raise ValueError(f"unknown target {spec!r}: use wsrelay, node, naive or an http:// URL")


def ensure_node_modules() -> None:
    if (NODE_DIR / "node_modules" / "ws").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("the node target needs npm (Node.js 18+) on PATH")
    print(f"bench: npm install --prefix {NODE_DIR}", file=sys.stderr)
    subprocess.run(
        [npm, "install", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"],
        check=True,
        stdout=sys.stderr,
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def get_json_status(url: str, timeout: float = 2.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        status: int = resp.status
        return status


class Server:
    """A server under test: started here (and stopped by :meth:`stop`) or already running."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.base_url = target.url or ""
        self.pid = target.pid

    def start(self, timeout: float = 30.0, cpus: set[int] | None = None) -> None:
        """Start the target (pinned to ``cpus``, if given) and wait for ``GET /health``."""
        if not self.target.argv:
            self._wait_healthy(timeout)
            return
        if self.target.name == "node":
            ensure_node_modules()
        port = free_port()
        argv = [a.replace("{port}", str(port)) for a in self.target.argv]
        fd, log = tempfile.mkstemp(prefix=f"bench-{self.target.name}-", suffix=".log")
        self.log_path = Path(log)
        env = {**os.environ, **self.target.env, "PYTHONUNBUFFERED": "1"}
        with os.fdopen(fd, "wb") as out:
            self.process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO_ROOT,
                # Pin before exec, so every thread of the server inherits the affinity.
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        self.pid = self.process.pid
        self.base_url = f"http://127.0.0.1:{port}"
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.target.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if get_json_status(self.base_url + "/health") == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.target.name} not healthy after {timeout}s\n" + self.log_tail()
                )
            time.sleep(0.1)

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None
