"""The wsrelay command, run as a user would: in subprocesses, against a real server."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading

import pytest

from tests.utils import TIMEOUT, Api, ServerProcess
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
        assert "--" + f.name.replace("_", "-") in text
        assert env_name(f.name) in text
        if f.default is not None:
            assert f"(default: {f.default})" in text


@pytest.mark.parametrize("command", ["pub", "sub"])
def test_client_commands_have_help_with_an_example(command: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "example: wsrelay " + command in capsys.readouterr().out


def test_invalid_setting_is_a_one_line_error() -> None:
    result = run("serve", "--max-body-size", "lots")
    assert result.returncode == 2
    assert "WSRELAY_MAX_BODY_SIZE" in result.stderr and "lots" in result.stderr
    result = run("serve", env={"WSRELAY_LOG_LEVEL": "chatty"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "log_level" in result.stderr


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
            == "delivered to 1 connection(s)"
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
