"""Small builders and parsers of Ethernet/IPv4/TCP/UDP frames for datapath tests.

Pure Python (struct). Builders compute correct checksums unless told otherwise;
`parse` decodes a frame back into a `Packet` and `Packet.checksums_ok()` verifies the
IPv4 header checksum and the TCP/UDP checksum (with the pseudo-header; a UDP
checksum of 0 means "none" and is valid).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
IP_MF = 0x2000

CLIENT_MAC = bytes.fromhex("020000000001")
NODE_MAC = bytes.fromhex("020000000002")


def csum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of data: the ones' complement of the ones'
    complement sum of its 16-bit big-endian words."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ip(addr: str | ipaddress.IPv4Address) -> bytes:
    return ipaddress.IPv4Address(addr).packed


def pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, proto, length)


def ether(payload: bytes, ethertype: int = ETH_P_IP, src: bytes = CLIENT_MAC, dst: bytes = NODE_MAC) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4_header(
    src: str, dst: str, proto: int, payload_len: int, *, ttl: int = 64, ident: int = 0x1234,
    frag: int = 0, ihl: int = 5, tot_len: int | None = None, options: bytes = b"",
    check: int | None = None,
) -> bytes:
    """An IPv4 header; ihl/tot_len/check may be forced to wrong values for malformed tests."""
    hdr_len = 20 + len(options)
    total = hdr_len + payload_len if tot_len is None else tot_len
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, ident, frag, ttl, proto, 0, _ip(src), _ip(dst)) + options
    value = csum(hdr) if check is None else check
    return hdr[:10] + struct.pack("!H", value) + hdr[12:]


def tcp_segment(src: str, dst: str, sport: int, dport: int, flags: int, payload: bytes = b"",
                seq: int = 1000, ack: int = 0, window: int = 64240) -> bytes:
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0)
    seg = hdr + payload
    value = csum(pseudo_header(_ip(src), _ip(dst), IPPROTO_TCP, len(seg)) + seg)
    return seg[:16] + struct.pack("!H", value) + seg[18:]


def udp_datagram(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", zero_csum: bool = False) -> bytes:
    length = 8 + len(payload)
    dgram = struct.pack("!HHHH", sport, dport, length, 0) + payload
    if zero_csum:
        return dgram
    value = csum(pseudo_header(_ip(src), _ip(dst), IPPROTO_UDP, length) + dgram) or 0xFFFF
    return dgram[:6] + struct.pack("!H", value) + dgram[8:]


def tcp(src: str, sport: int, dst: str, dport: int, flags: int = SYN, payload: bytes = b"", *, ttl: int = 64,
        **kw: int) -> bytes:
    """An Ethernet frame holding an IPv4 TCP segment with correct checksums."""
    seg = tcp_segment(src, dst, sport, dport, flags, payload, **kw)
    return ether(ipv4_header(src, dst, IPPROTO_TCP, len(seg), ttl=ttl) + seg)


def udp(src: str, sport: int, dst: str, dport: int, payload: bytes = b"", *, zero_csum: bool = False,
        ttl: int = 64) -> bytes:
    """An Ethernet frame holding an IPv4 UDP datagram (checksum 0 with zero_csum)."""
    dgram = udp_datagram(src, dst, sport, dport, payload, zero_csum)
    return ether(ipv4_header(src, dst, IPPROTO_UDP, len(dgram), ttl=ttl) + dgram)


def tcp_ts(src: str, sport: int, dst: str, dport: int, flags: int, tsval: int, tsecr: int, payload: bytes = b"",
           syn_layout: bool = False) -> bytes:
    """A frame whose TCP header carries the timestamp option: Linux's layout (NOP, NOP, TS),
    or that of a Linux SYN (MSS, SACK permitted, TS, NOP, window scale)."""
    ts = struct.pack("!BBII", 8, 10, tsval, tsecr)
    opts = (struct.pack("!BBH", 2, 4, 1460) + b"\x04\x02" + ts + b"\x01\x03\x03\x07") if syn_layout else \
        b"\x01\x01" + ts
    hdr = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, (5 + len(opts) // 4) << 4, flags, 64240, 0, 0) + opts
    seg = hdr + payload
    value = csum(pseudo_header(_ip(src), _ip(dst), IPPROTO_TCP, len(seg)) + seg)
    seg = seg[:16] + struct.pack("!H", value) + seg[18:]
    return ether(ipv4_header(src, dst, IPPROTO_TCP, len(seg)) + seg)


def icmp_echo(src: str, dst: str, ident: int = 1, seq: int = 1) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"ping"
    body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    return ether(ipv4_header(src, dst, IPPROTO_ICMP, len(body)) + body)


def arp_request(sender: str, target: str) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, CLIENT_MAC, _ip(sender), b"\0" * 6, _ip(target))
    return ether(body, ETH_P_ARP, dst=b"\xff" * 6)


def ipv6_tcp_syn(sport: int = 40000, dport: int = 30645) -> bytes:
    """An IPv6 TCP SYN (checksum left 0: nobody translates it)."""
    seg = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, SYN, 64240, 0, 0)
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(seg), IPPROTO_TCP, 64,
                      ipaddress.IPv6Address("fd00::180").packed, ipaddress.IPv6Address("fd00::101").packed)
    return ether(hdr + seg, ETH_P_IPV6)


@dataclass(frozen=True)
class Packet:
    """A decoded IPv4 TCP/UDP frame."""

    dst_mac: bytes
    src_mac: bytes
    saddr: str
    daddr: str
    proto: int
    ttl: int
    sport: int
    dport: int
    tcp_flags: int
    l4_csum: int
    ip_header: bytes
    l4: bytes  # the L4 header and payload (tot_len bounded)

    def ip_csum_ok(self) -> bool:
        return csum(self.ip_header) == 0

    def l4_csum_ok(self) -> bool:
        if self.proto == IPPROTO_UDP and self.l4_csum == 0:
            return True  # no checksum
        pseudo = pseudo_header(_ip(self.saddr), _ip(self.daddr), self.proto, len(self.l4))
        return csum(pseudo + self.l4) == 0

    def checksums_ok(self) -> bool:
        return self.ip_csum_ok() and self.l4_csum_ok()

    @property
    def flow(self) -> tuple[str, int, str, int]:
        """(saddr, sport, daddr, dport)."""
        return (self.saddr, self.sport, self.daddr, self.dport)


def parse(frame: bytes) -> Packet:
    """Decode an Ethernet/IPv4/TCP-or-UDP frame; ValueError for anything else."""
    if len(frame) < 34 or struct.unpack("!H", frame[12:14])[0] != ETH_P_IP:
        raise ValueError("not an IPv4 frame")
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    tot_len = struct.unpack("!H", ip[2:4])[0]
    proto = ip[9]
    if proto not in (IPPROTO_TCP, IPPROTO_UDP):
        raise ValueError(f"IP protocol {proto} is neither TCP nor UDP")
    l4 = ip[ihl:tot_len or len(ip)]  # tot_len 0: BIG TCP, the frame's length
    sport, dport = struct.unpack("!HH", l4[:4])
    if proto == IPPROTO_TCP:
        flags, l4_csum = l4[13], struct.unpack("!H", l4[16:18])[0]
    else:
        flags, l4_csum = 0, struct.unpack("!H", l4[6:8])[0]
    return Packet(
        dst_mac=frame[0:6], src_mac=frame[6:12],
        saddr=str(ipaddress.IPv4Address(ip[12:16])), daddr=str(ipaddress.IPv4Address(ip[16:20])),
        proto=proto, ttl=ip[8], sport=sport, dport=dport, tcp_flags=flags, l4_csum=l4_csum,
        ip_header=ip[:ihl], l4=l4,
    )


def payload_of(p: Packet) -> bytes:
    return p.l4[20:] if p.proto == IPPROTO_TCP else p.l4[8:]


def complete_partial_checksum(frame: bytes, l4_offset: int, csum_offset: int) -> bytes:
    """Do what a NIC does for a CHECKSUM_PARTIAL frame: the checksum field holds the
    pseudo-header sum; sum the L4 bytes from l4_offset (field included) and store the
    complement. (A frame captured before that step, e.g. on a veth, still carries the
    pseudo-header sum.)"""
    value = csum(frame[l4_offset:])
    at = l4_offset + csum_offset
    return frame[:at] + struct.pack("!H", value) + frame[at + 2 :]
