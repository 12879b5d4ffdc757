"""The WebSocket session's rules, without sockets: a real Relay on the memory backend,
inputs in, actions out."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import pytest

from tests.fakes import identity_framer
from wsrelay import codes
from wsrelay.config import Settings
from wsrelay.core.history import EPOCH_BYTES, Position
from wsrelay.core.registry import Client
from wsrelay.core.session import (
    ABNORMAL_CLOSURE,
    CONTROL_FRAME_BURST,
    CONTROL_FRAME_RATE,
    MAX_CLOSE_REASON,
    Close,
    Gate,
    Send,
    Session,
    admit,
    close_reason,
)
from wsrelay.errors import (
    BadRequest,
    BrokerUnavailable,
    Forbidden,
    InvalidToken,
    NotFound,
    ServiceUnavailable,
    TooManyRegistrations,
    UpgradeRequired,
)
from wsrelay.relay import Followed, Relay

EPOCH = re.compile(f"[0-9a-f]{{{2 * EPOCH_BYTES}}}")
"""A topic's epoch: random, so only its shape is known."""


class Slots:
    def __init__(self, limit: int = 10) -> None:
        self.limit, self.used = limit, 0

    def acquire(self) -> None:
        if self.used >= self.limit:
            raise ServiceUnavailable("full", code="too_many_connections")
        self.used += 1

    def release(self) -> None:
        self.used -= 1


class Claims:
    def __init__(self, user: str, topics: tuple[str, ...] = ()) -> None:
        self.user, self.topics = user, topics


def deny_origin(origin: str | None) -> None:
    if origin == "https://evil.example":
        raise Forbidden("origin not allowed", code="origin_not_allowed")


def verify(token: str) -> Claims:
    if token != "good":
        raise InvalidToken("the token is not valid")
    return Claims("7", ("a",))


def upgrade_ok() -> None:
    pass


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    settings = Settings(max_topics_per_client=3, max_registrations_per_user=1)
    async with Relay(settings, identity_framer) as r:
        yield r


def gate(relay: Any, slots: Slots | None = None, tokens: bool = True) -> Gate:
    return Gate(relay, deny_origin, verify if tokens else None, slots or Slots())


async def session(relay: Relay, *, raw: bool = False, topics: Iterable[str] = ()) -> Session:
    client = await relay.register(None, topics)
    query = {"format": "raw"} if raw else {}
    return await admit(gate(relay), client.id, query, {}, upgrade_ok)


def payload(action: object) -> Any:
    assert isinstance(action, Send), action
    return json.loads(action.payload)


# -- admission ---------------------------------------------------------------------------------


async def test_admit_by_id_takes_a_slot(relay: Relay) -> None:
    client = await relay.register(None, ["a"])
    slots = Slots()
    s = await admit(gate(relay, slots), client.id, {}, {}, upgrade_ok)
    assert (s.client.id, s.raw, s.temporary, slots.used) == (client.id, False, False, 1)
    await s.release()
    assert slots.used == 0
    assert await relay.lookup(client.id)  # a registration made by POST /register stays


async def test_admit_checks_in_the_order_a_client_can_act_on(relay: Relay) -> None:
    """Origin before registration before format before upgrade before capacity."""
    client = await relay.register(None)

    def no_upgrade() -> None:
        raise UpgradeRequired("send an Upgrade request")

    g = gate(relay, Slots(limit=0))
    evil = {"origin": "https://evil.example"}
    with pytest.raises(Forbidden):
        await admit(g, "no-such-id", {"format": "nope"}, evil, no_upgrade)
    with pytest.raises(NotFound):
        await admit(g, "no-such-id", {"format": "nope"}, {}, no_upgrade)
    with pytest.raises(BadRequest, match="format must be one of json, raw"):
        await admit(g, client.id, {"format": "nope"}, {}, no_upgrade)
    with pytest.raises(UpgradeRequired):
        await admit(g, client.id, {}, {}, no_upgrade)
    with pytest.raises(ServiceUnavailable):
        await admit(g, client.id, {}, {}, upgrade_ok)


async def test_admit_by_token_registers_for_the_connection_only(relay: Relay) -> None:
    slots = Slots()
    s = await admit(gate(relay, slots), None, {"token": "good", "format": "raw"}, {}, upgrade_ok)
    assert (s.client.user, s.client.topics, s.raw, s.temporary) == ("7", {"a"}, True, True)
    await s.release()
    assert slots.used == 0
    with pytest.raises(NotFound):
        await relay.lookup(s.client.id)
    await s.release()  # already gone: nothing raises, the slot count is the caller's


