"""What a node's maps should hold: the planning layer, pure (no kernel, no files).

A build stores a `Plan`: the resolved spec reduced to what the datapath needs, node
independent, as JSON (plan.json) that `load` reads without validating again. From a plan
and a node come the node's configuration (.rodata.config), its map sizes, and the
contents of its service maps; `diff` says what to write and delete to get there from
what the maps hold now. Keys and values are the maps' raw bytes, packed by layout.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import layout
from .errors import UsageError

FORMAT = 2
PROTOCOLS = layout.PROTOCOLS
_LOCAL = layout.FLAGS["BACKEND_LOCAL"]


@dataclass(frozen=True)
class NodeInfo:
    name: str
    address: ipaddress.IPv4Address
    pod_cidr: ipaddress.IPv4Network | None


@dataclass(frozen=True)
class ServicePlan:
    key: str  # namespace/name
    type: str  # NodePort | ClusterIP
    cluster_ip: str | None
    ports: tuple[tuple[str, int, int, int | None], ...]  # protocol, port, targetPort, nodePort
    backends: tuple[tuple, ...]  # (address, node (None: on no node)[, state: terminating | not-serving])
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    affinity: int = 0  # ClientIP affinity timeout, seconds (0: none)
    external_local: bool = False  # externalTrafficPolicy Local
    internal_local: bool = False  # internalTrafficPolicy Local
    health_check_port: int = 0  # healthCheckNodePort (0: none)
    source_ranges: tuple[str, ...] = ()  # loadBalancerSourceRanges

    def options(self) -> dict[str, Any]:
        """The settings that differ from the defaults, as plan.json holds them."""
        out: dict[str, Any] = {}
        if self.affinity:
            out["affinity"] = self.affinity
        if self.external_local:
            out["externalLocal"] = True
        if self.internal_local:
            out["internalLocal"] = True
        if self.health_check_port:
            out["healthCheckNodePort"] = self.health_check_port
        if self.source_ranges:
            out["sourceRanges"] = list(self.source_ranges)
        return out


_OPTIONS = {"affinity": "affinity", "externalLocal": "external_local", "internalLocal": "internal_local",
            "healthCheckNodePort": "health_check_port", "sourceRanges": "source_ranges"}

# A backend's state (the third item of a plan's backend; absent: ready) -> its backend_v4 flag.
STATE_FLAGS = {"ready": 0, "terminating": layout.FLAGS["BACKEND_TERMINATING"],
               "not-serving": layout.FLAGS["BACKEND_NOT_SERVING"]}
_TERMINATING, _NOT_SERVING = STATE_FLAGS["terminating"], STATE_FLAGS["not-serving"]


@dataclass(frozen=True)
class Frontend:
    addr: str
    port: int
    proto: int
    kind: str  # NodePort | ClusterIP | ExternalIP | LoadBalancer
    service: str  # namespace/name
    backends: tuple[tuple[str, int, int, int], ...]  # those taking new flows: addr, port, proto, backend flags
    others: tuple[tuple[str, int, int, int], ...] = ()  # its endpoints that take none (their flows go on)
    extra: int = 0  # SVC_LOCAL, SVC_REJECT, SVC_AFFINITY, SVC_SOURCE_RANGES
    group: tuple[str, int, int] | None = None  # affinity: the key of its port's first frontend
    affinity_timeout: int = 0
    health_check_port: int = 0
    source_ranges: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.addr, self.port, self.proto)

    @property
    def flags(self) -> int:
        """Its bpfgen_svc_value flags: its kind's (SVC_NODEPORT, SVC_CLUSTERIP, ...) and extra."""
        return layout.FLAGS[_KIND_FLAGS[self.kind]] | self.extra


_KIND_FLAGS = {"NodePort": "SVC_NODEPORT", "ClusterIP": "SVC_CLUSTERIP", "ExternalIP": "SVC_EXTERNALIP",
               "LoadBalancer": "SVC_LOADBALANCER"}


def _serving(backends: list[tuple[str, int, int, int]]) -> list[tuple[str, int, int, int]]:
    """kube-proxy's CategorizeEndpoints: the ready ones; with none ready, the serving and
    terminating ones; never the others."""
    ready = [b for b in backends if not b[3] & (_TERMINATING | _NOT_SERVING)]
    return ready or [b for b in backends if b[3] & _TERMINATING]


