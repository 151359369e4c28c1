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

FORMAT = 1
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
    backends: tuple[tuple[str, str | None], ...]  # address, node (None: on no node)
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class Frontend:
    addr: str
    port: int
    proto: int
    kind: str  # NodePort | ClusterIP | ExternalIP | LoadBalancer
    service: str  # namespace/name
    backends: tuple[tuple[str, int, int, bool], ...]  # addr, port, proto, local

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.addr, self.port, self.proto)

    @property
    def flags(self) -> int:
        """The bpfgen_svc_value flags of its kind (SVC_NODEPORT, SVC_CLUSTERIP, ...)."""
        return layout.FLAGS[_KIND_FLAGS[self.kind]]


_KIND_FLAGS = {"NodePort": "SVC_NODEPORT", "ClusterIP": "SVC_CLUSTERIP", "ExternalIP": "SVC_EXTERNALIP",
               "LoadBalancer": "SVC_LOADBALANCER"}


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
                    tuple((str(b.address), b.node) for b in s.backends),
                    tuple(map(str, s.external_ips)), tuple(map(str, s.load_balancer_ips)),
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
                          *([list(s.external_ips), list(s.load_balancer_ips)]
                            if s.external_ips or s.load_balancer_ips else [])]
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
                services=tuple(ServicePlan(k, t, ip, tuple(map(tuple, ports)), tuple(map(tuple, bes)),
                                           *map(tuple, extra))  # externalIPs, loadBalancerIPs (if any)
                               for k, t, ip, ports, bes, *extra in data["services"]),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise UsageError(f"{where}: not a bpfgen plan ({e}); compile the spec again") from None

    def node(self, name: str) -> NodeInfo:
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes)
        raise UsageError(f"node '{name}' is not in spec {self.name} (nodes: {known})")


# ---------------------------------------------------------------- per node


def frontends(plan: Plan, node: NodeInfo) -> list[Frontend]:
    """Every frontend node serves: a ClusterIP one per port of a service with a clusterIP,
    a NodePort one (on the node's address) per port of a NodePort service, and per port an
    ExternalIP one for each external IP and a LoadBalancer one for each load balancer IP (on
    every node: any node may receive them). A backend on no node is remote from every node."""
    result = []
    node_addr = str(node.address)
    for svc in plan.services:
        for protocol, port, target, node_port in svc.ports:
            proto = PROTOCOLS[protocol]
            backends = tuple((addr, target, proto, host == node.name) for addr, host in svc.backends)
            if svc.cluster_ip is not None:
                result.append(Frontend(svc.cluster_ip, port, proto, "ClusterIP", svc.key, backends))
            if node_port is not None:
                result.append(Frontend(node_addr, node_port, proto, "NodePort", svc.key, backends))
            for ip in svc.external_ips:
                result.append(Frontend(ip, port, proto, "ExternalIP", svc.key, backends))
            for ip in svc.load_balancer_ips:
                result.append(Frontend(ip, port, proto, "LoadBalancer", svc.key, backends))
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
    )


def map_sizes(plan: Plan) -> dict[str, int]:
    return {m.name: m.max_entries(plan.capacity) for m in layout.MAPS}


SERVICE_MAPS = ("svc_v4", "backend_v4", "revnat_v4")
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

    def frontend_key(self, f: Frontend) -> bytes:
        return self.svc_key(self.ip(f.addr), f.port, 0, f.proto, 0, 0)

    def identity(self, addr: str, port: int, proto: int) -> bytes:
        return self.backend(self.ip(addr), port, proto, 0)[_BACKEND_IDENTITY]


def _identities(fes: list[Frontend], pk: _Packer) -> dict[tuple[str, int, int], tuple[bytes, bool]]:
    """Every backend of the frontends: (addr, port, proto) -> (identity bytes, local)."""
    out: dict[tuple[str, int, int], tuple[bytes, bool]] = {}
    for f in fes:
        for addr, port, proto, local in f.backends:
            if (addr, port, proto) not in out:
                out[(addr, port, proto)] = (pk.identity(addr, port, proto), local)
    return out


