"""PROXY protocol v1 (text) and v2 (binary), as specified by HAProxy (doc/proxy-protocol.txt).

`build_v1` / `build_v2` make the header fastlb sends to a backend (`send-proxy`, `send-proxy-v2`);
`parse` reads the header a load balancer in front of fastlb sends (`accept-proxy` on a bind). Only TCP
over IPv4/IPv6 is relayed; LOCAL (v2) and UNKNOWN (v1) headers are accepted and mean "use the real peer".
"""
from __future__ import annotations

import ipaddress
import socket
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LENGTH = 107           # the spec's worst case, CRLF included
V2_MAX_LENGTH = 16 + 536      # fixed part + what fastlb accepts of addresses and TLVs

Address = tuple[str, int]


class ProxyProtocolError(ValueError):
    """A malformed PROXY protocol header: the connection is closed."""


def build_v1(source: Address, destination: Address) -> bytes:
    family = "TCP6" if ":" in source[0] else "TCP4"
    if (":" in destination[0]) != (family == "TCP6"):
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode("ascii")


def build_v2(source: Address, destination: Address) -> bytes:
    """A PROXY command over TCP; LOCAL when the two addresses are of different families."""
    if ":" in source[0] and ":" in destination[0]:
        addresses = (socket.inet_pton(socket.AF_INET6, source[0]) + socket.inet_pton(socket.AF_INET6, destination[0])
                     + struct.pack("!HH", source[1], destination[1]))
        return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x21, len(addresses)) + addresses
    if ":" not in source[0] and ":" not in destination[0]:
        addresses = (socket.inet_aton(source[0]) + socket.inet_aton(destination[0])
                     + struct.pack("!HH", source[1], destination[1]))
        return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, len(addresses)) + addresses
    return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0)


def parse(data: bytes) -> tuple[int, Address | None, Address | None] | None:
    """Reads a PROXY header at the start of data.

    Returns None when more bytes are needed, else (header length, source, destination); source and
    destination are None for LOCAL / UNKNOWN. Raises ProxyProtocolError when data cannot be a header."""
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data:
        raise ProxyProtocolError("no PROXY protocol header")
    return None


def _parse_v1(data: bytes) -> tuple[int, Address | None, Address | None] | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if not b"PROXY "[:len(data)] == data[:6] or len(data) >= V1_MAX_LENGTH:
            raise ProxyProtocolError("bad PROXY v1 header")
        return None
    parts = data[:end].split(b" ")
    if parts[0] != b"PROXY" or len(parts) < 2:
        raise ProxyProtocolError("bad PROXY v1 header")
    if parts[1] == b"UNKNOWN":
        return end + 2, None, None
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyProtocolError("bad PROXY v1 header")
    try:
        version = 4 if parts[1] == b"TCP4" else 6
        source_ip = ipaddress.ip_address(parts[2].decode("ascii"))
        destination_ip = ipaddress.ip_address(parts[3].decode("ascii"))
        source_port, destination_port = int(parts[4]), int(parts[5])
    except ValueError:
        raise ProxyProtocolError("bad address in PROXY v1 header") from None
    if (source_ip.version != version or destination_ip.version != version
            or not (0 <= source_port <= 65535 and 0 <= destination_port <= 65535)):
        raise ProxyProtocolError("bad address in PROXY v1 header")
    return end + 2, (str(source_ip), source_port), (str(destination_ip), destination_port)


def _parse_v2(data: bytes) -> tuple[int, Address | None, Address | None] | None:
    if len(data) < 16:
        if not V2_SIGNATURE.startswith(data[:12]):
            raise ProxyProtocolError("bad PROXY v2 signature")
        return None
    if data[:12] != V2_SIGNATURE:
        raise ProxyProtocolError("bad PROXY v2 signature")
    version_command, family, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2 or (version_command & 0xF) > 1:
        raise ProxyProtocolError("bad PROXY v2 version or command")
    if 16 + length > V2_MAX_LENGTH:
        raise ProxyProtocolError("PROXY v2 header too long")
    if len(data) < 16 + length:
        return None
    total = 16 + length
    if version_command & 0xF == 0:                     # LOCAL: health check of the proxy itself
        return total, None, None
    if family == 0x11 and length >= 12:
        source = (socket.inet_ntoa(data[16:20]), struct.unpack_from("!H", data, 24)[0])
        destination = (socket.inet_ntoa(data[20:24]), struct.unpack_from("!H", data, 26)[0])
        return total, source, destination
    if family == 0x21 and length >= 36:
        source = (socket.inet_ntop(socket.AF_INET6, data[16:32]), struct.unpack_from("!H", data, 48)[0])
        destination = (socket.inet_ntop(socket.AF_INET6, data[32:48]), struct.unpack_from("!H", data, 50)[0])
        return total, source, destination
    return total, None, None                         # UNSPEC or non-TCP: treat like LOCAL
