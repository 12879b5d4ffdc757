"""Presence rules (core/presence.py) and the presence commands' decoding, without I/O."""

from __future__ import annotations

import pytest

from wsrelay.core import presence
from wsrelay.core.commands import PresenceQuery, decode_command, request_id
from wsrelay.core.rules import NO_GRANTS, Grants, Namespace, Rules
from wsrelay.core.schema import PresenceClient
from wsrelay.errors import ForbiddenTopic, InvalidField, InvalidTopic, PresenceDisabled

RULES = Rules(
    [
        Namespace("room:*", presence=True, join_leave=True),
        Namespace("quiet:*", presence=True),
        Namespace("secret:*", subscribe="granted", presence=True),
    ]
)


def test_public_ids_are_stable_and_not_the_id() -> None:
    public = presence.public_id("a" * 32)
    assert public == presence.public_id("a" * 32)
    assert len(public) == presence.PUBLIC_ID_LENGTH
    assert public != "a" * 32 and public != presence.public_id("b" * 32)


def test_which_topics_keep_presence_and_announce() -> None:
    assert presence.presence_topics(RULES, {"room:1", "quiet:1", "plain", "room.*"}) == {
        "room:1",
        "quiet:1",
    }
    assert presence.announces(RULES, "room:1")
    assert not presence.announces(RULES, "quiet:1")
    assert not presence.announces(RULES, "plain")
    assert presence.presence_topics(Rules(), {"room:1"}) == set()  # no namespaces: none


def test_what_a_topic_command_joins_and_leaves() -> None:
    current = {"room:1", "quiet:1", "plain"}
    count = presence.joins_and_leaves
    assert count(RULES, current, "subscribe", ["room:1", "room:2", "quiet:2", "plain"]) == 1
    assert count(RULES, current, "unsubscribe", ["room:1", "room:9", "quiet:1"]) == 1
    assert count(RULES, current, "topics", ["room:2", "room:3", "plain"]) == 3  # -1, +2
    assert count(RULES, current, "topics", sorted(current)) == 0  # a reconnect's command
    assert count(RULES, set(), "subscribe", ["room.*"]) == 0  # a pattern joins no topic
    assert count(Rules(), set(), "subscribe", ["room:1"]) == 0


@pytest.mark.parametrize(
    ("topic", "grants", "error"),
    [
        ("room:1", NO_GRANTS, None),
        ("secret:1", Grants(subscribe=("secret:*",)), None),
        ("secret:1", NO_GRANTS, ForbiddenTopic),
        ("plain", NO_GRANTS, PresenceDisabled),
        ("room.*", NO_GRANTS, InvalidTopic),
        ("room:1 ", NO_GRANTS, InvalidTopic),
        ("", NO_GRANTS, InvalidTopic),
    ],
)
def test_who_may_ask(topic: str, grants: Grants, error: type[Exception] | None) -> None:
    if error is None:
        presence.check_query(RULES, topic, 128, "u", grants)
    else:
        with pytest.raises(error):
            presence.check_query(RULES, topic, 128, "u", grants)


def test_the_api_key_needs_no_grant_but_a_presence_topic() -> None:
    presence.check_topic(RULES, "secret:1", 128)
    with pytest.raises(PresenceDisabled, match="presence = true"):
        presence.check_topic(RULES, "plain", 128)
    with pytest.raises(InvalidTopic, match="not the pattern"):
        presence.check_topic(RULES, "room:>", 128)


def test_counts_and_order() -> None:
    entries = [
        PresenceClient("c3", None, "n", 3.0),
        PresenceClient("c1", "1", "n", 1.0),
        PresenceClient("c2", "1", "n", 2.0),
        PresenceClient("c0", "2", "n", 2.0),
    ]
    assert presence.counts(entries) == (4, 2)
    assert [e.client for e in presence.ordered(entries)] == ["c1", "c0", "c2", "c3"]


def test_presence_commands_decode() -> None:
    assert decode_command('{"presence": "room:1", "id": 3}') == PresenceQuery(
        "presence", "room:1", 3
    )
    assert decode_command('{"presence_stats": "room:1"}') == PresenceQuery(
        "presence_stats", "room:1", None
    )


@pytest.mark.parametrize(
    "text",
    [
        '{"presence": "a", "presence_stats": "a"}',
        '{"presence": "a", "topics": ["a"]}',
        '{"presence": "a", "since": {}}',
        '{"presence": "a", "publish": {"topic": "a", "message": "m"}}',
        '{"subscribe": ["a"], "id": 1}',
        '{"presence": ["a"]}',
    ],
)
def test_malformed_presence_commands_are_refused(text: str) -> None:
    with pytest.raises(InvalidField):
        decode_command(text)


def test_a_refused_commands_id_is_read_back() -> None:
    assert request_id('{"presence": 5, "id": 9}') == 9
    assert request_id('{"publish": {"id": 4}}') == 4
    assert request_id('{"presence": "a", "id": 1.5}') is None
