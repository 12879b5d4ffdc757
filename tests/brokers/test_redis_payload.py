"""The Redis broker's payload format (no Redis needed): string publications are encoded
byte for byte as before JSON payloads, so nodes of either version read each other's;
JSON text carries a fifth element, and payloads of older versions still decode."""

from __future__ import annotations

import msgspec

from wsrelay.brokers.redis import _decode_data, _payload
from wsrelay.core.fanout import Publication


class _Before(msgspec.Struct, array_like=True):
    """The payload as encoded before JSON payloads (the struct of that version)."""

    origin: str
    user: str | None
    message: str
    skip: str | None = None


def test_a_string_publication_is_encoded_as_before() -> None:
    for publication in (
        Publication("t", "hi"),
        Publication("t", '{"a":1}', "42", skip="c1"),
        Publication("t", "", None),
    ):
        before = msgspec.json.encode(
            _Before("node", publication.user, publication.message, publication.skip)
        )
        assert _payload("node", publication) == before


def test_json_text_carries_a_flag_and_round_trips() -> None:
    payload = _payload("node", Publication("t", '{"a":[1,2]}', "7", skip="c1", json=True))
    assert payload == b'["node","7","{\\"a\\":[1,2]}","c1",true]'
    data = _decode_data(payload)
    assert (data.message, data.user, data.skip, data.json) == ('{"a":[1,2]}', "7", "c1", True)


def test_older_payloads_still_decode_as_strings() -> None:
    for old in (b'["node",null,"hi"]', b'["node",null,"hi",null]', b'["node","u","hi","c"]'):
        data = _decode_data(old)
        assert data.message == "hi" and data.json is False
