"""In-memory stand-ins for the I/O layer, for unit tests of the core."""

from __future__ import annotations


def identity_framer(payload: bytes) -> bytes:
    return payload


class RecordingSink:
    """A Sink that records frames and closes; ``refuse`` makes it reject sends."""

    def __init__(self, raw: bool = False, refuse: bool = False) -> None:
        self.raw = raw
        self.refuse = refuse
        self.frames: list[bytes] = []
        self.closed: tuple[int, str] | None = None

    def send(self, frame: bytes) -> bool:
        if self.refuse or self.closed:
            return False
        self.frames.append(frame)
        return True

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
