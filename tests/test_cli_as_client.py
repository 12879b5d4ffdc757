"""``wsrelay pub --as-client`` and ``--idempotency-key`` on a real server with namespaces:
what a client with the given user id and grants may publish, and its refusals."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.test_cli import run
from tests.test_client_publish import CONFIG, receive
from tests.utils import ServerProcess, stop_and_check
from wsrelay.client import Relay

INBOX = """
[[namespace]]
pattern = "inbox:*"
subscribe = "granted"
publish = "granted"
"""


@pytest.fixture(scope="module")
def rules_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("cli-as-client") / "wsrelay.toml"
    config.write_text(CONFIG + INBOX)
    process = ServerProcess(["--config", str(config)]).start()
    yield process
    stop_and_check(process)


async def test_pub_as_client_with_a_grant_reaches_subscribers(rules_server: ServerProcess) -> None:
    topic = "inbox:42"
    async with (
        Relay(rules_server.url) as relay,
        relay.subscribe(topic, user_id=42, grants={"subscribe": ["inbox:{user}"]}) as inbox,
    ):
        done = await asyncio.to_thread(
            run,
            *("pub", topic, "hi 42", "--url", rules_server.url, "--as-client"),
            *("--user-id", "42", "--grant-publish", "inbox:{user}"),
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("published as a client at offset 1 (epoch ")
        message = await receive(inbox)
        assert (message.topic, message.message, message.offset) == (topic, "hi 42", 1)


def test_pub_as_client_without_a_matching_grant_is_refused(rules_server: ServerProcess) -> None:
    # {user} is the client's own user id: user 43 may not post in 42's inbox.
    done = run(
        *("pub", "inbox:42", "hi", "--url", rules_server.url, "--as-client"),
        *("--user-id", "43", "--grant-publish", "inbox:{user}"),
    )
    assert done.returncode == 1
    assert done.stderr.startswith("wsrelay pub: refused (forbidden_topic, 403): may not publish ")
    assert "'inbox:42'" in done.stderr and done.stderr.count("\n") == 1


def test_pub_as_client_subscribes_first_where_subscribers_publish(
    rules_server: ServerProcess,
) -> None:
    # chat:* has subscribe = "granted", publish = "subscribers".
    common = ("pub", "chat:cli", "hi", "--url", rules_server.url, "--as-client")
    grant = ("--grant-subscribe", "chat:*")
    not_subscribed = run(*common, *grant)
    assert not_subscribed.returncode == 1
    assert "is not subscribed to it" in not_subscribed.stderr
    subscribed = run(*common, *grant, "--subscribe")
    assert subscribed.returncode == 0, subscribed.stderr
    assert "published as a client at offset" in subscribed.stdout


def test_pub_idempotency_key_publishes_once(rules_server: ServerProcess) -> None:
    # A client's keys are its user's (an anonymous --as-client run is a new registration
    # each time, with no identity to repeat): the retry names the same user.
    for as_client in ((), ("--as-client", "--user-id", "7", "--grant-publish", "granted:*")):
        topic = f"granted:key{len(as_client)}"
        args = ("pub", topic, "once", "--url", rules_server.url, "--idempotency-key", "k")
        first = run(*args, *as_client)
        assert first.returncode == 0, first.stderr
        again = run(*args, *as_client)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == "duplicate of offset 1: nothing was published"


def test_pub_client_flags_need_as_client(rules_server: ServerProcess) -> None:
    done = run("pub", "t", "m", "--url", rules_server.url, "--grant-publish", "t")
    assert done.returncode == 2 and "need --as-client" in done.stderr
    done = run("pub", "t", "--stdin", "--url", rules_server.url, "--as-client")
    assert done.returncode == 2 and "--stdin goes without" in done.stderr
