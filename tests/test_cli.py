"""The wsrelay command, run as a user would: in subprocesses, against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import IO

import aiohttp
import pytest

from tests.gate import Gate
from tests.tcp_proxy import Proxy
from tests.utils import TIMEOUT, Api, ServerProcess, free_port
from wsrelay.cli import main
from wsrelay.config import Settings, env_name


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsrelay", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
        env={**os.environ, **(env or {})},
    )


def test_serve_help_lists_every_setting_with_default_and_variable(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(Settings):
        if f.metadata.get("file_only"):  # the namespaces: [[namespace]] tables in --config
            continue
        assert "--" + f.name.replace("_", "-") in text
        assert env_name(f.name) in text
        if f.default is not None:
            assert f"(default: {f.default})" in text


@pytest.mark.parametrize("command", ["serve", "pub", "sub", "stats"])
def test_every_command_has_help_with_an_example(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "example: wsrelay " + command in text
    if command != "serve":  # client commands: where they connect, and their defaults
        flat = " ".join(text.split())
        assert "WSRELAY_URL" in flat and "(default: http://127.0.0.1:8000)" in flat
        assert "WSRELAY_API_KEY" in flat
    if command == "stats":
        assert "(default: 1.0)" in " ".join(text.split())


def test_invalid_setting_is_a_one_line_error() -> None:
    result = run("serve", "--max-body-size", "lots")
    assert result.returncode == 2
    assert "WSRELAY_MAX_BODY_SIZE" in result.stderr and "lots" in result.stderr
    result = run("serve", env={"WSRELAY_LOG_LEVEL": "chatty"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "log_level" in result.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("--host", "0.0.0.0", "--api-key", "k3y"), {}),
        (("--host", "::"), {"WSRELAY_API_KEY": "a-key-long-enough-to-pass,fifteen-chars!!"}),
        (("--host", "relay.example"), {"WSRELAY_API_KEY": "x"}),
    ],
)
def test_serve_refuses_a_public_address_with_a_short_api_key(
    args: tuple[str, ...], env: dict[str, str]
) -> None:
    """A key shorter than 16 characters can be guessed over the network; on loopback
    (where tests use short keys) it is allowed."""
    result = run("serve", "--port", "0", *args, env=env)
    assert result.returncode == 2, result.stdout
    assert result.stderr.count("\n") == 1, result.stderr
    assert "16 characters" in result.stderr and "WSRELAY_API_KEY" in result.stderr
    for key in ("k3y", "fifteen-chars!!", "a-key-long-enough-to-pass"):
        assert key not in result.stderr  # the message never shows a key


def test_short_api_keys_are_allowed_on_loopback_and_with_insecure() -> None:
    from wsrelay.server.auth import startup_problem

    assert startup_problem(Settings(host="127.0.0.1", api_key=("k",))) is None
    assert startup_problem(Settings(host="::1", api_key=("k",))) is None
    assert startup_problem(Settings(host="localhost", api_key=("k",))) is None
    assert startup_problem(Settings(host="0.0.0.0", api_key=("k",), insecure=True)) is None
    assert startup_problem(Settings(host="0.0.0.0", api_key=("x" * 16,))) is None
    assert startup_problem(Settings(host="0.0.0.0", api_key=("x" * 15,))) is not None


async def test_environment_configures_the_server_and_flags_win(start_server, session) -> None:
    server = start_server(
        env={"WSRELAY_PUBLIC_URL": "wss://from-env.example", "WSRELAY_MAX_BODY_SIZE": "64"}
    )
    status, body = await Api(session, server.url).call("POST", "/register", {"user_id": 1})
    assert status == 200 and body["url"].startswith("wss://from-env.example/ws/")
    status, body = await Api(session, server.url).call(
        "POST", "/publish", {"topic": "t", "message": "x" * 100}
    )
    assert status == 413
    flagged = start_server(
        "--public-url", "ws://from-flag", env={"WSRELAY_PUBLIC_URL": "wss://from-env"}
    )
    status, body = await Api(session, flagged.url).call("POST", "/register", {"user_id": 1})
    assert body["url"].startswith("ws://from-flag/ws/")


def test_pub_and_sub_round_trip(server: ServerProcess, topic: str) -> None:
    """`wsrelay sub` prints what `wsrelay pub` publishes, for one user and for all."""
    sub = subprocess.Popen(
        [sys.executable, "-m", "wsrelay", "sub", topic, "--url", server.url, "--user-id", "9"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sub.stderr is not None and sub.stdout is not None
        ready = sub.stderr.readline()
        assert "subscribed to" in ready, ready
        env = {"WSRELAY_URL": server.url}
        assert (
            run("pub", topic, "hello from pub", env=env).stdout.strip()
            == "delivered to 1 connection(s) on this node"
        )
        assert "delivered to 0" in run("pub", topic, "not for 9", "--user-id", "10", env=env).stdout
        assert "delivered to 1" in run("pub", topic, "for 9", "--user-id", "9", env=env).stdout
        lines: list[str] = []

        def read_two() -> None:
            assert sub.stdout is not None
            lines.extend(sub.stdout.readline().strip() for _ in range(2))

        reader = threading.Thread(target=read_two, daemon=True)
        reader.start()
        reader.join(TIMEOUT)
        assert lines == ["hello from pub", "for 9"]
    finally:
        sub.terminate()
        sub.wait(TIMEOUT)
        for stream in (sub.stdout, sub.stderr):
            if stream is not None:
                stream.close()


def test_pub_reports_server_errors_and_unreachable_servers(server: ServerProcess) -> None:
    bad = run("pub", "no spaces allowed", "m", "--url", server.url)
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        "wsrelay pub: HTTP 400 invalid_topic: topic 'no spaces allowed' has a character "
        "outside A-Z a-z 0-9 _ - . : / @"
    )
    unreachable = run("pub", "t", "m", "--url", "http://127.0.0.1:9")
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("wsrelay pub: cannot reach http://127.0.0.1:9")
    assert unreachable.stderr.count("\n") == 1


# -- pub / sub / stats on the client library -------------------------------------------------


class Lines:
    """A subprocess's output stream, pumped by a thread, read line by line with timeouts."""

    def __init__(self, stream: IO[str]) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.queue.put(line.rstrip("\n"))
        self.queue.put(None)

    def next(self, timeout: float = TIMEOUT) -> str:
        line = self.queue.get(timeout=timeout)
        assert line is not None, "the stream ended"
        return line

    def until(self, text: str, timeout: float = TIMEOUT * 4) -> list[str]:
        """Lines up to and including the first that contains ``text``."""
        seen: list[str] = []
        while not seen or text not in seen[-1]:
            seen.append(self.next(timeout))
        return seen