@dataclass(frozen=True)
class Plan:
    name: str
    node_port_range: tuple[int, int]
    snat_port_range: tuple[int, int]
    capacity: dict[str, int]  # snake_case settings of cluster.capacity
    nodes: tuple[NodeInfo, ...]
    services: tuple[ServicePlan, ...]

    @classmethod
    def from_spec(cls, spec: Any) -> Plan:
        c = spec.cluster
        return cls(
            name=spec.metadata.name,
            node_port_range=(c.node_port_range.lo, c.node_port_range.hi),
            snat_port_range=(c.snat_port_range.lo, c.snat_port_range.hi),
            capacity=c.capacity.model_dump(),
            nodes=tuple(NodeInfo(n.name, n.address, n.pod_cidr) for n in spec.nodes),
            services=tuple(
                ServicePlan(
                    s.key, s.type, str(s.cluster_ip) if s.cluster_ip else None,
                    tuple((p.protocol, p.port, p.target_port, p.node_port) for p in s.ports),
                    tuple((layout.ip4_str(b.address), b.node) if b.conditions.state == "ready"
                          else (layout.ip4_str(b.address), b.node, b.conditions.state) for b in s.backends),
                    tuple(map(str, s.external_ips)), tuple(map(str, s.load_balancer_ips)),
                    affinity=s.affinity_timeout, external_local=s.external_traffic_policy == "Local",
                    internal_local=s.internal_traffic_policy == "Local",
                    health_check_port=s.health_check_node_port or 0,
                    source_ranges=tuple(map(str, s.load_balancer_source_ranges)),
                )
                for s in spec.services
            ),
        )

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "name": self.name,
            "nodePortRange": list(self.node_port_range),
            "snatPortRange": list(self.snat_port_range),
            "capacity": self.capacity,
            "nodes": [[n.name, str(n.address), str(n.pod_cidr) if n.pod_cidr else None] for n in self.nodes],
            "services": [[s.key, s.type, s.cluster_ip, [list(p) for p in s.ports], [list(b) for b in s.backends],
                          *_extras(s)]
                         for s in self.services],
        }
        return json.dumps(data, separators=(",", ":")) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Plan:
        """The plan a build stored; UsageError naming `where` if it is not one."""
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"plan format {data.get('format')!r}, this bpfgen reads {FORMAT}")
            return cls(
                name=data["name"],
                node_port_range=tuple(data["nodePortRange"]),
                snat_port_range=tuple(data["snatPortRange"]),
                capacity={k: int(v) for k, v in data["capacity"].items()},
                nodes=tuple(NodeInfo(n, ipaddress.IPv4Address(a), ipaddress.IPv4Network(c) if c else None)
                            for n, a, c in data["nodes"]),
                services=tuple(_service_from_json(item) for item in data["services"]),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise UsageError(f"{where}: not a bpfgen plan ({e}); compile the spec again") from None

    def node(self, name: str) -> NodeInfo:
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes)
        raise UsageError(f"node '{name}' is not in spec {self.name} (nodes: {known})")


def _extras(s: ServicePlan) -> list:
    """A service's optional items in plan.json: externalIPs, loadBalancerIPs, options (only
    as far as any is set)."""
    options = s.options()
    if options:
        return [list(s.external_ips), list(s.load_balancer_ips), options]
    if s.external_ips or s.load_balancer_ips:
        return [list(s.external_ips), list(s.load_balancer_ips)]
    return []


def _service_from_json(item: list) -> ServicePlan:
    key, type_, ip, ports, backends, *extra = item
    external, balancers, options = (extra + [[], [], {}][len(extra):])[:3]
    settings = {_OPTIONS[k]: (tuple(v) if isinstance(v, list) else v) for k, v in options.items()}
    for b in backends:
        if len(b) == 3 and b[2] not in STATE_FLAGS:
            raise ValueError(f"backend state {b[2]!r}")
    return ServicePlan(key, type_, ip, tuple(map(tuple, ports)), tuple(map(tuple, backends)), tuple(external),
                       tuple(balancers), **settings)


