"""`wsrelay pub --json` and `wsrelay sub` with JSON payloads, run as a user would: in
subprocesses, against a real server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.test_cli import run, subscriber
from tests.utils import TIMEOUT, ServerProcess


def pub(
    server: ServerProcess, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    if stdin is None:
        return run("pub", *args, "--url", server.url)
    return subprocess.run(
        [sys.executable, "-m", "wsrelay", "pub", *args, "--url", server.url],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )


def test_pub_json_publishes_values_and_sub_prints_them(server: ServerProcess, topic: str) -> None:
    sent = ['{"id": 17, "items": ["tea", "é"]}', "[1, 2.5, null]", "42", "true", '"quoted"']
    with (
        subscriber(topic, "--url", server.url) as (plain, _),
        subscriber(topic, "--json", "--url", server.url) as (framed, _),
    ):
        for text in sent:
            result = pub(server, topic, text, "--json")
            assert result.returncode == 0, result.stderr
            assert result.stdout == "delivered to 2 connection(s) on this node\n"
        result = pub(server, topic, '{"a": 1}')  # without --json: a string
        assert result.returncode == 0, result.stderr
        printed = [plain.next() for _ in range(len(sent) + 1)]
        frames = [json.loads(framed.next()) for _ in range(len(sent) + 1)]
    # Plain: a value as its compact JSON text, a string as itself.
    compact = ['{"id":17,"items":["tea","é"]}', "[1,2.5,null]", "42", "true", "quoted"]
    assert printed == [*compact, '{"a": 1}']
    assert [f["message"] for f in frames] == [*(json.loads(t) for t in sent), '{"a": 1}']


def test_pub_json_refuses_text_that_is_not_json(server: ServerProcess, topic: str) -> None:
    result = pub(server, topic, "{not json", "--json")
    assert result.returncode == 2
    assert result.stderr.startswith("wsrelay pub: --json: MESSAGE is not JSON (")
    assert result.stderr.count("\n") == 1


def test_pub_stdin_json_publishes_a_value_per_line(server: ServerProcess, topic: str) -> None:
    lines = ['{"n": 1}', "[2]", '"three"', "4"]
    with subscriber(topic, "--json", "--url", server.url) as (out, _):
        result = pub(server, topic, "--stdin", "--json", stdin="\n".join(lines) + "\n")
        assert result.returncode == 0, result.stderr
        received = [json.loads(out.next())["message"] for _ in lines]
    assert received == [{"n": 1}, [2], "three", 4]
    # A line that is not JSON stops it, naming the line; the lines of earlier batches went
    # out (the first line may have gone alone, or in the batch with the bad one).
    result = pub(server, topic, "--stdin", "--json", stdin='{"ok": 1}\n{oops}\n[3]\n')
    assert result.returncode == 1
    assert result.stderr.startswith("wsrelay pub: --json: line 2 is not JSON (")
    assert re.search(r"; [01] published$", result.stderr.rstrip()), result.stderr


def test_pub_as_client_json(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    config = tmp_path / "wsrelay.toml"
    config.write_text('[[namespace]]\npattern = "chat:*"\npublish = "granted"\n')
    server = start_server("--config", str(config))
    with subscriber("chat:1", "--json", "--url", server.url) as (out, _):
        result = pub(
            server, "chat:1", '{"text": "hi"}', "--json", "--as-client", "--grant-publish", "chat:*"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("published as a client at offset 1 ")
        assert json.loads(out.next())["message"] == {"text": "hi"}
