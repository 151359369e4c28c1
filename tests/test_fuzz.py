"""Packet fuzz suite: seeded random and mutated frames through node0's loaded programs.

node0 of examples/seed.yaml (its backend 10.0.1.72 is on node1: DNAT + SNAT) is loaded
in a network namespace of its own (eth0 with the node's address and MAC, neighbours
with fixed MACs, the pod CIDR routed via node1, forwarding on) with its maps pinned in
a fresh bpffs directory, and from_netdev / to_netdev run on every frame with
BPF_PROG_TEST_RUN. Nothing is attached anywhere.

Generated: valid TCP/UDP to the NodePort, to the ClusterIP (ingress and egress), to the
node outside the NodePort range, passing-by traffic, replies of the backend to the
node's SNAT ports and to the node's own ClusterIP flows, near misses of those, ICMP,
ARP, IPv6, VLAN-tagged and other ethertypes; then mutated: truncated (at every offset
in one stream), bad IHL, IP options, fragments, bad tot_len (short, long, 0) and
padding, random TCP flags (on established flows in one stream), bad checksums, TTL,
version and protocol bytes, random byte flips.

Oracles, checked on every frame with checksums computed here:
- the test run never fails (BPF_PROG_TEST_RUN refuses only frames the harness may
  refuse: shorter than Ethernet + IPv4 header) and the verdict is OK, SHOT or REDIRECT;
- a frame that is not service traffic (not to a frontend, not a reply of a flow seen
  translated) comes out byte-identical with TC_ACT_OK, garbage included: only service
  traffic may ever be dropped; IP fragments pass untranslated (README, Limits);
- a translated frame came from a well-formed one, keeps its length and every byte but
  MACs, TTL, addresses, ports and checksums; its IPv4 and TCP/UDP checksums (the
  pseudo-header included) are valid when the input's were (else their error is kept);
  a UDP checksum is 0 exactly when the input's was; its addresses are the expected
  ones: NodePort/ClusterIP -> 10.0.1.72:80 from 172.26.50.101 and a port of
  snatPortRange; a reply -> to the client of that port from its frontend
  (172.26.50.101:30645 or the ClusterIP); the node's ClusterIP flow (egress) ->
  10.0.1.72:80 from its own source; TTL decremented when the program forwards; a flow
  keeps its SNAT port until a FIN or RST (either way), a new SYN or its expiry;
- every drop is counted in drop_stats.

The seed is fixed (FUZZ_SEED) unless BPFGEN_FUZZ_SEED is set ("random" picks one); it is
printed with every failure, with the frame in hex. BPFGEN_FUZZ_PACKETS changes the
number of packets (20,000 per run). bench/fuzz.py runs the same streams for longer.
"""

from __future__ import annotations

import os
import random
import secrets
import socket
import struct
import subprocess
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bpfgen import layout
from bpfgen import libbpf as bpf
from bpfgen.loader import SERVICE_MAPS, open_datapath, sync_service_maps
from bpfgen.netns import enter_netns, ifindex as if_index
from bpfgen.render import TIMEOUTS

import packets as pk  # tests/packets.py (tests/ is on sys.path: rootdir conftest, or bench/fuzz.py)

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parent.parent
SEED_SPEC = REPO / "examples" / "seed.yaml"

FUZZ_SEED = 10  # the CI seed (issue 10); BPFGEN_FUZZ_SEED overrides it
PACKETS = 20_000
# Shares of the packets per stream (a test each).
STREAMS = {"mixed": 0.6, "truncated": 0.15, "established": 0.25}

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
VERDICTS = {TC_ACT_OK: "TC_ACT_OK", TC_ACT_SHOT: "TC_ACT_SHOT", TC_ACT_REDIRECT: "TC_ACT_REDIRECT"}
TCP, UDP, ICMP = 6, 17, 1


def A(addr: str) -> bytes:
    return socket.inet_aton(addr)


def S(addr: bytes) -> str:
    return socket.inet_ntoa(addr)


# examples/seed.yaml, node0
NODE0, NODE1 = A("172.26.50.101"), A("172.26.50.102")
CLIENT, OTHER_CLIENT = A("172.26.50.180"), A("172.26.50.190")
CLUSTER_IP = A("10.106.91.98")
BACKEND, BACKEND_PORT = A("10.0.1.72"), 80
NODEPORT = 30645
NODEPORT_RANGE = range(30000, 32768)
SNAT_RANGE = range(32768, 65536)
FRONTENDS = {(NODE0, NODEPORT), (CLUSTER_IP, 80)}  # TCP and UDP both

NODE_MAC, CLIENT_MAC = pk.NODE_MAC, pk.CLIENT_MAC
NODE1_MAC = bytes.fromhex("02000000aa02")
NEIGHBOURS = {CLIENT: CLIENT_MAC, OTHER_CLIENT: CLIENT_MAC, NODE1: NODE1_MAC}


def next_hop_mac(addr: bytes) -> bytes | None:
    """The MAC a fib lookup in the test namespace answers for addr (None: no neighbour)."""
    if addr[:3] == bytes([10, 0, 1]):  # the pod CIDR, routed via node1
        return NODE1_MAC
    return NEIGHBOURS.get(addr)


MAY_EXPIRE = dict(TIMEOUTS)["CT_CLOSE_TIMEOUT"] - 1  # s: below the shortest conntrack timeout
SKB_CTX_SIZE, SKB_IFINDEX_OFFSET = 192, 40  # struct __sk_buff: only ifindex is set

csum = pk.csum


def fuzz_seed() -> int:
    value = os.environ.get("BPFGEN_FUZZ_SEED", "").strip()
    if not value:
        return FUZZ_SEED
    if value == "random":
        return secrets.randbelow(1 << 32)
    return int(value, 0)


def fuzz_packets() -> int:
    return int(os.environ.get("BPFGEN_FUZZ_PACKETS", PACKETS))


# ---------------------------------------------------------------- the datapath under test


def _sh(*args: str, stdin: str | None = None) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, input=stdin)


