"""Behind a proxy: ``--trusted-proxy`` and ``--max-connections-per-ip``.

The client's address comes from ``X-Forwarded-For`` / ``Forwarded`` only when the peer
is a trusted proxy; the logs show it and the per-address limit counts it, on both
stacks. A spoofed header from anyone else is ignored, and no header, however
malformed, makes a 500. Real servers; the tests connect from 127.0.0.1, which is the
trusted proxy or not depending on the server's flags.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.utils import TIMEOUT, Api, ServerProcess
from wsrelay.config import Settings, load_config_file
from wsrelay.server.proxies import ClientAddresses, parse_address

Start = Callable[..., ServerProcess]

PROXY = "127.0.0.1"  # where the tests connect from


# -- the rule, without a server -----------------------------------------------------------------

TRUSTED = ClientAddresses(["127.0.0.1", "10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("peer", "xff", "forwarded", "expected"),
    [
        # no headers, or an untrusted peer: the peer
        ("127.0.0.1", [], [], "127.0.0.1"),
        ("198.51.100.1", ["203.0.113.7"], ["for=203.0.113.7"], "198.51.100.1"),
        # the nearest untrusted address, from the right; what lies left of it is the client's say
        ("127.0.0.1", ["203.0.113.7"], [], "203.0.113.7"),
        ("127.0.0.1", ["6.6.6.6, 203.0.113.7, 10.0.0.2"], [], "203.0.113.7"),
        ("127.0.0.1", ["6.6.6.6", "203.0.113.7"], [], "203.0.113.7"),  # two header lines
        ("127.0.0.1", ["10.0.0.5, 10.0.0.2"], [], "10.0.0.5"),  # proxies all the way
        ("127.0.0.1", ["203.0.113.7:4711"], [], "203.0.113.7"),
        ("127.0.0.1", ["::ffff:203.0.113.7"], [], "203.0.113.7"),
        ("::ffff:127.0.0.1", ["203.0.113.7"], [], "203.0.113.7"),
        ("fd00::1", ["2001:db8::1"], [], "2001:db8::1"),
        # RFC 7239, read only without X-Forwarded-For
        ("127.0.0.1", [], ["for=192.0.2.60;proto=http;by=203.0.113.43"], "192.0.2.60"),
        ("127.0.0.1", [], ['for=6.6.6.6, For="[2001:db8:cafe::17]:4711"'], "2001:db8:cafe::17"),
        ("127.0.0.1", [], ['for=6.6.6.6;x="a,b", for=10.0.0.3'], "6.6.6.6"),
        ("127.0.0.1", ["203.0.113.7"], ["for=6.6.6.6"], "203.0.113.7"),
        # unreadable: the walk stops there, at the last address it could vouch for
        ("127.0.0.1", ["203.0.113.7, unknown"], [], "127.0.0.1"),
        ("127.0.0.1", ["unknown, 203.0.113.7"], [], "203.0.113.7"),
        ("127.0.0.1", ["203.0.113.7, 10.0.0.2, garbage"], [], "127.0.0.1"),
        ("127.0.0.1", ["garbage, 10.0.0.2"], [], "10.0.0.2"),
        ("127.0.0.1", [""], [], "127.0.0.1"),
        ("127.0.0.1", [",,,"], [], "127.0.0.1"),
        ("127.0.0.1", ["203.0.113.7:99999"], [], "127.0.0.1"),
        ("127.0.0.1", ["fe80::1%eth0"], [], "127.0.0.1"),
        ("127.0.0.1", [], ['for="_gazonk"'], "127.0.0.1"),
        ("127.0.0.1", [], ['for="[2001:db8::1'], "127.0.0.1"),
        ("127.0.0.1", [], ["by=10.0.0.1"], "127.0.0.1"),
        ("127.0.0.1", [], ['for="'], "127.0.0.1"),
        ("127.0.0.1", ["é, ü"], [], "127.0.0.1"),
    ],
)
def test_the_client_address(peer: str, xff: list[str], forwarded: list[str], expected: str) -> None:
    assert TRUSTED.resolve(peer, xff, forwarded) == expected


def test_without_trusted_proxies_the_headers_are_never_read() -> None:
    assert ClientAddresses().resolve("127.0.0.1", ["203.0.113.7"], ["for=1.2.3.4"]) == "127.0.0.1"
    assert ClientAddresses(["127.0.0.1"]).resolve(None, ["203.0.113.7"]) is None


def test_a_long_chain_is_read_32_hops_deep() -> None:
    chain = ", ".join(["203.0.113.7"] + ["10.0.0.1"] * 40)
    assert TRUSTED.resolve("127.0.0.1", [chain]) == "10.0.0.1"
    assert parse_address(" [2001:db8::1]:443 ") is not None


def test_the_settings_take_cidr_ranges_from_flags_variables_and_files(tmp_path: Any) -> None:
    settings = Settings.from_env(
        {"WSRELAY_TRUSTED_PROXY": "10.0.0.0/8, fd00::/8", "WSRELAY_MAX_CONNECTIONS_PER_IP": "3"}
    )
    assert settings.trusted_proxy == ("10.0.0.0/8", "fd00::/8")
    assert settings.max_connections_per_ip == 3
    config = tmp_path / "wsrelay.toml"
    config.write_text('trusted_proxy = ["192.168.0.0/16"]\nmax_connections_per_ip = 2\n')
    assert load_config_file(str(config)) == {
        "trusted_proxy": ("192.168.0.0/16",),
        "max_connections_per_ip": 2,
    }
    with pytest.raises(
        ValueError, match=re.escape("'10.0.0.0/33' is not an IP address or CIDR range")
    ):
        Settings(trusted_proxy=("10.0.0.0/33",))
    with pytest.raises(ValueError, match="max_connections_per_ip"):
        Settings(max_connections_per_ip=-1)


# -- real servers, both stacks ------------------------------------------------------------------


@pytest.fixture(params=["native", "aiohttp"])
def stack(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def upgrade(url: str, **headers: str) -> websockets.ClientConnection:
    return await websockets.connect(url, additional_headers=headers, open_timeout=TIMEOUT)


async def refused(url: str, **headers: str) -> tuple[int, dict[str, Any], str | None]:
    """Status, JSON body and Retry-After of an upgrade that must be refused."""
    with pytest.raises(InvalidStatus) as caught:
        await upgrade(url, **headers)
    response = caught.value.response
    return (
        response.status_code,
        json.loads(response.body or b"{}"),
        response.headers.get("Retry-After"),
    )


async def eventually_connects(url: str, **headers: str) -> websockets.ClientConnection:
    """An upgrade that succeeds once the server has let go of a closed connection's slot
    (polling the condition itself, bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return await upgrade(url, **headers)
        except InvalidStatus as exc:
            if exc.response.status_code != 429 or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.02)


