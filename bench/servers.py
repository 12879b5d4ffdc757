"""Starting and stopping the servers under test for bench/fanout.py.

Built-in targets, each started as a subprocess on a free loopback port:

* ``wsrelay``: ``python -m wsrelay serve`` from this repository (``src/`` is put on PYTHONPATH, so
  an editable install is not required; its dependencies must be importable by this interpreter);
* ``node``: ``bench/peers/node/relay.js`` (``npm install`` runs first if node_modules is missing);
* ``naive``: ``bench/peers/naive_aiohttp.py``, the seed design on aiohttp;
* ``uws``: ``bench/peers/uws/relay.js``, the seed API on uWebSockets.js (C++) with its native
  topic pub/sub (``npm install`` runs first if node_modules is missing);
* ``wsrelay-redis``: a private ``redis-server`` on a free port (no persistence, in a temporary
  directory) and two ``python -m wsrelay serve --broker redis://...`` nodes on their own ports.
  The bench spreads subscribers over both nodes and publishes to the first one;
* ``wsrelay-redis1``: the same with one node;
* ``wsrelay-nohistory``: ``wsrelay`` with ``--history-size 0`` (no per-topic history, no
  recovery), to measure what the history costs beside the default;
* ``wsrelay-namespaces``: ``wsrelay`` with ``--config bench/namespaces.toml`` (eight
  namespaces, the bench's topics in the last), to measure what the rules cost;
* ``wsrelay-patterns``: ``wsrelay`` holding 10,000 wildcard subscriptions that match no
  bench topic (``bench/hold_patterns.py``, started once the relay is up), to measure what
  holding patterns costs a publish.

Any other target must be a URL (``http://127.0.0.1:8000``) of a server that is already running;
its CPU and memory are only measured when its pid is given (``--server-pid``).
"""

from __future__ import annotations

import contextlib
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
UWS_DIR = BENCH_DIR / "peers" / "uws"
BUILTIN = (
    "wsrelay",
    "node",
    "naive",
    "uws",
    "wsrelay-redis",
    "wsrelay-redis1",
    "wsrelay-nohistory",
    "wsrelay-namespaces",
    "wsrelay-patterns",
)
HELD_PATTERNS = 10000
"""Wildcard subscriptions the ``wsrelay-patterns`` target holds (issue 13's figure)."""


@dataclass(frozen=True)
class Target:
    name: str
    argv: tuple[str, ...] = ()  # command with "{port}" placeholder; empty for a URL target
    url: str | None = None  # base URL of an already running server
    pid: int | None = None  # pid of an already running server, when known
    env: dict[str, str] = field(default_factory=dict)
    nodes: int = 1  # relay processes; more than 1 share a private redis-server (wsrelay-redis)
    redis: bool = False  # the nodes use a private redis-server the bench starts
    acks: bool = False  # answers a subscription command with an acknowledgement (JSON mode)
    patterns: int = 0  # wildcard subscriptions held by bench/hold_patterns.py once it is up


def _wsrelay_env(connections: int, src_dir: str | None = None) -> dict[str, str]:
    src = str(Path(src_dir).resolve()) if src_dir else str(REPO_ROOT / "src")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
    # wsrelay refuses upgrades past --max-connections (default 10000): let every subscriber in.
    if connections > 10000:
        env["WSRELAY_MAX_CONNECTIONS"] = str(connections)
    return env