class Node0:
    """node0 of a compiled seed build, loaded in a fresh network namespace with pins in a
    fresh bpffs dir; the calling thread stays inside the namespace (the programs' fib
    lookups start at its eth0) until exit, which removes everything."""

    def __init__(self, build):
        self.build = build

    def __enter__(self) -> Node0:
        from bpfgen.state import ensure_bpffs

        stack = self._stack = ExitStack()
        try:
            ns = self.netns = f"bgf-{secrets.token_hex(4)}"
            _sh("ip", "netns", "add", ns)
            stack.callback(subprocess.run, ["ip", "netns", "del", ns], check=False, capture_output=True)
            mac = lambda b: b.hex(":")  # noqa: E731
            _sh("ip", "-n", ns, "-batch", "-", stdin="\n".join([
                "link add eth0 type veth peer name peer0",
                f"link set dev eth0 address {mac(NODE_MAC)}",
                f"addr add {S(NODE0)}/24 dev eth0",
                "link set eth0 up", "link set peer0 up", "link set lo up",
                *(f"neigh replace {S(a)} lladdr {mac(m)} dev eth0 nud permanent" for a, m in NEIGHBOURS.items()),
                f"route replace 10.0.1.0/24 via {S(NODE1)} dev eth0",
            ]) + "\n")
            _sh("nsenter", f"--net=/run/netns/{ns}", "sysctl", "-qw", "net.ipv4.ip_forward=1")

            ensure_bpffs()
            pins = Path("/sys/fs/bpf") / f"bpfgen-fuzz-{secrets.token_hex(4)}"
            pins.mkdir()
            stack.callback(subprocess.run, ["rm", "-rf", str(pins)], check=False)
            stack.enter_context(enter_netns(ns))
            plan = self.build.plan()
            node = plan.node("node0")
            obj = self.obj = stack.enter_context(open_datapath(self.build, plan, node, pins))
            self.maps = {m.name: stack.enter_context(obj.map(m.name).map_fd()) for m in layout.MAPS}
            sync_service_maps({n: self.maps[n] for n in SERVICE_MAPS}, plan, node, [self.maps["ct_v4"], self.maps["ct_half_v4"]])
            ctx = bytearray(SKB_CTX_SIZE)
            ctx[SKB_IFINDEX_OFFSET : SKB_IFINDEX_OFFSET + 4] = if_index("eth0").to_bytes(4, "little")
            self.ctx = bytes(ctx)
            self.progs = {p: obj.program(p).fd for p in ("from_netdev", "to_netdev")}
        except BaseException:
            stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def run(self, prog: str, frame: bytes) -> tuple[int, bytes]:
        res = bpf.prog_test_run(self.progs[prog], frame, ctx_in=self.ctx)
        return res.retval, res.data_out

    def drops(self) -> dict[str, int]:
        out = {}
        for name, value, _ in layout.DROP_REASONS.members:
            rows = self.maps["drop_stats"].lookup_percpu(layout.ID_KEY.pack(value)) or []
            out[name] = sum(layout.DROP_STATS.unpack(r)["packets"] for r in rows)
        return out


# ---------------------------------------------------------------- frames


def ip_header(src: bytes, dst: bytes, proto: int, l4_len: int, *, ttl: int = 64, ident: int = 0,
              frag: int = 0, options: bytes = b"", tos: int = 0) -> bytearray:
    h = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | (5 + len(options) // 4), tos, 20 + len(options) + l4_len,
                              ident, frag, ttl, proto, 0, src, dst) + options)
    h[10:12] = csum(bytes(h)).to_bytes(2, "big")
    return h


def l4_checksum(src: bytes, dst: bytes, proto: int, l4: bytes) -> int:
    return csum(src + dst + struct.pack("!BBH", 0, proto, len(l4)) + l4)


def tcp_segment(src: bytes, dst: bytes, sport: int, dport: int, flags: int, payload: bytes = b"", *,
                seq: int = 1000, ack: int = 0, window: int = 64240, options: bytes = b"") -> bytes:
    doff = 5 + len(options) // 4
    seg = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0, 0) + options + payload)
    seg[16:18] = l4_checksum(src, dst, TCP, bytes(seg)).to_bytes(2, "big")
    return bytes(seg)


def udp_datagram(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"", zero: bool = False) -> bytes:
    d = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    if not zero:
        d[6:8] = (l4_checksum(src, dst, UDP, bytes(d)) or 0xFFFF).to_bytes(2, "big")
    return bytes(d)


def ipv4_frame(src: bytes, dst: bytes, proto: int, l4: bytes, *, src_mac: bytes = CLIENT_MAC,
               dst_mac: bytes = NODE_MAC, **ip: int) -> bytes:
    return dst_mac + src_mac + b"\x08\x00" + bytes(ip_header(src, dst, proto, len(l4), **ip)) + l4


@dataclass
class Ip:
    """The IPv4 view of a frame (no validation): offsets and fields."""

    ihl: int  # bytes
    tot_len: int
    proto: int
    frag: int
    saddr: bytes
    daddr: bytes
    version: int

    @property
    def l4_off(self) -> int:
        return 14 + self.ihl


def ip_view(frame: bytes | bytearray) -> Ip | None:
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    return Ip(ihl=(frame[14] & 15) * 4, tot_len=int.from_bytes(frame[16:18], "big"), proto=frame[23],
              frag=int.from_bytes(frame[20:22], "big"), saddr=bytes(frame[26:30]), daddr=bytes(frame[30:34]),
              version=frame[14] >> 4)


def l4_bounds(frame: bytes | bytearray, ip: Ip) -> tuple[int, int] | None:
    """[start, end) of the L4 bytes of a well-formed frame (tot_len 0: BIG TCP, to the
    frame's end), or None when the frame is not one the datapath may translate."""
    if ip.version != 4 or ip.ihl < 20 or ip.proto not in (TCP, UDP) or ip.frag & 0x3FFF:
        return None
    total = ip.tot_len or len(frame) - 14
    if total < ip.ihl + (20 if ip.proto == TCP else 8) or 14 + total > len(frame):
        return None
    return ip.l4_off, 14 + total


def csum_off(proto: int) -> int:
    return 16 if proto == TCP else 6


def fix_ip_csum(b: bytearray) -> None:
    ihl = (b[14] & 15) * 4
    if ihl < 20 or 14 + ihl > len(b):
        ihl = 20
    b[24:26] = b"\0\0"
    b[24:26] = csum(bytes(b[14 : 14 + ihl])).to_bytes(2, "big")


def fix_l4_csum(b: bytearray) -> None:
    ip = ip_view(b)
    bounds = ip and l4_bounds(b, ip)
    if not bounds:
        return
    start, end = bounds
    at = start + csum_off(ip.proto)
    if ip.proto == UDP and b[at : at + 2] == b"\0\0":
        return  # no checksum
    b[at : at + 2] = b"\0\0"
    value = l4_checksum(ip.saddr, ip.daddr, ip.proto, bytes(b[start:end]))
    b[at : at + 2] = (value or (0xFFFF if ip.proto == UDP else 0)).to_bytes(2, "big")


# ---------------------------------------------------------------- oracles


@dataclass(frozen=True)
class Xlate:
    """One way a service frame may come out translated."""

    kind: str  # forward (DNAT+SNAT), reply (reverse), egress (ClusterIP from the node), egress-reply
    saddr: bytes
    sport: int | None  # None: any port of snatPortRange
    daddr: bytes
    dport: int


@dataclass
class Failure:
    kind: str
    detail: str
    index: int
    label: str
    prog: str
    frame: bytes
    verdict: int | None = None
    out: bytes | None = None

    def describe(self) -> str:
        lines = [f"#{self.index} {self.prog} [{self.label}]: {self.detail}",
                 f"    frame: {self.frame.hex()}"]
        if self.verdict is not None:
            lines.append(f"    verdict: {VERDICTS.get(self.verdict, self.verdict)}")
        if self.out is not None and self.out != self.frame and self.verdict != TC_ACT_SHOT:
            lines.append(f"    out:   {self.out.hex()}")
        return "\n".join(lines)


NOT_SERVICE_DROPPED = "NOT FOR A SERVICE, DROPPED (only service traffic may ever be dropped: datapath bug)"
NOT_SERVICE_CHANGED = "NOT FOR A SERVICE, NOT PASSED BYTE-IDENTICAL WITH TC_ACT_OK (datapath bug)"
FRAGMENT_TOUCHED = "IP FRAGMENT NOT PASSED UNTRANSLATED (README: fragments pass untranslated)"
MALFORMED_TRANSLATED = "MALFORMED FRAME TRANSLATED"
BAD_TRANSLATION = "TRANSLATED FRAME WRONG (addresses, checksums or untouched bytes)"
RUN_FAILED = "TEST RUN FAILED"
BAD_VERDICT = "UNEXPECTED VERDICT"
UNCOUNTED_DROP = "DROP NOT COUNTED IN drop_stats"
NOTHING_TRANSLATED = "FUZZ DID NOT EXERCISE THE DATAPATH"