@contextlib.contextmanager
def subscriber(*args: str, env: dict[str, str] | None = None) -> Iterator[tuple[Lines, Lines]]:
    """`wsrelay sub ARGS` until it said it is subscribed; yields (stdout, stderr) and
    stops it with SIGTERM after, which it must handle by cleaning up (exit 143)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "wsrelay", "sub", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None and process.stderr is not None
    out, err = Lines(process.stdout), Lines(process.stderr)
    try:
        assert "subscribed to" in err.next(TIMEOUT * 4)
        yield out, err
    finally:
        process.terminate()
        assert process.wait(TIMEOUT) == 143
        for stream in (process.stdout, process.stderr):
            stream.close()


def test_pub_stdin_publishes_every_line_in_order_and_sub_json_prints_them(
    server: ServerProcess, topic: str
) -> None:
    messages = [f'line {i} "quoted" é' for i in range(2999)] + [""]
    with subscriber(topic, "--json", "--url", server.url) as (out, _):
        result = subprocess.run(
            [sys.executable, "-m", "wsrelay", "pub", topic, "--stdin", "--url", server.url],
            input="".join(m + "\n" for m in messages),
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 4,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("published 3000 message(s) in ")
        assert result.stdout.rstrip().endswith(
            "delivered to 3000 connection(s) on this node in total"
        )
        received = [json.loads(out.next()) for _ in messages]
    assert received == [
        {"type": "message", "topic": topic, "message": m, "offset": i}
        for i, m in enumerate(messages, 1)
    ]


def test_pub_needs_a_message_or_stdin(server: ServerProcess, topic: str) -> None:
    for args in ([topic], [topic, "m", "--stdin"]):
        result = run("pub", *args, "--url", server.url)
        assert result.returncode == 2
        assert result.stderr == "wsrelay pub: give either MESSAGE or --stdin\n"


def test_stats_once_shows_counters_and_top_topics(server: ServerProcess, topic: str) -> None:
    with subscriber(topic + ".busy", topic + ".quiet", "--url", server.url) as (out, _):
        with subscriber(topic + ".busy", "--url", server.url):
            assert "delivered to 2" in run("pub", topic + ".busy", "m", "--url", server.url).stdout
            result = run("stats", "--once", "--prefix", topic, "--url", server.url)
        assert out.next() == f"[{topic}.busy] m"
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{server.url}  node ") and "broker up" in lines[0]
    for counter in ("connections", "registrations", "topics", "publishes", "deliveries"):
        assert any(line.split()[:1] == [counter] for line in lines), counter
    assert lines[-3:] == [
        "top topics (2 of 2), by subscribers:",
        f"           2  {topic}.busy",
        f"           1  {topic}.quiet",
    ]


def test_stats_refreshes_with_rates(server: ServerProcess, topic: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "wsrelay", "stats", "--interval", "0.1", "--url", server.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    out = Lines(process.stdout)
    try:
        out.until("publishes")  # the first snapshot has no rates yet
        assert re.fullmatch(r"publishes +[\d,]+  \([\d,]+\.\d/s\)", out.until("publishes")[-1])
        assert re.fullmatch(r"deliveries +[\d,]+  \([\d,]+\.\d/s\)", out.next())
    finally:
        process.terminate()
        assert process.wait(TIMEOUT) == 143
        process.stdout.close()
        process.stderr.close()


def test_wrong_api_key_is_the_servers_one_line_message(start_server, topic: str) -> None:
    server = start_server("--api-key", "right,other")
    for command, *args in (["pub", topic, "m"], ["sub", topic], ["stats", "--once"]):
        wrong = run(command, *args, "--url", server.url, env={"WSRELAY_API_KEY": "wrong"})
        assert wrong.returncode == 1
        assert wrong.stderr == (
            f"wsrelay {command}: HTTP 401 unauthorized: the API key is not valid\n"
        )
    # The flag wins over the variable; the variable may list several keys (the first counts).
    assert run("pub", topic, "m", "--url", server.url, "--api-key", "other").returncode == 0
    ok = run("stats", "--once", "--url", server.url, env={"WSRELAY_API_KEY": "right,x"})
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("command", ["pub", "sub", "stats"])
def test_unreachable_server_is_a_one_line_error(command: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    args = {"pub": ["pub", "t", "m"], "sub": ["sub", "t"], "stats": ["stats"]}[command]
    result = run(*args, env={"WSRELAY_URL": url})
    assert result.returncode == 1
    assert result.stderr.startswith(f"wsrelay {command}: cannot reach {url}: ")
    assert result.stderr.count("\n") == 1


def test_sub_reconnects_by_itself_and_cleans_up_on_sigterm(start_server, topic: str) -> None:
    """After a restart on the memory broker the topic's history is gone: `sub` says that
    messages may have been missed (on stderr), then prints what comes next."""
    port = str(free_port())
    first = start_server("--port", port)
    env = {"WSRELAY_URL": first.url}
    with subscriber(topic, env=env) as (out, err):
        assert "delivered to 1" in run("pub", topic, "before", env=env).stdout
        assert out.next() == "before"
        first.stop()
        assert "wsrelay sub: connection lost (close 1001" in err.next()
        second = start_server("--port", port)
        assert err.until("reconnected")[-1] == (
            f"wsrelay sub: reconnected (registered anew); subscribed to {topic}"
        )
        assert re.fullmatch(
            f"wsrelay sub: {re.escape(topic)}: not recovered, messages may have been missed: "
            r"the server lost its history \(e\.g\. it restarted on the memory broker\); "
            r"continuing after offset 0 of epoch \w+",
            err.next(),
        )
        assert "delivered to 1" in run("pub", topic, "after", env=env).stdout
        assert out.next() == "after"
    # SIGTERM deleted the registration.
    stats = run("stats", "--once", "--url", second.url).stdout
    assert re.search(r"^registrations +0$", stats, flags=re.MULTILINE), stats


async def test_sub_prints_what_was_published_while_its_connection_was_cut_once_in_order(
    server: ServerProcess, session: aiohttp.ClientSession, topic: str
) -> None:
    """`wsrelay sub --json` through a TCP proxy that cuts its connection (the server keeps
    running): what is published while it is away, while it reconnects and after is
    printed once each, in order, with consecutive offsets, on the same registration and
    with no "not recovered" notice."""
    api = Api(session, server.url)
    published: list[str] = []

    async def publish(count: int) -> None:
        for _ in range(count):
            published.append(f"m{len(published)}")
            status, body = await api.call(
                "POST", "/publish", {"topic": topic, "message": published[-1]}
            )
            assert status == 200, body

    async with Proxy(server.url) as proxy:
        process = subprocess.Popen(
            [sys.executable, "-m", "wsrelay", "sub", topic, "--json", "--url", proxy.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None and process.stderr is not None
        out, err = Lines(process.stdout), Lines(process.stderr)
        try:
            ready = await asyncio.to_thread(err.next, TIMEOUT * 4)
            assert ready == f"subscribed to {topic}; waiting for messages"
            await publish(5)
            lines = [await asyncio.to_thread(out.next) for _ in range(5)]

            proxy.down()
            lost = await asyncio.to_thread(err.next)
            assert lost.startswith("wsrelay sub: connection lost (close 1006"), lost
            await publish(30)  # while it is away
            proxy.up()
            during = asyncio.create_task(publish(30))  # while it reconnects and recovers
            notices = await asyncio.to_thread(err.until, "reconnected")
            assert notices[-1] == f"wsrelay sub: reconnected; subscribed to {topic}", notices
            await during
            await publish(5)  # live again
            while len(lines) < len(published):
                lines.append(await asyncio.to_thread(out.next))
        finally:
            process.terminate()
            assert await asyncio.to_thread(process.wait, TIMEOUT) == 143
            for stream in (out, err):
                stream.thread.join(TIMEOUT)  # read to the end
            process.stdout.close()
            process.stderr.close()
    printed = [json.loads(line) for line in lines]
    assert [(p["message"], p["offset"]) for p in printed] == [
        (message, offset) for offset, message in enumerate(published, start=1)
    ]
    assert list(out.queue.queue) == [None]  # and nothing more was printed
    rest = [line for line in err.queue.queue if line is not None]
    assert not [line for line in [*notices, *rest] if "not recovered" in line], rest


def test_sub_waits_as_long_as_the_server_asks_with_retry_after(start_server, topic: str) -> None:
    """A node shedding load answers 503 with Retry-After: `sub` waits that long (plus
    jitter) and says so, for its first connection (which would otherwise end the
    command) and for a reconnect (instead of its backoff)."""
    port = str(free_port())
    first = start_server("--port", port)
    waited = r"retrying in 1\.[0-5] s, as the server asked \(Retry-After: 1 s\)"  # 1 s + 0-0.5 s
    with Gate(first.url).in_thread() as gate:
        gate.refuse("register", "1")
        process = subprocess.Popen(
            [sys.executable, "-m", "wsrelay", "sub", topic, "--url", gate.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None and process.stderr is not None
        out, err = Lines(process.stdout), Lines(process.stderr)
        try:
            assert re.fullmatch(
                r"wsrelay sub: HTTP 503 broker_unavailable: shedding load \(test gate\); " + waited,
                err.next(TIMEOUT * 4),
            )
            assert err.next(TIMEOUT * 4) == f"subscribed to {topic}; waiting for messages"
            refused, registered = gate.seen["register"]
            assert (refused.status, registered.status) == (503, 200)
            assert registered.at - refused.at >= 1.0 - 0.01
            assert "delivered to 1" in run("pub", topic, "first", "--url", first.url).stdout
            assert out.next() == "first"

            gate.refuse("upgrade", "1")
            first.stop()
            assert "wsrelay sub: connection lost (close 1001" in err.next()
            second = start_server("--port", port)
            lines = err.until("reconnected")
            assert lines[-1] == f"wsrelay sub: reconnected (registered anew); subscribed to {topic}"
            assert any(
                re.fullmatch(
                    r"wsrelay sub: reconnect attempt \d+ failed \(HTTP 503 broker_unavailable: "
                    r"shedding load \(test gate\)\); " + waited,
                    line,
                )
                for line in lines
            ), lines
            upgrades = gate.seen["upgrade"]
            refused_at = next(i for i, seen in enumerate(upgrades) if seen.status == 503)
            assert upgrades[refused_at + 1].at - upgrades[refused_at].at >= 1.0 - 0.01
            assert "delivered to 1" in run("pub", topic, "second", "--url", second.url).stdout
            assert out.next() == "second"
        finally:
            process.terminate()
            assert process.wait(TIMEOUT) == 143
            process.stdout.close()
            process.stderr.close()


def test_serve_raises_its_open_files_limit_and_warns_when_it_is_too_low() -> None:
    """Started with a soft limit of 256 (many systems start processes at 1024), the server
    raises it to the hard limit; where even that is too low for --max-connections it says so."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open-files limit here is {hard}")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    process = subprocess.Popen(
        [sys.executable, "-m", "wsrelay", "serve", "--port", "0", "--max-connections", "10000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=low_soft_limit,
    )
    assert process.stdout is not None
    try:
        output = []
        for line in process.stdout:
            output.append(line)
            if line.startswith("wsrelay listening on "):
                break
        soft, _ = resource.prlimit(process.pid, resource.RLIMIT_NOFILE)
        assert soft == hard if hard != resource.RLIM_INFINITY else soft > 256
        assert any("open-files limit" in line for line in output), output
    finally:
        process.terminate()
        process.wait(TIMEOUT)
        process.stdout.close()