async def test_admit_by_token_refusals(relay: Relay) -> None:
    with pytest.raises(NotFound, match="connection tokens are not enabled"):
        await admit(gate(relay, tokens=False), None, {"token": "good"}, {}, upgrade_ok)
    with pytest.raises(InvalidToken, match="pass the connection token"):
        await admit(gate(relay), None, {}, {}, upgrade_ok)
    with pytest.raises(InvalidToken, match="not valid"):
        await admit(gate(relay), None, {"token": "forged"}, {}, upgrade_ok)


async def test_a_registration_refused_after_the_slot_gives_the_slot_back(relay: Relay) -> None:
    slots = Slots()
    first = await admit(gate(relay, slots), None, {"token": "good"}, {}, upgrade_ok)
    with pytest.raises(TooManyRegistrations):  # user 7 may hold one registration
        await admit(gate(relay, slots), None, {"token": "good"}, {}, upgrade_ok)
    assert slots.used == 1
    await first.release()


# -- commands ----------------------------------------------------------------------------------


async def test_commands_are_acknowledged_with_the_topics(relay: Relay) -> None:
    """The acknowledgement names the whole topic set, and where each topic the command
    subscribed to continues: the offset of its last publication, in its epoch."""
    s = await session(relay, topics=["a"])
    ack = payload(await s.on_text('{"subscribe": ["b", "c"]}'))
    assert (ack["type"], ack["topics"]) == ("subscribed", ["a", "b", "c"])
    positions = ack["positions"]
    assert set(positions) == {"b", "c"}  # the topics named, not "a"
    for position in positions.values():
        assert set(position) == {"offset", "epoch"}  # no "recovered": nothing was asked
        assert position["offset"] == 0 and EPOCH.fullmatch(position["epoch"])
    assert payload(await s.on_text(b'{"unsubscribe": ["a"]}')) == {
        "type": "subscribed",
        "topics": ["b", "c"],
        "positions": {},
    }
    first = await relay.publish("z", "one")
    second = await relay.publish("z", "two")
    assert (first.receipt.position.offset, second.receipt.position.offset) == (1, 2)
    assert first.receipt.position.epoch == second.receipt.position.epoch
    ack = payload(await s.on_text('{"topics": ["z"]}'))
    assert ack["topics"] == ["z"]
    assert ack["positions"] == {"z": {"offset": 2, "epoch": second.receipt.position.epoch}}


async def test_raw_mode_acknowledges_nothing(relay: Relay) -> None:
    s = await session(relay, raw=True)
    assert await s.on_text('{"subscribe": ["b"]}') is None
    assert s.client.topics == {"b"}


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", "invalid_json"),
        ('{"subscribe": ["a"], "topics": []}', "invalid_field"),
        ("{}", "invalid_field"),
        ('{"subscribe": ["bad topic"]}', "invalid_topic"),
        ('{"subscribe": ["a", "b", "c", "d"]}', "too_many_topics"),
        ('{"shout": 1}', "invalid_field"),
    ],
)
async def test_a_bad_command_gets_an_error_frame_and_changes_nothing(
    relay: Relay, text: str, code: str
) -> None:
    s = await session(relay, topics=["a"])
    frame = payload(await s.on_text(text))
    assert frame["type"] == "error" and frame["error"]["code"] == code
    assert s.client.topics == {"a"} and s.closed_with is None


async def test_a_bad_command_in_raw_mode_closes_naming_the_problem(relay: Relay) -> None:
    s = await session(relay, raw=True)
    action = await s.on_text('{"subscribe": ["bad topic"]}')
    assert isinstance(action, Close) and action.code == codes.POLICY_VIOLATION
    assert "topic" in action.reason and s.closed_with == (action.code, action.reason)


async def test_invalid_utf8_fails_the_connection_with_1007(relay: Relay) -> None:
    s = await session(relay)
    action = await s.on_text(b'{"subscribe": ["\xff"]}')
    assert action == Close(codes.INVALID_PAYLOAD, action.reason, fail=True)  # type: ignore[union-attr]


class BrokerDown:
    """A relay whose broker fails every subscription change."""

    def __init__(self, relay: Relay, error: Exception) -> None:
        self._relay, self._error = relay, error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._relay, name)

    async def subscribe(
        self, client: Client, topics: Iterable[str], since: Mapping[str, Position] | None = None
    ) -> Followed:
        raise self._error


