"""The relay's rules, free of I/O: no asyncio, no web framework, no Redis.

* :mod:`.topics` — what a topic name may be.
* :mod:`.schema` — the shapes of HTTP bodies and WebSocket frames, and their decoding.
* :mod:`.registry` — registrations, and the topic and user indexes of attached clients.
* :mod:`.outbox` — the bounded per-connection queue of frames waiting to be written.
* :mod:`.fanout` — one publication, encoded once, handed to every recipient.

The asyncio layer (:mod:`wsrelay.relay`, :mod:`wsrelay.server`) drives these and
passes effects in: a framer that turns a payload into WebSocket frame bytes, and
sinks that accept those bytes for one connection.
"""
