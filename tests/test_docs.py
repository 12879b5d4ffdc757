"""The documentation states what the code does: commands, settings, routes, close codes."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from wsrelay import codes
from wsrelay.cli import build_parser
from wsrelay.config import Settings, env_name
from wsrelay.server.app import create_app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    first_block = README.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in first_block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_the_two_setup_commands() -> None:
    serve, test = readme_commands()
    assert serve.endswith("wsrelay serve")
    assert test.endswith("pytest")


def test_ci_runs_the_readmes_test_command_verbatim() -> None:
    _, test = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines()


def test_readme_lists_every_setting() -> None:
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        assert f"| `{flag}` | `{env_name(f.name)}` |" in README, flag


def test_readme_lists_every_close_code() -> None:
    named = {
        value for name, value in vars(codes).items() if name.isupper() and isinstance(value, int)
    }
    documented = {int(c) for c in re.findall(r"^\| (\d{4}) \|", README, flags=re.MULTILINE)}
    assert named == documented


def test_readme_close_code_advice_matches_should_reconnect() -> None:
    """Client libraries (Python and wsrelay.js) follow codes.should_reconnect; users read
    the README's table. They must give the same advice."""
    rows = re.findall(r"^\| (\d{4}) \| [^|]+ \| (yes|no)\b", README, flags=re.MULTILINE)
    assert len(rows) >= 8
    for code, advice in rows:
        assert codes.should_reconnect(int(code)) == (advice == "yes"), code


def test_readme_lists_every_route() -> None:
    app = create_app()
    for resource in app.router.resources():
        path = resource.canonical.replace("{client_id}", "<id>")
        assert path in README, path


def test_readme_lists_every_cli_command() -> None:
    (commands,) = [
        action.choices
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    for name in commands:
        assert f"wsrelay {name}" in README, name