async def test_a_broker_failure_is_an_error_frame_not_the_end(relay: Relay) -> None:
    client = await relay.register(None)
    down = BrokerDown(relay, BrokerUnavailable("Redis is unreachable"))
    s = await admit(gate(down), client.id, {}, {}, upgrade_ok)
    frame = payload(await s.on_text('{"subscribe": ["a"]}'))
    assert frame["error"] == {"code": "broker_unavailable", "message": "Redis is unreachable"}
    assert s.closed_with is None


async def test_an_unexpected_failure_closes_with_1011(relay: Relay, caplog: Any) -> None:
    client = await relay.register(None)
    s = await admit(gate(BrokerDown(relay, RuntimeError("bug"))), client.id, {}, {}, upgrade_ok)
    assert await s.on_text('{"subscribe": ["a"]}') == Close(codes.INTERNAL_ERROR, "internal error")
    assert "unexpected error in a WebSocket command" in caplog.text


async def test_binary_is_refused_by_frame_or_by_close(relay: Relay) -> None:
    assert payload((await session(relay)).on_binary())["error"]["code"] == "unsupported_frame"
    action = (await session(relay, raw=True)).on_binary()
    assert isinstance(action, Close) and action.code == codes.UNSUPPORTED_DATA


# -- control frames ----------------------------------------------------------------------------


async def test_control_frames_within_the_budget_pass(relay: Relay) -> None:
    s = await session(relay)
    s.open(100.0)
    assert s.on_control_frames(CONTROL_FRAME_BURST, 100.0) is None
    # The budget refills at the rate: one second later, that many more pass.
    assert s.on_control_frames(int(CONTROL_FRAME_RATE), 101.0) is None
    # Ten idle minutes refill no more than the burst.
    assert s.on_control_frames(CONTROL_FRAME_BURST, 700.0) is None


async def test_a_control_frame_flood_fails_the_connection(relay: Relay) -> None:
    s = await session(relay)
    s.open(100.0)
    assert s.on_control_frames(CONTROL_FRAME_BURST, 100.0) is None
    action = s.on_control_frames(1, 100.01)
    assert isinstance(action, Close) and action.fail
    assert action.code == codes.POLICY_VIOLATION and "too many pings" in action.reason


# -- attach and close bookkeeping --------------------------------------------------------------


async def test_an_attach_refused_before_the_upgrade_is_answered_over_http(
    relay: Relay, caplog: Any
) -> None:
    s = await session(relay)
    gone = NotFound("this registration was deleted", code="unknown_client")
    assert s.refusal(gone) is gone  # 404
    down = BrokerUnavailable("Redis is unreachable")
    assert s.refusal(down) is down and down.retry_after  # 503 with Retry-After
    bug = s.refusal(RuntimeError("bug"))
    assert (bug.http_status, bug.code) == (500, "internal_error")
    assert "could not attach a connection" in caplog.text


async def test_a_connection_closed_while_attaching_is_refused(relay: Relay) -> None:
    s = await session(relay)
    s.closing(codes.NORMAL, "unregistered")
    assert s.closed_before_open().http_status == 404
    t = await session(relay)
    t.closing(codes.REPLACED, "replaced by a newer connection")
    refusal = t.closed_before_open()
    assert refusal.http_status == 503 and "replaced" in refusal.message


def test_close_reasons_are_cut_at_a_character_boundary() -> None:
    reason = "no topic " + "€" * 40  # 9 + 120 bytes
    cut = close_reason(reason)
    assert len(cut.encode()) <= MAX_CLOSE_REASON and reason.startswith(cut)
    assert len(cut.encode()) == 9 + 3 * 38  # 38 whole characters, none cut in two
    assert close_reason("short") == "short"


async def test_the_first_close_counts(relay: Relay) -> None:
    s = await session(relay)
    s.open(10.0)
    first = s.closing(codes.SLOW_CONSUMER, "slow consumer")
    s.closing(codes.GOING_AWAY, "shutting down")
    assert s.closed_with == (first.code, first.reason)
    ended = s.ended(12.5, received=(1000, ""))
    assert (ended.code, ended.by, ended.seconds) == (codes.SLOW_CONSUMER, "server", 2.5)


async def test_how_a_connection_ended(relay: Relay) -> None:
    s = await session(relay)
    s.open(0.0)
    assert s.ended(1.0, received=(1001, "bye")).by == "client"
    failed = s.ended(1.0, failed=(1002, "unmasked frame"))
    assert (failed.code, failed.by) == (1002, "server")
    assert (s.ended(1.0).code, s.ended(1.0).by) == (ABNORMAL_CLOSURE, "client")
