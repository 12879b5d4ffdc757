"""Namespaces, grants, the client publish rate and the config file (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes import RecordingSink, identity_framer
from wsrelay.config import Settings
from wsrelay.core.fanout import Publication, deliver
from wsrelay.core.history import MemoryHistory
from wsrelay.core.registry import Client
from wsrelay.core.rules import (
    DEFAULT_NAMESPACE,
    JOIN_LEAVE_BURST,
    JOIN_LEAVE_RATE,
    NO_GRANTS,
    Grants,
    JoinLeaveLimiter,
    Namespace,
    PublishLimiter,
    Rules,
    namespace_from_table,
)
from wsrelay.errors import ForbiddenTopic, InvalidTopic, MessageTooLarge, RateLimited
from wsrelay.relay import Relay

RULES = Rules(
    [
        Namespace("chat:*", subscribe="granted", publish="subscribers", max_message_size=8),
        Namespace("inbox:*", subscribe="granted", publish="granted"),
        Namespace("room.>", publish="granted"),
        Namespace("chat:lobby"),  # shadowed: the first match wins
    ]
)

CHAT = Grants(subscribe=("chat:*",))
INBOX = Grants(subscribe=("inbox:{user}",), publish=("inbox:{user}",))
ROOM = Grants(publish=("room.eu.*",))

# (topic, user, grants, may subscribe)
SUBSCRIBE_TABLE = [
    ("cats", None, NO_GRANTS, True),  # the default namespace: anyone
    ("room.eu.fr", None, NO_GRANTS, True),  # subscribe "any"
    ("chat:1", "1", NO_GRANTS, False),
    ("chat:1", "1", CHAT, True),
    ("chat:lobby", "1", NO_GRANTS, False),  # chat:* matched first
    ("chat:1", "1", Grants(subscribe=("chat:2",)), False),
    ("chat:1", "1", Grants(publish=("chat:*",)), False),  # a publish grant is not one to read
    ("inbox:42", "42", INBOX, True),
    ("inbox:43", "42", INBOX, False),  # {user} is the connection's own user
    ("inbox:42", None, INBOX, False),  # anonymous: {user} matches nothing
    ("inbox:42", "42", Grants(subscribe=("inbox:*",)), True),
]


@pytest.mark.parametrize(("topic", "user", "grants", "allowed"), SUBSCRIBE_TABLE)
def test_subscribe_table(topic: str, user: str | None, grants: Grants, allowed: bool) -> None:
    if allowed:
        RULES.check_subscribe([topic], user, grants)
        return
    with pytest.raises(ForbiddenTopic) as caught:
        RULES.check_subscribe(["cats", topic], user, grants)
    assert caught.value.http_status == 403 and caught.value.code == "forbidden_topic"
    assert repr(topic) in caught.value.message
    assert repr(RULES.namespace(topic).pattern) in caught.value.message
    assert "subscribe" in caught.value.message


# (topic, user, grants, subscribed, may publish)
PUBLISH_TABLE = [
    ("cats", "1", Grants(publish=(">",)), True, False),  # default: publish "none", even granted
    ("chat:1", "1", NO_GRANTS, True, True),  # "subscribers", subscribed
    ("chat:1", "1", NO_GRANTS, False, False),
    ("chat:1", "1", Grants(publish=("chat:1",)), False, True),  # or granted
    ("inbox:42", "42", INBOX, False, True),
    ("inbox:43", "42", INBOX, True, False),  # subscribed does not count for "granted"
    ("room.eu.fr", "1", ROOM, False, True),
    ("room.eu.fr.paris", "1", ROOM, False, False),  # * is one segment
    ("room.us.ny", "1", ROOM, True, False),
]


@pytest.mark.parametrize(("topic", "user", "grants", "subscribed", "allowed"), PUBLISH_TABLE)
def test_publish_table(
    topic: str, user: str | None, grants: Grants, subscribed: bool, allowed: bool
) -> None:
    if allowed:
        assert RULES.check_publish(topic, "hi", user, grants, subscribed) is RULES.namespace(topic)
        return
    with pytest.raises(ForbiddenTopic) as caught:
        RULES.check_publish(topic, "hi", user, grants, subscribed)
    rule = RULES.namespace(topic).publish
    assert f'publish = "{rule}"' in caught.value.message and repr(topic) in caught.value.message


def test_max_message_size_counts_utf8_bytes() -> None:
    RULES.check_publish("chat:1", "12345678", "1", NO_GRANTS, True)
    with pytest.raises(MessageTooLarge, match=r"9 bytes.*at most 8"):
        RULES.check_publish("chat:1", "é" * 4 + "x", "1", NO_GRANTS, True)


def test_no_namespace_keeps_todays_behaviour() -> None:
    rules = Rules()
    assert rules.open and rules.namespace("anything") is DEFAULT_NAMESPACE
    rules.check_subscribe(["a", "chat:1"], None, NO_GRANTS)
    with pytest.raises(ForbiddenTopic):
        rules.check_publish("a", "m", "1", NO_GRANTS, True)
    assert rules.history_sizes(100) is None


def test_history_size_per_namespace_in_the_memory_history() -> None:
    rules = Rules([Namespace("short.*", history_size=2), Namespace("none.*", history_size=0)])
    sizes = rules.history_sizes(5)
    assert sizes is not None and sizes("short.a") == 2 and sizes("other") == 5
    history = MemoryHistory(5, 300.0, 1 << 20, size_of=sizes)
    for topic in ("short.a", "none.a", "other"):
        for i in range(6):
            history.append(Publication(topic, str(i)))
    assert [p.message for p in history.read("short.a", limit=10).publications] == ["4", "5"]
    assert history.read("none.a", limit=10).publications == []
    assert len(history.read("other", limit=10).publications) == 5


def test_the_publish_bucket_allows_a_burst_then_the_rate() -> None:
    namespace = Namespace("chat:*", publish="subscribers", publish_rate=2.0, publish_burst=3)
    limiter = PublishLimiter()
    for _ in range(3):
        limiter.take(namespace, 100.0)
    with pytest.raises(RateLimited) as caught:
        limiter.take(namespace, 100.0)
    assert caught.value.code == "rate_limited" and caught.value.http_status == 429
    limiter.take(namespace, 100.5)  # half a second at 2/s: one more
    with pytest.raises(RateLimited):
        limiter.take(namespace, 100.5)
    other = Namespace("room.*", publish="granted", publish_burst=1)
    limiter.take(other, 100.5)  # each namespace has its own bucket


def test_joins_and_leaves_have_a_burst_then_a_rate_and_a_big_command_fits() -> None:
    limiter = JoinLeaveLimiter()
    limiter.take(JOIN_LEAVE_BURST - 1, 50.0)
    limiter.take(1, 50.0)
    with pytest.raises(RateLimited, match="too many joins and leaves"):
        limiter.take(1, 50.0)
    limiter.take(1, 50.0 + 1 / JOIN_LEAVE_RATE)  # refilled at the rate
    with pytest.raises(RateLimited):
        limiter.take(1, 50.0 + 1 / JOIN_LEAVE_RATE)
    fresh = JoinLeaveLimiter()
    fresh.take(5 * JOIN_LEAVE_BURST, 7.0)  # a page's 100 rooms at once: capped at the burst
    with pytest.raises(RateLimited):
        fresh.take(1, 7.0)


def test_grants_are_validated_naming_the_list_and_index() -> None:
    assert Grants.checked(["a.*", "a.*"], ["inbox:{user}"]) == Grants(("a.*",), ("inbox:{user}",))
    with pytest.raises(InvalidTopic, match=r"grants.publish\[1\]"):
        Grants.checked([], ["ok", "a.>.b"])
    with pytest.raises(InvalidTopic, match=r"grants.subscribe\[0\]"):
        Grants.checked(["bad topic"])


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ({"pattern": "a.*", "colour": "red"}, "unknown key 'colour'"),
        ({"subscribe": "any"}, "pattern is required"),
        ({"pattern": "a.*", "subscribe": "maybe"}, "subscribe must be one of any, granted"),
        ({"pattern": "a.*", "publish": "all"}, "publish must be one of"),
        ({"pattern": "a.*", "history_size": "5"}, "history_size must be int"),
        ({"pattern": "a.*", "presence": 1}, "presence must be bool"),
        ({"pattern": "a.*", "publish_burst": True}, "publish_burst must be int"),
        ({"pattern": "a.*", "publish_rate": 0}, "publish_rate must be more than 0"),
        ({"pattern": "inbox:{user}"}, "{user} belongs in grants"),
        ({"pattern": "a.>.b"}, "pattern:"),
    ],
)
def test_bad_namespace_tables_are_refused_naming_the_key(table: dict[str, object], fragment: str):
    with pytest.raises(ValueError, match="namespace 2") as caught:
        namespace_from_table(table, "namespace 2")
    assert fragment in str(caught.value)


# -- the config file ------------------------------------------------------------------------


GOOD = """
history_size = 50
outbox_limit = "2MiB"
api_key = ["k-one", "k-two"]
ping_interval = 10
insecure = true