# ---------------------------------------------------------------- per node


def frontends(plan: Plan, node: NodeInfo) -> list[Frontend]:
    """Every frontend node serves: a ClusterIP one per port of a service with a clusterIP,
    a NodePort one (on the node's address) per port of a NodePort service, and per port an
    ExternalIP one for each external IP and a LoadBalancer one for each load balancer IP (on
    every node: any node may receive them). A backend on no node is remote from every node.

    Each takes new flows to the endpoints kube-proxy would use (`_serving`); under a traffic
    policy Local (internalTrafficPolicy for the ClusterIP, externalTrafficPolicy for the
    others) only to this node's. A service with no such endpoint anywhere rejects new flows;
    a Local frontend without one on this node drops them."""
    result = []
    node_addr = str(node.address)
    svc_local, svc_reject = layout.FLAGS["SVC_LOCAL"], layout.FLAGS["SVC_REJECT"]
    affinity, ranges = layout.FLAGS["SVC_AFFINITY"], layout.FLAGS["SVC_SOURCE_RANGES"]
    for svc in plan.services:
        states = [(b[0], b[1], STATE_FLAGS[b[2]] if len(b) > 2 else 0) for b in svc.backends]
        for protocol, port, target, node_port in svc.ports:
            proto = PROTOCOLS[protocol]
            everyone = [(addr, target, proto, state | (_LOCAL if host == node.name else 0))
                        for addr, host, state in states]
            mine = [b for b in everyone if b[3] & _LOCAL]
            cluster, local = _serving(everyone), _serving(mine)
            base = (svc_reject if not cluster else 0) | (affinity if svc.affinity else 0)
            group: tuple[str, int, int] | None = None

            def frontend(addr: str, at: int, kind: str, policy_local: bool) -> Frontend:
                nonlocal group
                candidates, chosen = (mine, local) if policy_local else (everyone, cluster)
                extra = base | (svc_local if policy_local else 0)
                if kind == "LoadBalancer" and svc.source_ranges:
                    extra |= ranges
                if svc.affinity and group is None:
                    group = (addr, at, proto)
                return Frontend(addr, at, proto, kind, svc.key, tuple(chosen),
                                tuple(b for b in candidates if b not in chosen), extra,
                                group if svc.affinity else None, svc.affinity,
                                svc.health_check_port if kind != "ClusterIP" else 0,
                                svc.source_ranges if kind == "LoadBalancer" else ())

            if svc.cluster_ip is not None:
                result.append(frontend(svc.cluster_ip, port, "ClusterIP", svc.internal_local))
            if node_port is not None:
                result.append(frontend(node_addr, node_port, "NodePort", svc.external_local))
            for ip in svc.external_ips:
                result.append(frontend(ip, port, "ExternalIP", svc.external_local))
            for ip in svc.load_balancer_ips:
                result.append(frontend(ip, port, "LoadBalancer", svc.external_local))
    return result


def config(plan: Plan, node: NodeInfo) -> bytes:
    """The node's .rodata.config (struct bpfgen_config)."""
    net = node.pod_cidr
    return layout.CONFIG.pack(
        node_ip=node.address,
        # No podCIDR: 0.0.0.0 with a mask of all ones, which no real address matches.
        pod_net=net.network_address if net else 0,
        pod_mask=net.netmask if net else ipaddress.IPv4Address(0xFFFFFFFF),
        nodeport_min=plan.node_port_range[0], nodeport_max=plan.node_port_range[1],
        snat_port_min=plan.snat_port_range[0], snat_port_max=plan.snat_port_range[1],
        hairpin_ip=layout.HAIRPIN_ADDRESS,
        ct_entries=map_sizes(plan)["ct_v4"],
    )


def map_sizes(plan: Plan) -> dict[str, int]:
    return {m.name: m.max_entries(plan.capacity) for m in layout.MAPS}


SERVICE_MAPS = ("svc_v4", "backend_v4", "revnat_v4", "aff_match_v4", "src_range_v4", "fe_addr_v4", "be_addr_v4")
# The address filters (arrays of bits: written, never deleted, a missing word is 0).
ADDRESS_FILTERS = ("fe_addr_v4", "be_addr_v4")
_ADDR_BITS = layout.ADDR_BITS