class Model:
    """What the frames seen translated say about the datapath's flows (learnt from its
    outputs, checked by the oracles): which client a SNAT port belongs to, which of the
    node's own flows went to the ClusterIP."""

    def __init__(self):
        # (proto, snat port) -> {(client, client port, frontend addr, frontend port)}: every
        # client ever seen on the port (a port is taken over once its flow is gone)
        self.nat: dict[tuple[int, int], set[tuple[bytes, int, bytes, int]]] = defaultdict(set)
        # (proto, source, source port) -> {(frontend addr, frontend port)}: egress flows
        self.egress: dict[tuple[int, bytes, int], set[tuple[bytes, int]]] = defaultdict(set)
        # flows for the generators: (proto, client, port, fe addr, fe port) -> last SNAT port
        self.flows: dict[tuple[int, bytes, int, bytes, int], int] = {}
        self.flow_list: list[tuple[int, bytes, int, bytes, int]] = []
        self.egress_list: list[tuple[int, bytes, int]] = []
        # the same flows -> [SNAT port, when last translated, whether it may move, the
        # backend]: a flow keeps its port until a FIN or RST (either way), a new SYN, its
        # expiry, or another flow to that backend translated onto that port since
        self.ports: dict[tuple[int, bytes, int, bytes, int], list] = {}

    def candidates(self, prog: str, proto: int, saddr: bytes, sport: int, daddr: bytes, dport: int) -> list[Xlate]:
        out = []
        if prog == "from_netdev":
            if (daddr, dport) in FRONTENDS:
                out.append(Xlate("forward", NODE0, None, BACKEND, BACKEND_PORT))
            if saddr == BACKEND and sport == BACKEND_PORT:
                if daddr == NODE0:
                    for client, cport, fe, feport in self.nat.get((proto, dport), ()):
                        out.append(Xlate("reply", fe, feport, client, cport))
                if daddr == NODE0:  # (node0 has no podCIDR: README, Limits)
                    for fe, feport in self.egress.get((proto, daddr, dport), ()):
                        out.append(Xlate("egress-reply", fe, feport, daddr, dport))
        elif (daddr, dport) == (CLUSTER_IP, 80):
            out.append(Xlate("egress", saddr, sport, BACKEND, BACKEND_PORT))
        return out

    def learn(self, x: Xlate, proto: int, saddr: bytes, sport: int, daddr: bytes, dport: int, out_sport: int) -> None:
        if x.kind == "forward":
            self.nat[(proto, out_sport)].add((saddr, sport, daddr, dport))
            key = (proto, saddr, sport, daddr, dport)
            if key not in self.flows:
                self.flow_list.append(key)
            self.flows[key] = out_sport
        elif x.kind == "egress":
            key = (proto, saddr, sport)
            if key not in self.egress:
                self.egress_list.append(key)
            self.egress[key].add((daddr, dport))


def _ports(frame: bytes, off: int) -> tuple[int, int] | None:
    if off + 4 > len(frame):
        return None
    return int.from_bytes(frame[off : off + 2], "big"), int.from_bytes(frame[off + 2 : off + 4], "big")


def malformation(frame: bytes) -> str:
    """What is wrong with a frame, in a few words (failures are grouped by it)."""
    ip = ip_view(frame)
    if ip is None:
        return "not IPv4" if len(frame) < 14 or frame[12:14] != b"\x08\x00" else "shorter than an IPv4 header"
    if ip.version != 4:
        return "IP version is not 4"
    if ip.ihl < 20:
        return "IHL < 5"
    if ip.l4_off > len(frame):
        return "IHL beyond the frame"
    if ip.proto not in (TCP, UDP):
        return "not TCP/UDP"
    if ip.frag & 0x3FFF:
        return "fragment"
    if l4_bounds(frame, ip) is None:
        total = ip.tot_len or len(frame) - 14
        return "tot_len beyond the frame" if 14 + total > len(frame) else "L4 header cut short"
    return "well-formed"