def _entries(fes: list[Frontend], fe_keys: list[bytes], fe_ids: dict[bytes, int],
             identities: dict[tuple[str, int, int], tuple[bytes, bool]], be_ids: dict[bytes, int],
             pk: _Packer) -> Contents:
    """The map entries of frontends whose ids are decided."""
    svc: dict[bytes, bytes] = {}
    backends: dict[bytes, bytes] = {}
    rev: dict[bytes, bytes] = {}
    pack_id = _U32.pack
    local_flag, remote_flag = bytes((_LOCAL,)), b"\0"
    for f, key in zip(fes, fe_keys):
        fid = fe_ids[key]
        svc[key] = pk.svc_value(0, fid, len(f.backends), f.flags, 0)
        head, tail = key[:_SLOT.start], key[_SLOT.stop:]
        slot_value_tail = pk.svc_value(0, fid, 0, 0, 0)[4:]
        for slot, (baddr, port, proto, local) in enumerate(f.backends, start=1):
            identity, _ = identities[(baddr, port, proto)]
            bid = pack_id(be_ids[identity])
            svc[head + _SLOT_BYTES[slot] + tail] = bid + slot_value_tail
            backends[bid] = identity + (local_flag if local else remote_flag)
        rev[pack_id(fid)] = pk.revnat(pk.ip(f.addr), f.port, 0)
    return {"svc_v4": svc, "backend_v4": backends, "revnat_v4": rev}


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
    return _entries(fes, fe_keys, fe_ids, identities, be_ids, pk)


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
    have = _entries(old_fes, old_keys, old_ids, old_identities, existing_be, pk)

    new_identities = _identities(new_fes, pk)
    # What this change frees may be taken by what it adds (as a full load would): the
    # frontends it removes, the backends no service names any more. Conntrack's hold on
    # them still counts (held).
    new_key_set = set(new_keys)
    freed_fe = {old_ids[k] for k in old_keys if k not in new_key_set}
    new_identity_set = {i for i, _ in new_identities.values()}
    unnamed = {identity: t for t, (identity, _) in old_identities.items() if identity not in new_identity_set}
    if unnamed:
        still_named = {(addr, target, PROTOCOLS[proto]) for s in new.services if s.key not in changed
                       for proto, _, target, _ in s.ports for addr, _ in s.backends}
        unnamed = {identity: t for identity, t in unnamed.items() if t not in still_named}
    kept_be = {identity: bid for identity, bid in existing_be.items() if identity not in unnamed}
    fe_ids = _allocate(new_keys, {k: v for k, v in existing_fe.items() if k in new_key_set},
                       new.capacity["frontends"], held.frontends, "frontends",
                       lambda: kernel.frontend_ids_in_use() - freed_fe)
    be_ids = _allocate((i for i, _ in new_identities.values()), kept_be, new.capacity["backends"],
                       held.backends, "backends", lambda: set(kept_be.values()))
    want = _entries(new_fes, new_keys, fe_ids, new_identities, be_ids, pk)
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
    writes (backends and reverse NAT, then backend slots, then the frontends that count
    them), then the deletions in the reverse order."""

    writes: list[tuple[str, list[bytes], list[bytes]]]  # map, keys, values
    deletes: list[tuple[str, list[bytes]]]

    @property
    def written(self) -> int:
        return sum(len(k) for _, k, _ in self.writes)

    @property
    def deleted(self) -> int:
        return sum(len(k) for _, k in self.deletes)


def diff_maps(want: Contents, have: Contents) -> Changes:
    """The changes that make maps holding `have` hold `want` (and diff_maps(have, want)
    takes them back)."""
    writes, deletes = [], []
    for name in ("backend_v4", "revnat_v4", "svc_v4"):
        w, h = want.get(name, {}), have.get(name, {})
        changed = [k for k, v in w.items() if h.get(k) != v]
        if name == "svc_v4":  # slots before the frontends that count them
            changed.sort(key=lambda k: not _is_backend_slot(k))
        if changed:
            writes.append((name, changed, [w[k] for k in changed]))
    for name in ("svc_v4", "revnat_v4", "backend_v4"):
        w, h = want.get(name, {}), have.get(name, {})
        stale = [k for k in h if k not in w]
        if name == "svc_v4":  # frontends before their slots
            stale.sort(key=_is_backend_slot)
        if stale:
            deletes.append((name, stale))
    return Changes(writes, deletes)