def log_entries(server: ServerProcess, event: str) -> list[dict[str, Any]]:
    lines = [line for line in server.output if line.startswith("{")]
    return [entry for entry in map(json.loads, lines) if entry.get("event") == event]


async def test_a_trusted_proxys_forwarded_address_is_logged_and_counted(
    start_server: Start, session: aiohttp.ClientSession, stack: str
) -> None:
    server = start_server(
        *("--stack", stack, "--trusted-proxy", PROXY, "--max-connections-per-ip", "1"),
        *("--log-format", "json"),
    )
    api = Api(session, server.url)
    urls = [(await api.register(topics=["t"]))["url"] for _ in range(6)]
    first = await upgrade(urls[0], **{"X-Forwarded-For": "6.6.6.6, 203.0.113.7"})
    status, body, retry_after = await refused(urls[1], **{"X-Forwarded-For": "203.0.113.7"})
    assert (status, body["error"]["code"], retry_after) == (429, "too_many_connections_per_ip", "5")
    # The same address through the other header is the same address.
    status, _, _ = await refused(urls[1], Forwarded='for="203.0.113.7:5000"')
    assert status == 429
    other = await upgrade(urls[2], **{"X-Forwarded-For": "203.0.113.8"})  # counted apart
    # Unreadable: the proxy's own address (nothing else holds it), and never a 500.
    malformed = await upgrade(urls[3], **{"X-Forwarded-For": "203.0.113.9, not an address"})
    status, _, _ = await refused(urls[4], Forwarded='for="[2001:db8::1')
    assert status == 429  # the same fallback, PROXY, which holds its one connection
    await first.close()
    again = await eventually_connects(urls[1], **{"X-Forwarded-For": "203.0.113.7"})
    # Refused HTTP requests are logged with the forwarded address too, on each driver.
    answer = await api.call(
        "POST", "/publish", {"topic": "not a topic"}, headers={"X-Forwarded-For": "198.51.100.9"}
    )
    assert answer[0] == 400
    history = await api.call("GET", "/history", headers={"X-Forwarded-For": "198.51.100.10"})
    assert history[0] == 400
    for ws in (other, malformed, again):
        await ws.close()
    assert server.stop() == 0
    opened = [e["peer"] for e in log_entries(server, "ws_open")]
    assert opened == ["203.0.113.7", "203.0.113.8", PROXY, "203.0.113.7"]
    refusals = [(e["route"], e["status"], e["peer"]) for e in log_entries(server, "http_refused")]
    assert ("/publish", 400, "198.51.100.9") in refusals
    assert ("/history", 400, "198.51.100.10") in refusals
    per_ip = [(status, peer) for route, status, peer in refusals if route.startswith("/ws")]
    assert per_ip[:3] == [(429, "203.0.113.7"), (429, "203.0.113.7"), (429, PROXY)]
    # eventually_connects may be refused while the first connection's slot is released.
    assert set(per_ip[3:]) <= {(429, "203.0.113.7")}, per_ip


