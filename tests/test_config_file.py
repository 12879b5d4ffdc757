"""``wsrelay serve --config FILE`` on a real process: the file's settings and namespaces
apply, flags and variables win over it, and a bad file stops serve with one line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp

from tests.utils import TIMEOUT, Api, ServerProcess

Start = Callable[..., ServerProcess]


def serve_fails(*args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "wsrelay", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    return done.returncode, done.stderr


def test_serve_help_shows_config() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "wsrelay", "serve", "--help"], capture_output=True, text=True
    )
    assert "--config FILE" in done.stdout and "WSRELAY_CONFIG" in done.stdout


def test_a_bad_config_file_stops_serve_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "wsrelay.toml"
    for text, fragment in [
        ("colour = 'red'\n", "unknown key 'colour'"),
        ("history_size = 'many'\n", "history_size"),
        ("[[namespace]]\npattern = 'chat:*'\npublish = 'all'\n", "publish must be one of"),
    ]:
        config.write_text(text)
        status, stderr = serve_fails("--config", str(config))
        assert status == 2, stderr
        assert stderr.count("\n") == 1 and stderr.startswith("wsrelay serve: config file ")
        assert fragment in stderr, stderr


async def test_flags_and_variables_override_the_file(
    start_server: Start, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config = tmp_path / "wsrelay.toml"
    config.write_text(
        "max_topic_length = 5\nmax_topics_per_client = 1\n\n"
        "[[namespace]]\npattern = 'p.*'\nsubscribe = 'granted'\n"
    )
    server = start_server(
        "--config",
        str(config),
        "--max-topic-length",
        "50",
        env={"WSRELAY_MAX_TOPICS_PER_CLIENT": "3"},
    )
    api = Api(session, server.url)
    # the flag's 50, not the file's 5; the variable's 3, not the file's 1
    status, body = await api.call("POST", "/register", {"topics": ["longer-than-5", "b", "c"]})
    assert status == 200, body
    # the file's namespace applies
    status, body = await api.call("POST", "/register", {"topics": ["p.1"]})
    assert status == 403 and body["error"]["code"] == "forbidden_topic", body
    status, body = await api.call(
        "POST", "/register", {"topics": ["p.1"], "grants": {"subscribe": ["p.*"]}}
    )
    assert status == 200, body
