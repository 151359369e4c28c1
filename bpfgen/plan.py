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
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import layout
from .errors import UsageError

FORMAT = 1
PROTOCOLS = layout.PROTOCOLS
_NODEPORT = layout.FLAGS["SVC_NODEPORT"]
_CLUSTERIP = layout.FLAGS["SVC_CLUSTERIP"]
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
    backends: tuple[tuple[str, str], ...]  # address, node


@dataclass(frozen=True)
class Frontend:
    addr: str
    port: int
    proto: int
    kind: str  # NodePort | ClusterIP
    service: str  # namespace/name
    backends: tuple[tuple[str, int, int, bool], ...]  # addr, port, proto, local

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.addr, self.port, self.proto)


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
            "services": [[s.key, s.type, s.cluster_ip, [list(p) for p in s.ports], [list(b) for b in s.backends]]
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
                services=tuple(ServicePlan(k, t, ip, tuple(tuple(p) for p in ports), tuple(tuple(b) for b in bes))
                               for k, t, ip, ports, bes in data["services"]),
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
    a NodePort one (on the node's address) per port of a NodePort service."""
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

_U32 = struct.Struct("<I")
_SVC_ID = struct.Struct("<I")  # bpfgen_svc_value.id, at offset 4
_SVC_ID_OFFSET = 4
_SLOT = slice(6, 8)  # bpfgen_svc_key.slot
_BACKEND_IDENTITY = slice(0, 7)  # bpfgen_backend: addr, port, proto


def _allocate(wanted: Iterable, existing: dict, limit: int, held: Callable[[], set[int]], what: str) -> dict:
    """Ids 1..limit for wanted keys: an existing key keeps its id, a new one gets the lowest
    id that is neither in use nor held (still referred to by conntrack; asked only when a
    new id is needed)."""
    wanted = list(wanted)
    ids = {k: existing[k] for k in wanted if k in existing}
    new = [k for k in wanted if k not in ids]
    if not new:
        return ids
    used = set(ids.values()) | held()
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


def desired(plan: Plan, node: NodeInfo, have: Contents, held: Held | None = None) -> Contents:
    """The contents of node's service maps, keeping the ids already in `have` (the maps'
    current contents) and avoiding the ids conntrack still holds."""
    held = held or Held()
    pack_ip = _packed_addresses()
    svc_key, svc_value = layout.SVC_KEY.packer, layout.SVC_VALUE.packer
    backend, revnat, id_key = layout.BACKEND.packer, layout.REVNAT.packer, _U32.pack

    fes = frontends(plan, node)
    old_fe = {k: _SVC_ID.unpack_from(v, _SVC_ID_OFFSET)[0] for k, v in have["svc_v4"].items() if k[_SLOT] == b"\0\0"}
    old_be = {v[_BACKEND_IDENTITY]: _U32.unpack(k)[0] for k, v in have["backend_v4"].items()}

    fe_keys = [svc_key(pack_ip(f.addr), f.port, 0, f.proto, 0, 0) for f in fes]
    fe_ids = _allocate(fe_keys, old_fe, plan.capacity["frontends"], held.frontends, "frontends")
    be_identity = {}
    for f in fes:
        for addr, port, proto, local in f.backends:
            if (addr, port, proto) not in be_identity:
                be_identity[(addr, port, proto)] = (backend(pack_ip(addr), port, proto, 0)[:7], local)
    be_ids = _allocate((i for i, _ in be_identity.values()), old_be, plan.capacity["backends"], held.backends,
                       "backends")

    svc: dict[bytes, bytes] = {}
    backends: dict[bytes, bytes] = {}
    rev: dict[bytes, bytes] = {}
    for f, key in zip(fes, fe_keys):
        fid = fe_ids[key]
        addr = pack_ip(f.addr)
        svc[key] = svc_value(0, fid, len(f.backends), _NODEPORT if f.kind == "NodePort" else _CLUSTERIP, 0)
        for slot, (baddr, port, proto, local) in enumerate(f.backends, start=1):
            identity, _ = be_identity[(baddr, port, proto)]
            bid = be_ids[identity]
            svc[svc_key(addr, f.port, slot, f.proto, 0, 0)] = svc_value(bid, fid, 0, 0, 0)
            backends[id_key(bid)] = identity + bytes((_LOCAL if local else 0,))
        rev[id_key(fid)] = revnat(addr, f.port, 0)
    return {"svc_v4": svc, "backend_v4": backends, "revnat_v4": rev}


def _packed_addresses() -> Callable[[str], bytes]:
    cache: dict[str, bytes] = {}

    def pack(addr: str) -> bytes:
        b = cache.get(addr)
        if b is None:
            b = cache[addr] = ipaddress.IPv4Address(addr).packed
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
