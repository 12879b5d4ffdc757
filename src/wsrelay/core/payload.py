"""A publication's message: a string, or any other JSON value carried as its JSON text.

``{"message": "hi"}`` publishes the string ``hi``, as it always did;
``{"message": {"a": 1}}`` (an object, an array, a number, ``true``, ``false`` or
``null``) publishes that value. The relay never turns such a value into Python
objects: the request's decoder keeps it as :class:`msgspec.Raw`, :func:`message_text`
compacts it once into its JSON text (no whitespace), and from then on it is a ``str``
with a flag (:attr:`wsrelay.core.fanout.Publication.json`) saying that it is JSON text.
The envelope embeds that text as is (:func:`wire_value`), raw-mode clients receive the
text itself, brokers store and send it as a string, and every size rule counts its
UTF-8 bytes. A string message costs what it did: one decode, no flag set.

A string that holds JSON (``"{\\"a\\":1}"``) stays a string: it is the JSON *value*
that decides, never what a string looks like.

JSON values may nest at most :data:`MAX_DEPTH` arrays and objects: deeper ones are
refused at publish rather than failing in a subscriber's decoder (Python's decoders
recurse, within the interpreter's recursion limit).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final

import msgspec

from wsrelay.errors import InvalidField, InvalidJSON

MAX_DEPTH: Final = 128
"""Most arrays and objects a JSON message may nest (``[[1]]`` nests 2)."""

JsonMessage = Annotated[
    msgspec.Raw,
    msgspec.Meta(
        description="The message: a string (published as its text), or any other JSON value "
        "(object, array, number, true, false, null; nested at most "
        f"{MAX_DEPTH} deep), published as is and received as that value (raw-format "
        "clients receive its JSON text)."
    ),
]
"""A message field in a request: decoded lazily by :func:`message_text`."""

JsonValue = Annotated[
    Any,
    msgspec.Meta(description="The message: a string, or the JSON value it was published as."),
]
"""A message field in an answer or a frame: a ``str``, or :class:`msgspec.Raw` JSON text."""

_decode_str = msgspec.json.Decoder(str).decode


def _too_deep_pattern(most: int) -> re.Pattern[bytes]:
    return re.compile(rb"\n {%d}(?: |[^\n]*[\]}],?(?:\n|$))" % most)


_TOO_DEEP: Final = _too_deep_pattern(MAX_DEPTH)
"""In JSON text formatted with ``indent=1``, where a container sits inside
:data:`MAX_DEPTH` others: a line indented deeper than that (an element of one), or
one indented exactly that much and closing a bracket (an empty one, or the end of one;
strings cannot end a line with a bracket, their closing quote comes last)."""


def message_text(raw: msgspec.Raw | str, field: str = "message") -> tuple[str, bool]:
    """``(text, is_json)`` of a decoded request's message: a JSON string's own text and
    False, or any other JSON value's compact JSON text and True. ``field`` names the
    message in errors (``messages[3].message``). A ``str`` is a message already decoded
    as a string (:func:`wsrelay.core.schema.decode_publish`).

    Raises:
        InvalidJSON: the message is not valid UTF-8.
        InvalidField: a JSON value nested deeper than :data:`MAX_DEPTH`.
    """
    if isinstance(raw, str):
        return raw, False
    try:
        return _decode_str(raw), False
    except msgspec.ValidationError:
        pass  # not a string: any other JSON value (the request's decoder checked its syntax)
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"{field}: not valid UTF-8 at byte {exc.start}") from None
    except msgspec.DecodeError as exc:  # e.g. a lone surrogate escape
        raise InvalidJSON(f"{field}: not a valid JSON string: {exc}") from None
    if too_deep(raw):
        raise InvalidField(f"{field}: a JSON value may nest at most {MAX_DEPTH} arrays and objects")
    try:
        return msgspec.json.format(raw, indent=-1).decode(), True
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"{field}: not valid UTF-8 at byte {exc.start}") from None


def too_deep(data: bytes | msgspec.Raw, most: int = MAX_DEPTH) -> bool:
    """Whether the arrays and objects of the valid JSON text ``data`` nest more than
    ``most`` deep (``[[1]]`` nests 2). Costs two byte counts when ``data`` holds no
    more brackets than ``most``; otherwise one C-speed reformatting and search."""
    text = bytes(data)
    if text.count(b"[") + text.count(b"{") <= most:
        return False
    try:
        spread = msgspec.json.format(text, indent=1)
    except RecursionError:  # deeper than the interpreter's recursion limit allows
        return True
    pattern = _TOO_DEEP if most == MAX_DEPTH else _too_deep_pattern(most)
    return pattern.search(b"\n" + spread) is not None  # the first line has no newline


def wire_value(message: str, json: bool) -> str | msgspec.Raw:
    """What an envelope carries as ``message``: the string, or the JSON text embedded as is."""
    return msgspec.Raw(message) if json else message
