"""Wildcard subscriptions from the Python client and the CLI, against real servers:
``relay.subscribe("news.*")`` receives the messages of matching topics, a reconnect sends
``since`` for named topics only (a pattern has no position) and goes on; ``wsrelay sub
'news.*'`` prints each matching message with its topic."""

from __future__ import annotations

import json

from tests.tcp_proxy import Proxy
from tests.test_cli import run, subscriber
from tests.test_client import FAST, Events, receive, text
from tests.test_client_recovery import Consumer
from tests.utils import ServerProcess
from wsrelay.client import NotRecovered, Reconnecting, Relay, Subscribed


async def test_a_pattern_subscription_receives_matching_topics_and_survives_a_reconnect(
    server: ServerProcess, topic: str
) -> None:
    pattern, named = f"{topic}.*", f"{topic}.named"
    events = Events()
    async with (
        Proxy(server.url) as proxy,
        Relay(server.url) as publisher,
        Relay(proxy.url, backoff=FAST) as relay,
        relay.subscribe(pattern, named, on_event=events) as sub,
    ):
        assert sub.topics == (pattern, named)
        await publisher.publish(f"{topic}.eu", "eu 1")
        await publisher.publish(f"{topic}.eu.fr", "too deep")  # news.* is one segment
        await publisher.publish(named, "named 1")
        assert text(await receive(sub, 2)) == [(f"{topic}.eu", "eu 1"), (named, "named 1")]
        assert set(sub.positions) == {named}  # the pattern has none
        command = json.loads(sub._command())
        assert set(command["topics"]) == {pattern, named}
        assert set(command["since"]) == {named}

        consumer = Consumer(sub)
        proxy.down()
        await events.next(Reconnecting)
        await publisher.publish(named, "named 2")  # while away: recovered by name
        proxy.up()
        back = await events.next(Subscribed)
        assert isinstance(back, Subscribed) and not back.registered
        await publisher.publish(f"{topic}.uk", "uk 1")  # the pattern is back too
        received = await consumer.wait_for(2)
        await consumer.stop()
        assert text(received) == [(named, "named 2"), (f"{topic}.uk", "uk 1")]
        assert sub.reconnects == 1
        assert not any(isinstance(e, NotRecovered) for e in events.seen)


def test_sub_prints_the_messages_of_a_patterns_topics(server: ServerProcess, topic: str) -> None:
    env = {"WSRELAY_URL": server.url}
    with subscriber(f"{topic}.*", "--url", server.url) as (out, _):
        assert "delivered to 1" in run("pub", f"{topic}.eu", "bonjour", env=env).stdout
        assert "delivered to 0" in run("pub", f"{topic}.eu.fr", "too deep", env=env).stdout
        assert "delivered to 1" in run("pub", f"{topic}.uk", "hello", env=env).stdout
        assert out.next() == f"[{topic}.eu] bonjour"
        assert out.next() == f"[{topic}.uk] hello"
    with subscriber(f"{topic}.>", "--json", "--url", server.url) as (out, _):
        assert "delivered to 1" in run("pub", f"{topic}.eu.fr", "deep", env=env).stdout
        assert json.loads(out.next()) == {
            "type": "message",
            "topic": f"{topic}.eu.fr",
            "message": "deep",
            "offset": 2,
        }
