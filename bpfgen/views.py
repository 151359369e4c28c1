"""What is in a node's pinned maps: generic dumps decoded by the kernel's BTF, and the
operator's tables (services, conntrack, NAT) read from the kernel, not from a spec.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from . import layout
from . import libbpf as bpf
from .btf import Btf
from .errors import UsageError
from .inspect import map_type_name
from .state import pin_dir

PROTO_NAMES = {v: k for k, v in layout.PROTOCOLS.items()}


def pinned_map_names(node: str) -> list[str]:
    d = pin_dir(node)
    order = {m.name: i for i, m in enumerate(layout.MAPS)}
    if not d.is_dir():
        return []
    names = [p.name for p in d.iterdir() if not p.name.startswith("resizing_")]  # (a load replacing it)
    return sorted(names, key=lambda n: (order.get(n, len(order)), n))


@contextmanager
def open_maps(node: str, names: list[str] | None = None) -> Iterator[dict[str, bpf.MapFd]]:
    available = pinned_map_names(node)
    for name in names or []:
        if name not in available:
            raise UsageError(f"node {node} has no map '{name}' (maps: {', '.join(available) or 'none'})")
    with ExitStack() as stack:
        yield {n: stack.enter_context(bpf.MapFd.from_pin(pin_dir(node) / n)) for n in (names or available)}


@lru_cache(maxsize=16)
def _kernel_btf(btf_id: int) -> Btf:
    return Btf.parse(bpf.btf_raw_by_id(btf_id))


class _Codec:
    """Decodes one map's keys and values by its BTF (raw hex where it has none)."""

    def __init__(self, m: bpf.MapFd):
        info = m.info
        self.btf = _kernel_btf(info.btf_id) if info.btf_id else None
        self.key_id = info.btf_key_type_id
        self.value_id = info.btf_value_type_id

    def _decode(self, type_id: int, data: bytes) -> Any:
        if self.btf is None or not type_id:
            return data.hex(" ")
        return self.btf.decode(type_id, data)

    def key(self, data: bytes) -> Any:
        return self._decode(self.key_id, data)

    def value(self, data: bytes) -> Any:
        return self._decode(self.value_id, data)


@dataclass
class MapDump:
    """One map in bpftool's JSON shape: its header, and its entries (key/value, or
    key/values per CPU) decoded as they are read, a batch at a time, so that a busy
    node's conntrack is never held whole. An array holds every index whether it was
    written or not: its slots that are zero on every CPU say nothing and are left out,
    counted in zero_slots as the entries go by."""

    header: dict
    array: bool
    entries: Iterator[dict] = field(default_factory=lambda: iter(()))
    zero_slots: int = 0
    percpu: bool = False
    count: Callable[[], int] = lambda: 0  # the entries there are now (a scan that decodes nothing)

    def as_dict(self) -> dict:
        entries = list(self.entries)
        return {**self.header, "entries": entries, **({"zero_slots": self.zero_slots} if self.array else {})}


