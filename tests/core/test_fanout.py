from tests.fakes import RecordingSink, identity_framer
from wsrelay.core.fanout import Publication, deliver
from wsrelay.core.registry import Client


def attached(sink: RecordingSink) -> Client:
    client = Client("id", None, set())
    client.sink = sink
    return client


def test_every_recipient_gets_the_same_bytes_object() -> None:
    """The envelope is encoded and framed once per publication, not per recipient."""
    framed: list[bytes] = []

    def framer(payload: bytes) -> bytes:
        framed.append(payload)
        return b"F" + payload

    sinks = [RecordingSink() for _ in range(5)]
    publication = Publication("t", "hi", offset=7, epoch="e")
    assert deliver(publication, [attached(s) for s in sinks], framer) == 5
    assert framed == [b'{"type":"message","topic":"t","message":"hi","offset":7}']
    assert all(s.frames[0] is sinks[0].frames[0] for s in sinks)


def test_raw_recipients_get_the_message_text_only() -> None:
    raw, env = RecordingSink(raw=True), RecordingSink()
    publication = Publication("t", "h\u00e9", offset=3, epoch="e")
    deliver(publication, [attached(raw), attached(env)], identity_framer)
    assert raw.frames == ["h\u00e9".encode()]
    assert env.frames == [b'{"type":"message","topic":"t","message":"h\xc3\xa9","offset":3}']


def test_refusing_sinks_are_not_counted() -> None:
    """A sink over its outbox limit refuses; the count is of connections that took it."""
    sinks = [RecordingSink(), RecordingSink(refuse=True), RecordingSink()]
    assert deliver(Publication("t", "m"), [attached(s) for s in sinks], identity_framer) == 2
