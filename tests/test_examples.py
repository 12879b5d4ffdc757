"""The examples in examples/ run as the README shows them, against a real relay."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.utils import TIMEOUT, ServerProcess

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
README = (ROOT / "README.md").read_text()


def test_the_readme_shows_the_private_chat_as_it_is() -> None:
    for name in ("private_chat.toml", "private_chat.py"):
        assert (EXAMPLES / name).read_text() in README, f"README's copy of examples/{name}"


def test_the_private_chat_grants_posts_shows_presence_and_refuses(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server("--config", str(EXAMPLES / "private_chat.toml"))
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "private_chat.py")],
        env={**os.environ, "WSRELAY_URL": server.url},
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "in room:1: ['alice', 'bob']",
        "bob got: {'text': 'hi bob'}",
        "refused: forbidden_topic",  # alice may not post in room:2
        "refused: forbidden_topic",  # nor read it
    ]