def resolve_target(
    spec: str,
    server_pid: int | None = None,
    connections: int = 0,
    wsrelay_src: str | None = None,
    wsrelay_args: tuple[str, ...] = (),
) -> Target:
    """Turn a built-in target's name (:data:`BUILTIN`) or a URL into a :class:`Target`.

    ``connections``: WebSockets the target must accept (wsrelay's limit is raised to it).
    ``wsrelay_src``: the ``src/`` directory the wsrelay targets run (default this checkout's);
    ``wsrelay_args``: extra ``serve`` options for them (``--broker-pool-size 100``).
    """
    py = sys.executable
    if spec.startswith("wsrelay"):
        argv: tuple[str, ...] = (py, "-m", "wsrelay", "serve", "--host", "127.0.0.1")
        argv += ("--port", "{port}")
        env = _wsrelay_env(connections, wsrelay_src)
        if spec == "wsrelay":
            return Target("wsrelay", argv + wsrelay_args, env=env, acks=True)
        if spec == "wsrelay-nohistory":
            argv += ("--history-size", "0", *wsrelay_args)
            return Target(spec, argv, env=env, acks=True)
        if spec == "wsrelay-namespaces":
            argv += ("--config", str(BENCH_DIR / "namespaces.toml"), *wsrelay_args)
            return Target(spec, argv, env=env, acks=True)
        if spec == "wsrelay-patterns":
            return Target(spec, argv + wsrelay_args, env=env, acks=True, patterns=HELD_PATTERNS)
        argv += ("--broker", "{broker}", *wsrelay_args)
        if spec == "wsrelay-redis":
            return Target(spec, argv, env=env, nodes=2, redis=True, acks=True)
        if spec == "wsrelay-redis1":
            return Target(spec, argv, env=env, nodes=1, redis=True, acks=True)
    if spec == "node":
        script = str(NODE_DIR / "relay.js")
        return Target("node", ("node", script, "--host", "127.0.0.1", "--port", "{port}"))
    if spec == "uws":
        script = str(UWS_DIR / "relay.js")
        return Target("uws", ("node", script, "--host", "127.0.0.1", "--port", "{port}"))
    if spec == "naive":
        script = str(BENCH_DIR / "peers" / "naive_aiohttp.py")
        return Target("naive", (py, script, "--host", "127.0.0.1", "--port", "{port}"))
    if spec.startswith(("http://", "https://")):
        return Target(spec, url=spec.rstrip("/"), pid=server_pid)
    raise ValueError(f"unknown target {spec!r}: use {', '.join(BUILTIN)} or an http:// URL")


