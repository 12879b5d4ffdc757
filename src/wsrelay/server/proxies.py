"""The client's address behind trusted proxies (``--trusted-proxy``).

A proxy in front of the relay makes every connection come from the proxy's address.
The address of the client itself is then in the headers the proxy adds:
``X-Forwarded-For: client, proxy1, proxy2`` (each proxy appends the address it was
connected from) or RFC 7239's ``Forwarded: for=client, for=proxy1``. Anyone can send
those headers, so they are read only when the connection comes from a trusted proxy
(an address in one of the ``--trusted-proxy`` CIDR ranges), and then from the right:
the first address that is not itself a trusted proxy is the client's (what the
nearest proxy saw), and anything further left, which the client may have written, is
ignored. ``X-Forwarded-For`` is read when present (nginx, HAProxy, cloud load
balancers set it), ``Forwarded`` otherwise; a proxy that sets only ``Forwarded``
must remove an ``X-Forwarded-For`` its clients send (docs/security.md).

A header that cannot be read (a malformed list, an ``unknown`` or obfuscated
``for=``, a port past 65535) never fails the request: the walk stops at it and the
address found so far is used, at worst the proxy's own. That address is what the
logs show (``peer``) and what ``--max-connections-per-ip`` counts.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Final

from aiohttp import web

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_HOPS: Final = 32
"""Addresses of a forwarding header read at most, from the right: a chain longer than
this many trusted proxies stops at the 32nd."""

_PORT = re.compile(r"^(?P<host>[0-9.]+):(?P<port>[0-9]{1,5})$")
"""An IPv4 address with a port (``203.0.113.7:4711``), which some proxies write."""


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """The CIDR ranges of ``--trusted-proxy`` (a bare address is a /32 or /128).

    Raises:
        ValueError: a value is not an address or a network; the message names it.
    """
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"trusted_proxy: {value!r} is not an IP address or CIDR range "
                "(e.g. 10.0.0.0/8, 127.0.0.1, fd00::/8)"
            ) from None
    return tuple(networks)


def parse_address(text: str) -> IPAddress | None:
    """An address as a forwarding header writes it: ``203.0.113.7``, ``2001:db8::1``,
    with a port (``203.0.113.7:4711``, ``[2001:db8::1]:4711``), bracketed, or quoted;
    None if it is none of those (``unknown``, ``_hidden``, garbage)."""
    text = text.strip().strip('"').strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not _valid_port(rest.removeprefix(":"))):
            return None
        text = host
    else:
        with_port = _PORT.match(text)
        if with_port is not None:
            if not _valid_port(with_port["port"]):
                return None
            text = with_port["host"]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:1.2.3.4 is 1.2.3.4
            return address.ipv4_mapped
        if address.scope_id is not None:
            return None
    return address


def _valid_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 0 < len(text) <= 5 and int(text) <= 65535


def forwarded_for(values: Sequence[str]) -> list[str]:
    """The ``for=`` values of ``Forwarded`` headers, in order (elements without one
    count as an unreadable hop)."""
    hops = []
    for value in values:
        for element in _split(value, ","):
            found = None
            for pair in _split(element, ";"):
                name, equals, token = pair.partition("=")
                if equals and name.strip().lower() == "for":
                    found = token.strip()
            hops.append(found if found is not None else "")
    return hops


def _split(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


class ClientAddresses:
    """Finds a connection's client address from its peer and headers; see the module
    docstring. Without trusted proxies it is the peer's address, headers unread."""

    __slots__ = ("networks",)

    def __init__(self, trusted: Iterable[str] = ()) -> None:
        self.networks = parse_networks(trusted)

    def trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)

    def resolve(
        self,
        peer: str | None,
        x_forwarded_for: Sequence[str] = (),
        forwarded: Sequence[str] = (),
    ) -> str | None:
        """The client's address, given the connection's ``peer`` address and the values
        of its ``X-Forwarded-For`` and ``Forwarded`` headers (each header line one value,
        in the order received)."""
        if not self.networks or peer is None:
            return peer
        current = parse_address(peer)
        if current is None or not self.trusted(current):
            return peer
        if x_forwarded_for:
            hops = [hop for value in x_forwarded_for for hop in value.split(",")]
        elif forwarded:
            hops = forwarded_for(forwarded)
        else:
            return str(current)
        for hop in reversed(hops[-MAX_HOPS:]):
            address = parse_address(hop)
            if address is None:
                break  # unreadable: what lies to its left cannot be vouched for
            current = address
            if not self.trusted(address):
                break
        return str(current)


ADDRESSES = web.AppKey("client_addresses", ClientAddresses)


def request_address(request: web.Request) -> str | None:
    """The client address of an aiohttp request (the peer's without the app's
    :class:`ClientAddresses`, e.g. in an app mounted elsewhere)."""
    addresses = request.app.get(ADDRESSES)
    if addresses is None or not addresses.networks:
        return request.remote
    headers = request.headers
    return addresses.resolve(
        request.remote, headers.getall("X-Forwarded-For", ()), headers.getall("Forwarded", ())
    )