class Oracle:
    def __init__(self, model: Model):
        self.model = model
        self.stats: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.shot = 0

    def classify(self, prog: str, frame: bytes) -> tuple[str, list[Xlate]]:
        """("pass", []) for what must pass untouched ("fragment" likewise), else
        ("service", ways it may be translated) for what may be dropped or translated."""
        ip = ip_view(frame)
        if ip is None:
            return "pass", []
        if ip.version != 4 or ip.ihl < 20 or ip.l4_off > len(frame):
            # the L4 header's place is anyone's guess: service traffic if the ports after
            # a plain header, or where the IHL says, are a service's
            if ip.proto not in (TCP, UDP):
                return "pass", []
            cands = []
            for off in {34, ip.l4_off} if ip.ihl >= 20 else {34}:
                ports = _ports(frame, off)
                if ports:
                    cands += self.model.candidates(prog, ip.proto, ip.saddr, ports[0], ip.daddr, ports[1])
            return ("service", cands) if cands else ("pass", [])
        if ip.proto not in (TCP, UDP):
            return "pass", []
        if ip.frag & 0x3FFF:
            return "fragment", []
        ports = _ports(frame, ip.l4_off)
        if ports is None:
            return "pass", []
        cands = self.model.candidates(prog, ip.proto, ip.saddr, ports[0], ip.daddr, ports[1])
        return ("service", cands) if cands else ("pass", [])

    def check(self, prog: str, frame: bytes, verdict: int, out: bytes) -> tuple[str, str] | None:
        """None when the outcome is right, else (failure kind, detail)."""
        cls, cands = self.classify(prog, frame)
        if verdict == TC_ACT_SHOT:
            self.shot += 1
        if verdict not in VERDICTS:
            return BAD_VERDICT, f"verdict {verdict}"
        if cls != "service":
            if (verdict, out) == (TC_ACT_OK, frame):
                self.stats["passed"] += 1
                return None
            what = NOT_SERVICE_DROPPED if verdict == TC_ACT_SHOT else NOT_SERVICE_CHANGED
            if cls == "fragment":
                what = FRAGMENT_TOUCHED
            what += f" [{malformation(frame)}]"
            return what, f"{VERDICTS[verdict]}, {'unchanged' if out == frame else 'changed'}"
        self._closing(frame, cands)
        if verdict == TC_ACT_SHOT:
            self.stats["service dropped"] += 1
            return None
        if verdict == TC_ACT_OK and out == frame:
            self.stats["service passed"] += 1
            return None
        # translated
        ip = ip_view(frame)
        bounds = l4_bounds(frame, ip) if ip else None
        if bounds is None:
            return MALFORMED_TRANSLATED, f"{VERDICTS[verdict]}: the datapath translated a frame it cannot parse"
        problems, learnt = self._translated(prog, frame, verdict, out, ip, bounds, cands)
        if problems:
            return BAD_TRANSLATION, "; ".join(problems)
        self.stats["translated"] += 1
        self.kinds[learnt] += 1
        return None

    def _closing(self, frame: bytes, cands: list[Xlate]) -> None:
        """A FIN or RST of a flow, either way (translated or not): its port may move."""
        ip = ip_view(frame)
        bounds = l4_bounds(frame, ip) if ip and ip.proto == TCP else None
        if not bounds or not frame[bounds[0] + 13] & (pk.FIN | pk.RST):
            return
        sport, dport = _ports(frame, bounds[0])
        for x in cands:
            key = ((TCP, ip.saddr, sport, ip.daddr, dport) if x.kind == "forward"
                   else (TCP, x.daddr, x.dport, x.saddr, x.sport) if x.kind == "reply" else None)
            if key in self.model.ports:
                self.model.ports[key][2] = True

    def _translated(self, prog, frame, verdict, out, ip, bounds, cands) -> tuple[list[str], str]:
        start, end = bounds
        proto = ip.proto
        if len(out) != len(frame):
            return [f"length {len(frame)} -> {len(out)}"], ""
        co = start + csum_off(proto)
        allowed = set(range(0, 12)) | {22, 24, 25} | set(range(26, 34)) | set(range(start, start + 4)) | {co, co + 1}
        changed = [i for i in range(len(frame)) if frame[i] != out[i] and i not in allowed]
        problems = []
        if changed:
            problems.append(f"bytes changed that must not be: offsets {changed[:8]}")
        oip = ip_view(out)
        sport, dport = _ports(frame, start)
        osport, odport = _ports(out, start)
        # the address oracle
        match = None
        for x in cands:
            if (oip.saddr, oip.daddr, odport) == (x.saddr, x.daddr, x.dport) and (
                    osport == x.sport if x.sport is not None else osport in SNAT_RANGE):
                match = x
                break
        if match is None:
            problems.append(
                f"{S(ip.saddr)}:{sport} -> {S(ip.daddr)}:{dport} came out as {S(oip.saddr)}:{osport} -> "
                f"{S(oip.daddr)}:{odport}, expected one of: "
                + ", ".join(f"{x.kind} {S(x.saddr)}:{x.sport or 'snat'} -> {S(x.daddr)}:{x.dport}" for x in cands))
        # checksums: valid when the input's were, else the same error (incremental updates)
        ihl = ip.ihl
        ip_in, ip_out = csum(frame[14 : 14 + ihl]), csum(out[14 : 14 + ihl])
        if ip_out != ip_in:
            problems.append(f"IPv4 header checksum {'invalid' if ip_in == 0 else 'error changed'} "
                            f"({out[24:26].hex()}, residual {ip_out:#06x}, input's {ip_in:#06x})")
        in_c, out_c = frame[co : co + 2], out[co : co + 2]
        if proto == UDP and (in_c == b"\0\0") != (out_c == b"\0\0"):
            problems.append(f"UDP checksum {in_c.hex()} -> {out_c.hex()} (0 means none: it stays 0, and only 0 is 0)")
        elif not (proto == UDP and in_c == b"\0\0"):
            l4_in, l4_out = bytes(frame[start:end]), bytes(out[start:end])
            r_in = l4_checksum(ip.saddr, ip.daddr, proto, l4_in)
            r_out = l4_checksum(oip.saddr, oip.daddr, proto, l4_out)
            if r_out != r_in:
                name = "TCP" if proto == TCP else "UDP"
                problems.append(f"{name} checksum {out_c.hex()} {'invalid' if r_in == 0 else 'error changed'} over "
                                f"the pseudo-header (residual {r_out:#06x}, input's {r_in:#06x})")
        # verdict, MACs, TTL
        forwarded = prog == "from_netdev" and verdict == TC_ACT_REDIRECT
        if out[22] != (frame[22] - forwarded) & 0xFF:
            problems.append(f"TTL {frame[22]} -> {out[22]} ({'forwarded' if forwarded else 'not forwarded'})")
        if verdict == TC_ACT_REDIRECT and out[:12] != frame[:12]:
            mac = next_hop_mac(oip.daddr)
            if (out[0:6], out[6:12]) != (mac, NODE_MAC):
                problems.append(f"MACs {out[:12].hex()} (next hop {mac.hex() if mac else 'unknown'})")
        elif verdict == TC_ACT_OK and out[6:12] != frame[6:12]:
            problems.append("source MAC changed on a frame the stack carries on")
        if match is not None and match.kind == "forward":
            key = (proto, ip.saddr, sport, ip.daddr, dport)
            held = self.model.ports.get(key)
            now = time.monotonic()
            syn = proto == TCP and frame[start + 13] & (pk.SYN | pk.ACK) == pk.SYN
            # (taken: a later flow translated onto this flow's port towards the same backend:
            # the datapath gives a port to another flow only once this one closed, by a FIN
            # or RST the model may have put down to another flow of that port; looked at
            # only for a port that moved)
            if held and osport != held[0] and not (
                    held[2] or syn or now - held[1] > MAY_EXPIRE
                    or any(k != key and k[0] == proto and v[0] == held[0] and v[3] == held[3] and v[1] > held[1]
                           for k, v in self.model.ports.items())):
                problems.append(f"the flow moved from SNAT port {held[0]} to {osport} with no FIN, RST or SYN "
                                f"in between (translated {now - held[1]:.1f} s ago)")
        if problems:
            return problems, ""
        if match.kind == "forward":
            # (a closed flow's late packets go on through its port: it stays closed, its
            # port free to move, until a SYN opens the tuple again)
            closed = bool(held) and held[0] == osport and held[2] and not syn
            self.model.ports[key] = [osport, now, closed, (oip.daddr, odport)]
        self.model.learn(match, proto, ip.saddr, sport, ip.daddr, dport, osport)
        return [], match.kind


# ---------------------------------------------------------------- generators and mutators