def ensure_node_modules(peer: Path = NODE_DIR, module: str = "ws") -> None:
    """``npm install`` in the peer's directory unless ``module`` is already there."""
    if (peer / "node_modules" / module).is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"the {peer.name} target needs npm (Node.js 18+) on PATH")
    print(f"bench: npm install --prefix {peer}", file=sys.stderr)
    subprocess.run(
        [npm, "install", "--prefix", str(peer), "--no-audit", "--no-fund"],
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
    """A server under test: started here (and stopped by :meth:`stop`) or already running.

    A target with ``redis`` starts a private redis-server first, then ``nodes`` relay
    processes on it. ``base_url`` is the first node's (the bench publishes there),
    ``node_urls`` lists every node, ``pids`` their processes, ``redis_pid`` and
    ``redis_port`` Redis's.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self.processes: list[subprocess.Popen[bytes]] = []
        self.log_paths: list[Path] = []
        self.base_url = target.url or ""
        self.node_urls = [self.base_url] if target.url else []
        self.pids: list[int] = [target.pid] if target.pid else []
        self.redis: subprocess.Popen[bytes] | None = None
        self.redis_pid: int | None = None
        self.redis_port: int | None = None
        self._redis_dir: str | None = None
        self._holder: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.pids[0] if self.pids else None

    def start(self, timeout: float = 30.0, cpus: set[int] | None = None) -> None:
        """Start the target (pinned to ``cpus``, if given) and wait for ``GET /health``."""
        if not self.target.argv:
            self._wait_healthy(self.base_url, None, timeout)
            return
        if self.target.name == "node":
            ensure_node_modules()
        elif self.target.name == "uws":
            ensure_node_modules(UWS_DIR, "uWebSockets.js")
        broker = self._start_redis(cpus, timeout) if self.target.redis else ""
        for _ in range(self.target.nodes):
            self._start_node(broker, cpus)
        self.base_url = self.node_urls[0]
        for url, process in zip(self.node_urls, self.processes, strict=True):
            # /ready: a Redis node answers 200 only once its broker is connected.
            self._wait_healthy(url, process, timeout, "/ready" if broker else "/health")
        if self.target.patterns:
            self._hold_patterns(timeout)

    def _hold_patterns(self, timeout: float) -> None:
        """Start bench/hold_patterns.py on the first node and wait for its ``ready``."""
        argv = [sys.executable, str(BENCH_DIR / "hold_patterns.py"), "--url", self.base_url]
        argv += ["--patterns", str(self.target.patterns)]
        self._holder = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self._holder.stdout is not None
        # readline blocks: bounded by the holder's own 30 s timeout per acknowledgement.
        line = self._holder.stdout.readline().decode()
        if not line.startswith("ready"):
            raise RuntimeError(f"hold_patterns.py did not get ready: {line!r}\n{self.log_tail()}")

    def _popen(
        self, argv: list[str], name: str, cpus: set[int] | None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        fd, log = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")
        self.log_paths.append(Path(log))
        with os.fdopen(fd, "wb") as out:
            return subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO_ROOT,
                # Pin before exec, so every thread of the server inherits the affinity.
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )

    def _start_node(self, broker: str, cpus: set[int] | None) -> None:
        port = free_port()
        argv = [a.replace("{port}", str(port)) for a in self.target.argv]
        argv = [a.replace("{broker}", broker) for a in argv]
        env = {**os.environ, **self.target.env, "PYTHONUNBUFFERED": "1"}
        name = self.target.name + (f"-{len(self.processes)}" if self.target.nodes > 1 else "")
        process = self._popen(argv, name, cpus, env)
        self.processes.append(process)
        self.pids.append(process.pid)
        self.node_urls.append(f"http://127.0.0.1:{port}")

    def _start_redis(self, cpus: set[int] | None, timeout: float) -> str:
        """A private redis-server on a free port, no persistence; returns its URL."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(f"the {self.target.name} target needs redis-server on PATH")
        port = free_port()
        self._redis_dir = tempfile.mkdtemp(prefix="bench-redis-")
        argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        argv += ["no", "--dir", self._redis_dir]
        self.redis = self._popen(argv, "redis", cpus)
        self.redis_pid = self.redis.pid
        self.redis_port = port
        deadline = time.monotonic() + timeout
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=1) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0"
            if self.redis.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def _wait_healthy(
        self,
        base_url: str,
        process: subprocess.Popen[bytes] | None,
        timeout: float,
        path: str = "/health",
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"{self.target.name} exited with {process.returncode}:\n{self.log_tail()}"
                )
            try:
                if get_json_status(base_url + path) == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.target.name} not healthy after {timeout}s\n" + self.log_tail()
                )
            time.sleep(0.1)

    def log_count(self, text: str) -> int:
        """Lines of the nodes' logs (not Redis's) that contain ``text``."""
        count = 0
        for path in self.log_paths:
            if path.exists() and not path.name.startswith("bench-redis-"):
                with path.open(errors="replace") as f:
                    count += sum(text in line for line in f)
        return count

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for path in self.log_paths:
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self, keep_logs: str | None = None) -> None:
        """Stop every process; ``keep_logs``: a directory to move their logs to first."""
        if self._holder is not None:
            self._holder.terminate()
            self._holder.wait(10)
            self._holder = None
        for process in [*self.processes, *([self.redis] if self.redis else [])]:
            if process.poll() is None:
                process.terminate()
        for process in [*self.processes, *([self.redis] if self.redis else [])]:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []
        self.redis = None
        if self.target.argv:
            self.pids = []
        for path in self.log_paths:
            if keep_logs and path.exists():
                os.makedirs(keep_logs, exist_ok=True)
                shutil.move(path, Path(keep_logs) / path.name)
            path.unlink(missing_ok=True)
        self.log_paths = []
        if self._redis_dir is not None:
            shutil.rmtree(self._redis_dir, ignore_errors=True)
            self._redis_dir = None