async def test_a_spoofed_header_from_an_untrusted_peer_is_ignored(
    start_server: Start, session: aiohttp.ClientSession, stack: str
) -> None:
    server = start_server(
        *("--stack", stack, "--trusted-proxy", "10.0.0.0/8", "--max-connections-per-ip", "1"),
        *("--log-format", "json"),
    )
    api = Api(session, server.url)
    urls = [(await api.register(topics=["t"]))["url"] for _ in range(2)]
    first = await upgrade(urls[0], **{"X-Forwarded-For": "203.0.113.7"})
    # Another "client" by its header is the same peer: refused, the header changed nothing.
    status, body, _ = await refused(urls[1], **{"X-Forwarded-For": "203.0.113.8"})
    assert (status, body["error"]["code"]) == (429, "too_many_connections_per_ip")
    answer = await api.call(
        "POST", "/publish", {"topic": "not a topic"}, headers={"Forwarded": "for=203.0.113.9"}
    )
    assert answer[0] == 400
    await first.close()
    assert server.stop() == 0
    assert [e["peer"] for e in log_entries(server, "ws_open")] == [PROXY]
    assert {e["peer"] for e in log_entries(server, "http_refused")} == {PROXY}


HOSTILE = [
    "",
    " ",
    ",,,,",
    "unknown",
    "1.2.3.4:99999",
    "[::1",
    "::1]",
    '"' * 50,
    "for=",
    'for="[::1]:0"',
    "1.2.3.4, " * 900,
    "é, ü, \t",
    "256.256.256.256",
    "fe80::1%25eth0",
    "0x7f.1",
    ";;;=;=",
]


async def test_malformed_forwarding_headers_never_make_a_500(
    start_server: Start, session: aiohttp.ClientSession, stack: str
) -> None:
    server = start_server("--stack", stack, "--trusted-proxy", PROXY)
    api = Api(session, server.url)
    for value in HOSTILE:
        for name in ("X-Forwarded-For", "Forwarded"):
            headers = {name: value}
            status, _ = await api.call("POST", "/register", {"topics": ["t"]}, headers=headers)
            assert status == 200, (name, value)
            status, _ = await api.call(
                "POST", "/publish", {"topic": "t", "message": "m"}, headers=headers
            )
            assert status == 200, (name, value)
            reg = await api.register(topics=["t"])
            ws = await upgrade(reg["url"], **headers)
            await ws.close()
    assert server.stop() == 0
    assert "Traceback" not in server.log()


def test_openapi_lists_the_refusal_when_the_limit_is_set() -> None:
    from wsrelay.server.openapi import document

    def upgrade_statuses(settings: Settings) -> set[str]:
        paths = document(settings)["paths"]
        return {*paths["/ws/{client_id}"]["get"]["responses"], *paths["/ws"]["get"]["responses"]}

    assert "429" in upgrade_statuses(Settings(max_connections_per_ip=2))
    assert "429" not in upgrade_statuses(Settings(max_registrations_per_user=0))