class Gen:
    """Seeded frames: base frames (valid traffic of every kind) and mutations."""

    def __init__(self, rng: random.Random, model: Model):
        self.rng = rng
        self.model = model

    # -- pieces

    def client(self) -> bytes:
        r = self.rng.random()
        if r < 0.45:
            return CLIENT
        if r < 0.6:
            return OTHER_CLIENT
        if r < 0.62:  # the backend itself (hairpin), the other node, the node
            return self.rng.choice([BACKEND, NODE1, NODE0])
        if r < 0.9:  # on the node's link, no neighbour entry
            return bytes([172, 26, 50, self.rng.choice([x for x in range(2, 255) if x not in (101, 102, 180, 190)])])
        return bytes([198, 51, 100, self.rng.randrange(1, 255)])  # not routed from the node

    def port(self) -> int:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.randrange(32768, 65536)
        if r < 0.9:
            return self.rng.randrange(1024, 32768)
        return self.rng.choice([0, 1, 80, 1023, 30000, NODEPORT, 32767, 32768, 65535])

    def payload(self) -> bytes:
        n = self.rng.choice([0, 0, 1, 2, 3, 7, 16, 33, 64, 200, 1400])
        return self.rng.randbytes(n)

    def flags(self) -> int:
        r = self.rng.random()
        if r < 0.3:
            return self.rng.randrange(256)
        return self.rng.choice([pk.SYN, pk.SYN, pk.ACK, pk.PSH | pk.ACK, pk.FIN | pk.ACK, pk.RST, pk.SYN | pk.ACK,
                                pk.RST | pk.ACK, 0])

    def l4(self, proto: int, src: bytes, dst: bytes, sport: int, dport: int, flags: int | None = None) -> bytes:
        if proto == TCP:
            options = b""
            if self.rng.random() < 0.2:  # MSS, SACK-permitted, NOPs
                options = self.rng.choice([b"\x02\x04\x05\xb4", b"\x02\x04\x05\xb4\x04\x02\x01\x01", b"\x01" * 12])
            return tcp_segment(src, dst, sport, dport, self.flags() if flags is None else flags, self.payload(),
                               seq=self.rng.getrandbits(32), ack=self.rng.getrandbits(32), options=options)
        return udp_datagram(src, dst, sport, dport, self.payload(), zero=self.rng.random() < 0.1)

    def proto(self) -> int:
        return TCP if self.rng.random() < 0.65 else UDP

    def frame(self, src, dst, sport, dport, proto=None, flags=None, src_mac=CLIENT_MAC, dst_mac=NODE_MAC) -> bytes:
        proto = proto or self.proto()
        return ipv4_frame(src, dst, proto, self.l4(proto, src, dst, sport, dport, flags), src_mac=src_mac,
                          dst_mac=dst_mac, ttl=self.rng.choice([64, 64, 63, 128, 255, 2]),
                          ident=self.rng.getrandbits(16), frag=self.rng.choice([0, 0, 0x4000, 0x8000]),
                          tos=self.rng.choice([0, 0, 0x10, 0x03, self.rng.randrange(256)]))

    # -- base frames: (prog, frame, label)

    def nodeport(self):
        return "from_netdev", self.frame(self.client(), NODE0, self.port(), NODEPORT), "nodeport"

    def clusterip_in(self):
        return "from_netdev", self.frame(self.client(), CLUSTER_IP, self.port(), 80), "clusterip-ingress"

    def clusterip_out(self):
        # the node's own flows (ports below snatPortRange: README, Limits) and other sources
        if self.rng.random() < 0.6:
            src, sport = NODE0, self.rng.randrange(1024, 32768)
        else:
            src, sport = self.client(), self.port()
        return "to_netdev", self.frame(src, CLUSTER_IP, sport, 80, src_mac=NODE_MAC, dst_mac=NODE1_MAC), "clusterip-egress"

    def node_other_port(self):
        r = self.rng.random()
        if r < 0.4:
            dport = self.rng.randrange(1, 30000)
        elif r < 0.6:
            dport = self.rng.choice([p for p in (30000, 30644, 30646, 32767, self.rng.randrange(30000, 32768))
                                     if p != NODEPORT])
        else:
            dport = self.rng.randrange(32768, 65536)  # snatPortRange, likely unmapped
        prog = self.rng.choice(["from_netdev", "to_netdev"])
        src = self.rng.choice([self.client(), BACKEND])
        return prog, self.frame(src, NODE0, self.port(), dport), "node-other-port"

    def passing_by(self):
        dst = self.rng.choice([bytes([172, 26, 50, self.rng.randrange(256)]), A("10.106.91.99"), BACKEND, NODE1,
                               self.rng.randbytes(4)])
        dport = self.rng.choice([NODEPORT, 80, self.port()])
        prog = self.rng.choice(["from_netdev", "to_netdev"])
        return prog, self.frame(self.client(), dst, self.port(), dport), "passing-by"

    def wrong_direction(self):
        """Frontend traffic on the wrong hook: the NodePort on egress, replies on egress."""
        if self.rng.random() < 0.5:
            return "to_netdev", self.frame(self.client(), NODE0, self.port(), NODEPORT), "nodeport-on-egress"
        return "to_netdev", self.frame(BACKEND, NODE0, 80, self.rng.randrange(32768, 65536)), "reply-on-egress"

    def reply(self):
        """The backend to a SNAT port the model knows (or not), and near misses of it."""
        model, rng = self.model, self.rng
        if model.flow_list and rng.random() < 0.85:
            proto, client, cport, fe, feport = rng.choice(model.flow_list)
            port = model.flows[(proto, client, cport, fe, feport)]
        else:
            proto, port = self.proto(), rng.randrange(32768, 65536)
        src, sport, label = BACKEND, BACKEND_PORT, "reply"
        r = rng.random()
        if r < 0.08:
            sport, label = rng.choice([81, 8080, 0]), "reply-wrong-sport"
        elif r < 0.16:
            src, label = rng.choice([NODE1, CLIENT, A("10.0.1.73")]), "reply-wrong-source"
        elif r < 0.22:
            proto, label = TCP + UDP - proto, "reply-wrong-proto"
        return "from_netdev", self.frame(src, NODE0, sport, port, proto, src_mac=NODE1_MAC), label

    def egress_reply(self):
        model, rng = self.model, self.rng
        if not model.egress_list:
            return self.clusterip_out()
        proto, src, sport = rng.choice(model.egress_list)
        return "from_netdev", self.frame(BACKEND, src, BACKEND_PORT, sport, proto, src_mac=NODE1_MAC), "egress-reply"

    def udp_sum_to_zero(self):
        """A UDP datagram whose checksum computes to 0 once translated (it must then be
        sent as 0xffff): a NodePort request keeping its port of snatPortRange (if free), or
        a reply of a known UDP flow."""
        rng, model = self.rng, self.model
        flows = [f for f in model.flow_list if f[0] == UDP] if rng.random() < 0.5 else []
        if flows:
            _, client, cport, fe, feport = rng.choice(flows)
            port = model.flows[(UDP, client, cport, fe, feport)]
            after = (fe, client, feport, cport)
            src, dst, sport, dport, label = BACKEND, NODE0, BACKEND_PORT, port, "reply-udp-sums-to-0"
        else:
            client, cport = self.client(), rng.randrange(32768, 65536)
            after = (NODE0, BACKEND, cport, BACKEND_PORT)
            src, dst, sport, dport, label = client, NODE0, cport, NODEPORT, "nodeport-udp-sums-to-0"
        header = struct.pack("!HHHH", after[2], after[3], 10, 0) + b"\0\0"
        word = csum(after[0] + after[1] + struct.pack("!BBH", 0, UDP, 10) + header)
        l4 = udp_datagram(src, dst, sport, dport, word.to_bytes(2, "big"))
        return "from_netdev", ipv4_frame(src, dst, UDP, l4, src_mac=NODE1_MAC if src == BACKEND else CLIENT_MAC), label

    def icmp(self):
        rng = self.rng
        dst = rng.choice([NODE0, CLUSTER_IP, BACKEND, CLIENT])
        if rng.random() < 0.5:
            body = bytearray(struct.pack("!BBHHH", 8, 0, 0, rng.getrandbits(16), rng.getrandbits(16)) + self.payload())
        else:  # an error quoting a NodePort packet (not translated back: README, Limits)
            _, inner, _ = self.nodeport()
            body = bytearray(struct.pack("!BBHI", 3, rng.choice([1, 3, 4]), 0, 1400) + inner[14 : 14 + 28])
        body[2:4] = csum(bytes(body)).to_bytes(2, "big")
        prog = rng.choice(["from_netdev", "to_netdev"])
        return prog, ipv4_frame(self.client(), dst, ICMP, bytes(body)), "icmp"

    def other_protocol(self):
        proto = self.rng.choice([0, 2, 4, 41, 47, 50, 132, 136, 255])
        prog, frame, _ = self.nodeport()
        b = bytearray(frame)
        b[23] = proto
        fix_ip_csum(b)
        return self.rng.choice(["from_netdev", "to_netdev"]), bytes(b), f"ip-proto-{proto}"

    def non_ipv4(self):
        rng = self.rng
        r = rng.random()
        prog = rng.choice(["from_netdev", "to_netdev"])
        if r < 0.25:
            return prog, pk.arp_request(S(self.client()), S(NODE0)), "arp"
        if r < 0.5:
            return prog, pk.ipv6_tcp_syn(self.port(), rng.choice([NODEPORT, 80])), "ipv6"
        _, inner, _ = rng.choice([self.nodeport, self.clusterip_in, self.reply])()
        if r < 0.8:  # 802.1Q (or 802.1ad) tag: the node's interface carries no VLAN
            tpid = rng.choice([b"\x81\x00", b"\x88\xa8"])
            return prog, inner[:12] + tpid + rng.randbytes(2) + inner[12:], "vlan"
        ethertype = rng.choice([b"\x86\xdd", b"\x08\x06", b"\x00\x00", b"\x05\xdc", b"\x88\x47", b"\xff\xff",
                                rng.randbytes(2)])
        if ethertype == b"\x08\x00":
            ethertype = b"\x08\x01"
        return prog, inner[:12] + ethertype + inner[14:], "ethertype"

    BASES = (("nodeport", 22), ("clusterip_in", 8), ("clusterip_out", 8), ("node_other_port", 8),
             ("passing_by", 10), ("wrong_direction", 3), ("reply", 18), ("egress_reply", 5), ("icmp", 4), ("udp_sum_to_zero", 2),
             ("other_protocol", 2), ("non_ipv4", 5))

    def base(self):
        names, weights = zip(*self.BASES)
        return getattr(self, self.rng.choices(names, weights)[0])()

    # -- mutations: bytearray -> label (or "" when not applicable)

    def m_options(self, b: bytearray) -> str:
        """IP options (valid header, valid checksums): NOPs, EOL, record route, garbage."""
        ip = ip_view(b)
        if not ip or ip.ihl != 20:
            return ""
        n = self.rng.randrange(1, 11) * 4
        kind = self.rng.choice(["nop", "rr", "garbage"])
        if kind == "nop":
            opts = b"\x01" * (n - 1) + b"\x00"
        elif kind == "rr":
            opts = (bytes([7, min(n, 39), 4]) + bytes(n))[:n]
        else:
            opts = self.rng.randbytes(n)
        b[34:34] = opts
        b[14] = 0x40 | (5 + n // 4)
        b[16:18] = (ip.tot_len + n).to_bytes(2, "big") if ip.tot_len else b"\0\0"
        fix_ip_csum(b)
        return f"options-{kind}-{n}"

    def m_flags(self, b: bytearray) -> str:
        ip = ip_view(b)
        if not ip or ip.proto != TCP or len(b) < ip.l4_off + 20:
            return ""
        b[ip.l4_off + 13] = self.rng.randrange(256)
        if self.rng.random() < 0.2:
            b[ip.l4_off + 12] = self.rng.randrange(16) << 4 | (b[ip.l4_off + 12] & 15)  # data offset
        fix_l4_csum(b)
        return f"tcp-flags-{b[ip.l4_off + 13]:#04x}"

    def m_ttl(self, b: bytearray) -> str:
        b[22] = self.rng.choice([0, 1, 2, 255])
        fix_ip_csum(b)
        return f"ttl-{b[22]}"

    def m_udp_zero(self, b: bytearray) -> str:
        ip = ip_view(b)
        if not ip or ip.proto != UDP or len(b) < ip.l4_off + 8:
            return ""
        b[ip.l4_off + 6 : ip.l4_off + 8] = b"\0\0"
        return "udp-csum-0"

    def m_padding(self, b: bytearray) -> str:
        b.extend(self.rng.randbytes(self.rng.randrange(1, 64)))  # after tot_len: Ethernet padding
        return "padding"

    def m_ihl(self, b: bytearray) -> str:
        ihl = self.rng.choice([0, 1, 2, 3, 4, 6, 7, 8, 15, self.rng.randrange(16)])
        b[14] = (b[14] & 0xF0) | ihl
        fix_ip_csum(b)
        return f"ihl-{ihl}"

    def m_frag(self, b: bytearray) -> str:
        r = self.rng.random()
        if r < 0.4:
            frag = 0x2000  # first fragment
        elif r < 0.7:
            frag = self.rng.randrange(1, 0x2000)  # last fragment
        else:
            frag = 0x2000 | self.rng.randrange(1, 0x2000)
        frag |= self.rng.choice([0, 0x4000, 0x8000])
        b[20:22] = frag.to_bytes(2, "big")
        fix_ip_csum(b)
        return f"frag-{frag:#06x}"

    def m_tot_len(self, b: bytearray) -> str:
        ip = ip_view(b)
        real = len(b) - 14
        r = self.rng.random()
        if r < 0.3:
            value = self.rng.randrange(0, max(real, 1))  # short (also shorter than the headers)
        elif r < 0.5:
            value = self.rng.choice([1, 19, 20, 21, 27, 28, 39, 40, real - 1])
        elif r < 0.8:
            value = self.rng.randrange(real + 1, 65536)  # beyond the frame
        else:
            value = 0  # BIG TCP: the frame's length
        b[16:18] = (max(value, 0) & 0xFFFF).to_bytes(2, "big")
        fix_ip_csum(b)
        return f"tot-len-{value}" if ip else ""

    def m_truncate(self, b: bytearray) -> str:
        cut = self.rng.randrange(34, max(len(b), 35))
        del b[cut:]
        return f"truncated-{cut}"

    def m_version(self, b: bytearray) -> str:
        v = self.rng.choice([0, 5, 6, 15, self.rng.randrange(16)])
        b[14] = v << 4 | (b[14] & 15)
        fix_ip_csum(b)
        return f"version-{v}"

    def m_proto(self, b: bytearray) -> str:
        b[23] = self.rng.choice([TCP, UDP, ICMP, self.rng.randrange(256)])
        fix_ip_csum(b)
        return f"proto-{b[23]}"

    def m_bad_ip_csum(self, b: bytearray) -> str:
        b[24 + self.rng.randrange(2)] ^= 1 << self.rng.randrange(8)
        return "bad-ip-csum"

    def m_bad_l4_csum(self, b: bytearray) -> str:
        ip = ip_view(b)
        if not ip or ip.proto not in (TCP, UDP) or len(b) < ip.l4_off + csum_off(ip.proto) + 2:
            return ""
        b[ip.l4_off + csum_off(ip.proto) + self.rng.randrange(2)] ^= 1 << self.rng.randrange(8)
        return "bad-l4-csum"

    def m_flip(self, b: bytearray) -> str:
        n = self.rng.randrange(1, 4)
        at = [self.rng.randrange(14, len(b)) for _ in range(n)]
        for i in at:
            b[i] ^= 1 << self.rng.randrange(8)
        if self.rng.random() < 0.5:
            fix_ip_csum(b)
            fix_l4_csum(b)
        return "flip-" + "-".join(map(str, at))

    KEEP = (("m_options", 3), ("m_flags", 3), ("m_ttl", 1), ("m_udp_zero", 1), ("m_padding", 1))
    BREAK = (("m_ihl", 3), ("m_frag", 3), ("m_tot_len", 4), ("m_truncate", 3), ("m_version", 1), ("m_proto", 1),
             ("m_bad_ip_csum", 1), ("m_bad_l4_csum", 1), ("m_flip", 3))

    def mutate(self, frame: bytes) -> tuple[bytes, str]:
        b = bytearray(frame)
        labels = []
        if ip_view(b) is None:
            return frame, ""
        for table, p in ((self.KEEP, 0.35), (self.BREAK, 0.6), (self.BREAK, 0.15)):
            if self.rng.random() < p:
                names, weights = zip(*table)
                label = getattr(self, self.rng.choices(names, weights)[0])(b)
                if label:
                    labels.append(label)
                if ip_view(b) is None:
                    break
        return bytes(b), "+".join(labels)


# ---------------------------------------------------------------- runs


@dataclass
class Report:
    seed: int
    stream: str
    packets: int = 0
    seconds: float = 0.0
    failures: dict[str, list[Failure]] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    stats: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    not_runnable: int = 0
    drops: dict[str, int] = field(default_factory=dict)

    def fail(self, f: Failure) -> None:
        self.counts[f.kind] += 1
        examples = self.failures.setdefault(f.kind, [])
        if len(examples) < 3:
            examples.append(f)

    @property
    def ok(self) -> bool:
        return not self.counts

    def summary(self) -> str:
        rate = self.packets / self.seconds if self.seconds else 0
        return (f"{self.stream}: {self.packets} packets in {self.seconds:.1f} s ({rate:,.0f}/s), seed {self.seed}; "
                f"{dict(self.stats)}; translated by kind {dict(self.kinds)}; drops by reason {self.drops}"
                + (f"; {self.not_runnable} frames too short for BPF_PROG_TEST_RUN" if self.not_runnable else ""))

    def text(self) -> str:
        lines = [self.summary()]
        if self.counts:
            lines.append(f"replay: BPFGEN_FUZZ_SEED={self.seed} .venv/bin/python -m pytest tests/test_fuzz.py, or "
                         f"bench/fuzz.py --seed {self.seed} --stream {self.stream} (the frames alone: "
                         f"bench/fuzz.py --frame HEX --prog PROG; a reply needs its flow first)")
        for kind, n in self.counts.most_common():
            lines.append(f"- {kind}: {n} packets, e.g.")
            lines.extend("  " + f.describe().replace("\n", "\n  ") for f in self.failures[kind])
        return "\n".join(lines)


def harness_may_refuse(frame: bytes) -> bool:
    """BPF_PROG_TEST_RUN refuses (EINVAL) frames shorter than an Ethernet header, IPv4 ones
    shorter than Ethernet + IPv4 headers and IPv6 ones shorter than Ethernet + IPv6
    headers (test_datapath attaches a program for the short IPv4 ones)."""
    n = len(frame)
    return n < 14 or (frame[12:14] == b"\x08\x00" and n < 34) or (frame[12:14] == b"\x86\xdd" and n < 54)


class Fuzzer:
    def __init__(self, dp: Node0, seed: int, stream: str):
        self.dp = dp
        self.model = Model()
        self.oracle = Oracle(self.model)
        self.rng = random.Random(f"{seed}:{stream}")
        self.gen = Gen(self.rng, self.model)
        self.report = Report(seed, stream)
        self.index = 0

    def one(self, prog: str, frame: bytes, label: str) -> None:
        r = self.report
        i = self.index
        self.index += 1
        r.packets += 1
        try:
            verdict, out = self.dp.run(prog, frame)
        except Exception as e:  # noqa: BLE001 - every failure of the run is reported
            if harness_may_refuse(frame):
                r.not_runnable += 1
                return
            r.fail(Failure(RUN_FAILED, f"{type(e).__name__}: {e}", i, label, prog, frame))
            return
        bad = self.oracle.check(prog, frame, verdict, out)
        if bad:
            r.fail(Failure(bad[0], bad[1], i, label, prog, frame, verdict, out))

    def base_or_mutated(self) -> tuple[str, bytes, str]:
        prog, frame, label = self.gen.base()
        if self.rng.random() < 0.55:
            frame, mutation = self.gen.mutate(frame)
            if mutation:
                label = f"{label}+{mutation}"
        return prog, frame, label

    # -- streams

    def mixed(self, n: int) -> None:
        """Random frames of every kind, more than half of them mutated."""
        while self.index < n:
            self.one(*self.base_or_mutated())

    def truncated(self, n: int) -> None:
        """Frames of every kind cut at every offset (and the whole frame)."""
        while self.index < n:
            prog, frame, label = self.gen.base()
            if self.rng.random() < 0.3:
                frame, mutation = self.gen.mutate(frame)
                label = f"{label}+{mutation}" if mutation else label
            if len(frame) > 160:  # keep the offsets inside the headers mostly
                frame = frame[:160] if self.rng.random() < 0.7 else frame
            # (shorter frames than these BPF_PROG_TEST_RUN refuses: harness_may_refuse)
            first = {b"\x08\x00": 34, b"\x86\xdd": 54}.get(frame[12:14], 14)
            for cut in range(first, len(frame) + 1):
                if self.index >= n:
                    return
                self.one(prog, frame[:cut], f"{label}+cut-{cut}")

    def established(self, n: int) -> None:
        """Flows opened and then carried on with random TCP flags (and mutations) both
        ways: the client's segments to the frontend, the backend's to the SNAT port."""
        gen, rng, model = self.gen, self.rng, self.model
        clients = [CLIENT, OTHER_CLIENT] + [bytes([172, 26, 50, 20 + i]) for i in range(6)]
        while self.index < n:
            r = rng.random()
            if r < 0.15 or not model.flow_list:
                fe = rng.choice(sorted(FRONTENDS))
                proto = TCP if rng.random() < 0.8 else UDP
                prog, frame, label = "from_netdev", gen.frame(rng.choice(clients), fe[0], gen.port(), fe[1], proto,
                                                              pk.SYN), "flow-open"
            elif r < 0.55:
                proto, client, cport, fe, feport = rng.choice(model.flow_list)
                prog, frame, label = "from_netdev", gen.frame(client, fe, cport, feport, proto,
                                                              rng.randrange(256)), "flow-client"
            elif r < 0.95:
                prog, frame, label = gen.reply()
                label = "flow-" + label
                if rng.random() < 0.5 and frame[23] == TCP:
                    b = bytearray(frame)
                    b[34 + 13] = rng.randrange(256)
                    fix_l4_csum(b)
                    frame = bytes(b)
            else:
                prog, frame, label = self.base_or_mutated()
            if rng.random() < 0.1:
                frame, mutation = gen.mutate(frame)
                label = f"{label}+{mutation}" if mutation else label
            self.one(prog, frame, label)

    def finish(self, started: float) -> Report:
        r = self.report
        r.seconds = time.monotonic() - started
        r.stats, r.kinds = self.oracle.stats, self.oracle.kinds
        r.drops = {k: v for k, v in self.dp.drops().items() if v}
        if sum(r.drops.values()) != self.oracle.shot:
            r.fail(Failure(UNCOUNTED_DROP, f"{self.oracle.shot} TC_ACT_SHOT verdicts, drop_stats counts "
                           f"{sum(r.drops.values())}: {r.drops}", self.index, "-", "-", b""))
        return r


def run_stream(dp: Node0, seed: int, stream: str, packets: int) -> Report:
    fz = Fuzzer(dp, seed, stream)
    started = time.monotonic()
    getattr(fz, stream)(packets)
    return fz.finish(started)


# ---------------------------------------------------------------- the tests


@pytest.fixture
def node0(seed_build):
    with Node0(seed_build) as dp:
        yield dp


def _check(report: Report, minimum_translated: dict[str, int]) -> None:
    print(report.text())
    assert report.ok, report.text()
    for kind, least in minimum_translated.items():
        assert report.kinds[kind] >= least, f"{NOTHING_TRANSLATED}: {kind} {report.kinds[kind]} < {least}\n" + report.text()


def _share(stream: str) -> int:
    return max(1, round(fuzz_packets() * STREAMS[stream]))


def test_random_and_mutated_packets(node0):
    n = _share("mixed")
    report = run_stream(node0, fuzz_seed(), "mixed", n)
    _check(report, {"forward": n // 50, "reply": n // 200, "egress": n // 200, "egress-reply": 1})


def test_packets_truncated_at_every_offset(node0):
    n = _share("truncated")
    report = run_stream(node0, fuzz_seed(), "truncated", n)
    _check(report, {"forward": 1})


def test_random_tcp_flags_on_established_flows(node0):
    n = _share("established")
    report = run_stream(node0, fuzz_seed(), "established", n)
    _check(report, {"forward": n // 10, "reply": n // 10})


def test_oracles_catch_a_broken_translation(node0):
    """The oracles themselves: a wrong checksum, address or untouched byte, a dropped or
    changed passing-by frame are failures."""
    oracle = Oracle(Model())
    syn = ipv4_frame(CLIENT, NODE0, TCP, tcp_segment(CLIENT, NODE0, 40000, NODEPORT, pk.SYN, b"hello"))
    verdict, out = node0.run("from_netdev", syn)
    assert oracle.check("from_netdev", syn, verdict, out) is None
    assert oracle.model.flows == {(TCP, CLIENT, 40000, NODE0, NODEPORT): 40000}
    for at in (24, 26, 34 + 2, 34 + 16, 34 + 22, 22):  # IP csum, saddr, dport, TCP csum, payload, TTL
        broken = bytearray(out)
        broken[at] ^= 0x40
        assert oracle.check("from_netdev", syn, verdict, bytes(broken))[0] == BAD_TRANSLATION, at
    # the next segment of the flow leaving from another port
    ack = ipv4_frame(CLIENT, NODE0, TCP, tcp_segment(CLIENT, NODE0, 40000, NODEPORT, pk.ACK))
    verdict, out = node0.run("from_netdev", ack)
    moved = bytearray(out)
    moved[34:36] = (40001).to_bytes(2, "big")
    fix_l4_csum(moved)
    assert "moved from SNAT port 40000 to 40001" in oracle.check("from_netdev", ack, verdict, bytes(moved))[1]
    assert oracle.check("from_netdev", ack, verdict, out) is None
    passing = ipv4_frame(CLIENT, A("172.26.50.50"), TCP, tcp_segment(CLIENT, A("172.26.50.50"), 1, 2, pk.SYN))
    assert oracle.check("from_netdev", passing, TC_ACT_OK, passing) is None
    assert oracle.check("from_netdev", passing, TC_ACT_SHOT, passing)[0].startswith(NOT_SERVICE_DROPPED)
    assert oracle.check("from_netdev", passing, TC_ACT_OK, passing[:-1] + b"x")[0].startswith(NOT_SERVICE_CHANGED)
    assert oracle.check("from_netdev", passing, TC_ACT_REDIRECT, passing)[0].startswith(NOT_SERVICE_CHANGED)
    udp = ipv4_frame(CLIENT, NODE0, UDP, udp_datagram(CLIENT, NODE0, 40001, NODEPORT, b"x", zero=True))
    verdict, out = node0.run("from_netdev", udp)
    assert oracle.check("from_netdev", udp, verdict, out) is None
    broken = bytearray(out)
    broken[34 + 6 : 34 + 8] = b"\xff\xff"
    assert "UDP checksum" in oracle.check("from_netdev", udp, verdict, bytes(broken))[1]
    reply = ipv4_frame(BACKEND, NODE0, TCP, tcp_segment(BACKEND, NODE0, 80, 40000, pk.SYN | pk.ACK))
    verdict, out = node0.run("from_netdev", reply)
    assert oracle.check("from_netdev", reply, verdict, out) is None
    assert (ip_view(out).saddr, ip_view(out).daddr, _ports(out, 34)) == (NODE0, CLIENT, (NODEPORT, 40000))


def _garbage(ihl: int | None = None, version: int = 4, dst: bytes = A("172.26.50.50"), dport: int = 22,
             proto: int = TCP, cut: int | None = None) -> bytes:
    l4 = (tcp_segment(CLIENT, dst, 40000, dport, pk.SYN, b"data") if proto == TCP
          else bytes.fromhex("08000000123400017069") if proto == ICMP else udp_datagram(CLIENT, dst, 40000, dport))
    b = bytearray(ipv4_frame(CLIENT, dst, proto, l4))
    b[14] = version << 4 | (5 if ihl is None else ihl)
    fix_ip_csum(b)
    return bytes(b[:cut])


# Found by the fuzz streams (seed 10), as fixed frames: parse() returns PARSE_MALFORMED,
# a counted drop, for a bad version or IHL before it knows whether the frame is service
# traffic at all; only service traffic may ever be dropped.
GARBAGE_NOT_FOR_A_SERVICE = {
    "passing-by-ihl-4": _garbage(ihl=4),
    "passing-by-ihl-0": _garbage(ihl=0),
    "passing-by-version-6": _garbage(version=6),
    "passing-by-version-0-udp": _garbage(version=0, proto=UDP, dport=53),
    "icmp-to-the-node-ihl-3": _garbage(ihl=3, dst=NODE0, proto=ICMP),
    "to-the-node-port-22-ihl-beyond-the-frame": _garbage(ihl=15, dst=NODE0),
    "to-the-clusterip-ihl-8-no-ports-in-the-frame": _garbage(ihl=8, dst=CLUSTER_IP, dport=80, cut=34),
}


@pytest.mark.parametrize("prog", ["from_netdev", "to_netdev"])
@pytest.mark.parametrize("name", GARBAGE_NOT_FOR_A_SERVICE)
def test_garbage_ip_header_not_for_a_service_passes(node0, prog, name):
    frame = GARBAGE_NOT_FOR_A_SERVICE[name]
    oracle = Oracle(Model())
    assert oracle.classify(prog, frame)[0] == "pass"
    verdict, out = node0.run(prog, frame)
    assert (verdict, out) == (TC_ACT_OK, frame), (
        f"datapath bug: a frame not for a service ({malformation(frame)}) came out {VERDICTS.get(verdict, verdict)}"
        f"{'' if out == frame else ', changed'}: only service traffic may ever be dropped; frame {frame.hex()}, "
        f"drops {dict((k, v) for k, v in node0.drops().items() if v)}")