def address_filters(plan: Plan, node: NodeInfo) -> dict[str, dict[bytes, bytes]]:
    """The words of the node's address filters that have a bit set (the others are 0):
    fe_addr_v4 a bit for every clusterIP, external and load-balancer IP of the plan's
    services (a superset of the addresses of any node's frontends but its own, which the
    datapath never looks up there), be_addr_v4 one for every address and port of a backend
    on the node (whatever its state: the flows of a terminating one go on)."""
    return {"fe_addr_v4": _filter_words(layout.addr_filter_bit(_ip_int(a))
                                        for s in plan.services for a in _addresses(s)),
            "be_addr_v4": _filter_words(layout.endpoint_filter_bit(_ip_int(a), port)
                                        for s in plan.services for a, port in _local_backends(s, node))}


def _ip_int(addr: str) -> int:
    return int.from_bytes(socket.inet_aton(addr), "big")


def _filter_words(bits: Iterable[tuple[int, int]]) -> dict[bytes, bytes]:
    words: dict[int, int] = {}
    for word, bit in bits:
        words[word] = words.get(word, 0) | 1 << bit
    return {_U32.pack(w): _ADDR_BITS.pack(bits=b) for w, b in sorted(words.items())}


def _local_backends(s: ServicePlan, node: NodeInfo) -> tuple[tuple[str, int], ...]:
    """The endpoints (address, target port) of a service's backends on node."""
    return tuple((b[0], target) for _, _, target, _ in s.ports for b in s.backends if b[1] == node.name)


def _addresses(s: ServicePlan) -> tuple[str, ...]:
    """The addresses a service's frontends have (but a node's, of its NodePorts)."""
    return tuple(a for a in (s.cluster_ip, *s.external_ips, *s.load_balancer_ips) if a is not None)


Contents = dict[str, dict[bytes, bytes]]


def _offset(struct_: layout.Struct, name: str) -> slice:
    start = 0
    for f in struct_.fields:
        if f.name == name:
            return slice(start, start + f.size)
        start += f.size
    raise KeyError(name)


_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_SLOT = _offset(layout.SVC_KEY, "slot")
_SVC_ID = _offset(layout.SVC_VALUE, "id")
_BACKEND_IDENTITY = slice(0, _offset(layout.BACKEND, "flags").start)  # addr, port, proto
assert _offset(layout.SVC_VALUE, "backend_id") == slice(0, 4) and _offset(layout.BACKEND, "flags").stop == 8
_SLOT_BYTES = [_U16.pack(i) for i in range(1 << 16)]


def _allocate(wanted: Iterable, existing: dict, limit: int, held: Callable[[], set[int]], what: str,
              in_use: Callable[[], set[int]] = set) -> dict:
    """Ids 1..limit for wanted keys: an existing key keeps its id, a new one gets the lowest
    id that is neither in use (by the wanted keys, or by in_use()) nor held (still referred
    to by conntrack); in_use and held are asked only when a new id is needed."""
    wanted = list(wanted)
    ids = {k: existing[k] for k in wanted if k in existing}
    new = [k for k in wanted if k not in ids]
    if not new:
        return ids
    used = set(ids.values()) | held() | in_use()
    next_id = 1
    for k in new:
        while next_id in used:
            next_id += 1
        if next_id > limit:
            raise UsageError(f"more than {limit} {what} ids needed (live connections hold some); "
                             f"raise cluster.capacity.{what}")
        ids[k] = next_id
        used.add(next_id)
    return ids


@dataclass
class Held:
    """Ids that live conntrack entries refer to: a removed backend's or frontend's id is not
    handed out again while a flow may still use it, or the flow would follow the newcomer."""

    read: Callable[[], tuple[set[int], set[int]]] = lambda: (set(), set())
    _ids: tuple[set[int], set[int]] | None = field(default=None, init=False)

    def _get(self) -> tuple[set[int], set[int]]:
        if self._ids is None:
            self._ids = self.read()
        return self._ids

    def backends(self) -> set[int]:
        return self._get()[0]

    def frontends(self) -> set[int]:
        return self._get()[1]