def dump_map(m: bpf.MapFd) -> MapDump:
    info = m.info
    header = {"name": info.name, "type": map_type_name(info.type), "id": info.id, "key_size": info.key_size,
              "value_size": info.value_size, "max_entries": info.max_entries}
    out = MapDump(header, info.type in bpf.ARRAY_TYPES, percpu=m.percpu,
                  count=lambda: sum(len(keys) // m.key_size for keys, _ in m.scan()))
    codec = _Codec(m)

    def entries() -> Iterator[dict]:
        ks, vs = m.key_size, m.value_buf_size
        for keys, values in m.scan():
            for i in range(len(keys) // ks):
                k, v = keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs]
                if out.array and not any(v):
                    out.zero_slots += 1
                elif m.percpu:
                    yield {"key": codec.key(k),
                           "values": [{"cpu": cpu, "value": codec.value(raw)} for cpu, raw in enumerate(m.split_percpu(v))]}
                else:
                    yield {"key": codec.key(k), "value": codec.value(v)}

    out.entries = entries()
    return out


def dump_maps(node: str, map_name: str | None = None) -> Iterator[MapDump]:
    """The node's maps (or the one named), each to be read before the next is given."""
    with open_maps(node, [map_name] if map_name else None) as maps:
        for m in maps.values():
            yield dump_map(m)


def dump(node: str, map_name: str | None = None) -> list[dict]:
    return [d.as_dict() for d in dump_maps(node, map_name)]


# ---------------------------------------------------------------- operator tables


def _ep(addr: Any, port: int) -> str:
    return f"{addr}:{port}"


_FRONTEND_KINDS = (("NodePort", "SVC_NODEPORT"), ("LoadBalancer", "SVC_LOADBALANCER"),
                   ("ExternalIP", "SVC_EXTERNALIP"), ("ClusterIP", "SVC_CLUSTERIP"))


def _by_id(m: bpf.MapFd, value: layout.Struct) -> dict[int, dict]:
    """A map keyed by id (backend_v4, revnat_v4), decoded."""
    return {layout.ID_KEY.unpack(k): value.unpack(v) for k, v in m.lookup_batch()}


_BACKEND_STATES = (("terminating", "BACKEND_TERMINATING"), ("not-serving", "BACKEND_NOT_SERVING"))


def _backend_state(flags: int) -> str:
    return next((name for name, bit in _BACKEND_STATES if flags & layout.FLAGS[bit]), "ready")


def service_list(node: str) -> list[dict]:
    """The service table of node, read from its pinned maps: every frontend with its type,
    policies (traffic policy Local, ClientIP affinity, source ranges, reject) and backends:
    those that take new flows, then those that take none (terminating, not serving),
    each with its state."""
    with open_maps(node, ["svc_v4", "backend_v4", "revnat_v4", "src_range_v4"]) as maps:
        backends, revnat = _by_id(maps["backend_v4"], layout.BACKEND), _by_id(maps["revnat_v4"], layout.REVNAT)
        ranges: dict[int, list[str]] = {}
        for k, v in maps["src_range_v4"].lookup_batch():
            key = layout.SOURCE_RANGE_KEY.unpack(k)
            ranges.setdefault(key["rev_nat_id"], []).append(f"{key['addr']}/{layout.SOURCE_RANGE.unpack(v)['range_len']}")
        masters, slots = {}, {}
        for k, v in maps["svc_v4"].lookup_batch():
            key, val = layout.SVC_KEY.unpack(k), layout.SVC_VALUE.unpack(v)
            fe = (key["addr"], key["port"], key["proto"])
            if key["slot"] == 0:
                masters[fe] = val
            else:
                slots.setdefault(fe, {})[key["slot"]] = val["backend_id"]
    rows = []
    for fe, val in masters.items():
        addr, port, proto = fe
        flags = val["flags"]
        kind = next((name for name, bit in _FRONTEND_KINDS if flags & layout.FLAGS[bit]), "ClusterIP")
        bes = []
        for slot in range(1, val["count"] + val["others"] + 1):
            backend_id = slots.get(fe, {}).get(slot)
            be = backends.get(backend_id)
            new_flows = slot <= val["count"]
            if be is None:  # shown, not hidden: the datapath drops flows that pick it
                bes.append({"slot": slot, "address": None, "protocol": None, "local": False, "state": None,
                            "new_flows": new_flows,
                            "missing": f"slot {slot}" if backend_id is None else f"backend id {backend_id}"})
                continue
            bes.append({
                "slot": slot, "address": _ep(be["addr"], be["port"]), "protocol": PROTO_NAMES.get(be["proto"], be["proto"]),
                "local": bool(be["flags"] & layout.FLAGS["BACKEND_LOCAL"]), "state": _backend_state(be["flags"]),
                "new_flows": new_flows,
            })
        rev = revnat.get(val["id"], {})
        local = bool(flags & layout.FLAGS["SVC_LOCAL"])
        rows.append({
            "id": val["id"], "frontend": _ep(addr, port), "protocol": PROTO_NAMES.get(proto, proto), "type": kind,
            "traffic_policy": "Local" if local else "Cluster",
            "session_affinity": ({"type": "ClientIP", "timeout_seconds": rev.get("affinity_timeout", 0)}
                                 if flags & layout.FLAGS["SVC_AFFINITY"] else None),
            "health_check_node_port": rev.get("health_check_port") or None,
            "source_ranges": sorted(ranges.get(val["id"], [])) if flags & layout.FLAGS["SVC_SOURCE_RANGES"] else None,
            "no_backend": ("reject" if flags & layout.FLAGS["SVC_REJECT"] else "drop") if val["count"] == 0 else None,
            "backends": bes,
        })
    return sorted(rows, key=lambda r: r["id"])


def affinity_list(node: str) -> list[dict]:
    """The client addresses ClientIP affinity keeps on a backend, from the node's maps: the
    group (the frontends of one service port), the backend and the seconds left."""
    now = layout.datapath_now()
    with open_maps(node, ["affinity_v4", "backend_v4", "revnat_v4"]) as maps:
        backends, revnat = _by_id(maps["backend_v4"], layout.BACKEND), _by_id(maps["revnat_v4"], layout.REVNAT)
        rows = []
        for k, v in maps["affinity_v4"].lookup_batch():
            key, e = layout.AFFINITY_KEY.unpack(k), layout.AFFINITY_ENTRY.unpack(v)
            group = revnat.get(key["group"], {})
            be = backends.get(e["backend_id"])
            timeout = group.get("affinity_timeout", 0)
            rows.append({
                "client": str(key["client"]), "group": key["group"],
                "frontend": _ep(group["addr"], group["port"]) if group else None,
                "backend_id": e["backend_id"], "backend": _ep(be["addr"], be["port"]) if be else None,
                "expires_in": e["last_used"] + timeout - now, "live": now <= e["last_used"] + timeout,
            })
    return sorted(rows, key=lambda r: (r["group"], r["client"]))


CT_DIRS = {layout.FLAGS["CT_SERVICE"]: "SVC", layout.FLAGS["CT_OUT"]: "OUT", layout.FLAGS["CT_SERVICE_EGRESS"]: "SVC_EGRESS"}
CT_FLAG_NAMES = (("closing", "CT_CLOSING"), ("established", "CT_ESTABLISHED"), ("snat", "CT_SNAT"),
                 ("fin_client", "CT_FIN_CLIENT"), ("fin_backend", "CT_FIN_BACKEND"),
                 ("backend_closed_first", "CT_BACKEND_CLOSED_FIRST"), ("egress", "CT_EGRESS"),
                 ("midstream", "CT_MIDSTREAM"), ("backend_done", "CT_BACKEND_DONE"),
                 ("ts_rewrite", "CT_TS_REWRITE"))
NAT_DIRS = {layout.FLAGS["NAT_OUT"]: "OUT", layout.FLAGS["NAT_IN"]: "IN"}


CT_TABLES = {"ct_v4": "tcp", "ct_half_v4": "tcp-half-open", "ct_udp_v4": "udp"}


# What the tables read of each entry: scanned a batch at a time, a few fields unpacked
# (addresses and ports as packed bytes), so that a busy node's 500,000 entries stream
# through in seconds and little memory rather than as an object per field.
_CT_KEY = ("saddr", "daddr", "sport", "dport", "proto", "dir")
_CT_VALUE = ("expires", "backend_id", "rev_nat_id", "flags", "snat_port", "xl_saddr", "xl_daddr", "xl_dport")


def _fields(m: bpf.MapFd, value: layout.Struct, value_fields: tuple[str, ...]) -> Iterator[tuple[tuple, tuple]]:
    """(key fields of _CT_KEY, the value's value_fields) of every entry of m, keyed by a tuple."""
    keys_at = layout.TUPLE.reader(*_CT_KEY, size=m.key_size)
    values_at = value.reader(*value_fields, size=m.value_buf_size)
    for keys, values in m.scan():
        yield from zip(keys_at.iter_unpack(keys), values_at.iter_unpack(values))


def _ct_entries(maps: dict[str, bpf.MapFd]) -> Iterator[tuple[str, tuple, tuple]]:
    """(table, key fields of _CT_KEY, value fields of _CT_VALUE) of every entry."""
    for name in CT_TABLES:
        for k, v in _fields(maps[name], layout.CT_ENTRY, _CT_VALUE):
            yield name, k, v


def _packed_ep(addr: bytes, port: bytes) -> str:
    return f"{socket.inet_ntoa(addr)}:{int.from_bytes(port, 'big')}"


_FLAG_BITS = tuple((n, layout.FLAGS[bit]) for n, bit in CT_FLAG_NAMES)
_SNAT, _CT_OUT = layout.FLAGS["CT_SNAT"], layout.FLAGS["CT_OUT"]


def ct_rows(node: str) -> Iterator[dict]:
    """The node's conntrack entries, of its three tables (the table says which), in the
    kernel's order, read as they are given out (a busy node's are never all held)."""
    now = layout.datapath_now()
    with open_maps(node, list(CT_TABLES)) as maps:
        for table, (saddr, daddr, sport, dport, proto, direction), v in _ct_entries(maps):
            expires, backend_id, rev_nat_id, flags, snat_port, xl_saddr, _, _ = v
            # (the SNAT address: a reply entry's key comes from it, a forward entry translates to it)
            snat_addr = saddr if direction == _CT_OUT else xl_saddr
            yield {
                "table": CT_TABLES[table],
                "proto": PROTO_NAMES.get(proto, str(proto)), "dir": CT_DIRS.get(direction, str(direction)),
                "src": _packed_ep(saddr, sport), "dst": _packed_ep(daddr, dport),
                "expires_in": expires - now, "backend_id": backend_id, "rev_nat_id": rev_nat_id,
                "flags": [n for n, bit in _FLAG_BITS if flags & bit],
                "snat": _packed_ep(snat_addr, snat_port) if flags & _SNAT else None,
            }


def ct_list(node: str) -> list[dict]:
    """ct_rows, sorted (for a node's few entries: the lab's report)."""
    return sorted(ct_rows(node), key=lambda r: (r["dir"], r["src"], r["dst"]))


def nat_rows(node: str) -> Iterator[dict]:
    """The node's SNAT pairs: OUT, from the conntrack entries of SNATed flows (client ->
    backend, from node:port), which hold that translation (the datapath writes no entry of
    its own for it); IN, the port claims of snat_v4 (backend -> node:port, to the client).
    In the kernel's order, read as they are given out."""
    with open_maps(node, ["snat_v4", *CT_TABLES]) as maps:
        for _, (saddr, _, sport, _, proto, direction), v in _ct_entries(maps):
            _, _, _, flags, snat_port, xl_saddr, xl_daddr, xl_dport = v
            if direction in layout.CT_FORWARD_DIRS and flags & _SNAT:
                yield {"proto": PROTO_NAMES.get(proto, str(proto)), "dir": "OUT",
                       "src": _packed_ep(saddr, sport), "dst": _packed_ep(xl_daddr, xl_dport),
                       "xlate": "XLATE_SRC", "to": _packed_ep(xl_saddr, snat_port)}
        for (saddr, daddr, sport, dport, proto, direction), (addr, port) in _fields(
                maps["snat_v4"], layout.NAT_ENTRY, ("addr", "port")):
            d = NAT_DIRS.get(direction, str(direction))
            yield {"proto": PROTO_NAMES.get(proto, str(proto)), "dir": d, "src": _packed_ep(saddr, sport),
                   "dst": _packed_ep(daddr, dport), "xlate": "XLATE_SRC" if d == "OUT" else "XLATE_DST",
                   "to": _packed_ep(addr, port)}


def nat_list(node: str) -> list[dict]:
    """nat_rows, sorted (OUT first)."""
    return sorted(nat_rows(node), key=lambda r: (r["dir"] != "OUT", r["src"], r["dst"]))
