"""The generated NodePort datapath, run on packets with BPF_PROG_TEST_RUN.

Every test compiles a spec (cached per session), loads the node's object with its maps
pinned under the test's private bpffs directory, fills the service maps as
`bpfgen load` does (desired_entries + sync_service_maps) and runs from_netdev (tc ingress) or
to_netdev (tc egress) on hand-built frames, inside a network namespace of its own, so
the programs' fib lookups see only that namespace:

    eth0 (node address, MAC NODE_MAC) -- neighbours with fixed MACs: the client, the
    other nodes; a route to every other node's pod CIDR via that node.

Two tests need what BPF_PROG_TEST_RUN cannot give (frames shorter than an IPv4
header, CHECKSUM_PARTIAL skbs): they attach a program to eth0 of the test namespace,
never to an interface of the root namespace (`attached` checks it).
"""

from __future__ import annotations

import ipaddress
import itertools
import mmap
import os
import socket
import struct
import subprocess
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bpfgen import layout
from bpfgen import libbpf as bpf
from bpfgen.build import Build, compile_spec
from bpfgen.loader import COLLECTOR_PROGRAM, SERVICE_MAPS, arm_collector, open_datapath, sync_service_maps
from bpfgen.plan import Plan
from bpfgen.netns import current_netns, enter_netns, ifindex as if_index
from bpfgen.render import SETTLE_TICKS, SNAT_RETRIES, TIMEOUTS
from bpfgen.spec import Spec, load_spec

import packets as pk  # tests/packets.py (tests/ is on sys.path: rootdir conftest)
from conftest import filter_sharer, tuple_key

pytestmark = pytest.mark.kernel

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7

REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "examples" / "seed.yaml"
SPECS = Path(__file__).parent / "specs" / "datapath"
SEVERAL, TINY_SNAT, GROWN, REPLACED = (SPECS / f"{n}.yaml" for n in ("several", "tiny-snat", "grown", "replaced"))

# The walk-through's addresses (examples/seed.yaml).
CLIENT = "172.26.50.180"
OTHER_CLIENT = "172.26.50.190"
NODE0, NODE1 = "172.26.50.101", "172.26.50.102"
NODEPORT = 30645
BACKEND, BACKEND_PORT = "10.0.1.72", 80
SNAT_RANGE = range(32768, 65536)

NODE_MAC = pk.NODE_MAC  # eth0 of the node under test
CLIENT_MAC = pk.CLIENT_MAC
PEER_MACS = {NODE0: bytes.fromhex("02000000aa01"), NODE1: bytes.fromhex("02000000aa02")}

TIMEOUT = dict(TIMEOUTS)
FLAGS = layout.FLAGS
TCP, UDP = pk.IPPROTO_TCP, pk.IPPROTO_UDP

# struct __sk_buff as BPF_PROG_TEST_RUN takes it: only ifindex (offset 40) is set, so
# the skb comes from eth0 of the test namespace (fib lookups start there).
SKB_CTX_SIZE = 192
SKB_IFINDEX_OFFSET = 40


def skb_ctx(ifindex: int) -> bytes:
    ctx = bytearray(SKB_CTX_SIZE)
    ctx[SKB_IFINDEX_OFFSET : SKB_IFINDEX_OFFSET + 4] = ifindex.to_bytes(4, "little")
    return bytes(ctx)


now_sec = layout.datapath_now  # the datapath's clock, in seconds


# ---------------------------------------------------------------- the datapath under test


@dataclass
class Run:
    """One BPF_PROG_TEST_RUN: the verdict and the frame as the program left it."""

    retval: int
    frame: bytes

    @property
    def pkt(self) -> pk.Packet:
        return pk.parse(self.frame)


@dataclass
class Datapath:
    """A node's object, loaded with pins in the test's bpffs dir, service maps filled."""

    spec: Spec
    node: str
    address: str
    obj: bpf.BpfObject
    ifindex: int
    maps: dict[str, bpf.MapFd] = field(default_factory=dict)

    # -- running programs

    def _run(self, prog: str, frame: bytes) -> Run:
        res = bpf.prog_test_run(self.obj.program(prog).fd, frame, ctx_in=skb_ctx(self.ifindex))
        return Run(res.retval, res.data_out)

    def from_netdev(self, frame: bytes) -> Run:
        return self._run("from_netdev", frame)

    def to_netdev(self, frame: bytes) -> Run:
        return self._run("to_netdev", frame)

    # -- the service maps

    def sync(self, spec_path: Path) -> None:
        """Fill the service maps for this node from a spec, as `bpfgen load` does."""
        spec = load_spec(spec_path)
        _route_backends(spec, self.node)
        plan = Plan.from_spec(spec)
        service = {name: self.maps[name] for name in SERVICE_MAPS}
        sync_service_maps(service, plan, plan.node(self.node), [self.maps["ct_v4"], self.maps["ct_half_v4"]])

    def frontend_id(self, port: int = NODEPORT, proto: int = TCP, addr: str | None = None) -> int:
        key = layout.SVC_KEY.pack(addr=addr or self.address, port=port, proto=proto, slot=0)
        raw = self.maps["svc_v4"].lookup(key)
        assert raw is not None, f"no frontend {addr or self.address}:{port}/{proto}"
        return layout.SVC_VALUE.unpack(raw)["id"]

    def backend(self, backend_id: int) -> tuple[str, int] | None:
        raw = self.maps["backend_v4"].lookup(layout.ID_KEY.pack(backend_id))
        if raw is None:
            return None
        be = layout.BACKEND.unpack(raw)
        return str(be["addr"]), be["port"]

    # -- state maps

    def ct_table(self, flow: tuple[str, int, str, int], direction: str, proto: int = TCP) -> str | None:
        """Which conntrack table holds the entry: ct_v4, ct_half_v4 (half-open TCP), ct_udp_v4 or None."""
        key = tuple_key(flow, direction, proto)
        return next((name for name in ("ct_v4", "ct_half_v4", "ct_udp_v4") if self.maps[name].lookup(key) is not None),
                    None)

    def ct(self, flow: tuple[str, int, str, int], direction: str, proto: int = TCP) -> dict | None:
        """The entry, from whichever conntrack table holds it."""
        table = self.ct_table(flow, direction, proto)
        raw = table and self.maps[table].lookup(tuple_key(flow, direction, proto))
        return None if not raw else layout.CT_ENTRY.unpack(raw)

    def put_ct(self, flow: tuple[str, int, str, int], direction: str, proto: int = TCP, **entry: object) -> None:
        """Write the entry where it is (ct_v4, or ct_udp_v4, for a new one)."""
        table = self.ct_table(flow, direction, proto) or ("ct_v4" if proto == TCP else "ct_udp_v4")
        self.maps[table].update(tuple_key(flow, direction, proto), layout.CT_ENTRY.pack(**entry))

    def nat(self, flow: tuple[str, int, str, int], direction: str, proto: int = TCP) -> tuple[str, int] | None:
        raw = self.maps["snat_v4"].lookup(tuple_key(flow, direction, proto))
        if raw is None:
            return None
        e = layout.NAT_ENTRY.unpack(raw)
        return str(e["addr"]), e["port"]

    def put_nat(self, flow: tuple[str, int, str, int], direction: str, to: tuple[str, int], proto: int = TCP) -> None:
        self.maps["snat_v4"].update(tuple_key(flow, direction, proto), layout.NAT_ENTRY.pack(addr=to[0], port=to[1]))

    def entries(self, name: str) -> dict[bytes, bytes]:
        return dict(self.maps[name].items())

    def forget_flows(self) -> None:
        """Empty conntrack, SNAT and the kept next hops (a fresh node with the same services)."""
        for name in ("ct_v4", "ct_half_v4", "ct_udp_v4", "snat_v4", "nh_v4"):
            for key in list(self.maps[name].keys()):
                self.maps[name].delete(key)

    # -- counters (per-CPU, summed)

    def drops(self, reason: str) -> int:
        values = self.maps["drop_stats"].lookup_percpu(layout.ID_KEY.pack(layout.DROP_REASONS.value(reason)))
        return sum(layout.DROP_STATS.unpack(v)["packets"] for v in values)

    def all_drops(self) -> dict[str, int]:
        return {name: self.drops(name) for name, _, _ in layout.DROP_REASONS.members}

    def frontend_stats(self, frontend_id: int) -> tuple[int, int]:
        values = self.maps["svc_stats"].lookup_percpu(layout.ID_KEY.pack(frontend_id))
        rows = [layout.SVC_STATS.unpack(v) for v in values]
        return sum(r["packets"] for r in rows), sum(r["bytes"] for r in rows)


def age_check(dp: Datapath, flow: tuple[str, int, str, int], direction: str, proto: int = TCP) -> None:
    """Make the entry's backend and next hop due for their once-a-second check."""
    entry = dp.ct(flow, direction, proto)
    dp.put_ct(flow, direction, proto, **{**entry, "checked": 1})


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def build_of(tmp_path_factory: pytest.TempPathFactory):
    """Compile a spec once per session: build_of(spec_path) -> Build."""
    cache: dict[Path, Build] = {}

    def get(spec_path: Path) -> Build:
        if spec_path not in cache:
            cache[spec_path] = compile_spec(spec_path, tmp_path_factory.mktemp(spec_path.stem))
        return cache[spec_path]

    return get


def _route_backends(spec: Spec, node: str) -> None:
    """Routes, as the lab has them, in the namespace this thread is in: other nodes' pod
    CIDRs via those nodes, and remote backends outside them /32 via their node (the
    datapath drops what it cannot route)."""
    ns = current_netns()
    assert ns, "the datapath runs inside the test namespace"

    def route(prefix: str, via: str) -> None:
        subprocess.run(["ip", "-n", ns, "route", "replace", prefix, "via", via, "dev", "eth0"], check=True)

    for other in spec.nodes:
        if other.name != node and other.pod_cidr is not None:
            route(str(other.pod_cidr), str(other.address))
    for svc in spec.services:
        for b in svc.backends:
            host = spec.node(b.node)
            if b.node != node and not (host.pod_cidr and b.address in host.pod_cidr):
                route(f"{b.address}/32", str(host.address))


def _prepare_namespace(ns, spec: Spec, node: str) -> None:
    """eth0 carries the node's address and NODE_MAC; the client and the other nodes are
    neighbours with fixed MACs; forwarding on (the programs' ingress fib lookups need
    it). Routes come with each sync (_route_backends)."""
    me = spec.node(node)
    ns.ip("addr", "flush", "dev", "eth0")
    ns.ip("addr", "add", f"{me.address}/24", "dev", "eth0")
    ns.ip("link", "set", "dev", "eth0", "address", NODE_MAC.hex(":"))
    ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    ns.ip("neigh", "replace", CLIENT, "lladdr", CLIENT_MAC.hex(":"), "dev", "eth0", "nud", "permanent")
    ns.ip("neigh", "replace", OTHER_CLIENT, "lladdr", CLIENT_MAC.hex(":"), "dev", "eth0", "nud", "permanent")
    for other in spec.nodes:
        if other.name == node:
            continue
        mac = PEER_MACS.get(str(other.address), bytes.fromhex("02000000aaff"))
        ns.ip("neigh", "replace", str(other.address), "lladdr", mac.hex(":"), "dev", "eth0", "nud", "permanent")


@pytest.fixture
def datapath(netns, isolated_state: Path, build_of):
    """A factory: datapath(spec_path=SEED, node="node0") -> Datapath, run in `netns`.

    The test's thread stays inside the namespace until teardown; objects and map fds are
    closed, then isolated_state removes the pins and netns the namespace."""
    stack = ExitStack()
    stack.enter_context(enter_netns(netns.name))
    counter = itertools.count()

    def make(spec_path: Path = SEED, node: str = "node0") -> Datapath:
        build = build_of(spec_path)
        spec = build.spec()
        _prepare_namespace(netns, spec, node)
        pins = isolated_state / f"{next(counter)}-{node}"
        pins.mkdir(parents=True)
        plan = build.plan()
        obj = stack.enter_context(open_datapath(build, plan, plan.node(node), pins))
        dp = Datapath(spec, node, str(spec.node(node).address), obj, if_index("eth0"))
        for m in layout.MAPS:
            dp.maps[m.name] = stack.enter_context(obj.map(m.name).map_fd())
        dp.sync(spec_path)
        return dp

    with stack:
        yield make


@pytest.fixture
def node0(datapath) -> Datapath:
    """node0 of the seed spec: its backend 10.0.1.72 is remote (DNAT + SNAT)."""
    return datapath(SEED, "node0")


@pytest.fixture
def node1(datapath) -> Datapath:
    """node1 of the seed spec: its backend 10.0.1.72 is local (DNAT only)."""
    return datapath(SEED, "node1")


# ---------------------------------------------------------------- helpers


@contextmanager
def attached(dp: Datapath, netns, prog: str, point: int):
    """prog attached to eth0 of the test namespace (for what BPF_PROG_TEST_RUN cannot
    reproduce); the clsact qdisc, and with it the filter, is removed afterwards."""
    here = os.stat("/proc/thread-self/ns/net")
    ns = os.stat(f"/run/netns/{netns.name}")
    assert (here.st_dev, here.st_ino) == (ns.st_dev, ns.st_ino), "refusing to attach outside the test namespace"
    assert dp.ifindex == if_index("eth0")
    bpf.tc_hook_create(dp.ifindex, bpf.BPF_TC_INGRESS)
    try:
        bpf.tc_attach(dp.ifindex, point, dp.obj.program(prog).fd, handle=1, priority=1)
        yield
    finally:
        bpf.tc_hook_destroy(dp.ifindex)


def syn(sport: int, dst: str = NODE0, dport: int = NODEPORT, src: str = CLIENT, **kw) -> bytes:
    return pk.tcp(src, sport, dst, dport, pk.SYN, **kw)


def assert_translated(run: Run, flow: tuple[str, int, str, int], original: bytes, ttl: int = 64) -> pk.Packet:
    """The output frame carries flow, valid checksums, the original payload and ttl."""
    p = run.pkt
    assert p.flow == flow
    assert p.ip_csum_ok(), "IPv4 header checksum"
    assert p.l4_csum_ok(), f"{'TCP' if p.proto == TCP else 'UDP'} checksum {p.l4_csum:#06x}"
    assert p.ttl == ttl
    assert pk.payload_of(p) == pk.payload_of(pk.parse(original))
    assert len(run.frame) == len(original)
    return p


def assert_forwarded_to(run: Run, mac: bytes) -> None:
    """Redirected out of eth0 with the MACs of the fib answer."""
    assert run.retval == TC_ACT_REDIRECT
    assert run.frame[0:6] == mac
    assert run.frame[6:12] == NODE_MAC


# ================================================================ 0. the verifier's budget

# Half the kernel's limit of a million processed instructions: kernels differ in how much
# of a program their verifier walks (one took a from_netdev that another refused at its
# million), so a program must pass here with room to spare.
VERIFIER_BUDGET = 500_000


@pytest.mark.parametrize("spec_path, node", [(SEED, "node0"), (SEED, "node1"), *(
    (SPECS / f"{n}.yaml", "node0") for n in ("several", "tiny-snat", "grown", "half-open", "semantics"))],
    ids=lambda v: v.stem if isinstance(v, Path) else v)
def test_every_program_verifies_within_half_the_kernels_limit(datapath, spec_path, node):
    dp = datapath(spec_path, node)
    counts = {}
    for prog in dp.obj.programs:
        info = bpf.prog_info(prog.fd)
        counts[prog.name] = info.verified_insns  # (bpf_prog_info's: this bpftool does not show it)
    assert set(counts) == {"from_netdev", "to_netdev", COLLECTOR_PROGRAM}
    assert all(0 < n <= VERIFIER_BUDGET for n in counts.values()), counts


# ================================================================ 1. not for a service


def _frag(first: bool) -> bytes:
    seg = pk.tcp_segment(CLIENT, NODE0, 40000, NODEPORT, pk.SYN)
    frag = pk.IP_MF if first else 100  # offset 100*8, no MF: a last fragment
    return pk.ether(pk.ipv4_header(CLIENT, NODE0, TCP, len(seg), frag=frag) + seg)


NOT_FOR_A_SERVICE = {
    "other-port": pk.tcp(CLIENT, 40000, NODE0, 22, pk.SYN),
    "snat-range-port-without-nat": pk.tcp(BACKEND, 80, NODE0, 40000, pk.SYN | pk.ACK),
    "other-address": pk.tcp(CLIENT, 40000, "172.26.50.50", NODEPORT, pk.SYN),
    "udp-other-port": pk.udp(CLIENT, 40000, NODE0, 53, b"query"),
    "icmp": pk.icmp_echo(CLIENT, NODE0),
    "arp": pk.arp_request(CLIENT, NODE0),
    "ipv6": pk.ipv6_tcp_syn(),
    "first-fragment": _frag(first=True),
    "later-fragment": _frag(first=False),
    "sctp-to-nodeport": pk.ether(pk.ipv4_header(CLIENT, NODE0, 132, 12) + bytes(12)),
}


@pytest.mark.parametrize("prog", ["from_netdev", "to_netdev"])
@pytest.mark.parametrize("name", NOT_FOR_A_SERVICE)
def test_packet_not_for_a_service_passes_unchanged(node0, prog, name):
    frame = NOT_FOR_A_SERVICE[name]
    run = getattr(node0, prog)(frame)
    assert (run.retval, run.frame) == (TC_ACT_OK, frame)
    assert node0.entries("ct_v4") == {} and node0.entries("snat_v4") == {}
    assert not any(node0.all_drops().values())