class _Packer:
    """Keys and values of the service maps, as bytes (built by concatenation: a large
    cluster has a million backend slots)."""

    def __init__(self) -> None:
        self.ip = _packed_addresses()
        self.svc_key = layout.SVC_KEY.packer
        self.svc_value = layout.SVC_VALUE.packer
        self.backend = layout.BACKEND.packer
        self.revnat = layout.REVNAT.packer
        self.source_range_key = layout.SOURCE_RANGE_KEY.packer

    def frontend_key(self, f: Frontend) -> bytes:
        return self.svc_key(self.ip(f.addr), f.port, 0, f.proto, 0, 0)

    def group_key(self, key: tuple[str, int, int]) -> bytes:
        return self.svc_key(self.ip(key[0]), key[1], 0, key[2], 0, 0)

    def identity(self, addr: str, port: int, proto: int) -> bytes:
        return self.backend(self.ip(addr), port, proto, 0)[_BACKEND_IDENTITY]


def _identities(fes: list[Frontend], pk: _Packer) -> dict[tuple[str, int, int], tuple[bytes, int]]:
    """Every backend of the frontends: (addr, port, proto) -> (identity bytes, backend flags)."""
    out: dict[tuple[str, int, int], tuple[bytes, int]] = {}
    for f in fes:
        for addr, port, proto, flags in f.backends + f.others:
            if (addr, port, proto) not in out:
                out[(addr, port, proto)] = (pk.identity(addr, port, proto), flags)
    return out


def _entries(fes: list[Frontend], fe_keys: list[bytes], fe_ids: dict[bytes, int],
             identities: dict[tuple[str, int, int], tuple[bytes, int]], be_ids: dict[bytes, int],
             pk: _Packer) -> Contents:
    """The map entries of frontends whose ids are decided."""
    svc: dict[bytes, bytes] = {}
    backends: dict[bytes, bytes] = {}
    rev: dict[bytes, bytes] = {}
    match: dict[bytes, bytes] = {}
    ranges: dict[bytes, bytes] = {}
    pack_id = _U32.pack
    flag_bytes = [bytes((i,)) for i in range(256)]
    for f, key in zip(fes, fe_keys):
        fid = fe_ids[key]
        svc[key] = pk.svc_value(0, fid, len(f.backends), len(f.others), f.flags, 0, 0)
        head, tail = key[:_SLOT.start], key[_SLOT.stop:]
        slot_value_tail = pk.svc_value(0, fid, 0, 0, 0, 0, 0)[4:]
        for slot, (baddr, port, proto, _) in enumerate(f.backends + f.others, start=1):
            identity, flags = identities[(baddr, port, proto)]
            bid = pack_id(be_ids[identity])
            svc[head + _SLOT_BYTES[slot] + tail] = bid + slot_value_tail
            backends[bid] = identity + flag_bytes[flags]
            if f.group is not None and slot <= len(f.backends):
                match[bid + pack_id(fid)] = pack_id(slot)
        group = fe_ids[pk.group_key(f.group)] if f.group is not None else 0
        rev[pack_id(fid)] = pk.revnat(pk.ip(f.addr), f.port, f.health_check_port, group, f.affinity_timeout)
        for cidr in f.source_ranges:
            net = ipaddress.IPv4Network(cidr)
            ranges[pk.source_range_key(32 + net.prefixlen, fid, net.network_address.packed)] = \
                pack_id(net.prefixlen)
    return {"svc_v4": svc, "backend_v4": backends, "revnat_v4": rev, "aff_match_v4": match,
            "src_range_v4": ranges}


