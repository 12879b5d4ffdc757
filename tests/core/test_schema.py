import pytest

from wsrelay.core.payload import message_text
from wsrelay.core.schema import (
    ClientCommand,
    MessageFrame,
    PublishRequest,
    RegisterRequest,
    TextBatchPublishRequest,
    TextPublishRequest,
    decode,
    decode_batch,
    decode_publish,
    encode,
)
from wsrelay.errors import InvalidField, InvalidJSON, RelayError


def test_publish_request_accepts_the_seed_body() -> None:
    """The seed's {"topic", "user_id", "message"} decodes as is."""
    body = decode(b'{"topic": "cats", "user_id": 1, "message": "hi"}', PublishRequest)
    assert (body.topic, body.user_id, message_text(body.message)) == ("cats", 1, ("hi", False))


def test_user_id_may_be_a_string_or_absent() -> None:
    assert decode(b'{"topic":"a","message":"m","user_id":"u1"}', PublishRequest).user_id == "u1"
    assert decode(b'{"topic":"a","message":"m"}', PublishRequest).user_id is None


@pytest.mark.parametrize(
    ("body", "error", "fragment"),
    [
        (b"{", InvalidJSON, "not valid JSON"),
        (b"", InvalidJSON, "not valid JSON"),
        (b'{"topic":"a","message":"\xff"}', InvalidJSON, "UTF-8"),
        (b'{"message":"m"}', InvalidField, "missing required field `topic`"),
        (b'{"topic":1,"message":"m"}', InvalidField, "$.topic"),
        (b'{"topic":"a"}', InvalidField, "missing required field `message`"),
        (b'{"topic":"a","message":NaN}', InvalidJSON, "not valid JSON"),
        (b'{"topic":"a","message":{"a":}}', InvalidJSON, "not valid JSON"),
        (b'{"topic":"a","message":[1,2}', InvalidJSON, "not valid JSON"),
        (b'{"topic":"a","message":{"a":"\xff"}}', InvalidJSON, "message: not valid UTF-8"),
        (b'{"topic":"a","message":' + b"[" * 129 + b"]" * 129 + b"}", InvalidField, "at most 128"),
        (b'{"topic":"a","message":' + b"[" * 5000 + b"]" * 5000 + b"}", InvalidField, "128"),
        (b'{"topic":"a","message":"m","user_id":true}', InvalidField, "$.user_id"),
        (b'{"topic":"a","message":"m","user_id":1.5}', InvalidField, "$.user_id"),
        (b'{"topic":"a","message":"m","user_id":1' + b"0" * 5000 + b"}", InvalidField, "$.user_id"),
        (b'{"topic":"a","message":"m","extra":1}', InvalidField, "unknown field `extra`"),
        (b'["topic"]', InvalidField, "Expected `object`"),
        (b"[" * 100_000, InvalidField, "Expected `object`"),
    ],
)
def test_bad_publish_bodies_name_the_problem(
    body: bytes, error: type[RelayError], fragment: str
) -> None:
    """Malformed JSON and wrong shapes raise errors whose message names the field, the
    message's own problems included (as the server decodes it: body, then message)."""
    with pytest.raises(error) as info:
        message_text(decode(body, PublishRequest).message)
    assert fragment in info.value.message


def test_register_topics_must_be_strings() -> None:
    with pytest.raises(InvalidField, match=r"\$\.topics\[1\]"):
        decode(b'{"user_id":1,"topics":["a",2]}', RegisterRequest)


def test_command_fields_default_to_absent() -> None:
    command = decode('{"subscribe":["a"]}', ClientCommand)
    assert (command.topics, command.subscribe, command.unsubscribe) == (None, ["a"], None)


def test_message_frame_names_its_topic() -> None:
    """The delivered envelope tells a client on several topics where a message came from,
    and its offset in that topic's stream."""
    assert (
        encode(MessageFrame("cats", "hi", 4))
        == b'{"type":"message","topic":"cats","message":"hi","offset":4}'
    )


def test_publish_bodies_of_strings_take_the_fast_decoder_and_values_the_raw_one() -> None:
    """decode_publish and decode_batch: strings as before (TextPublishRequest), any other
    message kept raw; both refuse what decode refuses, with its message."""
    text = decode_publish(b'{"topic":"a","message":"{\\"x\\":1}"}')
    assert isinstance(text, TextPublishRequest) and text.message == '{"x":1}'
    value = decode_publish(b'{"topic":"a","message":{"x":1}}')
    assert isinstance(value, PublishRequest) and message_text(value.message) == ('{"x":1}', True)
    batch = decode_batch(b'{"messages":[{"topic":"a","message":"s"},{"topic":"a","message":1}]}')
    assert [message_text(m.message) for m in batch.messages] == [("s", False), ("1", True)]
    strings = decode_batch(b'{"messages":[{"topic":"a","message":"s"}]}')
    assert isinstance(strings, TextBatchPublishRequest)
    with pytest.raises(InvalidField, match="unknown field `extra`"):
        decode_publish(b'{"topic":"a","message":{},"extra":1}')
    with pytest.raises(InvalidJSON, match="not valid JSON"):
        decode_batch(b'{"messages":[{"topic":"a","message":[}]}')
    with pytest.raises(InvalidField, match="at most 128"):
        decode_publish(b'{"topic":"a","message":' + b"[" * 5000 + b"]" * 5000 + b"}")