def test_the_frontend_address_filter_has_the_frontends_bits_and_a_sharer_passes_unchanged(node0):
    """fe_addr_v4 has a bit set for the seed's clusterIP alone (traffic to an address whose
    bit is clear passes before it is parsed); a packet to another address with that very
    bit, which is no frontend, takes the whole path and passes unchanged; the clusterIP is
    translated."""
    clusterip = "10.106.91.98"
    word, bit = layout.addr_filter_bit(int(ipaddress.IPv4Address(clusterip)))
    words = {layout.ID_KEY.unpack(k): layout.ADDR_BITS.unpack(v)["bits"]
             for k, v in node0.entries("fe_addr_v4").items()}
    assert {w: b for w, b in words.items() if b} == {word: 1 << bit}
    sharer = filter_sharer(clusterip)
    for frame in (pk.tcp(CLIENT, 40000, sharer, 80, pk.SYN), pk.udp(CLIENT, 40000, sharer, 80, b"q")):
        run = node0.from_netdev(frame)
        assert (run.retval, run.frame) == (TC_ACT_OK, frame)
    assert node0.entries("ct_half_v4") == {} and node0.entries("ct_udp_v4") == {}
    assert node0.from_netdev(pk.tcp(CLIENT, 40000, clusterip, 80, pk.SYN)).pkt.daddr == BACKEND


def _cut_short(dst: str, dport: int, proto: int = TCP, *, tot_len: int | None = None, keep: int | None = None,
               src: str = CLIENT, sport: int = 40000) -> bytes:
    """A frame whose TCP/UDP header is cut short: by tot_len (the bytes may follow it) or
    by the frame's end (keep: the L4 bytes kept)."""
    l4 = (pk.tcp_segment(src, dst, sport, dport, pk.SYN) if proto == TCP
          else pk.udp_datagram(src, dst, sport, dport, b""))
    l4 = l4 if keep is None else l4[:keep]
    length = 20 + (len(l4) if tot_len is None else tot_len)
    return pk.ether(pk.ipv4_header(src, dst, proto, 0, tot_len=length) + l4)


# Not service traffic, whatever its L4 header looks like: it passes untouched.
SHORT_NOT_FOR_A_SERVICE = {
    "tcp-cut-short-by-tot-len": _cut_short(NODE0, 22, tot_len=10),
    "tcp-tot-len-only-ip-header": _cut_short(NODE0, 22, tot_len=0),  # tot_len 20
    "tcp-header-truncated": _cut_short(NODE0, 22, keep=10),
    "udp-cut-short-by-tot-len": _cut_short(NODE0, 53, UDP, tot_len=4),
    "udp-header-truncated": _cut_short(NODE0, 53, UDP, keep=4),
    "tot-len-zero-big-tcp": pk.ether(pk.ipv4_header(CLIENT, NODE0, TCP, 0, tot_len=0)
                                     + pk.tcp_segment(CLIENT, NODE0, 40000, 22, pk.SYN, b"big")),
    "tot-len-beyond-packet": _cut_short(NODE0, 22, tot_len=200),
    "nodeport-to-another-address": _cut_short("172.26.50.50", NODEPORT, tot_len=10),
    "reply-to-an-unused-snat-port": _cut_short(NODE0, 40001, tot_len=10, src=BACKEND, sport=BACKEND_PORT),
    "no-ports-at-all": _cut_short(NODE0, NODEPORT, keep=2),
}


@pytest.mark.parametrize("prog", ["from_netdev", "to_netdev"])
@pytest.mark.parametrize("name", SHORT_NOT_FOR_A_SERVICE)
def test_short_packet_not_for_a_service_passes_unchanged(node0, prog, name):
    """Only service traffic may ever be dropped: a packet whose TCP/UDP header is cut
    short (by tot_len, the frame's end, or tot_len 0 as BIG TCP has it) passes
    byte-identical when it is not for a service."""
    frame = SHORT_NOT_FOR_A_SERVICE[name]
    node0.from_netdev(syn(40000, src=OTHER_CLIENT))  # a flow, so that maps are not empty
    ct_before, snat_before = node0.entries("ct_v4"), node0.entries("snat_v4")
    run = getattr(node0, prog)(frame)
    assert (run.retval, run.frame) == (TC_ACT_OK, frame)
    assert node0.entries("ct_v4") == ct_before and node0.entries("snat_v4") == snat_before
    assert not any(node0.all_drops().values())