def desired(plan: Plan, node: NodeInfo, have: Contents, held: Held | None = None) -> Contents:
    """The contents of node's service maps, keeping the ids already in `have` (the maps'
    current contents) and avoiding the ids conntrack still holds."""
    held = held or Held()
    pk = _Packer()
    fes = frontends(plan, node)
    old_fe = {k: _U32.unpack(v[_SVC_ID])[0] for k, v in have["svc_v4"].items() if k[_SLOT] == b"\0\0"}
    old_be = {v[_BACKEND_IDENTITY]: _U32.unpack(k)[0] for k, v in have["backend_v4"].items()}
    fe_keys = [pk.frontend_key(f) for f in fes]
    fe_ids = _allocate(fe_keys, old_fe, plan.capacity["frontends"], held.frontends, "frontends")
    identities = _identities(fes, pk)
    be_ids = _allocate((i for i, _ in identities.values()), old_be, plan.capacity["backends"], held.backends,
                       "backends")
    return {**_entries(fes, fe_keys, fe_ids, identities, be_ids, pk), **address_filters(plan, node)}


class KernelView:
    """What an incremental update asks of the node's maps (the loader gives it the maps)."""

    def frontend_ids(self, keys: list[bytes]) -> dict[bytes, int]:
        """The ids of those frontends (slot-0 keys) that are in svc_v4."""
        raise NotImplementedError

    def frontend_ids_in_use(self) -> set[int]:
        raise NotImplementedError

    def backends(self) -> dict[bytes, tuple[int, bytes]]:
        """identity (addr, port, proto bytes) -> (id, the whole backend_v4 value)."""
        raise NotImplementedError


def incremental(old: Plan, new: Plan, node: NodeInfo, kernel: KernelView, held: Held | None = None) -> Changes:
    """The changes from the maps as `old` filled them to what `new` says, computed from the
    services that differ alone: a one-backend change in 10,000 services touches one."""
    held = held or Held()
    before = {s.key: s for s in old.services}
    after = {s.key: s for s in new.services}
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    if not changed:
        return Changes([], [])
    pk = _Packer()
    # (the filters are the plan's, whole: computed only when the changed services' addresses
    # or local backends change)
    def addresses(services: dict[str, ServicePlan]) -> list[tuple]:
        return [(_addresses(services[k]), _local_backends(services[k], node)) for k in sorted(changed) if k in services]

    if addresses(before) != addresses(after):
        filters = address_filters(old, node), address_filters(new, node)
    else:
        filters = {}, {}

    def part(plan: Plan, services: dict[str, ServicePlan]) -> list[Frontend]:
        sub = Plan(plan.name, plan.node_port_range, plan.snat_port_range, plan.capacity, plan.nodes,
                   tuple(services[k] for k in sorted(changed) if k in services))
        return frontends(sub, node)

    old_fes, new_fes = part(old, before), part(new, after)
    old_keys, new_keys = [pk.frontend_key(f) for f in old_fes], [pk.frontend_key(f) for f in new_fes]
    existing_fe = kernel.frontend_ids(list(dict.fromkeys(old_keys + new_keys)))
    kernel_be = kernel.backends()
    existing_be = {identity: bid for identity, (bid, _) in kernel_be.items()}
    old_ids, old_identities = dict(existing_fe), _identities(old_fes, pk)
    if any(k not in old_ids for k in old_keys) or any(i not in existing_be for i, _ in old_identities.values()):
        raise StaleState("the maps do not hold what the last load wrote")
    have = {**_entries(old_fes, old_keys, old_ids, old_identities, existing_be, pk), **filters[0]}

    new_identities = _identities(new_fes, pk)
    # What this change frees may be taken by what it adds (as a full load would): the
    # frontends it removes, the backends no service names any more. Conntrack's hold on
    # them still counts (held).
    new_key_set = set(new_keys)
    freed_fe = {old_ids[k] for k in old_keys if k not in new_key_set}
    new_identity_set = {i for i, _ in new_identities.values()}
    unnamed = {identity: t for t, (identity, _) in old_identities.items() if identity not in new_identity_set}
    if unnamed:
        still_named = {(b[0], target, PROTOCOLS[proto]) for s in new.services if s.key not in changed
                       for proto, _, target, _ in s.ports for b in s.backends}
        unnamed = {identity: t for identity, t in unnamed.items() if t not in still_named}
    kept_be = {identity: bid for identity, bid in existing_be.items() if identity not in unnamed}
    fe_ids = _allocate(new_keys, {k: v for k, v in existing_fe.items() if k in new_key_set},
                       new.capacity["frontends"], held.frontends, "frontends",
                       lambda: kernel.frontend_ids_in_use() - freed_fe)
    be_ids = _allocate((i for i, _ in new_identities.values()), kept_be, new.capacity["backends"],
                       held.backends, "backends", lambda: set(kept_be.values()))
    want = {**_entries(new_fes, new_keys, fe_ids, new_identities, be_ids, pk), **filters[1]}
    # Backends are shared between services: one the changed services name is written only if
    # its entry differs; one they no longer name stays while another service names it.
    for identity, bid in be_ids.items():
        if identity in kernel_be and kernel_be[identity][0] == bid:
            have["backend_v4"][_U32.pack(bid)] = kernel_be[identity][1]
    for identity, (bid, value) in kernel_be.items():
        key = _U32.pack(bid)
        if key in have["backend_v4"] and key not in want["backend_v4"] and identity not in unnamed:
            want["backend_v4"][key] = value
    return diff_maps(want, have)