[[namespace]]
pattern = "chat:*"
subscribe = "granted"
publish = "subscribers"
presence = true
join_leave = true
history_size = 5
max_message_size = 1024
publish_rate = 2.5
publish_burst = 4

[[namespace]]
pattern = "news.>"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "wsrelay.toml"
    path.write_text(text)
    return str(path)


def test_a_config_file_sets_settings_and_namespaces(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    settings = Settings.from_env({"WSRELAY_CONFIG": path})
    assert settings.config == path
    assert (settings.history_size, settings.outbox_limit) == (50, 2 * 1024 * 1024)
    assert settings.api_key == ("k-one", "k-two") and settings.insecure is True
    assert settings.ping_interval == 10.0
    chat, news = settings.namespaces
    assert chat == Namespace("chat:*", "granted", "subscribers", True, True, 5, 1024, 2.5, 4)
    assert news == Namespace("news.>")
    assert settings.rules().namespace("chat:1") == chat


def test_variables_and_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    environ = {"WSRELAY_CONFIG": path, "WSRELAY_HISTORY_SIZE": "7", "WSRELAY_PING_INTERVAL": "3"}
    settings = Settings.from_env(environ, history_size=9)
    assert (settings.history_size, settings.ping_interval) == (9, 3.0)
    assert settings.outbox_limit == 2 * 1024 * 1024  # from the file still
    # --config (an override) wins over WSRELAY_CONFIG
    other = tmp_path / "other.toml"
    other.write_text("port = 9\n")
    assert Settings.from_env({"WSRELAY_CONFIG": path}, config=str(other)).port == 9


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("colour = 1\n", "unknown key 'colour'"),
        ("namespaces = []\n", "unknown key 'namespaces'"),
        ("config = 'x.toml'\n", "unknown key 'config'"),
        ("history_size = 1.5\n", "history_size must be an integer, not float"),
        ("history_size = true\n", "history_size must be an integer, not bool"),
        ("insecure = 'perhaps'\n", "insecure: expected true or false"),
        ("api_key = [1]\n", "api_key must be a list of strings"),
        ("host = 1\n", "host must be a string"),
        ("history_size = -1\n", "history_size must be 0"),
        ("namespace = 1\n", "namespace must be a list of tables"),
        ("[[namespace]]\npattern = 'a.*'\nbogus = 1\n", "namespace 1: unknown key 'bogus'"),
        ("x = [\n", "not valid TOML"),
    ],
)
def test_a_bad_config_file_is_refused_naming_the_problem(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as caught:
        Settings.from_env({}, config=path)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nope\.toml: No such file"):
        Settings.from_env({"WSRELAY_CONFIG": str(tmp_path / "nope.toml")})


# -- skip: the publisher's own connection ----------------------------------------------------


def test_deliver_leaves_out_the_skipped_client() -> None:
    a, b = Client("a", None, {"t"}), Client("b", None, {"t"})
    a.sink, b.sink = RecordingSink(), RecordingSink()
    assert deliver(Publication("t", "m", skip="a"), [a, b], identity_framer) == 1
    assert a.sink.frames == [] and len(b.sink.frames) == 1


async def test_a_replay_leaves_out_the_clients_own_skip_self_publications() -> None:
    async with Relay(Settings(), identity_framer) as relay:
        publisher = await relay.register(1, ["t"])
        position = (await relay.subscribe(publisher, ["t"])).positions["t"][0]
        await relay.publish("t", "mine", skip=publisher.id)
        await relay.publish("t", "theirs")
        followed = await relay.subscribe(publisher, ["t"], {"t": position})
        assert [p.message for p in followed.replay] == ["theirs"]
        other = await relay.register(2, ["t"])
        followed = await relay.subscribe(other, ["t"], {"t": position})
        assert [p.message for p in followed.replay] == ["mine", "theirs"]