@pytest.mark.parametrize("name, frame", [
    ("to-the-nodeport", _cut_short(NODE0, NODEPORT, tot_len=10)),
    ("to-the-clusterip", _cut_short("10.106.91.98", 80, UDP, tot_len=4)),
    ("reply-to-a-snat-port", _cut_short(NODE0, 40000, tot_len=10, src=BACKEND, sport=BACKEND_PORT)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_short_service_packet_is_a_counted_drop(node0, name, frame):
    node0.from_netdev(syn(40000))  # NODE0:40000 is this flow's SNAT port
    run = node0.from_netdev(frame)
    assert run.retval == TC_ACT_SHOT
    assert node0.drops("MALFORMED") == 1


def test_big_tcp_packet_with_tot_len_zero_is_translated(node1):
    """BIG TCP (GSO beyond 64 KiB): tot_len 0, the length is the packet's."""
    seg = pk.tcp_segment(CLIENT, NODE1, 40000, NODEPORT, pk.SYN, b"big tcp")
    frame = pk.ether(pk.ipv4_header(CLIENT, NODE1, TCP, 0, tot_len=0) + seg)
    run = node1.from_netdev(frame)
    assert run.retval == TC_ACT_OK
    assert_translated(run, (CLIENT, 40000, BACKEND, BACKEND_PORT), frame)
    assert run.frame[16:18] == b"\0\0"  # tot_len stays 0


# ================================================================ 2. local backend: DNAT


def test_syn_to_local_backend_is_dnated(node1):
    frame = pk.tcp(CLIENT, 40000, NODE1, NODEPORT, pk.SYN, b"hello")
    run = node1.from_netdev(frame)

    assert run.retval == TC_ACT_OK  # the stack delivers it to the local pod
    assert_translated(run, (CLIENT, 40000, BACKEND, BACKEND_PORT), frame)
    assert run.frame[:12] == frame[:12]  # MACs untouched

    fid = node1.frontend_id()
    service = node1.ct((CLIENT, 40000, NODE1, NODEPORT), "CT_SERVICE")
    out = node1.ct((CLIENT, 40000, BACKEND, BACKEND_PORT), "CT_OUT")
    for entry in (service, out):
        assert entry is not None
        assert node1.backend(entry["backend_id"]) == (BACKEND, BACKEND_PORT)
        assert entry["rev_nat_id"] == fid
        assert not entry["flags"] & FLAGS["CT_SNAT"]
        assert now_sec() < entry["expires"] <= now_sec() + TIMEOUT["CT_SYN_TIMEOUT"] + 1
    assert node1.entries("snat_v4") == {}
    assert node1.frontend_stats(fid) == (1, len(frame))


# ================================================================ 3. remote backend: DNAT + SNAT


@pytest.mark.parametrize("client_port", [40000, 10000], ids=["port-in-snat-range", "port-outside-snat-range"])
def test_syn_to_remote_backend_is_dnated_and_snated(node0, client_port):
    frame = pk.tcp(CLIENT, client_port, NODE0, NODEPORT, pk.SYN, b"hello")
    run = node0.from_netdev(frame)

    assert_forwarded_to(run, PEER_MACS[NODE1])  # the route to 10.0.1.0/24 is via node1
    p = run.pkt
    snat_port = p.sport
    if client_port in SNAT_RANGE:
        assert snat_port == client_port
    else:
        assert snat_port in SNAT_RANGE
    assert_translated(run, (NODE0, snat_port, BACKEND, BACKEND_PORT), frame, ttl=63)

    # The NAT pair, as the walk-through lists it: IN is the port's claim; OUT is the flow's
    # conntrack entry (no SNAT entry of its own).
    assert node0.nat((BACKEND, BACKEND_PORT, NODE0, snat_port), "NAT_IN") == (CLIENT, client_port)
    assert len(node0.entries("snat_v4")) == 1
    svc_entry = node0.ct((CLIENT, client_port, NODE0, NODEPORT), "CT_SERVICE")
    assert (str(svc_entry["xl_saddr"]), svc_entry["snat_port"]) == (NODE0, snat_port)

    fid = node0.frontend_id()
    # CT_OUT is keyed by the flow as it leaves: from node0's SNAT port.
    for flow, direction in (((CLIENT, client_port, NODE0, NODEPORT), "CT_SERVICE"),
                            ((NODE0, snat_port, BACKEND, BACKEND_PORT), "CT_OUT")):
        entry = node0.ct(flow, direction)
        assert entry is not None, direction
        assert node0.backend(entry["backend_id"]) == (BACKEND, BACKEND_PORT)
        assert entry["rev_nat_id"] == fid
        assert entry["flags"] & FLAGS["CT_SNAT"]
        assert entry["snat_port"] == snat_port and entry["ack_mark"] == 0  # (a SYN acknowledges nothing)
    assert node0.frontend_stats(fid) == (1, len(frame))


def test_remote_backend_without_neighbour_entry_uses_redirect_neigh(node0, netns):
    netns.ip("neigh", "del", NODE1, "dev", "eth0")
    frame = syn(40000)
    run = node0.from_netdev(frame)
    assert run.retval == TC_ACT_REDIRECT
    assert_translated(run, (NODE0, 40000, BACKEND, BACKEND_PORT), frame, ttl=63)


def test_unroutable_backend_is_a_counted_drop(node0, netns):
    netns.ip("route", "replace", "unreachable", "10.0.1.0/24")
    run = node0.from_netdev(syn(40000))
    assert run.retval == TC_ACT_SHOT
    assert node0.drops("FIB_FAILED") == 1


def test_a_new_flow_takes_the_next_hop_looked_up_in_the_last_second_and_then_looks_again(node0, netns):
    """The first flow to a backend looks its next hop up and keeps the answer in nh_v4 by
    addresses and interface (a reply's, towards the client, is not kept); a new flow in
    the second after takes it from there (the neighbour's new MAC, set meanwhile, is not
    seen yet); once the answer is due, the next new flow looks again and gets the MAC the
    kernel now has (ip neigh: the oracle)."""
    nh_key = layout.NH_KEY.pack(saddr=NODE0, daddr=BACKEND, ifindex=node0.ifindex, egress=0)
    hop_fields = ("checked", "ifindex", "nh", "l2_dst", "l2_mid", "l2_src")
    old_mac, new_mac = PEER_MACS[NODE1], bytes.fromhex("02000000aa77")

    assert_forwarded_to(node0.from_netdev(syn(40000)), old_mac)
    kept = layout.NH_ENTRY.unpack(node0.maps["nh_v4"].lookup(nh_key))
    assert (kept["nh"], kept["ifindex"]) == (FLAGS["NH_REDIRECT"], node0.ifindex)
    assert now_sec() - 1 <= kept["checked"] <= now_sec()
    assert node0.ct((CLIENT, 40000, NODE0, NODEPORT), "CT_SERVICE")["checked"] == kept["checked"]

    netns.ip("neigh", "replace", NODE1, "lladdr", new_mac.hex(":"), "dev", "eth0", "nud", "permanent")
    assert new_mac.hex(":") in netns.ip("neigh", "show", NODE1)
    assert_forwarded_to(node0.from_netdev(syn(40001)), old_mac)  # the kept answer
    entry = node0.ct((CLIENT, 40001, NODE0, NODEPORT), "CT_SERVICE")
    assert {f: entry[f] for f in hop_fields} == {f: kept[f] for f in hop_fields}

    # (3 s back: the datapath's coarse clock may lag the test's by a tick)
    node0.maps["nh_v4"].update(nh_key, layout.NH_ENTRY.pack(**{**kept, "checked": now_sec() - 3}))  # due
    assert_forwarded_to(node0.from_netdev(syn(40002)), new_mac)
    kept = layout.NH_ENTRY.unpack(node0.maps["nh_v4"].lookup(nh_key))
    assert kept["checked"] >= now_sec() - 1 and str(kept["daddr"]) == BACKEND
    # a reply's lookup (towards the client) is not kept: one answer, the backend's, for all
    reply = node0.from_netdev(pk.tcp(BACKEND, BACKEND_PORT, NODE0, 40002, pk.SYN | pk.ACK))
    assert_forwarded_to(reply, CLIENT_MAC)
    assert len(node0.entries("nh_v4")) == 1

    # a kept answer of another key (an LRU map's element handed on while copied) is not taken
    node0.maps["nh_v4"].update(nh_key, layout.NH_ENTRY.pack(**{**kept, "daddr": "10.0.1.99", "l2_dst": 0}))
    assert_forwarded_to(node0.from_netdev(syn(40003)), new_mac)


# ================================================================ 4. reply of a SNATed flow


@pytest.mark.parametrize("client_port", [40000, 10000], ids=["port-in-snat-range", "port-outside-snat-range"])
@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
def test_reply_through_snat_goes_back_to_client_from_frontend(node0, client_port, proto):
    if proto == TCP:
        request = pk.tcp(CLIENT, client_port, NODE0, NODEPORT, pk.SYN)
    else:
        request = pk.udp(CLIENT, client_port, NODE0, NODEPORT, b"request")
    snat_port = node0.from_netdev(request).pkt.sport

    if proto == TCP:
        reply = pk.tcp(BACKEND, BACKEND_PORT, NODE0, snat_port, pk.SYN | pk.ACK, b"welcome", ttl=62)
    else:
        reply = pk.udp(BACKEND, BACKEND_PORT, NODE0, snat_port, b"answer", ttl=62)
    run = node0.from_netdev(reply)

    assert_forwarded_to(run, CLIENT_MAC)
    assert_translated(run, (NODE0, NODEPORT, CLIENT, client_port), reply, ttl=61)
    assert run.pkt.tcp_flags == pk.parse(reply).tcp_flags


def test_reply_to_unknown_snat_port_is_untouched(node0):
    node0.from_netdev(syn(40000))
    reply = pk.tcp(BACKEND, BACKEND_PORT, NODE0, 40001, pk.SYN | pk.ACK)
    run = node0.from_netdev(reply)
    assert (run.retval, run.frame) == (TC_ACT_OK, reply)


def test_reply_of_an_expired_flow_is_untouched(node0):
    node0.from_netdev(syn(40000))  # the client's port is in snatPortRange: kept
    out = (NODE0, 40000, BACKEND, BACKEND_PORT)
    node0.put_ct(out, "CT_OUT", **{**node0.ct(out, "CT_OUT"), "expires": now_sec() - 2})
    reply = pk.tcp(BACKEND, BACKEND_PORT, NODE0, 40000, pk.SYN | pk.ACK)
    run = node0.from_netdev(reply)
    assert (run.retval, run.frame) == (TC_ACT_OK, reply)


# ================================================================ 5. local backend: reply on egress


def test_local_backend_reply_gets_frontend_as_source(node1):
    node1.from_netdev(pk.tcp(CLIENT, 40000, NODE1, NODEPORT, pk.SYN))
    reply = pk.tcp(BACKEND, BACKEND_PORT, CLIENT, 40000, pk.SYN | pk.ACK, b"welcome")
    run = node1.to_netdev(reply)

    assert run.retval == TC_ACT_OK
    assert_translated(run, (NODE1, NODEPORT, CLIENT, 40000), reply)


def test_local_backend_traffic_of_no_flow_is_untouched(node1):
    node1.from_netdev(pk.tcp(CLIENT, 40000, NODE1, NODEPORT, pk.SYN))
    for frame in (pk.tcp(BACKEND, BACKEND_PORT, CLIENT, 40001, pk.SYN | pk.ACK),  # another client port
                  pk.tcp(BACKEND, 8080, CLIENT, 40000, pk.SYN | pk.ACK)):  # another backend port
        run = node1.to_netdev(frame)
        assert (run.retval, run.frame) == (TC_ACT_OK, frame)


def test_the_local_backend_filter_decides_what_leaves_untouched(node0, node1):
    """be_addr_v4 has a bit for the node's own backends' endpoints alone: a packet leaving
    from an address and port whose bit is clear, to no frontend, passes before it is
    parsed, even one whose tuple a local backend's flow has (its bit cleared by hand: the
    filter decides, not a lookup), and with the bit back it is translated; a packet from
    another address with that very bit takes the whole path and passes unchanged."""
    word, bit = layout.endpoint_filter_bit(int(ipaddress.IPv4Address(BACKEND)), BACKEND_PORT)
    for dp, want in ((node1, {word: 1 << bit}), (node0, {})):
        words = {layout.ID_KEY.unpack(k): layout.ADDR_BITS.unpack(v)["bits"]
                 for k, v in dp.entries("be_addr_v4").items()}
        assert {w: b for w, b in words.items() if b} == want
    node1.from_netdev(pk.tcp(CLIENT, 40000, NODE1, NODEPORT, pk.SYN))
    reply = pk.tcp(BACKEND, BACKEND_PORT, CLIENT, 40000, pk.SYN | pk.ACK, b"welcome")
    key, filled = layout.ID_KEY.pack(word), node1.maps["be_addr_v4"].lookup(layout.ID_KEY.pack(word))
    node1.maps["be_addr_v4"].update(key, layout.ADDR_BITS.pack(bits=0))
    try:
        run = node1.to_netdev(reply)
        assert (run.retval, run.frame) == (TC_ACT_OK, reply)
    finally:
        node1.maps["be_addr_v4"].update(key, filled)
    assert_translated(node1.to_netdev(reply), (NODE1, NODEPORT, CLIENT, 40000), reply)
    sharer = filter_sharer(BACKEND, within="10.0.0.0/8", port=BACKEND_PORT)
    for frame in (pk.tcp(sharer, BACKEND_PORT, CLIENT, 40000, pk.SYN | pk.ACK),
                  pk.udp(sharer, BACKEND_PORT, CLIENT, 40000, b"a")):
        run = node1.to_netdev(frame)
        assert (run.retval, run.frame) == (TC_ACT_OK, frame)
    assert not any(node1.all_drops().values())


def test_a_reply_to_a_pod_passes_by_unless_its_port_has_a_flow_to_a_clusterip(datapath):
    """A packet arriving for a pod of the node, whose destination is no frontend, passes
    before it is parsed unless the pod's port has a flow to a ClusterIP: such a flow's
    reply is still translated, and other packets to the pod pass unchanged."""
    node1 = datapath(REPO / "examples" / "three-nodes.yaml", "node1")
    pod, dns, backend = "10.0.1.5", "10.96.0.10", "10.0.2.53"  # (its backend on node2)
    out = node1.to_netdev(pk.udp(pod, 41000, dns, 53, b"query"))
    assert out.pkt.flow == (pod, 41000, backend, 53)
    assert node1.from_netdev(pk.udp(backend, 53, pod, 41000, b"answer")).pkt.flow == (dns, 53, pod, 41000)
    for frame in (pk.udp(backend, 53, pod, 41001, b"answer"), pk.tcp("10.0.2.9", 80, pod, 41002, pk.SYN | pk.ACK)):
        run = node1.from_netdev(frame)
        assert (run.retval, run.frame) == (TC_ACT_OK, frame)
    assert not any(node1.all_drops().values())


# ================================================================ 6. UDP checksums


@pytest.mark.parametrize("node", ["node0", "node1"])
def test_udp_zero_checksum_stays_zero(datapath, node):
    dp = datapath(SEED, node)
    frame = pk.udp(CLIENT, 40000, dp.address, NODEPORT, b"no checksum", zero_csum=True)
    run = dp.from_netdev(frame)
    p = run.pkt
    assert p.daddr == BACKEND and p.dport == BACKEND_PORT
    assert p.l4_csum == 0
    assert p.ip_csum_ok()

    reply = pk.udp(BACKEND, BACKEND_PORT, p.saddr, p.sport, b"none either", zero_csum=True)
    back = (dp.from_netdev if node == "node0" else dp.to_netdev)(reply).pkt
    assert back.flow == (dp.address, NODEPORT, CLIENT, 40000)
    assert back.l4_csum == 0 and back.ip_csum_ok()


@pytest.mark.parametrize("node", ["node0", "node1"])
def test_udp_checksum_is_updated(datapath, node):
    dp = datapath(SEED, node)
    frame = pk.udp(CLIENT, 40000, dp.address, NODEPORT, b"with checksum")
    run = dp.from_netdev(frame)
    ttl = 63 if node == "node0" else 64
    source = (NODE0, 40000) if node == "node0" else (CLIENT, 40000)
    p = assert_translated(run, (*source, BACKEND, BACKEND_PORT), frame, ttl=ttl)
    assert p.l4_csum != 0


def test_udp_checksum_that_becomes_zero_is_sent_as_ffff(node0):
    """A translated UDP checksum that computes to 0 must be sent as 0xffff (0 means none)."""
    # node0 keeps the client's port (inside the SNAT range): the translated header is
    # known in advance, so a 2-byte payload can make its checksum compute to 0.
    after = pk.udp_datagram(NODE0, BACKEND, 40000, BACKEND_PORT, b"\0\0", zero_csum=True)
    pseudo = pk.pseudo_header(pk._ip(NODE0), pk._ip(BACKEND), UDP, len(after))
    total = (~pk.csum(pseudo + after)) & 0xFFFF  # ones' complement sum with payload 0
    payload = ((~total) & 0xFFFF).to_bytes(2, "big")
    assert pk.csum(pseudo + after[:8] + payload) == 0  # the translated checksum computes to 0

    frame = pk.udp(CLIENT, 40000, NODE0, NODEPORT, payload)
    assert pk.parse(frame).l4_csum != 0
    p = node0.from_netdev(frame).pkt
    assert p.flow == (NODE0, 40000, BACKEND, BACKEND_PORT)
    assert p.l4_csum == 0xFFFF
    assert p.checksums_ok()


TP_STATUS_CSUMNOTREADY = 1 << 3
SOL_PACKET, PACKET_AUXDATA = 263, 8  # <linux/socket.h>, <linux/if_packet.h>
AUXDATA = struct.Struct("IIIHHHH")  # struct tpacket_auxdata


def test_egress_rewrite_of_partial_checksum_packet(node1, netns):
    """Local sockets hand veth packets with CHECKSUM_PARTIAL (kernel-notes): their L4
    checksum field holds the pseudo-header sum, which the address rewrite must update
    (BPF_F_PSEUDO_HDR). BPF_PROG_TEST_RUN's skbs are never partial, so here to_netdev is
    attached to eth0's egress inside the test namespace and a local "backend" socket
    replies; the frame is captured on the veth peer."""
    node1.from_netdev(pk.udp(CLIENT, 40000, NODE1, NODEPORT, b"request"))  # the flow
    netns.ip("addr", "add", f"{BACKEND}/32", "dev", "lo")  # the pod, local to the namespace
    with ExitStack() as stack:
        capture = stack.enter_context(socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(pk.ETH_P_IP)))
        capture.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        capture.bind(("peer0", 0))
        capture.settimeout(2)
        stack.enter_context(attached(node1, netns, "to_netdev", bpf.BPF_TC_EGRESS))
        backend = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        backend.bind((BACKEND, BACKEND_PORT))
        backend.sendto(b"reply from the pod", (CLIENT, 40000))
        while True:
            frame, ancillary, _, _ = capture.recvmsg(2048, socket.CMSG_SPACE(AUXDATA.size))
            p = pk.parse(frame) if frame[23:24] == bytes([UDP]) else None
            if p is not None and pk.payload_of(p) == b"reply from the pod":
                break
    status = next(AUXDATA.unpack(data[: AUXDATA.size])[0] for level, kind, data in ancillary
                  if (level, kind) == (SOL_PACKET, PACKET_AUXDATA))
    assert p.flow == (NODE1, NODEPORT, CLIENT, 40000)
    assert p.ip_csum_ok()
    assert status & TP_STATUS_CSUMNOTREADY, "veth did not pass a partial checksum: the test proves nothing"
    done = pk.parse(pk.complete_partial_checksum(frame, 14 + len(p.ip_header), 6))
    assert done.l4_csum_ok(), "the pseudo-header sum was not updated for the new source address"


# ================================================================ 7. conntrack states


def _reply(dp: Datapath, snat_port: int, flags: int, payload: bytes = b"", client_port: int = 40000,
           **kw: int) -> Run:
    """A backend's segment to the client's flow: through the SNAT on ingress (node0), or
    leaving on egress from the local backend (node1). kw: seq, ack."""
    if dp.node == "node0":
        return dp.from_netdev(pk.tcp(BACKEND, BACKEND_PORT, NODE0, snat_port, flags, payload, **kw))
    return dp.to_netdev(pk.tcp(BACKEND, BACKEND_PORT, CLIENT, client_port, flags, payload, **kw))


def _out_flow(dp: Datapath, snat_port: int, client_port: int = 40000) -> tuple[str, int, str, int]:
    return (NODE0, snat_port, BACKEND, BACKEND_PORT) if dp.node == "node0" else (CLIENT, client_port, BACKEND, BACKEND_PORT)


@pytest.mark.parametrize("node", ["node0", "node1"])
@pytest.mark.parametrize("flags", [pk.ACK, pk.PSH | pk.ACK, pk.FIN | pk.ACK, pk.RST, pk.SYN | pk.ACK],
                         ids=["ack", "psh-ack", "fin-ack", "rst", "syn-ack"])
def test_tcp_without_syn_for_unknown_flow_reaches_a_backend_with_short_lived_state(datapath, node, flags):
    """A mid-stream segment for a frontend with no state is DNATed (and SNATed) to a
    backend, which answers with a reset that is translated back: the client fails fast.
    Its state lives CT_CLOSE_TIMEOUT and never becomes established."""
    dp = datapath(SEED, node)
    service = (CLIENT, 40000, dp.address, NODEPORT)
    frame = pk.tcp(*service, flags, b"mid-stream")
    run = dp.from_netdev(frame)
    p = run.pkt
    assert (p.daddr, p.dport) == (BACKEND, BACKEND_PORT) and p.checksums_ok()
    assert p.tcp_flags == flags
    assert not any(dp.all_drops().values())
    entry = dp.ct(service, "CT_SERVICE")
    assert entry["flags"] & FLAGS["CT_MIDSTREAM"] and not entry["flags"] & FLAGS["CT_ESTABLISHED"]
    assert entry["expires"] <= now_sec() + TIMEOUT["CT_CLOSE_TIMEOUT"] + 1
    snat = entry["snat_port"]
    # More segments of the client's do not make it long-lived.
    dp.from_netdev(pk.tcp(*service, pk.ACK, b"more"))
    assert dp.ct(service, "CT_SERVICE")["expires"] <= now_sec() + TIMEOUT["CT_CLOSE_TIMEOUT"] + 1
    assert not dp.ct(service, "CT_SERVICE")["flags"] & FLAGS["CT_ESTABLISHED"]

    reset = _reply(dp, snat, pk.RST)
    assert reset.pkt.flow == (dp.address, NODEPORT, CLIENT, 40000)
    assert reset.pkt.tcp_flags == pk.RST and reset.pkt.checksums_ok()
    for flow, direction in ((service, "CT_SERVICE"), (_out_flow(dp, snat), "CT_OUT")):
        e = dp.ct(flow, direction)
        assert e["flags"] & FLAGS["CT_CLOSING"], direction
        assert e["expires"] <= now_sec() + TIMEOUT["CT_CLOSE_TIMEOUT"] + 1, direction

    # The client's next connection on the tuple is a new flow.
    dp.from_netdev(pk.tcp(*service, pk.SYN))
    entry = dp.ct(service, "CT_SERVICE")
    assert not entry["flags"] & (FLAGS["CT_MIDSTREAM"] | FLAGS["CT_CLOSING"])
    assert entry["expires"] >= now_sec() + TIMEOUT["CT_SYN_TIMEOUT"] - 1


def test_ack_establishes_the_flow(node1):
    service = (CLIENT, 40000, NODE1, NODEPORT)
    node1.from_netdev(pk.tcp(*service, pk.SYN))
    assert not node1.ct(service, "CT_SERVICE")["flags"] & FLAGS["CT_ESTABLISHED"]
    node1.from_netdev(pk.tcp(*service, pk.ACK))
    entry = node1.ct(service, "CT_SERVICE")
    assert entry["flags"] & FLAGS["CT_ESTABLISHED"]
    assert entry["expires"] >= now_sec() + TIMEOUT["CT_ESTABLISHED_TIMEOUT"] - 1


def _established(dp: Datapath, client_port: int = 40000) -> tuple[tuple[str, int, str, int], int]:
    """SYN, the backend's SYN-ACK, the client's ACK: (the service tuple, the SNAT port)."""
    service = (CLIENT, client_port, dp.address, NODEPORT)
    dp.from_netdev(pk.tcp(*service, pk.SYN))
    snat = dp.ct(service, "CT_SERVICE")["snat_port"]
    assert _reply(dp, snat, pk.SYN | pk.ACK, client_port=client_port).pkt.flow == (
        dp.address, NODEPORT, CLIENT, client_port)
    dp.from_netdev(pk.tcp(*service, pk.ACK))
    return service, snat


@pytest.mark.parametrize("closer", ["client", "backend"])
@pytest.mark.parametrize("node", ["node0", "node1"])
def test_one_fin_half_closes_and_the_second_closes(datapath, node, closer):
    """As Linux conntrack: one side's FIN leaves the flow established with its long
    timeout (a client that did shutdown(SHUT_WR) still gets its answer after more than
    CT_CLOSE_TIMEOUT); the other side's FIN closes it. Who closed first is kept."""
    dp = datapath(SEED, node)
    service, snat = _established(dp)
    out = _out_flow(dp, snat)

    def client_fin() -> None:
        assert dp.from_netdev(pk.tcp(*service, pk.FIN | pk.ACK)).pkt.daddr == BACKEND

    def backend_fin() -> None:
        assert _reply(dp, snat, pk.FIN | pk.ACK).pkt.flow == (dp.address, NODEPORT, CLIENT, 40000)

    first, second = (client_fin, backend_fin) if closer == "client" else (backend_fin, client_fin)
    first_bit = FLAGS["CT_FIN_CLIENT"] if closer == "client" else FLAGS["CT_FIN_BACKEND"]
    first()
    for flow, direction in ((service, "CT_SERVICE"), (out, "CT_OUT")):
        entry = dp.ct(flow, direction)
        assert entry["flags"] & FLAGS["CT_ESTABLISHED"] and entry["flags"] & first_bit, direction
        assert not entry["flags"] & FLAGS["CT_CLOSING"], direction
        assert entry["expires"] >= now_sec() + TIMEOUT["CT_ESTABLISHED_TIMEOUT"] - 1, direction
    # the half-closed flow still carries data the other way, translated
    answer = _reply(dp, snat, pk.PSH | pk.ACK, b"the answer")
    assert answer.pkt.flow == (dp.address, NODEPORT, CLIENT, 40000)
    assert dp.ct(service, "CT_SERVICE")["expires"] >= now_sec() + TIMEOUT["CT_ESTABLISHED_TIMEOUT"] - 1

    second()
    for flow, direction in ((service, "CT_SERVICE"), (out, "CT_OUT")):
        entry = dp.ct(flow, direction)
        assert entry["flags"] & FLAGS["CT_CLOSING"], direction
        assert entry["flags"] & FLAGS["CT_FIN_CLIENT"] and entry["flags"] & FLAGS["CT_FIN_BACKEND"], direction
        assert bool(entry["flags"] & FLAGS["CT_BACKEND_CLOSED_FIRST"]) == (closer == "backend"), direction
        assert entry["expires"] <= now_sec() + TIMEOUT["CT_CLOSE_TIMEOUT"] + 1, direction


@pytest.mark.parametrize("sender", ["client", "backend"])
@pytest.mark.parametrize("node", ["node0", "node1"])
def test_rst_closes_both_entries(datapath, node, sender):
    dp = datapath(SEED, node)
    service, snat = _established(dp)
    if sender == "client":
        dp.from_netdev(pk.tcp(*service, pk.RST))
    else:
        _reply(dp, snat, pk.RST)
    for flow, direction in ((service, "CT_SERVICE"), (_out_flow(dp, snat), "CT_OUT")):
        entry = dp.ct(flow, direction)
        assert entry["flags"] & FLAGS["CT_CLOSING"], direction
        assert entry["expires"] <= now_sec() + TIMEOUT["CT_CLOSE_TIMEOUT"] + 1, direction


@pytest.mark.parametrize("sender", ["client", "backend"])
@pytest.mark.parametrize("node", ["node0", "node1"])
def test_a_rst_out_of_window_passes_and_changes_nothing_one_in_window_closes(datapath, node, sender):
    """As Linux conntrack: a RST ends the flow only if its sequence number is in window
    (from what its receiver acknowledged, kept in the other direction's entry as ack_mark,
    in steps of ACK_MARK_STEP). A blind one (a sender off the path who guessed the
    client's address and port) passes, translated, and changes no state: the flow keeps
    its established timeout, and its SNAT port is not freed for another client."""
    from bpfgen.render import ACK_MARK_STEP, RST_WINDOW

    dp = datapath(SEED, node)
    service = (CLIENT, 40000, dp.address, NODEPORT)
    c, b = 0x10000000, 0xFFFFFF00  # the client's and the backend's initial sequence numbers (b wraps)
    dp.from_netdev(pk.tcp(*service, pk.SYN, seq=c))
    snat = dp.ct(service, "CT_SERVICE")["snat_port"]
    out = _out_flow(dp, snat)
    _reply(dp, snat, pk.SYN | pk.ACK, seq=b, ack=c + 1)
    dp.from_netdev(pk.tcp(*service, pk.ACK, seq=c + 1, ack=(b + 1) & 0xFFFFFFFF))
    dp.from_netdev(pk.tcp(*service, pk.PSH | pk.ACK, b"x" * 100, seq=c + 1, ack=(b + 1) & 0xFFFFFFFF))
    _reply(dp, snat, pk.PSH | pk.ACK, b"y" * 100, seq=(b + 1) & 0xFFFFFFFF, ack=c + 101)
    # each entry keeps what its packets acknowledged: moved on only a step at a time
    assert dp.ct(out, "CT_OUT")["ack_mark"] == c + 1
    assert dp.ct(service, "CT_SERVICE")["ack_mark"] == (b + 1) & 0xFFFFFFFF
    _reply(dp, snat, pk.ACK, seq=(b + 101) & 0xFFFFFFFF, ack=c + 1 + ACK_MARK_STEP)
    assert dp.ct(out, "CT_OUT")["ack_mark"] == c + 1 + ACK_MARK_STEP

    def rst(seq: int) -> Run:
        seq &= 0xFFFFFFFF
        if sender == "client":
            return dp.from_netdev(pk.tcp(*service, pk.RST, seq=seq))
        return _reply(dp, snat, pk.RST, seq=seq)

    acked = c + 1 + ACK_MARK_STEP if sender == "client" else b + 1  # what the RST's receiver acknowledged
    for blind in (acked + RST_WINDOW + 1, acked + 2**31, acked - 1):
        run = rst(blind)
        assert run.pkt.tcp_flags == pk.RST and run.pkt.checksums_ok()
        if sender == "client":
            assert (run.pkt.daddr, run.pkt.dport) == (BACKEND, BACKEND_PORT)
        else:
            assert run.pkt.flow == (dp.address, NODEPORT, CLIENT, 40000)
        for flow, direction in ((service, "CT_SERVICE"), (out, "CT_OUT")):
            entry = dp.ct(flow, direction)
            assert not entry["flags"] & (FLAGS["CT_CLOSING"] | FLAGS["CT_BACKEND_DONE"]), (hex(blind), direction)
            assert entry["expires"] >= now_sec() + TIMEOUT["CT_ESTABLISHED_TIMEOUT"] - 1, direction
    rst(acked + 50_000)  # (the receiver's window holds data in flight)
    for flow, direction in ((service, "CT_SERVICE"), (out, "CT_OUT")):
        entry = dp.ct(flow, direction)
        assert entry["flags"] & FLAGS["CT_CLOSING"] and entry["flags"] & FLAGS["CT_BACKEND_DONE"], direction
        assert entry["expires"] <= now_sec() + TIMEOUT["CT_CLOSE_TIMEOUT"] + 1, direction


# A port whose flow's backend side is over (CT_BACKEND_DONE) is free SETTLE_TICKS ticks of the
# coarse clock (2^20 ns each, plus the clock's own granularity) after: the backend may not
# have the flow's last packet yet.
DONE_TICKS = (SETTLE_TICKS + 1) * 2**20 / 1e9 + 0.01


def _close(dp: Datapath, service: tuple[str, int, str, int], snat: int, first: str = "client",
           final_ack: bool = True) -> None:
    """Both FINs, `first` side first, then (final_ack) that side's ACK of the other's FIN."""
    client = lambda flags: dp.from_netdev(pk.tcp(*service, flags))  # noqa: E731
    backend = lambda flags: _reply(dp, snat, flags, client_port=service[1])  # noqa: E731
    closer, other = (client, backend) if first == "client" else (backend, client)
    closer(pk.FIN | pk.ACK)
    other(pk.FIN | pk.ACK)
    if final_ack:
        closer(pk.ACK)
    assert dp.ct(service, "CT_SERVICE")["flags"] & FLAGS["CT_CLOSING"]


@pytest.mark.parametrize("node", ["node0", "node1"])
def test_syn_after_fin_is_a_new_flow(datapath, node):
    dp = datapath(SEED, node)
    service, snat = _established(dp)
    first_port = dp.from_netdev(pk.tcp(*service, pk.FIN | pk.ACK)).pkt.sport
    _close(dp, service, snat)
    # The last ACK still belongs to the closing flow.
    assert dp.from_netdev(pk.tcp(*service, pk.ACK)).pkt.sport == first_port
    assert dp.ct(service, "CT_SERVICE")["flags"] & FLAGS["CT_CLOSING"]
    time.sleep(DONE_TICKS)

    frame = pk.tcp(*service, pk.SYN)
    p = dp.from_netdev(frame).pkt
    entry = dp.ct(service, "CT_SERVICE")
    assert not entry["flags"] & FLAGS["CT_CLOSING"]
    assert entry["expires"] >= now_sec() + TIMEOUT["CT_SYN_TIMEOUT"] - 1
    out = (NODE0, p.sport, BACKEND, BACKEND_PORT) if node == "node0" else (CLIENT, 40000, BACKEND, BACKEND_PORT)
    assert not dp.ct(out, "CT_OUT")["flags"] & FLAGS["CT_CLOSING"]
    assert (p.daddr, p.dport) == (BACKEND, BACKEND_PORT) and p.checksums_ok()
    if node == "node0":
        # The same client reconnects: the closed flow's SNAT port is taken at once (the
        # client closed first: the backend holds no TIME_WAIT), and replies are translated.
        assert p.sport == first_port
        assert entry["snat_port"] == p.sport
        assert dp.nat((BACKEND, BACKEND_PORT, NODE0, p.sport), "NAT_IN") == (CLIENT, 40000)
        back = dp.from_netdev(pk.tcp(BACKEND, BACKEND_PORT, NODE0, p.sport, pk.SYN | pk.ACK)).pkt
        assert back.flow == (NODE0, NODEPORT, CLIENT, 40000)


# Client ports whose bytes all vary, so that flows spread over backends.
SPREAD_PORTS = [33001 + 311 * i for i in range(48)]


@pytest.mark.parametrize("node", ["node0", "node1"])
def test_flow_keeps_its_backend_when_backends_are_added(datapath, node):
    dp = datapath(SEED, node)
    before = {}
    for port in SPREAD_PORTS:
        p = dp.from_netdev(pk.tcp(CLIENT, port, dp.address, NODEPORT, pk.SYN)).pkt
        before[port] = (p.saddr, p.sport, p.daddr, p.dport)
    assert {(d, dp_) for _, _, d, dp_ in before.values()} == {(BACKEND, BACKEND_PORT)}

    dp.sync(GROWN)  # 10.0.1.72 stays, three more backends join

    for port in SPREAD_PORTS:
        run = dp.from_netdev(pk.tcp(CLIENT, port, dp.address, NODEPORT, pk.ACK, b"next"))
        assert run.pkt.flow == before[port], f"flow from client port {port} moved"
        assert run.pkt.checksums_ok()

    new = Counter()
    for port in SPREAD_PORTS:
        p = dp.from_netdev(pk.tcp(OTHER_CLIENT, port, dp.address, NODEPORT, pk.SYN)).pkt
        new[p.daddr] += 1
    grown = {str(b.address) for b in load_spec(GROWN).services[0].backends}
    assert set(new) <= grown
    assert len(new) > 1, f"new flows all went to {set(new)}"


@pytest.mark.parametrize("node", ["node0", "node1"])
def test_flow_off_a_removed_backend_stays_translated_both_ways(datapath, node):
    """The backend of an established flow is removed and another one added: once the
    flow's entry is checked again (at most a second later: the fast path checks its
    backend once a second), the flow's next packets go to a live backend, and that
    backend's replies are still reverse-translated to the frontend (never leaked with the
    pod's address)."""
    dp = datapath(SEED, node)
    service = (CLIENT, 40000, dp.address, NODEPORT)
    dp.from_netdev(pk.tcp(*service, pk.SYN))
    dp.from_netdev(pk.tcp(*service, pk.ACK))

    dp.sync(REPLACED)  # 10.0.1.72 is gone, 10.0.1.80 is the only backend
    age_check(dp, service, "CT_SERVICE")  # a second has passed since the entry was checked

    p = dp.from_netdev(pk.tcp(*service, pk.ACK, b"more")).pkt
    assert (p.daddr, p.dport) == ("10.0.1.80", BACKEND_PORT)
    if node == "node0":
        reply = dp.from_netdev(pk.tcp("10.0.1.80", BACKEND_PORT, NODE0, p.sport, pk.ACK, b"answer"))
    else:
        reply = dp.to_netdev(pk.tcp("10.0.1.80", BACKEND_PORT, CLIENT, 40000, pk.ACK, b"answer"))
    assert reply.pkt.flow == (dp.address, NODEPORT, CLIENT, 40000)


# ================================================================ 8. SNAT port allocation


def _occupy(dp: Datapath, port: int, occupant: tuple[str, int], ct_expires: int | None, flags: int = 0,
            rev_nat_id: int | None = None) -> None:
    """Make NODE0:port the SNAT port of occupant's flow to BACKEND: its claim, and
    (unless ct_expires is None) its CT_OUT entry (keyed NODE0:port -> BACKEND) expiring
    at ct_expires with flags (CT_SNAT added), through the NodePort unless rev_nat_id
    says another frontend."""
    dp.put_nat((BACKEND, BACKEND_PORT, NODE0, port), "NAT_IN", occupant)
    if ct_expires is not None:
        dp.put_ct((NODE0, port, BACKEND, BACKEND_PORT), "CT_OUT", expires=ct_expires, backend_id=1,
                  rev_nat_id=dp.frontend_id() if rev_nat_id is None else rev_nat_id,
                  flags=FLAGS["CT_SNAT"] | flags, snat_port=port)


def assert_nat_pair(dp: Datapath, client: tuple[str, int], port: int) -> None:
    assert dp.nat((BACKEND, BACKEND_PORT, NODE0, port), "NAT_IN") == client


GRACE = TIMEOUT["SNAT_REUSE_GRACE"]
CLOSED = FLAGS["CT_ESTABLISHED"] | FLAGS["CT_FIN_CLIENT"] | FLAGS["CT_FIN_BACKEND"] | FLAGS["CT_CLOSING"]
BACKEND_FIRST = CLOSED | FLAGS["CT_BACKEND_CLOSED_FIRST"]

# occupant's client address, its CT_OUT entry (expires relative to now, flags; None: no
# entry), whether it goes through another frontend address (the ClusterIP), and whether
# CLIENT's new flow takes the port over. (Past times are two seconds past, not one: the
# datapath's coarse clock may be a tick behind now_sec, at a second's turn.)
OCCUPANTS = {
    "live": (OTHER_CLIENT, (100, FLAGS["CT_ESTABLISHED"]), False, False),
    "live-same-client": (CLIENT, (100, FLAGS["CT_ESTABLISHED"]), False, False),
    "half-closed-same-client": (CLIENT, (100, FLAGS["CT_ESTABLISHED"] | FLAGS["CT_FIN_BACKEND"]
                                         | FLAGS["CT_BACKEND_CLOSED_FIRST"]), False, False),
    "expired-within-grace": (OTHER_CLIENT, (-5, FLAGS["CT_ESTABLISHED"]), False, False),
    "no-ct-entry": (OTHER_CLIENT, None, False, True),
    "expired-beyond-grace": (OTHER_CLIENT, (-GRACE - 30, FLAGS["CT_ESTABLISHED"]), False, True),
    # the backend closed first: it holds node:port -> backend in TIME_WAIT
    "other-client-waits": (OTHER_CLIENT, (5, BACKEND_FIRST), False, False),
    "other-client-after-the-rest": (OTHER_CLIENT, (-GRACE - 2, BACKEND_FIRST), False, True),
    # the same connection tuple (client address and port, frontend) reuses it at once:
    # TCP timestamp offsets are per connection (kernel 6.18 hashes the ports too), so
    # only that tuple's clock passes the backend's TIME_WAIT
    "same-client-tuple-reuses-at-once": ((CLIENT, 40000), (5, BACKEND_FIRST), False, True),
    "same-client-other-port-waits": (CLIENT, (5, BACKEND_FIRST), False, False),
    "same-client-other-frontend-waits": ((CLIENT, 40000), (5, BACKEND_FIRST), True, False),
    # the client closed first (or a reset): the backend holds no TIME_WAIT, once the client's
    # final ACK went by (before it the backend is in LAST_ACK and answers a SYN with an ACK)
    "client-closed-first-no-rest": (OTHER_CLIENT, (5, CLOSED | FLAGS["CT_BACKEND_DONE"]), False, True),
    "client-closed-first-before-its-final-ack": (OTHER_CLIENT, (5, CLOSED), False, False),
    "client-closed-first-final-ack-never-seen": (OTHER_CLIENT, (-2, CLOSED), False, True),
    "reset-no-rest": (OTHER_CLIENT, (5, FLAGS["CT_ESTABLISHED"] | FLAGS["CT_CLOSING"] | FLAGS["CT_BACKEND_DONE"]),
                      False, True),
    "expired-mid-stream-pickup": (OTHER_CLIENT, (-2, FLAGS["CT_MIDSTREAM"]), False, True),
}


@pytest.mark.parametrize("occupant_state", OCCUPANTS)
def test_client_port_held_by_another_flow(node0, occupant_state):
    """kernel-notes, SNAT and TCP: a port whose flow closed is taken at once by the same
    connection tuple (client address and port, frontend), by another flow only after the
    rest, and by anyone at once when the client closed first; a live flow keeps it."""
    client, ct, other_frontend, taken_over = OCCUPANTS[occupant_state]
    occupant = client if isinstance(client, tuple) else (client, 50000)
    rev_nat_id = node0.frontend_id(80, addr="10.106.91.98") if other_frontend else None
    if ct is None:
        _occupy(node0, 40000, occupant, None)
    else:
        _occupy(node0, 40000, occupant, now_sec() + ct[0], ct[1], rev_nat_id)

    frame = syn(40000)
    run = node0.from_netdev(frame)
    assert_forwarded_to(run, PEER_MACS[NODE1])
    port = run.pkt.sport
    assert_translated(run, (NODE0, port, BACKEND, BACKEND_PORT), frame, ttl=63)
    assert_nat_pair(node0, (CLIENT, 40000), port)
    if taken_over:
        assert port == 40000
        out = node0.ct((NODE0, 40000, BACKEND, BACKEND_PORT), "CT_OUT")
        assert not out["flags"] & FLAGS["CT_CLOSING"]  # the new flow's entry
        assert out["nat_cookie"] != 0
    else:
        assert port != 40000 and port in SNAT_RANGE
        # the occupant keeps its mapping (its NAT_OUT key is the new flow's too when both
        # are one client tuple to one backend: then NAT_IN alone says it)
        assert node0.nat((BACKEND, BACKEND_PORT, NODE0, 40000), "NAT_IN") == occupant
        if occupant != (CLIENT, 40000):
            assert_nat_pair(node0, occupant, 40000)
    # Replies to the chosen port reach this client.
    back = node0.from_netdev(pk.tcp(BACKEND, BACKEND_PORT, NODE0, port, pk.SYN | pk.ACK)).pkt
    assert back.flow == (NODE0, NODEPORT, CLIENT, 40000)


def test_snat_port_range_exhausted_by_live_flows_is_a_counted_drop(datapath):
    dp = datapath(TINY_SNAT, "node0")  # snatPortRange 40000-40003
    ports = set()
    for i in range(4):
        p = dp.from_netdev(pk.tcp(f"172.26.50.{180 + i}", 50000 + i, NODE0, NODEPORT, pk.SYN)).pkt
        assert 40000 <= p.sport <= 40003
        ports.add(p.sport)
    assert len(ports) == 4
    snat_before, ct_before = dp.entries("snat_v4"), dp.entries("ct_v4")

    run = dp.from_netdev(pk.tcp("172.26.50.190", 50010, NODE0, NODEPORT, pk.SYN))
    assert run.retval == TC_ACT_SHOT
    assert dp.drops("SNAT_EXHAUSTED") == 1
    assert dp.entries("snat_v4") == snat_before  # no half-written mapping
    assert dp.entries("ct_v4") == ct_before


def test_snat_port_of_a_stale_flow_is_reused_when_range_is_full(datapath):
    dp = datapath(TINY_SNAT, "node0")
    clients = [(f"172.26.50.{180 + i}", 50000 + i) for i in range(4)]
    port_of = {c: dp.from_netdev(pk.tcp(*c, NODE0, NODEPORT, pk.SYN)).pkt.sport for c in clients}
    # The first client's flow is gone (its conntrack entries expired and were evicted).
    gone = clients[0]
    for flow, direction in (((NODE0, port_of[gone], BACKEND, BACKEND_PORT), "CT_OUT"),
                            ((*gone, NODE0, NODEPORT), "CT_SERVICE")):
        dp.maps[dp.ct_table(flow, direction)].delete(tuple_key(flow, direction))
    nat_key = tuple_key((BACKEND, BACKEND_PORT, NODE0, port_of[gone]), "NAT_IN")
    fresh = layout.NAT_ENTRY.unpack(dp.maps["snat_v4"].lookup(nat_key))
    # Claimed a moment ago, a port without conntrack is a flow still being set up: kept.
    blocked = dp.from_netdev(pk.tcp("172.26.50.190", 50010, NODE0, NODEPORT, pk.SYN))
    assert blocked.retval == TC_ACT_SHOT and dp.drops("SNAT_EXHAUSTED") >= 1
    # Claimed long ago: the flow is gone, the port is taken over.
    dp.maps["snat_v4"].update(nat_key, layout.NAT_ENTRY.pack(**{**fresh, "claimed": fresh["claimed"] - 10}))

    run = dp.from_netdev(pk.tcp("172.26.50.190", 50010, NODE0, NODEPORT, pk.SYN))
    assert run.retval == TC_ACT_REDIRECT
    assert run.pkt.sport == port_of[gone]
    assert_nat_pair(dp, ("172.26.50.190", 50010), port_of[gone])


def test_a_flow_whose_own_port_is_out_of_range_tries_snat_retries_distinct_ports(datapath):
    """A client port outside snatPortRange: the search starts at the port the flow's hash
    picks and goes on to the ports after it, SNAT_RETRIES ports in all, none tried twice:
    with all but the last of them held by live flows, the flow gets the last."""
    def after(port: int, n: int) -> int:
        return SNAT_RANGE[(port - SNAT_RANGE.start + n) % len(SNAT_RANGE)]

    frame = syn(20000)  # (below the range)
    picked = datapath(SEED, "node0").from_netdev(frame).pkt.sport  # (a node alone: the range free)
    assert picked in SNAT_RANGE
    dp = datapath(SEED, "node0")
    for n in range(SNAT_RETRIES - 1):
        _occupy(dp, after(picked, n), (f"172.26.50.{150 + n}", 50000), now_sec() + 100, FLAGS["CT_ESTABLISHED"])

    run = dp.from_netdev(frame)
    assert run.retval == TC_ACT_REDIRECT
    assert run.pkt.sport == after(picked, SNAT_RETRIES - 1)
    assert_nat_pair(dp, (CLIENT, 20000), run.pkt.sport)
    # One more held, and the range has no port for it within its tries: a counted drop.
    dp2 = datapath(SEED, "node0")
    for n in range(SNAT_RETRIES):
        _occupy(dp2, after(picked, n), (f"172.26.50.{150 + n}", 50000), now_sec() + 100, FLAGS["CT_ESTABLISHED"])
    assert dp2.from_netdev(frame).retval == TC_ACT_SHOT
    assert dp2.drops("SNAT_EXHAUSTED") == 1


def test_snat_port_after_the_backend_closed_first(node0):
    """The backend closes first (it holds node:port in TIME_WAIT): another client does
    not get the port, and neither does the client through another frontend address; the
    same client reconnecting to the same frontend does, at once."""
    service, snat = _established(node0)
    assert snat == 40000
    _close(node0, service, snat, first="backend")

    other = node0.from_netdev(pk.tcp(OTHER_CLIENT, 40000, NODE0, NODEPORT, pk.SYN)).pkt
    assert other.sport != 40000, "the port was handed to another client within its rest"
    via_clusterip = node0.from_netdev(pk.tcp(CLIENT, 40000, "10.106.91.98", 80, pk.SYN)).pkt
    assert via_clusterip.sport != 40000

    again = node0.from_netdev(pk.tcp(*service, pk.SYN)).pkt
    assert again.sport == 40000
    assert_nat_pair(node0, (CLIENT, 40000), 40000)
    back = node0.from_netdev(pk.tcp(BACKEND, BACKEND_PORT, NODE0, 40000, pk.SYN | pk.ACK)).pkt
    assert back.flow == (NODE0, NODEPORT, CLIENT, 40000)


def test_snat_port_after_the_client_closed_first_waits_for_its_final_ack(node0):
    """Before the client's final ACK the backend is in LAST_ACK (it would answer a new SYN
    for the tuple with a challenge ACK): the port is not taken; SETTLE_TICKS after it, it is."""
    service, snat = _established(node0)
    _close(node0, service, snat, first="client", final_ack=False)
    assert node0.from_netdev(pk.tcp(OTHER_CLIENT, 40000, NODE0, NODEPORT, pk.SYN)).pkt.sport != 40000
    node0.from_netdev(pk.tcp(*service, pk.ACK))
    assert node0.ct(service, "CT_SERVICE")["flags"] & FLAGS["CT_BACKEND_DONE"]
    # not in the same moment (the backend may hold the final ACK in its socket backlog)...
    assert node0.from_netdev(pk.tcp("172.26.50.192", snat, NODE0, NODEPORT, pk.SYN)).pkt.sport != snat
    time.sleep(DONE_TICKS)
    # ...but some milliseconds after
    assert node0.from_netdev(pk.tcp("172.26.50.191", snat, NODE0, NODEPORT, pk.SYN)).pkt.sport == snat


def test_snat_port_after_the_client_closed_first_has_no_rest(node0):
    service, snat = _established(node0)
    _close(node0, service, snat, first="client")
    time.sleep(DONE_TICKS)
    p = node0.from_netdev(pk.tcp(OTHER_CLIENT, 40000, NODE0, NODEPORT, pk.SYN)).pkt
    assert p.sport == 40000
    assert_nat_pair(node0, (OTHER_CLIENT, 40000), 40000)
    back = node0.from_netdev(pk.tcp(BACKEND, BACKEND_PORT, NODE0, 40000, pk.SYN | pk.ACK)).pkt
    assert back.flow == (NODE0, NODEPORT, OTHER_CLIENT, 40000)


@pytest.mark.parametrize("closes_first", ["client", "backend"])
def test_many_sequential_connections_through_a_small_range_never_exhaust_it(datapath, closes_first):
    """A connect/answer/close loop through a four-port range never runs out: when the
    client closes first (no TIME_WAIT on the backend) from a new port each time, and when
    the backend closes first but the client connects from one port again (the same tuple,
    which passes the backend's TIME_WAIT)."""
    dp = datapath(TINY_SNAT, "node0")
    for i in range(40):
        service = (CLIENT, 50000 + (i if closes_first == "client" else 0), NODE0, NODEPORT)
        run = dp.from_netdev(pk.tcp(*service, pk.SYN))
        assert run.retval == TC_ACT_REDIRECT, f"connection {i}: {dp.all_drops()}"
        port = run.pkt.sport
        dp.from_netdev(pk.tcp(BACKEND, BACKEND_PORT, NODE0, port, pk.SYN | pk.ACK))
        dp.from_netdev(pk.tcp(*service, pk.ACK, b"request"))
        if closes_first == "client":
            dp.from_netdev(pk.tcp(*service, pk.FIN | pk.ACK, b"request"))
            dp.from_netdev(pk.tcp(BACKEND, BACKEND_PORT, NODE0, port, pk.FIN | pk.PSH | pk.ACK, b"answer"))
            dp.from_netdev(pk.tcp(*service, pk.ACK))  # the final ACK: the backend leaves LAST_ACK
            time.sleep(DONE_TICKS)
        else:
            dp.from_netdev(pk.tcp(BACKEND, BACKEND_PORT, NODE0, port, pk.FIN | pk.PSH | pk.ACK, b"answer"))
            dp.from_netdev(pk.tcp(*service, pk.FIN | pk.ACK))
    assert dp.drops("SNAT_EXHAUSTED") == 0


def test_a_backend_closed_flows_port_rests_for_the_clients_next_port(datapath):
    """The backend closed first and holds TIME_WAIT with the old connection's timestamps:
    the same client from another port may not take that port (with every other port
    live, its SYN is a counted drop); the same tuple again takes it at once."""
    dp = datapath(TINY_SNAT, "node0")  # snatPortRange 40000-40003
    flows = [_established(dp, 50000 + i) for i in range(4)]
    service, snat = flows[0]
    _close(dp, service, snat, first="backend")
    run = dp.from_netdev(pk.tcp(CLIENT, 50010, NODE0, NODEPORT, pk.SYN))
    assert run.retval == TC_ACT_SHOT and dp.drops("SNAT_EXHAUSTED") == 1
    run = dp.from_netdev(pk.tcp(*service, pk.SYN))
    assert run.retval == TC_ACT_REDIRECT and run.pkt.sport == snat


@pytest.mark.parametrize("first", ["ingress", "egress"])
def test_ingress_and_egress_flows_of_one_tuple_keep_their_own_entries(node0, first):
    """The same tuple client:port -> ClusterIP arriving on the interface (from_netdev:
    DNAT + SNAT) and leaving it (to_netdev: a flow of the node, DNAT only): two flows
    with keys of their own, neither takes over the other's entry."""
    flow = (CLIENT, 40000, "10.106.91.98", 80)

    def ingress(flags: int = pk.SYN) -> pk.Packet:
        return node0.from_netdev(pk.tcp(*flow, flags)).pkt

    def egress(flags: int = pk.SYN) -> pk.Packet:
        return node0.to_netdev(pk.tcp(*flow, flags)).pkt

    if first == "ingress":
        p_in, p_out = ingress(), egress()
    else:
        p_out, p_in = egress(), ingress()
    assert p_in.flow == (NODE0, 40000, BACKEND, BACKEND_PORT)  # SNATed
    assert p_out.flow == (CLIENT, 40000, BACKEND, BACKEND_PORT)  # not SNATed
    svc_in, svc_out = node0.ct(flow, "CT_SERVICE"), node0.ct(flow, "CT_SERVICE_EGRESS")
    assert svc_in["flags"] & FLAGS["CT_SNAT"] and not svc_in["flags"] & FLAGS["CT_EGRESS"]
    assert svc_out["flags"] & FLAGS["CT_EGRESS"] and not svc_out["flags"] & FLAGS["CT_SNAT"]
    # Each flow's next packets and replies stay its own.
    assert ingress(pk.ACK).flow == p_in.flow
    assert egress(pk.ACK).flow == p_out.flow
    reply = node0.from_netdev(pk.tcp(BACKEND, BACKEND_PORT, NODE0, 40000, pk.SYN | pk.ACK)).pkt
    assert reply.flow == ("10.106.91.98", 80, CLIENT, 40000)
    assert node0.ct(flow, "CT_SERVICE")["flags"] & FLAGS["CT_SNAT"]
    assert not node0.ct(flow, "CT_SERVICE_EGRESS")["flags"] & FLAGS["CT_SNAT"]


def test_replies_to_the_nodes_own_flows_are_looked_up_only_at_their_local_ports(node0):
    """Traffic to the node is looked up as a reply to its own ClusterIP flows only at a
    local port such a flow may still have (local_port_v4, until when); the mark follows
    the flow's entries up, also when only replies come (a download), so no live flow's
    reply is ever passed untranslated."""
    flow = (NODE0, 20000, "10.106.91.98", 80)
    marks = node0.maps["local_port_v4"]

    def mark(port: int) -> int:
        return layout.LOCAL_PORT.unpack(marks.lookup(layout.ID_KEY.pack(port)))["expires"]

    assert mark(20000) == 0
    assert node0.to_netdev(pk.tcp(*flow, pk.SYN)).pkt.flow == (NODE0, 20000, BACKEND, BACKEND_PORT)
    out = node0.ct(flow, "CT_SERVICE_EGRESS")
    assert mark(20000) == out["expires"] > 0 and mark(20001) == 0
    reply = pk.tcp(BACKEND, BACKEND_PORT, NODE0, 20000, pk.SYN | pk.ACK)
    assert node0.from_netdev(reply).pkt.flow == ("10.106.91.98", 80, NODE0, 20000)
    # a packet from the backend to another port of the node: no flow's, passed as it is
    other = pk.tcp(BACKEND, BACKEND_PORT, NODE0, 20001, pk.ACK)
    assert node0.from_netdev(other).frame == other
    node0.to_netdev(pk.tcp(*flow, pk.ACK))  # established
    # the flow's entries made to expire sooner, the mark lowered to match (as if time had
    # passed): a reply raises both again
    reply_flow, out_key = (BACKEND, BACKEND_PORT, NODE0, 20000), (NODE0, 20000, BACKEND, BACKEND_PORT)
    back = node0.ct(out_key, "CT_OUT")
    soon = back["expires"] - 100
    node0.put_ct(out_key, "CT_OUT", **{**back, "expires": soon})
    marks.update(layout.ID_KEY.pack(20000), layout.LOCAL_PORT.pack(expires=soon))
    assert node0.from_netdev(pk.tcp(*reply_flow, pk.ACK, b"data")).pkt.flow == ("10.106.91.98", 80, NODE0, 20000)
    assert mark(20000) >= node0.ct(out_key, "CT_OUT")["expires"] > soon
    # with the mark over, the same reply is not looked up: passed as it is
    marks.update(layout.ID_KEY.pack(20000), layout.LOCAL_PORT.pack(expires=1))
    data = pk.tcp(*reply_flow, pk.ACK, b"more")
    assert node0.from_netdev(data).frame == data


# ================================================================ 9. malformed packets


def _tcp_to_nodeport() -> bytes:
    return pk.tcp(CLIENT, 40000, NODE0, NODEPORT, pk.SYN, b"payload")


def _malformed() -> dict[str, bytes]:
    good = _tcp_to_nodeport()
    ip = good[14:]
    seg = pk.tcp_segment(CLIENT, NODE0, 40000, NODEPORT, pk.SYN)
    udp = pk.udp_datagram(CLIENT, NODE0, 40000, NODEPORT, b"")
    return {
        "ihl-4": pk.ether(pk.ipv4_header(CLIENT, NODE0, TCP, len(seg), ihl=4) + seg),
        "ihl-0": pk.ether(pk.ipv4_header(CLIENT, NODE0, TCP, len(seg), ihl=0) + seg),
        "version-6-in-ipv4-frame": good[:14] + bytes([0x65]) + ip[1:],
        "tot-len-beyond-packet": pk.ether(pk.ipv4_header(CLIENT, NODE0, TCP, 0, tot_len=len(ip) + 40) + ip[20:]),
        "tot-len-below-headers": pk.ether(pk.ipv4_header(CLIENT, NODE0, TCP, 0, tot_len=30) + seg),
        "tcp-header-truncated": pk.ether(pk.ipv4_header(CLIENT, NODE0, TCP, 10) + seg[:10]),
        "udp-header-truncated": pk.ether(pk.ipv4_header(CLIENT, NODE0, UDP, 4) + udp[:4]),
        "ihl-beyond-packet": pk.ether(pk.ipv4_header(CLIENT, NODE0, TCP, 0, ihl=15) + seg),
        "options-but-no-tcp-header": pk.ether(
            pk.ipv4_header(CLIENT, NODE0, TCP, 0, ihl=10, options=bytes(20)) + seg[:8]),
    }


MALFORMED = _malformed()


@pytest.mark.parametrize("prog", ["from_netdev", "to_netdev"])
@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_packet_is_never_translated(node0, prog, name):
    frame = MALFORMED[name]
    run = getattr(node0, prog)(frame)
    if run.retval == TC_ACT_SHOT:
        assert node0.drops("MALFORMED") == 1
    else:
        assert (run.retval, run.frame) == (TC_ACT_OK, frame)
    assert node0.entries("ct_v4") == {} and node0.entries("snat_v4") == {}
    assert sum(node0.all_drops().values()) == node0.drops("MALFORMED")


@pytest.mark.parametrize("length", [14, 24, 33], ids=["ethernet-only", "10-byte-ip-header", "19-byte-ip-header"])
def test_frame_shorter_than_an_ipv4_header_passes(node0, netns, length):
    """Not a packet the datapath can read, so not service traffic: it passes to the stack
    (which judges it). BPF_PROG_TEST_RUN refuses IPv4 frames shorter than 14 + 20 bytes,
    so from_netdev is attached to eth0's ingress *inside the test namespace* and the frame
    is sent from the veth peer, then a short service packet, which is a counted drop: the
    one drop shows the program saw both, in order."""
    frame = _tcp_to_nodeport()[:length]
    short_service = MALFORMED["tcp-header-truncated"]
    with attached(node0, netns, "from_netdev", bpf.BPF_TC_INGRESS):
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind(("peer0", 0))
            s.send(frame)
            s.send(short_service)
        deadline = time.monotonic() + 2
        while node0.drops("MALFORMED") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert node0.drops("MALFORMED") == 1
    assert sum(node0.all_drops().values()) == 1
    assert node0.entries("ct_v4") == {} and node0.entries("snat_v4") == {}


def test_ip_options_are_handled(node1):
    """A valid header with options: the L4 header starts after them."""
    seg = pk.tcp_segment(CLIENT, NODE1, 40000, NODEPORT, pk.SYN, b"opts")
    options = bytes([1, 1, 1, 0])  # NOP NOP NOP EOL
    frame = pk.ether(pk.ipv4_header(CLIENT, NODE1, TCP, len(seg), ihl=6, options=options) + seg)
    run = node1.from_netdev(frame)
    assert run.retval == TC_ACT_OK
    assert_translated(run, (CLIENT, 40000, BACKEND, BACKEND_PORT), frame)


# ================================================================ 10. backend selection


def _backend_of_new_flow(dp: Datapath, client: str, port: int, nodeport: int) -> str:
    run = dp.from_netdev(pk.tcp(client, port, NODE1, nodeport, pk.SYN))
    assert run.retval == TC_ACT_OK
    return run.pkt.daddr


@pytest.mark.parametrize("nodeport, count", [(30003, 3), (30004, 4)], ids=["3-backends", "4-backends"])
def test_backend_selection_is_deterministic(datapath, nodeport, count):
    dp = datapath(SEVERAL, "node1")
    tuples = [(f"172.26.50.{10 + i % 7}", 33001 + 977 * i) for i in range(24)]
    first = {t: _backend_of_new_flow(dp, *t, nodeport) for t in tuples}
    dp.forget_flows()
    again = {t: _backend_of_new_flow(dp, *t, nodeport) for t in tuples}
    assert first == again


SEVERAL_BACKENDS = {30003: {"10.0.1.10", "10.0.1.11", "10.0.1.12"},
                    30004: {"10.0.1.20", "10.0.1.21", "10.0.1.22", "10.0.1.23"}}
CONSECUTIVE = "consecutive client ports"
NEIGHBOURS = "clients of one subnet"


@pytest.mark.parametrize(
    "nodeport, count",
    [(30003, 3), (30004, 4)],
    ids=["3-backends", "4-backends"],
)
@pytest.mark.parametrize("clients", [CONSECUTIVE, NEIGHBOURS])
def test_new_flows_spread_over_all_backends(datapath, nodeport, count, clients):
    dp = datapath(SEVERAL, "node1")
    if clients == CONSECUTIVE:
        tuples = [(CLIENT, 40000 + i) for i in range(240)]  # one client, sequential ports
    else:
        tuples = [(f"172.26.50.{1 + i}", 40000) for i in range(240)]  # many clients, one port
    seen = Counter(_backend_of_new_flow(dp, *t, nodeport) for t in tuples)
    expected = SEVERAL_BACKENDS[nodeport]
    assert set(seen) == expected, f"backends chosen: {dict(seen)}"
    fair = len(tuples) / count
    assert min(seen.values()) >= fair / 2, f"uneven spread: {dict(seen)}"


def test_one_client_port_to_two_frontends_of_one_backend_stays_two_flows(node0):
    """A client reuses its source port towards two frontends (the NodePort and the
    ClusterIP) that share a backend: two SNAT ports, and each reply gets its own
    frontend back."""
    to_nodeport = node0.from_netdev(pk.tcp(CLIENT, 40000, NODE0, NODEPORT, pk.SYN)).pkt
    to_clusterip = node0.from_netdev(pk.tcp(CLIENT, 40000, "10.106.91.98", 80, pk.SYN)).pkt
    assert (to_nodeport.daddr, to_clusterip.daddr) == (BACKEND, BACKEND)
    assert to_nodeport.sport != to_clusterip.sport
    for port, frontend in ((to_nodeport.sport, (NODE0, NODEPORT)), (to_clusterip.sport, ("10.106.91.98", 80))):
        reply = node0.from_netdev(pk.tcp(BACKEND, BACKEND_PORT, NODE0, port, pk.SYN | pk.ACK)).pkt
        assert reply.flow == (*frontend, CLIENT, 40000)
        assert reply.checksums_ok()


def test_a_tuple_reconnecting_after_the_backend_closed_takes_its_port_again(node0):
    """The client reconnects on the same tuple after the backend closed first: the same
    connection tuple passes the backend's TIME_WAIT (its timestamps run on the old
    connection's clock), so the new flow takes the old SNAT port at once, from the start
    of a fresh flow's state. (The client's port is outside the SNAT range.)"""
    service, old_port = _established(node0, client_port=10000)
    _close(node0, service, old_port, first="backend")
    run = node0.from_netdev(pk.tcp(*service, pk.SYN))
    assert run.retval == TC_ACT_REDIRECT and run.pkt.sport == old_port
    assert not node0.ct(service, "CT_SERVICE")["flags"] & (FLAGS["CT_CLOSING"] | FLAGS["CT_FIN_BACKEND"])
    back = node0.from_netdev(pk.tcp(BACKEND, BACKEND_PORT, NODE0, old_port, pk.SYN | pk.ACK)).pkt
    assert back.flow == (NODE0, NODEPORT, CLIENT, 10000)


# ================================================================ 11. flood resistance

HALF_OPEN = SPECS / "half-open.yaml"  # capacity: flows 64, halfOpenFlows 8


@pytest.mark.parametrize("node", ["node0", "node1"])
def test_flow_is_half_open_until_established_then_moves_to_the_main_table(datapath, node):
    dp = datapath(HALF_OPEN, node)
    service = (CLIENT, 40000, dp.address, NODEPORT)
    dp.from_netdev(pk.tcp(*service, pk.SYN))
    snat = dp.ct(service, "CT_SERVICE")["snat_port"]
    out = _out_flow(dp, snat)
    assert dp.ct_table(service, "CT_SERVICE") == dp.ct_table(out, "CT_OUT") == "ct_half_v4"
    _reply(dp, snat, pk.SYN | pk.ACK)
    assert dp.ct_table(out, "CT_OUT") == "ct_half_v4"
    run = dp.from_netdev(pk.tcp(*service, pk.ACK, b"request"))
    assert run.pkt.daddr == BACKEND and run.pkt.checksums_ok()
    assert dp.ct_table(service, "CT_SERVICE") == dp.ct_table(out, "CT_OUT") == "ct_v4"
    assert dp.entries("ct_half_v4") == {}
    assert dp.ct(service, "CT_SERVICE")["flags"] & FLAGS["CT_ESTABLISHED"]
    assert dp.ct(out, "CT_OUT")["flags"] & FLAGS["CT_ESTABLISHED"]
    answer = _reply(dp, snat, pk.PSH | pk.ACK, b"answer")
    assert answer.pkt.flow == (dp.address, NODEPORT, CLIENT, 40000) and answer.pkt.checksums_ok()


def test_an_entry_left_behind_in_the_half_open_table_joins_its_admitted_partner(datapath):
    """An established flow's forward entry found in ct_half_v4, with its partner in ct_v4
    and an older copy of that partner left in ct_half_v4 too: the entry moves to ct_v4,
    the partner there is kept as it is (not overwritten by the older copy), and both copies
    leave ct_half_v4."""
    dp = datapath(HALF_OPEN, "node0")
    service, snat = _established(dp)
    out = _out_flow(dp, snat)
    forward, partner = tuple_key(service, "CT_SERVICE"), tuple_key(out, "CT_OUT")
    table, half = dp.maps["ct_v4"], dp.maps["ct_half_v4"]
    kept = table.lookup(partner)
    older = layout.CT_ENTRY.unpack(kept)
    half.update(partner, layout.CT_ENTRY.pack(**{**older, "flags": older["flags"] & ~FLAGS["CT_ESTABLISHED"],
                                                  "ack_mark": 12345}))
    half.update(forward, table.lookup(forward))
    table.delete(forward)
    entry = layout.CT_ENTRY.unpack(half.lookup(forward))
    half.update(forward, layout.CT_ENTRY.pack(**{**entry, "expires": entry["expires"] - 100}))  # (so it changes)
    run = dp.from_netdev(pk.tcp(*service, pk.ACK, b"again"))
    assert run.pkt.daddr == BACKEND and run.pkt.checksums_ok()
    assert dp.ct_table(service, "CT_SERVICE") == "ct_v4" and dp.entries("ct_half_v4") == {}
    assert layout.CT_ENTRY.unpack(table.lookup(partner))["ack_mark"] == older["ack_mark"]
    assert layout.CT_ENTRY.unpack(table.lookup(partner))["flags"] & FLAGS["CT_ESTABLISHED"]


def _opening(dp: Datapath) -> tuple[tuple[str, int, str, int], int, bytes]:
    """A flow half-open after its SYN and the backend's SYN-ACK, the client's ACK to come:
    (the service tuple, the SNAT port, the key of its CT_OUT entry)."""
    service = (CLIENT, 40000, dp.address, NODEPORT)
    dp.from_netdev(pk.tcp(*service, pk.SYN))
    snat = dp.ct(service, "CT_SERVICE")["snat_port"]
    _reply(dp, snat, pk.SYN | pk.ACK)
    return service, snat, tuple_key(_out_flow(dp, snat), "CT_OUT")


def test_a_flow_whose_reply_entry_the_half_open_table_lost_gets_it_back_when_established(datapath):
    """A SYN flood churns ct_half_v4 between a flow's SYN-ACK and its ACK, and evicts the
    flow's CT_OUT entry: the client's ACK admits the flow with that entry made again in
    ct_v4 from the forward one, so the backend's answer is still translated back (not
    left to the node's stack, which would reset the backend)."""
    dp = datapath(HALF_OPEN, "node0")
    service, snat, out = _opening(dp)
    half_out = layout.CT_ENTRY.unpack(dp.maps["ct_half_v4"].lookup(out))
    dp.maps["ct_half_v4"].delete(out)  # (evicted)
    dp.maps["snat_v4"].delete(tuple_key((BACKEND, BACKEND_PORT, NODE0, snat), "NAT_IN"))  # (its claim too)
    _not_checked_soon(dp, tuple_key(service, "CT_SERVICE"))
    run = dp.from_netdev(pk.tcp(*service, pk.ACK, b"request"))
    assert run.pkt.flow == (NODE0, snat, BACKEND, BACKEND_PORT) and run.pkt.checksums_ok()
    assert dp.ct_table(service, "CT_SERVICE") == dp.ct_table(_out_flow(dp, snat), "CT_OUT") == "ct_v4"
    assert dp.entries("ct_half_v4") == {}
    made = layout.CT_ENTRY.unpack(dp.maps["ct_v4"].lookup(out))
    for field in ("xl_saddr", "xl_sport", "xl_daddr", "xl_dport", "nat_cookie", "backend_id", "rev_nat_id"):
        assert made[field] == half_out[field], field
    assert made["flags"] & FLAGS["CT_ESTABLISHED"]
    assert dp.nat((BACKEND, BACKEND_PORT, NODE0, snat), "NAT_IN") == (CLIENT, 40000)  # (claimed again)
    answer = _reply(dp, snat, pk.PSH | pk.ACK, b"answer")
    assert answer.retval == TC_ACT_REDIRECT
    assert answer.pkt.flow == (NODE0, NODEPORT, CLIENT, 40000) and answer.pkt.checksums_ok()


def _not_checked_soon(dp: Datapath, key: bytes) -> None:
    """The half-open entry at key due for its once-a-second check only in a while (so that
    its check's repair does not run first, however slow the test)."""
    entry = layout.CT_ENTRY.unpack(dp.maps["ct_half_v4"].lookup(key))
    dp.maps["ct_half_v4"].update(key, layout.CT_ENTRY.pack(**{**entry, "checked": layout.datapath_now() + 30}))


def _take_port(dp: Datapath, snat: int) -> bytes:
    """The NAT_IN claim of node0:snat towards the backend made another client's (another
    cookie): what it holds now."""
    key = tuple_key((BACKEND, BACKEND_PORT, NODE0, snat), "NAT_IN")
    claim = layout.NAT_ENTRY.unpack(dp.maps["snat_v4"].lookup(key))
    dp.maps["snat_v4"].update(key, layout.NAT_ENTRY.pack(**{**claim, "addr": "172.26.50.199", "port": 50000,
                                                           "cookie": claim["cookie"] ^ 0x5a5a}))
    return dp.maps["snat_v4"].lookup(key)


def test_a_flow_whose_port_another_flow_took_is_not_admitted_into_that_flow(datapath):
    """Between a flow's SYN-ACK and its ACK, its CT_OUT entry was evicted and its SNAT port
    given to another flow, whose entry holds that key now: the client's ACK is not
    delivered into the other flow's tuple towards the backend, nor is the other flow's
    entry touched; it goes as a new flow, on another port (the backend resets it)."""
    dp = datapath(HALF_OPEN, "node0")
    service, snat, out = _opening(dp)
    theirs = layout.CT_ENTRY.unpack(dp.maps["ct_half_v4"].lookup(out))
    theirs = layout.CT_ENTRY.pack(**{**theirs, "nat_cookie": theirs["nat_cookie"] ^ 0x5a5a,
                                     "xl_daddr": "172.26.50.199"})  # (another client's)
    dp.maps["ct_half_v4"].update(out, theirs)
    claim = _take_port(dp, snat)
    _not_checked_soon(dp, tuple_key(service, "CT_SERVICE"))
    run = dp.from_netdev(pk.tcp(*service, pk.ACK, b"request"))
    assert run.pkt.daddr == BACKEND and run.pkt.sport != snat
    assert dp.maps["ct_half_v4"].lookup(out) == theirs and dp.maps["ct_v4"].lookup(out) is None
    assert dp.maps["snat_v4"].lookup(tuple_key((BACKEND, BACKEND_PORT, NODE0, snat), "NAT_IN")) == claim
    assert dp.ct_table(service, "CT_SERVICE") == "ct_half_v4"
    assert dp.ct(service, "CT_SERVICE")["flags"] & FLAGS["CT_MIDSTREAM"]
    assert dp.ct(service, "CT_SERVICE")["snat_port"] == run.pkt.sport
    # and so its next segment
    assert dp.from_netdev(pk.tcp(*service, pk.ACK, b"more")).pkt.sport == run.pkt.sport


def test_a_flow_not_admitted_for_another_flows_key_leaves_no_entry_behind(datapath):
    """As above, but the new flow the ACK would be cannot be made (the frontend has no
    backend left for new flows): the flow's half-open entry, which the ACK found and made
    established, goes too, so that its next segment (in the same second, with nothing of
    its entry changing) does not take the fast path into the other flow's tuple."""
    dp = datapath(HALF_OPEN, "node0")
    service, snat, out = _opening(dp)
    theirs = layout.CT_ENTRY.unpack(dp.maps["ct_half_v4"].lookup(out))
    dp.maps["ct_half_v4"].update(out, layout.CT_ENTRY.pack(**{**theirs, "nat_cookie": theirs["nat_cookie"] ^ 0x5a5a}))
    _take_port(dp, snat)
    _not_checked_soon(dp, tuple_key(service, "CT_SERVICE"))
    frontend = layout.SVC_KEY.pack(addr=NODE0, port=NODEPORT, proto=TCP, slot=0)
    value = layout.SVC_VALUE.unpack(dp.maps["svc_v4"].lookup(frontend))
    dp.maps["svc_v4"].update(frontend, layout.SVC_VALUE.pack(**{**value, "count": 0}))
    for _ in range(2):
        run = dp.from_netdev(pk.tcp(*service, pk.ACK, b"request"))
        assert not (run.retval == TC_ACT_REDIRECT and run.pkt.daddr == BACKEND)
    assert dp.ct_table(service, "CT_SERVICE") is None and dp.maps["ct_v4"].lookup(out) is None


def test_a_flow_whose_port_another_flow_claimed_while_both_reply_entries_went_is_not_admitted(datapath):
    """A flood evicted a flow's CT_OUT entry and its SNAT claim, another flow claimed the port
    and its CT_OUT entry went too: the client's ACK does not make the reply entry again (the
    other flow's replies would come to this client), and goes as a new flow."""
    dp = datapath(HALF_OPEN, "node0")
    service, snat, out = _opening(dp)
    dp.maps["ct_half_v4"].delete(out)
    claim = _take_port(dp, snat)
    _not_checked_soon(dp, tuple_key(service, "CT_SERVICE"))
    run = dp.from_netdev(pk.tcp(*service, pk.ACK, b"request"))
    assert run.pkt.daddr == BACKEND and run.pkt.sport != snat
    assert dp.maps["ct_v4"].lookup(out) is None and dp.maps["ct_half_v4"].lookup(out) is None
    assert dp.maps["snat_v4"].lookup(tuple_key((BACKEND, BACKEND_PORT, NODE0, snat), "NAT_IN")) == claim
    assert dp.ct(service, "CT_SERVICE")["flags"] & FLAGS["CT_MIDSTREAM"]


def test_a_flow_without_snat_whose_tuple_another_flow_holds_is_reset(datapath):
    """A flow to a local backend (no SNAT: its tuple towards the backend is the client's)
    whose CT_OUT entry was evicted and that key taken by another flow (another backend id:
    the backend removed and added again) is not admitted: the client gets a reset, and the
    other flow's entry stays as it is."""
    dp = datapath(HALF_OPEN, "node1")
    service = (CLIENT, 40000, dp.address, NODEPORT)
    dp.from_netdev(pk.tcp(*service, pk.SYN))
    _reply(dp, 0, pk.SYN | pk.ACK)
    out = tuple_key(_out_flow(dp, 0), "CT_OUT")
    theirs = layout.CT_ENTRY.unpack(dp.maps["ct_half_v4"].lookup(out))
    theirs = layout.CT_ENTRY.pack(**{**theirs, "backend_id": theirs["backend_id"] + 1})
    dp.maps["ct_half_v4"].update(out, theirs)
    _not_checked_soon(dp, tuple_key(service, "CT_SERVICE"))
    run = dp.from_netdev(pk.tcp(*service, pk.ACK, b"request", seq=7, ack=7777))
    assert run.pkt.flow == (dp.address, NODEPORT, CLIENT, 40000) and run.pkt.tcp_flags == pk.RST
    assert dp.maps["ct_half_v4"].lookup(out) == theirs and dp.maps["ct_v4"].lookup(out) is None
    assert dp.ct_table(service, "CT_SERVICE") is None


def _fill_ct_v4(dp: Datapath, expires: int, leave: int = 0) -> list[bytes]:
    """ct_v4 filled up with other flows' entries (up to its capacity, but `leave` slots):
    new keys only (a key written again takes no slot: a later fill would leave room)."""
    keys = []
    table = dp.maps["ct_v4"]
    held = dp.entries("ct_v4")
    size = table.info.max_entries - len(held) - leave
    i = 0
    while len(keys) < size:
        key = tuple_key((f"172.29.{i // 250}.{i % 250 + 1}", 50000, NODE0, NODEPORT), "CT_SERVICE")
        i += 1
        if key not in held:
            keys.append(key)
            table.update(key, layout.CT_ENTRY.pack(expires=expires, flags=FLAGS["CT_ESTABLISHED"]),
                         flags=bpf.BPF_NOEXIST)
    assert len(dp.entries("ct_v4")) == table.info.max_entries - leave
    return keys


def test_a_full_established_table_refuses_a_new_flow_and_evicts_none(datapath):
    """ct_v4 never evicts: when it cannot take both entries of a flow being established,
    the packet is a counted drop (CT_FULL) answered with a reset at its ACK, and the
    flow's half-open entries go (neither entry gets in: here one slot was left), for a
    flow of the node itself too (half-open until established, as a client's); every
    established entry stays. A flow already admitted (its partner in ct_v4) is never
    refused. Its collector (once at load, then on its timer) removes dead entries, and the
    next flow gets in."""
    dp = datapath(HALF_OPEN, "node0")
    now = layout.datapath_now()
    live = _established(dp, client_port=41000)
    keys = _fill_ct_v4(dp, now + 1000, leave=1)
    before = dp.entries("ct_v4")
    service = (CLIENT, 42000, NODE0, NODEPORT)
    dp.from_netdev(pk.tcp(*service, pk.SYN))
    snat = dp.ct(service, "CT_SERVICE")["snat_port"]
    _reply(dp, snat, pk.SYN | pk.ACK, client_port=42000)
    run = dp.from_netdev(pk.tcp(*service, pk.ACK, seq=7, ack=7777))
    assert dp.drops("CT_FULL") == 1
    assert run.pkt.flow == (NODE0, NODEPORT, CLIENT, 42000) and run.pkt.tcp_flags == pk.RST
    assert struct.unpack("!I", run.pkt.l4[4:8]) == (7777,) and run.pkt.checksums_ok()
    assert dp.entries("ct_half_v4") == {} and dp.entries("ct_v4") == before
    keys += _fill_ct_v4(dp, now + 1000)  # (the last slot: the node's flow gets a first entry nowhere)
    before = dp.entries("ct_v4")
    own = (NODE0, 20000, "10.106.91.98", 80)  # the node's own flow to a ClusterIP
    assert dp.to_netdev(pk.tcp(*own, pk.SYN)).pkt.flow == (NODE0, 20000, BACKEND, BACKEND_PORT)
    assert dp.ct_table(own, "CT_SERVICE_EGRESS") == "ct_half_v4"
    assert dp.from_netdev(pk.tcp(BACKEND, BACKEND_PORT, NODE0, 20000, pk.SYN | pk.ACK)).pkt.flow == (
        "10.106.91.98", 80, NODE0, 20000)
    run = dp.to_netdev(pk.tcp(*own, pk.ACK))
    assert dp.drops("CT_FULL") == 2 and run.pkt.tcp_flags == pk.RST
    assert run.pkt.flow == ("10.106.91.98", 80, NODE0, 20000)
    assert dp.entries("ct_half_v4") == {} and dp.entries("ct_v4") == before
    assert dp.from_netdev(pk.tcp(*live[0], pk.ACK, b"still here")).pkt.daddr == BACKEND
    # an admitted flow whose forward entry was left in ct_half_v4: kept, not refused
    table = dp.maps["ct_v4"]
    forward = tuple_key(live[0], "CT_SERVICE")
    dp.maps["ct_half_v4"].update(forward, table.lookup(forward))
    table.delete(forward)
    keys += _fill_ct_v4(dp, now + 1000)
    entry = dp.ct(live[0], "CT_SERVICE")  # (its expiry a second old: the packet refreshes it,
    dp.put_ct(live[0], "CT_SERVICE", **{**entry, "expires": entry["expires"] - 1})  # which admits)
    run = dp.from_netdev(pk.tcp(*live[0], pk.ACK, b"again"))
    assert run.pkt.daddr == BACKEND and dp.drops("CT_FULL") == 2
    assert dp.ct_table(live[0], "CT_SERVICE") == "ct_half_v4"
    # The collector: a dead entry goes at once, but a SNATed flow's CT_OUT entry whose
    # backend may hold TIME_WAIT (here: expired without a close), which keeps its port
    # resting for SNAT_REUSE_GRACE, unless the table was 3/4 full at the last sweep.
    grace = dict(TIMEOUTS)["SNAT_REUSE_GRACE"]
    for key in keys[:6]:
        dp.maps["ct_v4"].update(key, layout.CT_ENTRY.pack(expires=now - grace - 5))
    dp.maps["ct_v4"].update(keys[6], layout.CT_ENTRY.pack(expires=now - 5, flags=FLAGS["CT_ESTABLISHED"]))
    closed = FLAGS["CT_SNAT"] | FLAGS["CT_ESTABLISHED"] | FLAGS["CT_FIN_CLIENT"] | FLAGS["CT_FIN_BACKEND"] | \
        FLAGS["CT_CLOSING"] | FLAGS["CT_BACKEND_DONE"]  # the client closed first, its final ACK seen
    resting = FLAGS["CT_SNAT"] | FLAGS["CT_ESTABLISHED"]
    cases = ((keys[5], resting, now - grace - 5), (keys[7], closed, now - 5), (keys[8], resting, now - 5),
             (keys[9], resting, now - 5))
    for i, (key, flags, expires) in enumerate(cases):
        dp.maps["ct_v4"].delete(key)
        out = tuple_key((NODE0, 33000 + i, BACKEND, BACKEND_PORT), "CT_OUT")
        dp.maps["ct_v4"].update(out, layout.CT_ENTRY.pack(expires=expires, flags=flags, snat_port=33000 + i))
        keys[keys.index(key)] = out
    count = len(dp.entries("ct_v4"))
    arm = dp.obj.program(COLLECTOR_PROGRAM).fd
    assert arm_collector(arm) == 8  # (the first sweep: no count of the table yet)
    assert [dp.maps["ct_v4"].lookup(k) is not None for k in keys[:10]] == [False] * 8 + [True, True]
    assert arm_collector(arm) == 2  # the table was 3/4 full: the rest yields
    assert len(dp.entries("ct_v4")) == count - 10
    _established(dp, client_port=42001)
    assert dp.ct_table((CLIENT, 42001, NODE0, NODEPORT), "CT_SERVICE") == "ct_v4"


def test_syn_flood_larger_than_the_half_open_table_leaves_established_flows(datapath):
    """Established flows live in ct_v4; half-open ones (a spoofed SYN flood) in ct_half_v4,
    which is all a flood larger than it evicts."""
    dp = datapath(HALF_OPEN, "node0")
    established = [_established(dp, client_port=41000 + i) for i in range(4)]
    before = {s: dp.ct(s, "CT_SERVICE") for s, _ in established}
    for i in range(200):  # 25 times the half-open capacity
        dp.from_netdev(pk.tcp(f"172.28.{i // 250}.{i % 250 + 1}", 20000 + i, NODE0, NODEPORT, pk.SYN))
    assert len(dp.entries("ct_half_v4")) <= 2 * 8
    assert len(dp.entries("ct_v4")) == 2 * len(established)
    for service, snat in established:
        assert dp.ct(service, "CT_SERVICE") == before[service]
        run = dp.from_netdev(pk.tcp(*service, pk.ACK, b"still here"))
        assert run.retval == TC_ACT_REDIRECT and run.pkt.flow == (NODE0, snat, BACKEND, BACKEND_PORT)
        back = _reply(dp, snat, pk.ACK, b"answer", client_port=service[1])
        assert back.pkt.flow == (NODE0, NODEPORT, CLIENT, service[1])
    assert not any(dp.all_drops().values())


# ================================================================ 9. kube-proxy's service semantics

SEMANTICS = SPECS / "semantics.yaml"
EMPTY_TCP, EMPTY_UDP, STICKY, LOCAL, TERMINATING = 30700, 30701, 30710, 30720, 30730
LOCAL_LB = "198.51.100.9"


def _icmp(frame: bytes) -> tuple[bytes, bytes]:
    """The IPv4 header and the ICMP message of an ICMP frame (checksums checked)."""
    ip = frame[14:]
    assert ip[9] == pk.IPPROTO_ICMP and (ip[0] & 0x0F) == 5
    tot_len = struct.unpack("!H", ip[2:4])[0]
    assert len(frame) == 14 + tot_len
    assert pk.csum(ip[:20]) == 0 and pk.csum(ip[20:tot_len]) == 0, "checksums"
    return ip[:20], ip[20:tot_len]


def test_syn_to_a_service_without_endpoints_gets_a_reset(datapath):
    dp = datapath(SEMANTICS, "node0")
    run = dp.from_netdev(pk.tcp(CLIENT, 40000, NODE0, EMPTY_TCP, pk.SYN, seq=7000))
    assert run.retval == TC_ACT_REDIRECT  # back out of the interface it came in by
    p = run.pkt
    assert p.flow == (NODE0, EMPTY_TCP, CLIENT, 40000) and p.checksums_ok()
    assert p.tcp_flags == pk.RST | pk.ACK
    assert struct.unpack("!II", p.l4[4:12]) == (0, 7001)  # seq 0, ack = its seq + 1 (the SYN)
    assert (run.frame[0:6], run.frame[6:12]) == (CLIENT_MAC, NODE_MAC)
    assert len(run.frame) == 14 + 40 and dp.drops("REJECTED") == 1
    assert dp.entries("ct_half_v4") == {} and dp.entries("ct_v4") == {}  # no state for it


def test_a_segment_with_ack_gets_a_reset_at_its_ack_and_a_reset_gets_nothing(datapath):
    dp = datapath(SEMANTICS, "node0")
    run = dp.from_netdev(pk.tcp(CLIENT, 40001, NODE0, EMPTY_TCP, pk.PSH | pk.ACK, b"x" * 100, seq=5, ack=9999))
    p = run.pkt
    assert p.tcp_flags == pk.RST and struct.unpack("!I", p.l4[4:8]) == (9999,) and p.checksums_ok()
    assert pk.payload_of(p) == b"" and len(run.frame) == 14 + 40
    run = dp.from_netdev(pk.tcp(CLIENT, 40001, NODE0, EMPTY_TCP, pk.RST, seq=5))
    assert run.retval == TC_ACT_SHOT and dp.drops("REJECTED") == 2


def test_udp_to_a_service_without_endpoints_gets_port_unreachable(datapath):
    dp = datapath(SEMANTICS, "node0")
    original = pk.udp(CLIENT, 5000, NODE0, EMPTY_UDP, b"<13>hello" * 20)
    run = dp.from_netdev(original)
    assert run.retval == TC_ACT_REDIRECT
    ip, icmp = _icmp(run.frame)
    assert (ip[12:16], ip[16:20]) == (socket.inet_aton(NODE0), socket.inet_aton(CLIENT))
    assert icmp[:2] == bytes((3, 3))  # destination unreachable, port unreachable
    assert icmp[8:] == original[14:14 + 28]  # the datagram's IPv4 header and first 8 bytes
    # from the node itself (to_netdev): the answer comes back in to it
    run = dp.to_netdev(pk.udp(NODE0, 5001, "10.106.1.1", 514, b"x", ))
    assert run.retval == TC_ACT_REDIRECT
    ip, icmp = _icmp(run.frame)
    assert (ip[12:16], ip[16:20]) == (socket.inet_aton("10.106.1.1"), socket.inet_aton(NODE0))


def test_client_ip_affinity_keeps_a_client_on_one_backend(datapath):
    dp = datapath(SEMANTICS, "node0")
    seen = Counter(dp.from_netdev(syn(41000 + i, dport=STICKY)).pkt.daddr for i in range(20))
    assert len(seen) == 1, seen
    others = Counter(dp.from_netdev(syn(41000 + i, dport=STICKY, src=f"172.26.51.{i + 1}")).pkt.daddr
                     for i in range(40))
    assert len(others) > 1, others  # other clients spread
    [entry] = [v for k, v in dp.entries("affinity_v4").items() if layout.AFFINITY_KEY.unpack(k)["client"] ==
               __import__("ipaddress").IPv4Address(CLIENT)]
    e = layout.AFFINITY_ENTRY.unpack(entry)
    assert dp.backend(e["backend_id"])[0] == next(iter(seen)) and abs(e["last_used"] - now_sec()) <= 1


def test_client_ip_affinity_ends_after_its_timeout(datapath):
    dp = datapath(SEMANTICS, "node0")
    dp.from_netdev(syn(42000, dport=STICKY))
    [(key, raw)] = dp.entries("affinity_v4").items()
    e = layout.AFFINITY_ENTRY.unpack(raw)
    # the client's endpoint, last used 601 s ago, with an id no backend has: not kept
    dp.maps["affinity_v4"].update(key, layout.AFFINITY_ENTRY.pack(backend_id=999, last_used=now_sec() - 601))
    run = dp.from_netdev(syn(42001, dport=STICKY))
    assert run.retval == TC_ACT_REDIRECT
    e = layout.AFFINITY_ENTRY.unpack(dp.maps["affinity_v4"].lookup(key))
    assert e["backend_id"] != 999 and abs(e["last_used"] - now_sec()) <= 1
    # within the timeout, an id that is not one of the frontend's backends is not followed either
    dp.maps["affinity_v4"].update(key, layout.AFFINITY_ENTRY.pack(backend_id=999, last_used=now_sec()))
    assert dp.from_netdev(syn(42002, dport=STICKY)).retval == TC_ACT_REDIRECT


def test_external_traffic_policy_local(datapath):
    dp0 = datapath(SEMANTICS, "node0")  # no local endpoint: a counted drop
    assert dp0.from_netdev(syn(43000, dport=LOCAL)).retval == TC_ACT_SHOT
    assert dp0.drops("NO_LOCAL_BACKEND") == 1 and dp0.drops("REJECTED") == 0
    dp1 = datapath(SEMANTICS, "node1")  # its local endpoint, without SNAT
    run = dp1.from_netdev(syn(43001, dst=NODE1, dport=LOCAL))
    assert run.retval == TC_ACT_OK and run.pkt.flow == (CLIENT, 43001, BACKEND, 80)


def test_load_balancer_source_ranges(datapath):
    dp = datapath(SEMANTICS, "node1")
    run = dp.from_netdev(syn(44000, dst=LOCAL_LB, dport=80))
    assert run.retval == TC_ACT_OK and run.pkt.flow == (CLIENT, 44000, BACKEND, 80)
    assert dp.from_netdev(syn(44001, dst=LOCAL_LB, dport=80, src=OTHER_CLIENT)).retval == TC_ACT_SHOT
    assert dp.drops("SOURCE_RANGE") == 1
    # the service's NodePort admits every client
    assert dp.from_netdev(syn(44002, dst=NODE1, dport=LOCAL, src=OTHER_CLIENT)).retval == TC_ACT_OK


def test_a_terminating_endpoint_takes_no_new_flow_but_keeps_its_own(datapath):
    dp = datapath(SEMANTICS, "node1")
    assert {dp.from_netdev(syn(45000 + i, dst=NODE1, dport=TERMINATING)).pkt.daddr for i in range(10)} == {
        "10.0.1.77"}
    # a flow already on the terminating endpoint goes on with it
    flow = (CLIENT, 45100, NODE1, TERMINATING)
    [terminating] = [i for i in range(1, 100) if dp.backend(i) == ("10.0.1.76", 80)]
    dp.from_netdev(pk.tcp(*flow, pk.SYN))
    entry = dp.ct(flow, "CT_SERVICE")
    dp.put_ct(flow, "CT_SERVICE", **{**entry, "backend_id": terminating, "xl_daddr": "10.0.1.76", "checked": 0})
    run = dp.from_netdev(pk.tcp(*flow, pk.ACK, b"more"))
    assert run.pkt.daddr == "10.0.1.76" and run.pkt.checksums_ok()


def test_a_flow_of_the_node_to_its_own_backend_is_a_hairpin(node1, netns):
    """node1's own flow to a ClusterIP whose backend runs on node1: SNATed to the hairpin
    address and sent to the pod's interface; the pod's reply, leaving through eth0 (the
    node routes the hairpin address there), is translated back and sent in again."""
    netns.ip("link", "add", "pod0", "type", "veth", "peer", "name", "pod0p")
    netns.ip("link", "set", "pod0p", "up")
    netns.ip("link", "set", "pod0", "up")
    netns.ip("route", "replace", f"{BACKEND}/32", "dev", "pod0")
    pod_mac = bytes.fromhex("02000000bb01")
    netns.ip("neigh", "replace", BACKEND, "lladdr", pod_mac.hex(":"), "dev", "pod0", "nud", "permanent")
    cluster_ip = "10.106.91.98"
    run = node1.to_netdev(pk.tcp(NODE1, 40000, cluster_ip, 80, pk.SYN))
    assert run.retval == TC_ACT_REDIRECT and run.frame[0:6] == pod_mac
    p = run.pkt
    assert (p.saddr, p.daddr, p.dport) == (layout.HAIRPIN_ADDRESS, BACKEND, BACKEND_PORT) and p.checksums_ok()
    assert p.sport in SNAT_RANGE
    back = node1.to_netdev(pk.tcp(BACKEND, BACKEND_PORT, layout.HAIRPIN_ADDRESS, p.sport, pk.SYN | pk.ACK))
    assert back.retval == TC_ACT_REDIRECT  # (in again: BPF_F_INGRESS)
    assert back.pkt.flow == (cluster_ip, 80, NODE1, 40000) and back.pkt.checksums_ok()
    assert back.frame[0:6] == back.frame[6:12]  # to the interface's own address
    run = node1.to_netdev(pk.tcp(NODE1, 40000, cluster_ip, 80, pk.ACK, b"request"))
    assert run.pkt.flow == (layout.HAIRPIN_ADDRESS, p.sport, BACKEND, BACKEND_PORT)
    assert not any(node1.all_drops().values())


def test_an_evicted_claim_of_a_live_flow_is_given_back_not_taken(node0):
    """The SNAT table is an LRU map: an idle flow's claim (NAT_IN) may be evicted while its
    conntrack entries live. A new flow trying that port finds the flow and gives it its
    claim back instead of taking its tuple."""
    occupant = (OTHER_CLIENT, 50000)
    node0.put_ct((NODE0, 40000, BACKEND, BACKEND_PORT), "CT_OUT", expires=now_sec() + 100, backend_id=1,
                 rev_nat_id=node0.frontend_id(), flags=FLAGS["CT_SNAT"] | FLAGS["CT_ESTABLISHED"],
                 snat_port=40000, nat_cookie=0x1234567, xl_saddr=NODE0, xl_sport=NODEPORT,
                 xl_daddr=occupant[0], xl_dport=occupant[1])
    assert node0.nat((BACKEND, BACKEND_PORT, NODE0, 40000), "NAT_IN") is None
    run = node0.from_netdev(syn(40000))
    assert run.retval == TC_ACT_REDIRECT and run.pkt.sport != 40000
    assert node0.nat((BACKEND, BACKEND_PORT, NODE0, 40000), "NAT_IN") == occupant
    raw = node0.maps["snat_v4"].lookup(tuple_key((BACKEND, BACKEND_PORT, NODE0, 40000), "NAT_IN"))
    assert layout.NAT_ENTRY.unpack(raw)["cookie"] == 0x1234567
    assert node0.ct((NODE0, 40000, BACKEND, BACKEND_PORT), "CT_OUT")["xl_daddr"] == __import__("ipaddress").IPv4Address(
        OTHER_CLIENT)  # the occupant's reply entry is untouched


def test_udp_flows_have_a_table_of_their_own(node0):
    node0.from_netdev(pk.udp(CLIENT, 5353, NODE0, NODEPORT, b"q"))
    node0.from_netdev(syn(41000))
    assert node0.ct_table((CLIENT, 5353, NODE0, NODEPORT), "CT_SERVICE", UDP) == "ct_udp_v4"
    assert node0.ct_table((CLIENT, 41000, NODE0, NODEPORT), "CT_SERVICE") == "ct_half_v4"
    assert all(k[12] == TCP for k in node0.entries("ct_v4")) and all(k[12] == UDP for k in node0.entries("ct_udp_v4"))


def test_an_evicted_reply_entry_is_made_again_by_the_clients_next_packet(node0):
    service, snat = _established(node0)
    out = (NODE0, snat, BACKEND, BACKEND_PORT)
    before = node0.ct(out, "CT_OUT")
    node0.maps["ct_v4"].delete(tuple_key(out, "CT_OUT"))  # as an LRU map evicts one entry of an idle flow
    entry = node0.ct(service, "CT_SERVICE")
    node0.put_ct(service, "CT_SERVICE", **{**entry, "checked": now_sec() - 5})  # idle for a while
    run = node0.from_netdev(pk.tcp(*service, pk.ACK, b"again"))
    assert run.pkt.flow == (NODE0, snat, BACKEND, BACKEND_PORT)
    again = node0.ct(out, "CT_OUT")
    assert again is not None and {k: again[k] for k in ("backend_id", "rev_nat_id", "nat_cookie", "xl_daddr",
                                                      "xl_dport", "xl_saddr", "xl_sport")} == {
        k: before[k] for k in ("backend_id", "rev_nat_id", "nat_cookie", "xl_daddr", "xl_dport", "xl_saddr", "xl_sport")}
    assert _reply(node0, snat, pk.ACK, b"answer").pkt.flow == (NODE0, NODEPORT, CLIENT, 40000)


def test_a_flow_whose_tuple_another_flow_took_is_not_delivered_into_it(node0):
    service, snat = _established(node0)
    out = (NODE0, snat, BACKEND, BACKEND_PORT)
    other = node0.ct(out, "CT_OUT")
    node0.put_ct(out, "CT_OUT", **{**other, "nat_cookie": other["nat_cookie"] ^ 0xFF, "xl_dport": 50001})
    entry = node0.ct(service, "CT_SERVICE")
    node0.put_ct(service, "CT_SERVICE", **{**entry, "checked": now_sec() - 5})
    run = node0.from_netdev(pk.tcp(*service, pk.ACK, b"mine"))
    assert run.pkt.sport != snat  # a new flow (a port of its own): never the other flow's tuple
    assert node0.ct(out, "CT_OUT")["xl_dport"] == 50001


def test_a_closed_flows_late_packet_is_not_delivered_into_the_flow_that_took_its_port(node0):
    """The client closed first and the backend is done: the port is free a few milliseconds
    later, and another client's flow claims it. A late packet of the closed flow (its final
    ACK again) does not go through that port into the other flow's tuple, even within the
    second before its entry's next check."""
    service, snat = _established(node0)
    _close(node0, service, snat, first="client")
    claim = _take_port(node0, snat)
    run = node0.from_netdev(pk.tcp(*service, pk.ACK))
    assert not (run.retval == TC_ACT_REDIRECT and run.pkt.sport == snat)
    assert node0.maps["snat_v4"].lookup(tuple_key((BACKEND, BACKEND_PORT, NODE0, snat), "NAT_IN")) == claim


def test_client_ip_affinity_holds_under_external_traffic_policy_local(datapath):
    dp = datapath(SEMANTICS, "node1")
    seen = Counter(dp.from_netdev(syn(46000 + i, dst=NODE1, dport=30740)).pkt.daddr for i in range(20))
    assert len(seen) == 1 and next(iter(seen)) != "10.0.0.9", seen  # one local endpoint, kept
    # an affinity learnt on the ClusterIP (every endpoint) to the remote one is not followed by the
    # Local NodePort: that endpoint takes none of its flows
    [(key, raw)] = dp.entries("affinity_v4").items()
    [remote] = [i for i in range(1, 100) if dp.backend(i) == ("10.0.0.9", 80)]
    dp.maps["affinity_v4"].update(key, layout.AFFINITY_ENTRY.pack(backend_id=remote, last_used=now_sec()))
    run = dp.from_netdev(syn(46100, dst=NODE1, dport=30740))
    assert run.retval == TC_ACT_OK and run.pkt.daddr != "10.0.0.9"


# ================================================================ 10. TCP timestamps of SNATed flows


def _ts_of(p: pk.Packet) -> tuple[int, int]:
    opts = p.l4[20:(p.l4[12] >> 4) * 4]
    i = opts.index(b"\x08\x0a")
    return struct.unpack("!II", opts[i + 2:i + 10])


def test_a_snated_flows_timestamps_are_the_nodes_clock_both_ways(node0):
    """The client's TSval is moved onto the node's clock (ms) towards the backend, and the
    backend's TSecr back onto the client's: a later flow on the same SNAT port then carries
    newer timestamps than this one, whoever its client is (the backend's TIME_WAIT passes it)."""
    service = (CLIENT, 40000, NODE0, NODEPORT)
    now_ms = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1_000_000
    run = node0.from_netdev(pk.tcp_ts(*service, pk.SYN, 5_000_000, 0, syn_layout=True))
    p = run.pkt
    assert run.retval == TC_ACT_REDIRECT and p.checksums_ok()
    tsval, tsecr = _ts_of(p)
    assert abs(tsval - now_ms) < 1000 and tsecr == 0
    delta = (tsval - 5_000_000) % (1 << 32)
    entry = node0.ct(service, "CT_SERVICE")
    assert entry["flags"] & FLAGS["CT_TS_REWRITE"] and entry["ts_delta"] == delta
    snat = p.sport
    back = node0.from_netdev(pk.tcp_ts(BACKEND, BACKEND_PORT, NODE0, snat, pk.SYN | pk.ACK, 777, tsval,
                                     syn_layout=True)).pkt
    assert back.flow == (NODE0, NODEPORT, CLIENT, 40000) and back.checksums_ok()
    assert _ts_of(back) == (777, 5_000_000)  # its echo, as the client sent it
    fwd = node0.from_netdev(pk.tcp_ts(*service, pk.ACK, 5_000_010, 777, b"data")).pkt
    assert _ts_of(fwd) == ((5_000_010 + delta) % (1 << 32), 777) and fwd.checksums_ok()
    assert fwd.l4[(fwd.l4[12] >> 4) * 4:] == b"data"
    # a segment without the option passes as it is
    plain = node0.from_netdev(pk.tcp(*service, pk.ACK, b"x")).pkt
    assert plain.checksums_ok()


def _closed_by_the_backend_with_timestamps(node0: Datapath) -> tuple[int, int]:
    """A flow whose SYN had timestamps (so its own are the node's clock), closed by the
    backend first (which holds TIME_WAIT), settled: (its SNAT port, its last TSval)."""
    service = (CLIENT, 40000, NODE0, NODEPORT)
    p = node0.from_netdev(pk.tcp_ts(*service, pk.SYN, 1, 0, syn_layout=True)).pkt
    snat = p.sport
    tsval, _ = _ts_of(p)
    node0.from_netdev(pk.tcp_ts(BACKEND, BACKEND_PORT, NODE0, snat, pk.SYN | pk.ACK, 9, tsval))
    node0.from_netdev(pk.tcp_ts(*service, pk.ACK, 2, 9))
    node0.from_netdev(pk.tcp_ts(BACKEND, BACKEND_PORT, NODE0, snat, pk.FIN | pk.ACK, 10, tsval))
    node0.from_netdev(pk.tcp_ts(*service, pk.FIN | pk.ACK, 3, 10))  # the backend goes TIME_WAIT
    out = node0.ct((NODE0, snat, BACKEND, BACKEND_PORT), "CT_OUT")
    assert out["flags"] & FLAGS["CT_BACKEND_DONE"] and out["flags"] & FLAGS["CT_BACKEND_CLOSED_FIRST"]
    time.sleep(DONE_TICKS)
    return snat, tsval


def test_a_port_whose_backend_holds_time_wait_is_taken_by_another_client_with_rewritten_timestamps(node0):
    """The backend closed first (it holds TIME_WAIT): with the flow's timestamps on the node's
    clock, another client's new flow may take the port a moment after, not 120 s after."""
    snat, tsval = _closed_by_the_backend_with_timestamps(node0)
    run = node0.from_netdev(pk.tcp_ts(OTHER_CLIENT, snat, NODE0, NODEPORT, pk.SYN, 123, 0, syn_layout=True))
    assert run.pkt.sport == snat
    assert (_ts_of(run.pkt)[0] - tsval) % (1 << 32) < 1 << 31  # newer than the old flow's
    # without timestamps, TIME_WAIT would reject another client's SYN: the port rests
    service2 = (CLIENT, 40001, NODE0, NODEPORT)
    p2 = node0.from_netdev(pk.tcp(*service2, pk.SYN)).pkt
    _reply(node0, p2.sport, pk.SYN | pk.ACK, client_port=40001)
    node0.from_netdev(pk.tcp(*service2, pk.ACK))
    _close(node0, service2, p2.sport, first="backend", final_ack=False)
    time.sleep(DONE_TICKS)
    assert node0.from_netdev(pk.tcp("172.26.50.193", p2.sport, NODE0, NODEPORT, pk.SYN)).pkt.sport != p2.sport


def test_a_first_packet_on_two_cpus_gives_one_mapping(node0):
    """The same first packet twice (a SYN and its copy on another CPU): one SNAT port, one
    claim. And when the second comes while the first is between its claim and its
    conntrack entries (here: those entries removed), it takes the same port under the same
    claim rather than a second one."""
    service = (CLIENT, 40000, NODE0, NODEPORT)
    first = node0.from_netdev(syn(40000)).pkt.sport
    assert node0.from_netdev(syn(40000)).pkt.sport == first
    [(claim_key, claim)] = node0.entries("snat_v4").items()
    for table in ("ct_half_v4", "ct_v4"):
        for key in list(node0.maps[table].keys()):
            node0.maps[table].delete(key)
    assert node0.from_netdev(syn(40000)).pkt.sport == first
    assert node0.entries("snat_v4") == {claim_key: claim}
    cookie = layout.NAT_ENTRY.unpack(claim)["cookie"]
    assert node0.ct(service, "CT_SERVICE")["nat_cookie"] == cookie
    assert node0.ct((NODE0, first, BACKEND, BACKEND_PORT), "CT_OUT")["nat_cookie"] == cookie


def test_a_port_released_by_timestamps_waits_for_a_syn_without_them(node0):
    """The port of a flow on the node's clock whose backend holds TIME_WAIT goes at once to
    another client's SYN with a timestamp (rewritten onto that clock: newer), not to one
    without (TIME_WAIT takes that only if its sequence number happens to lie past the old
    flow's: a 1 s stall for half of them)."""
    snat, _ = _closed_by_the_backend_with_timestamps(node0)
    assert node0.from_netdev(pk.tcp(OTHER_CLIENT, snat, NODE0, NODEPORT, pk.SYN)).pkt.sport != snat
    stamped = pk.tcp_ts("172.26.50.191", snat, NODE0, NODEPORT, pk.SYN, 5, 0, syn_layout=True)
    assert node0.from_netdev(stamped).pkt.sport == snat


def test_a_port_released_by_timestamps_still_waits_for_a_syn_without_them_once_its_entry_is_collected(node0):
    """The collector removes a dead flow's reply entry as soon as no SYN with timestamps
    would trip on the backend's TIME_WAIT: the port's claim then keeps the rest for SYNs
    without (until SNAT_REUSE_GRACE after the flow's end), so a client without timestamps
    still gets another port, and one with them still gets this one."""
    snat, _ = _closed_by_the_backend_with_timestamps(node0)
    out = (NODE0, snat, BACKEND, BACKEND_PORT)
    now = now_sec()
    node0.put_ct(out, "CT_OUT", **{**node0.ct(out, "CT_OUT"), "expires": now - 2})  # its close timeout over
    claim_key = tuple_key((BACKEND, BACKEND_PORT, NODE0, snat), "NAT_IN")
    claim = layout.NAT_ENTRY.unpack(node0.maps["snat_v4"].lookup(claim_key))
    node0.maps["snat_v4"].update(claim_key, layout.NAT_ENTRY.pack(**{**claim, "claimed": now - 30}))
    arm_collector(node0.obj.program(COLLECTOR_PROGRAM).fd)
    assert node0.maps["ct_v4"].lookup(tuple_key(out, "CT_OUT")) is None  # (collected)
    assert node0.from_netdev(pk.tcp(OTHER_CLIENT, snat, NODE0, NODEPORT, pk.SYN)).pkt.sport != snat
    stamped = pk.tcp_ts("172.26.50.191", snat, NODE0, NODEPORT, pk.SYN, 5, 0, syn_layout=True)
    assert node0.from_netdev(stamped).pkt.sport == snat


@pytest.mark.parametrize("proto", [UDP, TCP])
def test_a_flow_whose_forward_entry_was_evicted_comes_back_on_its_port(node0, proto):
    """One flow, one mapping: a flow whose forward entry an LRU map evicted while its reply
    entry lives (an idle UDP flow; a half-open TCP one in a SYN flood; or its first packet
    seen again on another CPU once the first CPU wrote its entries) comes back on its own
    port, under its own claim, not on a second port."""
    service = (CLIENT, 41000, NODE0, NODEPORT)
    first = pk.udp(*service, b"q") if proto == UDP else syn(41000)
    p = node0.from_netdev(first).pkt
    cookie = node0.ct(service, "CT_SERVICE", proto)["nat_cookie"]
    node0.maps[node0.ct_table(service, "CT_SERVICE", proto)].delete(tuple_key(service, "CT_SERVICE", proto))
    again = node0.from_netdev(first).pkt
    assert again.flow == p.flow
    assert node0.ct(service, "CT_SERVICE", proto)["nat_cookie"] == cookie
    assert node0.ct((NODE0, p.sport, p.daddr, p.dport), "CT_OUT", proto)["nat_cookie"] == cookie


def test_a_claim_whose_reply_entry_was_evicted_stays_its_live_flows(node0):
    """The port of a live flow whose reply entry an LRU map evicted (a one-way UDP flow's,
    which no packet looks up) is not another client's while the flow's checks renew its
    claim: else the flow's datagrams, translated with no lookup until its next check,
    would go into the other client's tuple."""
    service = (CLIENT, 41000, NODE0, NODEPORT)
    p = node0.from_netdev(pk.udp(*service, b"1")).pkt
    port, out = p.sport, (NODE0, p.sport, p.daddr, p.dport)
    claim_key = tuple_key((p.daddr, p.dport, NODE0, port), "NAT_IN", UDP)
    claim = layout.NAT_ENTRY.unpack(node0.maps["snat_v4"].lookup(claim_key))
    # the flow began a while ago: its claim made then, its last check as long ago
    node0.maps["snat_v4"].update(claim_key, layout.NAT_ENTRY.pack(**{**claim, "claimed": now_sec() - 30}))
    node0.put_ct(service, "CT_SERVICE", UDP, **{**node0.ct(service, "CT_SERVICE", UDP), "checked": now_sec() - 30})
    assert node0.from_netdev(pk.udp(*service, b"2")).pkt.sport == port  # (its check)
    node0.maps["ct_udp_v4"].delete(tuple_key(out, "CT_OUT", UDP))  # evicted just after
    assert node0.from_netdev(pk.udp(OTHER_CLIENT, port, NODE0, NODEPORT, b"x")).pkt.sport != port
    assert node0.from_netdev(pk.udp(*service, b"3")).pkt.flow == p.flow


def test_a_live_flow_of_the_nodes_own_keeps_its_tuple(node0):
    """A connection of the node's own to a backend (a ClusterIP flow: its reply entry not
    SNATed) from a port of snatPortRange (bound there, or the range not reserved): a
    NodePort client whose own port that is gets another, a new claim or an old one."""
    node_flow = (NODE0, 41000, BACKEND, BACKEND_PORT)
    mine = dict(expires=now_sec() + 100, backend_id=1, rev_nat_id=node0.frontend_id(),
                flags=FLAGS["CT_EGRESS"] | FLAGS["CT_ESTABLISHED"], xl_saddr="10.96.0.10", xl_sport=80,
                xl_daddr=NODE0, xl_dport=41000)
    node0.put_ct(node_flow, "CT_OUT", **mine)
    assert node0.from_netdev(syn(41000)).pkt.sport != 41000
    claim_key = tuple_key((BACKEND, BACKEND_PORT, NODE0, 41000), "NAT_IN")
    raw = node0.maps["snat_v4"].lookup(claim_key)
    if raw is not None:  # (the refused first claim stays: old, it is stale by its own rule)
        old = {**layout.NAT_ENTRY.unpack(raw), "claimed": now_sec() - 30}
        node0.maps["snat_v4"].update(claim_key, layout.NAT_ENTRY.pack(**old))
    assert node0.from_netdev(syn(41000, src=OTHER_CLIENT)).pkt.sport != 41000
    after = node0.ct(node_flow, "CT_OUT")
    assert {k: after[k] for k in mine} == {**mine, "xl_saddr": __import__("ipaddress").IPv4Address("10.96.0.10"),
                                           "xl_daddr": __import__("ipaddress").IPv4Address(NODE0)}


def _in_lockstep_on_two_cpus(prog_fd: int, ctx: bytes, frames: tuple[list[bytes], list[bytes]]) -> None:
    """Runs frames[0][i] on one CPU and frames[1][i] on another at the same moment, for each
    i in turn: two forked processes meeting at a spin barrier in shared memory before each
    pair (a test run stays on its CPU)."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        if os.environ.get("CI"):
            pytest.fail("needs two CPUs (CI: this test must run)", pytrace=False)
        pytest.skip("needs two CPUs")
    shared = mmap.mmap(-1, 16)
    counters = memoryview(shared).cast("Q")
    children = []
    for side in (0, 1):
        pid = os.fork()
        if pid == 0:  # the child: its side's frames, each once the other side is there too
            code = 1
            try:
                os.sched_setaffinity(0, {cpus[side]})
                deadline = time.monotonic() + 120
                for i, frame in enumerate(frames[side]):
                    counters[side] = i + 1
                    spins = 0
                    while counters[1 - side] < i + 1:
                        spins += 1
                        if not spins & 0xFFFF and time.monotonic() > deadline:
                            raise TimeoutError("the other side never came")
                    bpf.prog_test_run(prog_fd, frame, ctx_in=ctx)
                code = 0
            finally:
                counters[side] = 2**64 - 1  # (done or failed: the other side waits for it no more)
                os._exit(code)
        children.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    assert codes == [0, 0], codes


def test_both_fins_on_two_cpus_at_once_close_the_flow(node0):
    """The client's FIN and the backend's FIN of one flow handled at the same moment on
    two CPUs (an RSS NIC puts a flow's two directions on two queues): each sets its bit of
    both entries' state, neither loses the other's, and the flow closes (a lost FIN left
    it half-closed, holding its SNAT port for the established timeout, 6 h)."""
    flows = [_established(node0, client_port=41000 + i) for i in range(3000)]
    fins = ([pk.tcp(*service, pk.FIN | pk.ACK) for service, _ in flows],
            [pk.tcp(BACKEND, BACKEND_PORT, NODE0, snat, pk.FIN | pk.ACK) for _, snat in flows])
    _in_lockstep_on_two_cpus(node0.obj.program("from_netdev").fd, skb_ctx(node0.ifindex), fins)
    both = FLAGS["CT_FIN_CLIENT"] | FLAGS["CT_FIN_BACKEND"]
    late = now_sec() + dict(TIMEOUTS)["CT_CLOSE_TIMEOUT"] + 1
    entries = [entry for service, snat in flows
               for entry in (node0.ct(service, "CT_SERVICE"), node0.ct(_out_flow(node0, snat), "CT_OUT"))]
    lost = [entry for entry in entries if entry["flags"] & both != both]
    assert len(lost) == 0, f"{len(lost)} entries lost a FIN"
    # (closing, and with the closing expiry: one CPU's store of the established one, from
    # the state before the other's FIN, must not land last)
    long_lived = [entry for entry in entries if not entry["flags"] & FLAGS["CT_CLOSING"] or entry["expires"] > late]
    assert long_lived == [], f"{len(long_lived)} entries not closing after both FINs"
    # (and the final ACKs keep it so)
    for service, snat in flows:
        node0.from_netdev(pk.tcp(*service, pk.ACK))
        node0.from_netdev(pk.tcp(BACKEND, BACKEND_PORT, NODE0, snat, pk.ACK))
    late = now_sec() + dict(TIMEOUTS)["CT_CLOSE_TIMEOUT"] + 1
    open_ = [service for service, snat in flows
             for entry in (node0.ct(service, "CT_SERVICE"), node0.ct(_out_flow(node0, snat), "CT_OUT"))
             if not entry["flags"] & FLAGS["CT_CLOSING"] or entry["expires"] > late]
    assert open_ == []
