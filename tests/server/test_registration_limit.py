"""``--max-registrations-per-user`` against a real server: the 429 answer, and what frees a slot.

The store's side (atomicity, expiry, several nodes) is in tests/brokers/conformance.py; two
server processes sharing one Redis are in tests/test_multinode.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import jwt
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.utils import TIMEOUT, Api

SECRET = "test-secret-that-is-long-enough-for-hs256"


async def test_past_the_limit_register_answers_429_naming_it(
    start_server, session: aiohttp.ClientSession
) -> None:
    server = start_server("--max-registrations-per-user", "2")
    api = Api(session, server.url)
    first = await api.register(7)
    await api.register("7")  # the same user: ids compare as strings

    async with session.post(server.url + "/register", json={"user_id": 7}) as response:
        assert response.status == 429
        assert response.content_type == "application/json"
        body = await response.json()
    assert body["error"]["code"] == "too_many_registrations"
    message = body["error"]["message"]
    assert "'7' already holds 2 registrations" in message
    assert "max_registrations_per_user" in message

    await api.register(8)  # another user has slots of their own
    for _ in range(5):
        await api.register(None)  # anonymous registrations are not limited
    status, _ = await api.call("DELETE", f"/register/{first['id']}")
    assert status == 200
    await api.register(7)  # deleting one freed a slot
    assert (await api.call("POST", "/register", {"user_id": 7}))[0] == 429


async def test_connection_tokens_count_while_connected(
    start_server, session: aiohttp.ClientSession
) -> None:
    """A token's registration takes a slot for as long as its connection is open; past the
    limit the handshake is refused with 429 before the upgrade."""
    server = start_server(
        env={"WSRELAY_JWT_SECRET": SECRET, "WSRELAY_MAX_REGISTRATIONS_PER_USER": "1"}
    )
    api = Api(session, server.url)
    tok = jwt.encode({"sub": "9", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    ws = await websockets.connect(server.ws_url + "/ws?token=" + tok, open_timeout=TIMEOUT)

    status, body = await api.call("POST", "/register", {"user_id": 9})
    assert (status, body["error"]["code"]) == (429, "too_many_registrations")
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(server.ws_url + "/ws?token=" + tok, open_timeout=TIMEOUT)
    refused: Any = info.value.response
    assert refused.status_code == 429
    assert json.loads(refused.body)["error"]["code"] == "too_many_registrations"

    await ws.close()

    async def slot_freed() -> None:
        while (await api.call("POST", "/register", {"user_id": 9}))[0] != 200:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(slot_freed(), TIMEOUT)


@pytest.mark.parametrize(("limit", "documented"), [("100", True), ("0", False)])
async def test_openapi_documents_429_only_when_there_is_a_limit(
    start_server, session: aiohttp.ClientSession, limit: str, documented: bool
) -> None:
    server = start_server("--max-registrations-per-user", limit)
    status, doc = await Api(session, server.url).call("GET", "/openapi.json")
    assert status == 200
    assert ("429" in doc["paths"]["/register"]["post"]["responses"]) is documented
    assert ("429" in doc["paths"]["/ws"]["get"]["responses"]) is documented
