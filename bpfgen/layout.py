"""The one description of every struct, enum and map the datapath shares with Python.

The generated C header (``bpfgen_layout.h``) is rendered from these objects, and the
loader packs map keys and values with the same objects, so a layout is written once.
Dumps decode live maps from the kernel's BTF, which clang derives from that header.

Byte order: fields of type ``ip4`` and ``port`` hold network byte order (as in the
packet); every other integer is host order.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import struct as _struct
import time
from collections.abc import Callable
from dataclasses import dataclass

# Scalar field types: C type, Python struct code, size (all naturally aligned).
SCALARS: dict[str, tuple[str, str, int]] = {
    "u8": ("__u8", "<B", 1),
    "u16": ("__u16", "<H", 2),
    "u32": ("__u32", "<I", 4),
    "u64": ("__u64", "<Q", 8),
    "ip4": ("bpfgen_ip4_t", "4s", 4),  # IPv4 address, network order (packed bytes)
    "port": ("bpfgen_port_t", ">H", 2),  # L4 port, network order
    "proto": ("bpfgen_proto_t", "<B", 1),  # IP protocol number
    "timer": ("struct bpf_timer", "16s", 16),  # the kernel's timer, opaque (reads as zeros)
    "wq": ("struct bpf_wq", "16s", 16),  # the kernel's BPF work item, opaque (reads as zeros)
}

# The typedefs behind the display types; the BTF decoder keys on these names.
TYPEDEFS = (
    ("bpfgen_ip4_t", "__u32", "IPv4 address in network byte order"),
    ("bpfgen_port_t", "__u16", "L4 port in network byte order"),
    ("bpfgen_proto_t", "__u8", "IP protocol number (6 TCP, 17 UDP)"),
)

PROTOCOLS = {"TCP": 6, "UDP": 17}


# A flow of the node or its pods (leaving through the interface, to_netdev) to a backend on
# the node is SNATed to this address, which the node routes out of the interface (with the
# interface's own MAC as its neighbour): the backend's replies then cross the interface, where
# they are translated back and sent in again (Cilium's IPV4_LOOPBACK plays that part).
HAIRPIN_ADDRESS = "169.254.42.1"

# The datapath's clock is CLOCK_MONOTONIC seconds plus this offset (C: DATAPATH_CLOCK_OFFSET),
# so that "now" is never near 0 and times in the past (now - grace) never wrap, even on a
# freshly booted node.
DATAPATH_CLOCK_OFFSET = 1 << 24


def ip4_str(address: ipaddress.IPv4Address) -> str:
    """str(address), by the C formatter (a large cluster writes 100,000s of addresses)."""
    return socket.inet_ntoa(address.packed)


def datapath_now() -> int:
    """Now on the datapath's clock (bpf_ktime_get_ns: CLOCK_MONOTONIC, plus
    DATAPATH_CLOCK_OFFSET), in the seconds that conntrack's `expires` and SNAT's `claimed`
    hold."""
    return int(time.clock_gettime(time.CLOCK_MONOTONIC)) + DATAPATH_CLOCK_OFFSET


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    doc: str = ""

    @property
    def ctype(self) -> str:
        return SCALARS[self.type][0]

    @property
    def size(self) -> int:
        return SCALARS[self.type][2]

    @property
    def format(self) -> str:
        return SCALARS[self.type][1]


@dataclass(frozen=True)
class Struct:
    """A C struct with explicit padding: implicit padding is rejected, not guessed."""

    name: str
    doc: str
    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        offset = 0
        for f in self.fields:
            if offset % f.size:
                raise ValueError(f"struct {self.name}: field {f.name} at offset {offset} is misaligned")
            offset += f.size
        align = max(f.size for f in self.fields)
        if offset % align:
            raise ValueError(f"struct {self.name}: size {offset} is not a multiple of {align}; add padding")

    @property
    def cname(self) -> str:
        return f"struct {self.name}"

    @property
    def size(self) -> int:
        return sum(f.size for f in self.fields)

    def pack(self, **values: object) -> bytes:
        """Pack field values (missing fields are 0; ip4 accepts str/IPv4Address; port an int)."""
        unknown = set(values) - {f.name for f in self.fields}
        if unknown:
            raise KeyError(f"struct {self.name} has no field {sorted(unknown)[0]}")
        out = bytearray()
        for f in self.fields:
            v = values.get(f.name, 0)
            out += _struct.pack(f.format, ipaddress.IPv4Address(v or 0).packed if f.type == "ip4" else int(v))
        return bytes(out)

    @functools.cached_property
    def packer(self) -> Callable[..., bytes]:
        """A fast pack of positional values in field order: ip4 as 4 packed bytes, port an
        int in host order, every other field an int (for bulk map contents)."""
        codes = {"ip4": "4s", "port": "H"}
        fmt = _struct.Struct("<" + "".join(codes.get(f.type, f.format[1:]) for f in self.fields))
        swapped = [i for i, f in enumerate(self.fields) if f.type == "port"]
        if not swapped:
            return fmt.pack

        def pack(*values: object) -> bytes:
            v = list(values)
            for i in swapped:
                v[i] = ((v[i] & 0xFF) << 8) | (v[i] >> 8)
            return fmt.pack(*v)

        return pack

    def reader(self, *names: str, size: int | None = None) -> _struct.Struct:
        """A struct.Struct that reads only the named fields (named in field order) out of one
        packed value of size bytes (default: the struct's own), the rest skipped: integers
        in host order, ip4 and port fields as their packed (network-order) bytes. With
        iter_unpack, a scan of a big map's values in one pass."""
        wanted = set(names) - {f.name for f in self.fields}
        if wanted:
            raise KeyError(f"struct {self.name} has no field {sorted(wanted)[0]}")
        if list(names) != [f.name for f in self.fields if f.name in names]:
            raise ValueError(f"struct {self.name}: fields {', '.join(names)} are not in the struct's order, or repeat")
        size = self.size if size is None else size
        if size < self.size:
            raise ValueError(f"struct {self.name}: {size} bytes, need {self.size}")
        fmt, offset, at = "<", 0, 0
        for f in self.fields:
            if f.name in names:
                if f.type in ("timer", "wq"):
                    raise ValueError(f"struct {self.name}: field {f.name} ({f.type}) is opaque")
                code = f"{f.size}s" if f.type in ("ip4", "port") else f.format.removeprefix("<")
                fmt += f"{offset - at}x" * (offset > at) + code
                at = offset + f.size
            offset += f.size
        return _struct.Struct(fmt + f"{size - at}x" * (size > at))

    def unpack(self, data: bytes) -> dict[str, object]:
        """The inverse of pack: ip4 as IPv4Address, port in host order."""
        if len(data) < self.size:
            raise ValueError(f"struct {self.name}: {len(data)} bytes, need {self.size}")
        values: dict[str, object] = {}
        offset = 0
        for f in self.fields:
            (v,) = _struct.unpack_from(f.format, data, offset)
            values[f.name] = ipaddress.IPv4Address(v) if f.type == "ip4" else v
            offset += f.size
        return values


def _s(name: str, doc: str, *fields: tuple[str, str] | tuple[str, str, str]) -> Struct:
    return Struct(name, doc, tuple(Field(*f) for f in fields))


SVC_KEY = _s(
    "bpfgen_svc_key",
    "A service frontend; slot 0 is the frontend itself, slots 1..count its backends.",
    ("addr", "ip4"), ("port", "port"), ("slot", "u16"), ("proto", "proto"),
    ("pad1", "u8"), ("pad2", "u16"),
)
SVC_VALUE = _s(
    "bpfgen_svc_value",
    "Slot 0: count backends that take new flows, others more (slots count+1..count+others: its"
    " endpoints that take none, terminating or not serving, whose flows go on), id, flags."
    " Slot n: backend_id of backend n.",
    ("backend_id", "u32"), ("id", "u32", "frontend id: reverse-NAT index and counter index"),
    ("count", "u16"), ("others", "u16"), ("flags", "u8"), ("pad1", "u8"), ("pad2", "u16"),
)
BACKEND = _s(
    "bpfgen_backend",
    "A backend endpoint; flags: BACKEND_LOCAL when it runs on this node, its state (BACKEND_TERMINATING,"
    " BACKEND_NOT_SERVING).",
    ("addr", "ip4"), ("port", "port"), ("proto", "proto"), ("flags", "u8"),
)
REVNAT = _s(
    "bpfgen_revnat",
    "A frontend by id: its address, the healthCheckNodePort of its service (0: none) and its"
    " ClientIP affinity (the group shared by the frontends of one service port, and the timeout).",
    ("addr", "ip4"), ("port", "port"), ("health_check_port", "u16"),
    ("affinity_group", "u32", "0: no affinity"), ("affinity_timeout", "u32", "seconds"),
)
AFFINITY_KEY = _s(
    "bpfgen_affinity_key", "A client address of a ClientIP affinity group.",
    ("client", "ip4"), ("group", "u32"),
)
AFFINITY_ENTRY = _s(
    "bpfgen_affinity_entry", "The backend a client address keeps, and when it last opened a flow.",
    ("backend_id", "u32"), ("last_used", "u32", "datapath seconds"),
)
AFFINITY_MATCH_KEY = _s(
    "bpfgen_affinity_match_key", "A backend that takes new flows of an affinity frontend.",
    ("backend_id", "u32"), ("rev_nat_id", "u32"),
)
AFFINITY_MATCH = _s("bpfgen_affinity_match", "The backend's slot in the frontend.", ("slot", "u32"))
SOURCE_RANGE_KEY = _s(
    "bpfgen_source_range_key",
    "An LPM key: a client range admitted to a frontend (prefix_len: 32 for the id plus the range's).",
    ("prefix_len", "u32"), ("rev_nat_id", "u32"), ("addr", "ip4"),
)
SOURCE_RANGE = _s("bpfgen_source_range", "The range's own prefix length.", ("range_len", "u32"))
TUPLE = _s(
    "bpfgen_tuple",
    "A flow tuple: conntrack key (dir CT_SERVICE: client -> frontend arriving on the interface;"
    " CT_SERVICE_EGRESS: node or pod -> ClusterIP leaving it; CT_OUT: as the flow leaves for its"
    " backend, from node:snat_port when SNATed) and SNAT key (dir NAT_OUT/NAT_IN).",
    ("saddr", "ip4"), ("daddr", "ip4"), ("sport", "port"), ("dport", "port"),
    ("proto", "proto"), ("dir", "u8"), ("pad", "u16"),
)
CT_ENTRY = _s(
    "bpfgen_ct_entry",
    "Conntrack state of one direction-tagged tuple.",
    ("expires", "u32", "seconds of the datapath clock after which the entry is dead"),
    ("backend_id", "u32"), ("rev_nat_id", "u32"), ("flags", "u16", "CT_* state flags"),
    ("snat_port", "port"),
    ("ack_mark", "u32", "TCP: an acknowledgement number the packets that find this entry carried, at most"
     " ACK_MARK_STEP behind their latest (0: none seen); the other side's RST is in window from it on"),
    ("nat_cookie", "u32", "SNAT: the cookie of the NAT_IN claim this flow made (0: none)"),
    ("xl_saddr", "ip4", "the whole translation of packets that find this entry: new source,"),
    ("xl_daddr", "ip4", "destination,"), ("xl_sport", "port"), ("xl_dport", "port", "and ports"),
    ("ifindex", "u32", "cached next hop: the interface (NH_REDIRECT, NH_NEIGH)"),
    ("checked", "u32", "when the next hop was looked up (the time of nh_v4's answer) and the backend checked"
     " (datapath seconds; 0: never)"),
    ("l2_dst", "u32", "cached next hop: destination MAC bytes 0-3 (NH_NEIGH: the gateway's address)"),
    ("l2_mid", "u32", "destination MAC bytes 4-5, source MAC bytes 0-1"),
    ("l2_src", "u32", "source MAC bytes 2-5"),
    ("nh", "u8", "next hop of packets that find this entry: NH_STACK, or NH_FIB and the cached answer"),
    ("pad1", "u8"),
    ("done_tick", "u16", "CT_BACKEND_DONE: when it was set (coarse clock, units of 2^20 ns, wrapping)"),
    ("ts_delta", "u32", "CT_TS_REWRITE: added to the client's TCP TSval towards the backend (its TSecr back: less)"),
    ("started", "u32", "when the flow began (datapath seconds)"),
)
NAT_ENTRY = _s(
    "bpfgen_nat_entry",
    "An SNAT translation: NAT_OUT rewrites the source to addr:port, NAT_IN the destination.",
    ("addr", "ip4", "NAT_IN: the client of the port's last flow"), ("port", "port"),
    ("tw_mark", "u16", "NAT_IN: the port's last flow's reply entry expired then (datapath seconds, low 16 bits, 0:"
     " no mark) and the backend may hold the flow in TIME_WAIT, which only SYNs with timestamps pass: others wait SNAT_REUSE_GRACE from"
     " then (set when the collector removes the flow's reply entry before that)"),
    ("claimed", "u32", "NAT_IN: when a flow took the port (seconds, the clock of expires)"),
    ("cookie", "u32", "NAT_IN: the claim, never 0; claimed and cookie change together (one 64-bit"
     " compare-and-swap) and the flow's conntrack entries carry it"),
)
CONFIG = _s(
    "bpfgen_config",
    "A node's settings, written into the object's .rodata.config before load: one object serves every node.",
    ("node_ip", "ip4", "the node's address"),
    ("pod_net", "ip4", "the node's podCIDR (0.0.0.0/32 when it has none: matches no packet)"),
    ("pod_mask", "ip4"),
    ("nodeport_min", "u16"), ("nodeport_max", "u16"),
    ("snat_port_min", "u16"), ("snat_port_max", "u16"),
    ("hairpin_ip", "ip4", "the source a flow of the node or its pods to a backend on the node is SNATed to"),
    ("ct_entries", "u32", "ct_v4's size: its collector gives up SNAT ports' rests when it is 3/4 full"),
)
SVC_STATS = _s("bpfgen_svc_stats", "Per-CPU packet and byte counts of one frontend.", ("packets", "u64"), ("bytes", "u64"))
DROP_STATS = _s("bpfgen_drop_stats", "Per-CPU count of drops of one reason.", ("packets", "u64"))
COLLECTOR = _s("bpfgen_collector", "ct_v4's collector: its timer, and the work item the timer starts (a sweep"
               " runs in process context, where packets preempt it).", ("timer", "timer"), ("work", "wq"),
               ("entries", "u32", "what the last sweep left in ct_v4"), ("pad", "u32"), ("pad2", "u64"))
NH_KEY = _s(
    "bpfgen_nh_key", "A next hop's lookup towards a backend: the translated packet's addresses and the interface the"
    " lookup is made for (the packet's, in or out: egress).",
    ("saddr", "ip4"), ("daddr", "ip4"), ("ifindex", "u32"), ("egress", "u8"), ("pad1", "u8"), ("pad2", "u16"),
)
NH_ENTRY = _s(
    "bpfgen_nh_entry", "The kernel's answer to a next hop's lookup, as conntrack entries cache it.",
    ("checked", "u32", "when it was looked up (datapath seconds): good for the second after"),
    ("daddr", "ip4", "the key's destination (a copy is checked against it)"), ("ifindex", "u32"),
    ("l2_dst", "u32"), ("l2_mid", "u32"), ("l2_src", "u32"),
    ("nh", "u8", "NH_REDIRECT or NH_NEIGH"), ("pad1", "u8"), ("pad2", "u16"),
)
LOCAL_PORT = _s("bpfgen_local_port", "Until when (datapath seconds) a flow of the node or its pods to a ClusterIP may"
                " live that has this local port: its replies are looked up only before then.", ("expires", "u32"))
ADDR_BITS = _s("bpfgen_addr_bits", "64 bits of an address filter (fe_addr_v4, be_addr_v4).",
               ("bits", "u64", "bit b: some address of the filter hashes to this word's bit b (addr_filter_bit)"))

# The address filters: one bit per hash of an address (2^20 bits in 2^14 words). The
# frontend filter (fe_addr_v4) has a bit set for every address a frontend may have but the
# node's (clusterIPs, external and load-balancer IPs): a packet arriving for neither the
# node nor its pods whose destination's bit is clear is for no service, and passes after
# one array lookup, before it is parsed (to a pod, after the local port's lookup too). The
# local backend filter (be_addr_v4) has one for every address and port of a backend on the
# node (endpoint_filter_bit): a packet leaving whose source's bit is clear is no local
# backend's reply, and with its destination's frontend bit clear too it passes after two
# array lookups.
ADDR_FILTER_BITS_LOG2 = 20
ADDR_FILTER_WORDS = 1 << (ADDR_FILTER_BITS_LOG2 - 6)
ADDR_FILTER_HASH = 0x9E3779B1  # (multiplicative hashing: the high bits of addr * this)
ENDPOINT_PORT_MIX = 0x10001  # an endpoint's port into its address before the hash


def addr_filter_bit(addr: int) -> tuple[int, int]:
    """The word and bit of an address filter of the IPv4 address addr (as an integer, host
    order); the datapath's addr_filter_has."""
    index = ((addr * ADDR_FILTER_HASH) & 0xFFFFFFFF) >> (32 - ADDR_FILTER_BITS_LOG2)
    return index >> 6, index & 63


def endpoint_filter_bit(addr: int, port: int) -> tuple[int, int]:
    """The word and bit of be_addr_v4 of the endpoint addr:port (host order); the
    datapath's endpoint_filter_has."""
    return addr_filter_bit((addr + port * ENDPOINT_PORT_MIX) & 0xFFFFFFFF)


@dataclass(frozen=True)
class Scalar:
    """A plain integer map key (array maps require a 32-bit integer key in BTF)."""

    cname: str
    size: int

    def pack(self, value: int) -> bytes:
        return int(value).to_bytes(self.size, "little")

    def unpack(self, data: bytes) -> int:
        return int.from_bytes(data[: self.size], "little")


ID_KEY = Scalar("__u32", 4)

STRUCTS = (SVC_KEY, SVC_VALUE, BACKEND, REVNAT, TUPLE, CT_ENTRY, NAT_ENTRY, AFFINITY_KEY, AFFINITY_ENTRY,
           AFFINITY_MATCH_KEY, AFFINITY_MATCH, SOURCE_RANGE_KEY, SOURCE_RANGE, CONFIG, SVC_STATS, DROP_STATS,
           LOCAL_PORT, COLLECTOR, NH_KEY, NH_ENTRY, ADDR_BITS)


@dataclass(frozen=True)
class Enum:
    name: str
    prefix: str
    members: tuple[tuple[str, int, str], ...]


    def value(self, name: str) -> int:
        return next(v for n, v, _ in self.members if n == name)

    def label(self, value: int) -> str:
        return next((d for _, v, d in self.members if v == value), str(value))


DROP_REASONS = Enum(
    "bpfgen_drop_reason",
    "DROP_",
    (
        ("NO_BACKEND", 0, "no backend"),
        ("SNAT_EXHAUSTED", 1, "SNAT ports exhausted"),
        ("FIB_FAILED", 2, "fib lookup failed"),
        ("MALFORMED", 3, "malformed packet"),
        ("CT_NO_SYN", 4, "TCP packet of no known flow without SYN"),
        ("CT_FULL", 5, "a new flow refused: its conntrack table is full"),
        ("REWRITE_FAILED", 6, "packet rewrite failed"),
        ("TTL_EXCEEDED", 7, "TTL exceeded in forwarding"),
        ("NO_LOCAL_BACKEND", 8, "traffic policy Local and no endpoint on this node"),
        ("SOURCE_RANGE", 9, "client outside the loadBalancerSourceRanges"),
        ("REJECTED", 10, "no endpoints: rejected (TCP reset, ICMP port unreachable sent)"),
    ),
)
ENUMS = (DROP_REASONS,)

# Flag bits, key directions and constants (values in C are generated from here).
FLAGS = {
    "SVC_NODEPORT": 1,
    "SVC_CLUSTERIP": 2,
    "SVC_EXTERNALIP": 4,  # a frontend on one of a service's externalIPs
    "SVC_LOADBALANCER": 8,  # a frontend on a load balancer IP of a service
    "SVC_LOCAL": 16,  # traffic policy Local: only this node's endpoints (a node without one drops)
    "SVC_REJECT": 32,  # the service has no endpoint that takes new flows: new flows are rejected
    "SVC_SOURCE_RANGES": 64,  # only clients of its loadBalancerSourceRanges (src_range_v4)
    "SVC_AFFINITY": 128,  # ClientIP session affinity (revnat_v4 holds the group and timeout)
    "BACKEND_LOCAL": 1,
    "BACKEND_TERMINATING": 2,  # serving and terminating: takes new flows only where none is ready
    "BACKEND_NOT_SERVING": 4,  # takes no new flow; its TCP flows go on, its UDP flows are cleared
    # ct entry flags
    "CT_CLOSING": 1,  # both sides sent FIN, or a RST was seen
    "CT_ESTABLISHED": 2,
    "CT_SNAT": 4,
    "CT_FIN_CLIENT": 8,  # the client sent FIN
    "CT_FIN_BACKEND": 16,  # the backend sent FIN
    "CT_BACKEND_CLOSED_FIRST": 32,  # the backend's FIN came first: it holds TIME_WAIT
    "CT_EGRESS": 64,  # a flow of the node or its pods (to_netdev), keyed CT_SERVICE_EGRESS
    "CT_MIDSTREAM": 128,  # opened by a segment without SYN: short-lived, never established
    "CT_BACKEND_DONE": 256,  # the backend's side is over: a RST, or the client's ACK of its FIN after the client's
    # (or, the backend closed first, the client's FIN: the backend enters TIME_WAIT)
    "CT_TS_REWRITE": 512,  # TCP timestamps rewritten to the node's clock (SNAT): TIME_WAIT passes a new SYN
    # ct entry nh: where packets that find the entry go
    "NH_STACK": 0,  # the stack delivers them (a local backend; replies to the node's own flows)
    "NH_FIB": 1,  # forwarded by the program; the next hop is not cached yet
    "NH_REDIRECT": 2,  # cached: out of ifindex with the cached MACs
    "NH_NEIGH": 3,  # cached: out of ifindex through the kernel's neighbour lookup of l2_dst
    "NH_INGRESS": 4,  # back in through the interface, to the node's stack (a hairpin flow's replies)
    # tuple.dir of conntrack keys
    "CT_SERVICE": 1,
    "CT_OUT": 2,
    "CT_SERVICE_EGRESS": 3,
    # tuple.dir of SNAT keys
    "NAT_OUT": 1,
    "NAT_IN": 2,
    "DATAPATH_CLOCK_OFFSET": DATAPATH_CLOCK_OFFSET,
    "ADDR_FILTER_HASH": ADDR_FILTER_HASH,
    "ADDR_FILTER_SHIFT": 32 - ADDR_FILTER_BITS_LOG2,
    "ENDPOINT_PORT_MIX": ENDPOINT_PORT_MIX,
}
# The tuple.dir of the conntrack entries a flow's packets towards its backend find (the
# others are CT_OUT: its replies').
CT_FORWARD_DIRS = frozenset({FLAGS["CT_SERVICE"], FLAGS["CT_SERVICE_EGRESS"]})


BPF_F_NO_PREALLOC = 1


@dataclass(frozen=True)
class MapDef:
    name: str
    type: str  # libbpf BPF_MAP_TYPE_ suffix
    key: Struct | Scalar
    value: Struct
    doc: str
    size: Callable[[dict[str, int]], int]  # max_entries from the capacity settings (frontends, ...)
    flags: int = 0

    def max_entries(self, capacity: dict[str, int]) -> int:
        return self.size(capacity)


# Hash maps of services grow on use (no preallocation), so a generous capacity costs no
# memory until it is used; conntrack and SNAT maps are preallocated by the kernel: LRU maps
# but ct_v4 (established TCP flows are never evicted; its collector removes dead entries).
MAPS = (
    MapDef("svc_v4", "HASH", SVC_KEY, SVC_VALUE, "service frontends and their backend slots",
           lambda c: c["frontends"] + c["backend_slots"], BPF_F_NO_PREALLOC),
    MapDef("backend_v4", "HASH", ID_KEY, BACKEND, "backends by id", lambda c: c["backends"], BPF_F_NO_PREALLOC),
    MapDef("revnat_v4", "HASH", ID_KEY, REVNAT, "frontend by reverse-NAT id", lambda c: c["frontends"],
           BPF_F_NO_PREALLOC),
    MapDef("ct_v4", "HASH", TUPLE, CT_ENTRY, "conntrack of established TCP flows and the node's own TCP flows"
           " (never evicts: full, it refuses new flows; its collector removes dead entries)", lambda c: 2 * c["flows"]),
    MapDef("ct_udp_v4", "LRU_HASH", TUPLE, CT_ENTRY, "conntrack of UDP flows (apart: a flood of datagrams evicts"
           " no TCP flow)", lambda c: 2 * c["udp_flows"]),
    MapDef("ct_half_v4", "LRU_HASH", TUPLE, CT_ENTRY, "conntrack of TCP flows not established yet (promoted to"
           " ct_v4 when they are): a SYN flood evicts only these", lambda c: 2 * c["half_open_flows"]),
    MapDef("snat_v4", "LRU_HASH", TUPLE, NAT_ENTRY, "SNAT port claims (NAT_IN; like cilium_snat_v4_external): one"
           " per SNATed flow", lambda c: c["flows"] + c["udp_flows"] + c["half_open_flows"]),
    MapDef("nh_v4", "LRU_HASH", NH_KEY, NH_ENTRY, "next hops towards backends by addresses and interface, each"
           " looked up again after a second: a new flow to a backend seen in that second needs no fib lookup",
           lambda c: c["next_hops"]),
    MapDef("affinity_v4", "LRU_HASH", AFFINITY_KEY, AFFINITY_ENTRY, "ClientIP session affinity: a client's backend",
           lambda c: c["affinity_clients"]),
    MapDef("aff_match_v4", "HASH", AFFINITY_MATCH_KEY, AFFINITY_MATCH,
           "the backends an affinity frontend may keep a client on", lambda c: c["backend_slots"], BPF_F_NO_PREALLOC),
    MapDef("src_range_v4", "LPM_TRIE", SOURCE_RANGE_KEY, SOURCE_RANGE, "loadBalancerSourceRanges per frontend",
           lambda c: c["source_ranges"], BPF_F_NO_PREALLOC),
    MapDef("collector_v4", "ARRAY", ID_KEY, COLLECTOR, "ct_v4's collector, on a timer that runs while this map"
           " is pinned", lambda c: 1),
    MapDef("local_port_v4", "ARRAY", ID_KEY, LOCAL_PORT, "by local port, the flows of the node or its pods to"
           " ClusterIPs (so that other traffic to them passes without a conntrack lookup)", lambda c: 65536),
    MapDef("fe_addr_v4", "ARRAY", ID_KEY, ADDR_BITS, "the frontend address filter: a bit per address hash, set"
           " for every address of a frontend but the node's (traffic to other addresses passes at once)",
           lambda c: ADDR_FILTER_WORDS),
    MapDef("be_addr_v4", "ARRAY", ID_KEY, ADDR_BITS, "the local backend filter: a bit per address and port hash,"
           " set for every address and port of a backend on this node (other traffic leaving, not to a frontend,"
           " passes at once)", lambda c: ADDR_FILTER_WORDS),
    MapDef("svc_stats", "PERCPU_ARRAY", ID_KEY, SVC_STATS, "packets and bytes per frontend id",
           lambda c: c["frontends"] + 1),
    MapDef("drop_stats", "PERCPU_ARRAY", ID_KEY, DROP_STATS, "drops by reason", lambda c: len(DROP_REASONS.members)),
)
