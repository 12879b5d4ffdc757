"""The documentation states what the code does: commands, settings, routes, close codes."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
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
        if f.metadata.get("file_only"):  # the namespaces: [[namespace]] tables, no flag
            assert "[[namespace]]" in README
            continue
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
        path = resource.canonical.replace("{client_id}", "<id>").replace("{user_id}", "<id>")
        assert path in README, path


def test_readme_lists_every_cli_command() -> None:
    (commands,) = [
        action.choices
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    for name in commands:
        assert f"wsrelay {name}" in README, name


# -- claims found false by following the docs (issue 10) -------------------------------------

DOCS = {
    path.relative_to(ROOT).as_posix(): path.read_text()
    for path in [ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").rglob("*.md")]
}


def test_no_doc_installs_wsrelay_from_pypi() -> None:
    """wsrelay is not on the package index: installs go through a checkout."""
    for name, text in DOCS.items():
        assert not re.search(r"pip install ['\"]?wsrelay\b", text), name
    assert "git clone" in DOCS["docs/deployment.md"]


def test_nginx_configs_keep_upstream_connections_alive() -> None:
    """nginx sends HTTP/1.0 and 'Connection: close' upstream unless told otherwise, which
    makes an upstream's keepalive do nothing."""
    blocks = [
        (name, block)
        for name, text in DOCS.items()
        for block in re.findall(r"```nginx\n(.*?)```", text, flags=re.DOTALL)
    ]
    assert len(blocks) >= 2
    for name, block in blocks:
        assert not re.search(r"''\s+close;", block), name
        for location in re.findall(r"location [^{]*\{[^}]*\}", block):
            if "proxy_pass" in location:
                assert "proxy_http_version 1.1;" in location, (name, location)
                assert re.search(
                    r"proxy_set_header Connection (\$connection_upgrade|\"\");", location
                ), (name, location)


def test_docs_say_serve_raises_its_open_files_limit() -> None:
    from wsrelay import cli

    assert "raise_open_files_limit()" in inspect.getsource(cli._run_server)
    for name in ("bench/README.md", "docs/deployment.md"):
        text = " ".join(DOCS[name].split())
        assert "does not raise its own" not in text, name
        assert "`wsrelay serve` also raises its own soft limit" in text or (
            "`wsrelay serve` raises its own soft limit" in text
        ), name


def test_readme_states_the_stdin_batch_size() -> None:
    from wsrelay.cli_client import _stdin_batches

    limit = inspect.signature(_stdin_batches).parameters["limit"].default
    assert f"in batches of up to {limit}" in README
    assert f"in batches of {limit}" not in README


def test_publish_driver_speed_is_quoted_as_decision_0005_measured() -> None:
    decision = DOCS["docs/decisions/0005-native-publish-driver.md"]

    def requests_per_second(row: str) -> int:
        line = next(line for line in decision.splitlines() if line.startswith(f"| {row}"))
        return int(line.split("|")[2].strip(" *").replace(",", ""))

    ratio = requests_per_second("**wsrelay, native") / requests_per_second("wsrelay on aiohttp")
    quoted = f"about {ratio:.1f} times aiohttp's requests/s"
    stack = next(f for f in dataclasses.fields(Settings) if f.name == "stack")
    assert quoted in stack.metadata["help"]
    assert quoted in README
    assert quoted in " ".join((ROOT / "src/wsrelay/server/front.py").read_text().split())
    for name, text in DOCS.items():
        assert "twice aiohttp" not in text, name


def test_readme_quotes_pub_as_it_prints() -> None:
    source = inspect.getsource(importlib.import_module("wsrelay.cli_client")._pub)
    assert 'f"delivered to {recipients} connection(s) on this node"' in source
    assert "delivered to 1 connection(s) on this node" in README


def test_per_worker_endpoints_are_documented_as_such() -> None:
    for name in ("README.md", "docs/deployment.md"):
        text = " ".join(DOCS[name].split())
        assert "whichever worker" in text, name


def test_security_md_lists_every_limit_setting() -> None:
    limits = DOCS["docs/security.md"].split("## Limits", 1)[1]
    for f in dataclasses.fields(Settings):
        if f.name.startswith("max_") or f.name in ("outbox_limit", "request_timeout"):
            assert "`--" + f.name.replace("_", "-") + "`" in limits, f.name


async def test_readme_embedding_under_a_prefix_gives_urls_with_the_prefix() -> None:
    """README, Embedding: mounted under a prefix, public_url (prefix included) is what
    makes the url POST /register returns reach the relay."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    outer = web.Application()
    outer.add_subapp("/relay", create_app(Settings(public_url="ws://app.example/relay")))
    assert 'Settings(public_url="wss://app.example.com/relay")' in README
    assert 'outer.add_subapp("/relay", wsrelay.create_app(settings))' in README
    async with TestClient(TestServer(outer)) as client:
        response = await client.post("/relay/register", json={"topics": ["cats"]})
        url = (await response.json())["url"]
        assert url.startswith("ws://app.example/relay/ws/")
        ws = await client.ws_connect(url.removeprefix("ws://app.example"))
        await ws.send_json({"topics": ["cats"]})
        assert (await ws.receive_json())["type"] == "subscribed"
        await ws.close()


def test_readme_states_the_join_and_leave_limit() -> None:
    from wsrelay.core.rules import JOIN_LEAVE_BURST, JOIN_LEAVE_RATE

    stated = f"join or leave such topics {JOIN_LEAVE_BURST} times at once, then "
    stated += f"{JOIN_LEAVE_RATE:g} times per second"
    assert stated in " ".join(README.split())