class StaleState(Exception):
    """The node's maps are not as the last load left them: reconcile in full."""


def _packed_addresses() -> Callable[[str], bytes]:
    """Dotted quads (a plan's are canonical: the spec validated them) as 4 bytes."""
    cache: dict[str, bytes] = {}

    def pack(addr: str) -> bytes:
        b = cache.get(addr)
        if b is None:
            b = cache[addr] = socket.inet_aton(addr)
        return b

    return pack


def _is_backend_slot(key: bytes) -> bool:
    return key[_SLOT] != b"\0\0"


@dataclass
class Changes:
    """What to do to the service maps, in an order that keeps every reference whole: the
    writes (the address filter's new bits, backends and reverse NAT, then backend slots,
    then the frontends that count them), then the deletions in the reverse order, then
    the finals (the address filter's words losing bits: once no frontend has them)."""

    writes: list[tuple[str, list[bytes], list[bytes]]]  # map, keys, values
    deletes: list[tuple[str, list[bytes]]]
    finals: list[tuple[str, list[bytes], list[bytes]]] = field(default_factory=list)

    @property
    def written(self) -> int:
        return sum(len(k) for _, k, _ in self.writes + self.finals)

    @property
    def deleted(self) -> int:
        return sum(len(k) for _, k in self.deletes)


def diff_maps(want: Contents, have: Contents) -> Changes:
    """The changes that make maps holding `have` hold `want` (and diff_maps(have, want)
    takes them back)."""
    writes, deletes, finals = [], [], []
    # The address filters (arrays: their words are written, never deleted, a missing one
    # is 0): a word first gains the bits of both, and loses the old ones at the end.
    bits, zero = _ADDR_BITS.reader("bits"), _ADDR_BITS.pack(bits=0)
    for name in ADDRESS_FILTERS:
        w, h = want.get(name, {}), have.get(name, {})
        gain: dict[bytes, bytes] = {}
        lose: dict[bytes, bytes] = {}
        for k in sorted(w.keys() | h.keys()):
            old, new = bits.unpack(h.get(k, zero))[0], bits.unpack(w.get(k, zero))[0]
            if old | new != old:
                gain[k] = _ADDR_BITS.pack(bits=old | new)
            if new != old | new:
                lose[k] = w.get(k, zero)
        if gain:
            writes.append((name, list(gain), list(gain.values())))
        if lose:
            finals.append((name, list(lose), list(lose.values())))
    for name in ("backend_v4", "revnat_v4", "aff_match_v4", "src_range_v4", "svc_v4"):
        w, h = want.get(name, {}), have.get(name, {})
        changed = [k for k, v in w.items() if h.get(k) != v]
        if name == "svc_v4":  # slots before the frontends that count them
            changed.sort(key=lambda k: not _is_backend_slot(k))
        if changed:
            writes.append((name, changed, [w[k] for k in changed]))
    for name in ("svc_v4", "src_range_v4", "aff_match_v4", "revnat_v4", "backend_v4"):
        w, h = want.get(name, {}), have.get(name, {})
        stale = [k for k in h if k not in w]
        if name == "svc_v4":  # frontends before their slots
            stale.sort(key=_is_backend_slot)
        if stale:
            deletes.append((name, stale))
    return Changes(writes, deletes, finals)
