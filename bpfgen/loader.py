"""`bpfgen load` / `unload`: a node's datapath into the kernel and out again.

load reads as: check -> open (pins reused) -> load -> fill maps -> attach -> record.
A load that fails part-way undoes what it did: the maps' previous contents come
back, a previous program is attached again, new pins and a new qdisc are removed.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

from . import layout
from . import libbpf as bpf
from .build import Build, compile_spec, find_build, open_build
from .errors import BpfgenError, UsageError
from .netns import enter_netns, ifindex as if_index
from .services import frontends
from .spec import Node, PortRange, Spec
from .state import (
    NodeRecord,
    UnreadableRecord,
    check_privileges,
    ensure_bpffs,
    netns_inode,
    node_lock,
    pin_dir,
    record_dir,
    remove_pins,
    require_host_bpffs,
)

TC_HANDLE = 0xB9F
TC_PRIORITY = 0xB9F
HOOKS = (("ingress", bpf.BPF_TC_INGRESS, "from_netdev"), ("egress", bpf.BPF_TC_EGRESS, "to_netdev"))
SERVICE_MAPS = ("svc_v4", "backend_v4", "revnat_v4")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- what the maps should hold


def _allocate(wanted: list, existing: dict, limit: int, held: set[int] = frozenset()) -> dict:
    """Ids for wanted keys: an existing key keeps its id, a new one gets the lowest id
    that is neither in use nor held (still referred to by conntrack)."""
    ids = {k: existing[k] for k in wanted if k in existing}
    used = set(ids.values()) | set(held)
    next_id = 1
    for k in wanted:
        if k in ids:
            continue
        while next_id in used:
            next_id += 1
        if next_id >= limit:
            raise UsageError(f"more than {limit - 1} ids needed; the map is too small for this spec")
        ids[k] = next_id
        used.add(next_id)
    return ids


def conntrack_refs(ct: bpf.MapFd) -> tuple[set[int], set[int]]:
    """Backend ids and reverse-NAT ids that conntrack entries refer to. A removed
    backend's or frontend's id is not handed out again while a flow may still use it,
    or the flow would silently follow the newcomer."""
    now = layout.datapath_now()
    backends, revnats = set(), set()
    for _, v in ct.lookup_batch():
        entry = layout.CT_ENTRY.unpack(v)
        if entry["expires"] >= now:  # dead entries the LRU has not evicted hold nothing
            backends.add(entry["backend_id"])
            revnats.add(entry["rev_nat_id"])
    return backends, revnats


def desired_entries(
    spec: Spec, node: Node, maps: dict[str, bpf.MapFd], ct: bpf.MapFd | None = None
) -> dict[str, dict[bytes, bytes]]:
    """The contents of the service maps for node, keeping the ids already in the maps
    and holding back the ids conntrack (ct_v4, if given) still refers to."""
    held_backends, held_revnats = conntrack_refs(ct) if ct is not None else (set(), set())
    fes = frontends(spec, node)
    old_fe, old_be = {}, {}
    for k, v in maps["svc_v4"].items():
        key = layout.SVC_KEY.unpack(k)
        if key["slot"] == 0:
            old_fe[(key["addr"], key["port"], key["proto"])] = layout.SVC_VALUE.unpack(v)["id"]
    for k, v in maps["backend_v4"].items():
        be = layout.BACKEND.unpack(v)
        old_be[(be["addr"], be["port"], be["proto"])] = layout.ID_KEY.unpack(k)
    fe_ids = _allocate([f.key for f in fes], old_fe, maps["revnat_v4"].info.max_entries, held_revnats)
    be_keys = list(dict.fromkeys(b[:3] for f in fes for b in f.backends))
    be_ids = _allocate(be_keys, old_be, 1 << 32, held_backends)

    svc, backends, revnat = {}, {}, {}
    for f in fes:
        fid = fe_ids[f.key]
        flags = layout.FLAGS["SVC_NODEPORT" if f.kind == "NodePort" else "SVC_CLUSTERIP"]
        svc[layout.SVC_KEY.pack(addr=f.addr, port=f.port, proto=f.proto, slot=0)] = layout.SVC_VALUE.pack(
            count=len(f.backends), id=fid, flags=flags
        )
        for slot, (addr, port, proto, local) in enumerate(f.backends, start=1):
            bid = be_ids[(addr, port, proto)]
            svc[layout.SVC_KEY.pack(addr=f.addr, port=f.port, proto=f.proto, slot=slot)] = layout.SVC_VALUE.pack(
                backend_id=bid, id=fid
            )
            backends[layout.ID_KEY.pack(bid)] = layout.BACKEND.pack(
                addr=addr, port=port, proto=proto, flags=layout.FLAGS["BACKEND_LOCAL"] if local else 0
            )
        revnat[layout.ID_KEY.pack(fid)] = layout.REVNAT.pack(addr=f.addr, port=f.port)
    return {"svc_v4": svc, "backend_v4": backends, "revnat_v4": revnat}


def _slot_order(key: bytes) -> int:
    """Backend slots (1..n) of the service map before the frontends (slot 0) that count them."""
    return 0 if layout.SVC_KEY.unpack(key)["slot"] else 1


# The order writes go in, so that no packet meets a reference to a missing entry:
# backends and reverse NAT first, then the backend slots, then the frontends that
# count them. Deletions go in the reverse order.
_WRITE_ORDER = (("backend_v4", None), ("revnat_v4", None), ("svc_v4", _slot_order))


def sync_service_maps(maps: dict[str, bpf.MapFd], want: dict[str, dict[bytes, bytes]],
                      have: dict[str, dict[bytes, bytes]]) -> None:
    """Make the service maps hold exactly want: every write across the maps first, then
    every deletion, each in an order that keeps references whole."""
    for name, order in _WRITE_ORDER:
        changed = [k for k, v in want[name].items() if have[name].get(k) != v]
        if order:
            changed.sort(key=order)
        if changed:
            maps[name].update_batch(changed, [want[name][k] for k in changed])
    for name, order in reversed(_WRITE_ORDER):
        stale = [k for k in have[name] if k not in want[name]]
        if order:
            stale.sort(key=order, reverse=True)
        for k in stale:
            maps[name].delete(k)


# ---------------------------------------------------------------- load


@dataclass
class LoadResult:
    node: str
    iface: str
    pin_dir: str
    updated: bool
    programs: dict[str, dict]
    messages: list[str] = field(default_factory=list)


def interface_addresses(iface: str) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses of iface in the calling thread's network namespace; refuses an
    interface that is not Ethernet (the datapath parses Ethernet frames)."""
    proc = subprocess.run(["ip", "-j", "addr", "show", "dev", iface], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsageError(f"interface '{iface}': {proc.stderr.strip() or 'ip addr failed'}")
    links = json.loads(proc.stdout or "[]")
    kind = links[0].get("link_type") if links else None
    if kind != "ether":
        raise UsageError(f"interface '{iface}' is not an Ethernet interface (link type {kind}); "
                         "the datapath handles Ethernet frames only")
    return [
        ipaddress.IPv4Address(a["local"])
        for link in links
        for a in link.get("addr_info", [])
        if a.get("family") == "inet"
    ]


def _port_ranges(text: str) -> set[int]:
    """Ports of a sysctl list like "1000-1010,2000" (ip_local_reserved_ports)."""
    ports: set[int] = set()
    for part in text.replace(",", " ").split():
        lo, _, hi = part.partition("-")
        ports.update(range(int(lo), int(hi or lo) + 1))
    return ports


def ephemeral_port_warning(node: str, snat: PortRange) -> str | None:
    """A warning when the calling thread's namespace hands out ephemeral ports inside
    snatPortRange: a reply to the node's own connection could be taken for an SNAT reply."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        reserved = _port_ranges(Path("/proc/sys/net/ipv4/ip_local_reserved_ports").read_text())
    except (OSError, ValueError):
        return None
    clash = [p for p in range(max(lo, snat.lo), min(hi, snat.hi) + 1) if p not in reserved]
    if not clash:
        return None
    return (f"warning: node {node} hands out ephemeral ports {lo}-{hi}, {len(clash)} of them inside "
            f"snatPortRange {snat}; replies to the node's own connections could be taken for SNAT replies. "
            f"Reserve them (sysctl net.ipv4.ip_local_reserved_ports={snat}) or narrow net.ipv4.ip_local_port_range")


def pick_node(spec: Spec, iface: str, node: str | None, addresses: list[ipaddress.IPv4Address]) -> Node:
    if node is not None:
        try:
            return spec.node(node)
        except KeyError:
            known = ", ".join(n.name for n in spec.nodes)
            raise UsageError(f"node '{node}' is not in spec {spec.metadata.name} (nodes: {known})") from None
    for n in spec.nodes:
        if n.address in addresses:
            return n
    have = ", ".join(map(str, addresses)) or "none"
    raise UsageError(
        f"cannot tell which node interface '{iface}' is: its addresses ({have}) match no node of "
        f"spec {spec.metadata.name}; pass --node"
    )


def resolve_build(build: str | Path | None, spec: str | Path | None) -> Build:
    if build and spec:
        raise UsageError("give --build or --spec, not both")
    if spec:
        return compile_spec(spec)
    return open_build(build) if build else find_build()


class _Undo:
    """Steps to take back, newest first, if the load fails part-way, and what they need
    kept open until then (map fds, the fd of a replaced program)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], None]]] = []
        self.held = ExitStack()

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self.steps.append((what, fn))

    def hold(self, resource: Any) -> Any:
        return self.held.enter_context(resource)

    def run(self) -> list[str]:
        failures = []
        for what, fn in reversed(self.steps):
            try:
                fn()
            except Exception as e:  # keep undoing the rest
                failures.append(f"could not undo {what}: {e}")
        return failures


def _same_program(prog_id: int, new_fd: int) -> bool:
    """Same code (tag) on the same maps: the tag ignores which maps a program uses, and
    after pins were recreated the old program would still use the old maps."""
    with bpf.prog_get_fd_by_id(prog_id) as old_fd:
        return (bpf.prog_info(old_fd).tag, bpf.prog_map_ids(old_fd)) == (
            bpf.prog_info(new_fd).tag, bpf.prog_map_ids(new_fd))


def _prog_record(name: str, prog_id: int) -> dict:
    with bpf.prog_get_fd_by_id(prog_id) as fd:
        info = bpf.prog_info(fd)
    return {"name": name, "id": prog_id, "tag": info.tag}


def load(
    iface: str,
    build: str | Path | None = None,
    spec: str | Path | None = None,
    node: str | None = None,
    netns: str | None = None,
) -> LoadResult:
    check_privileges()
    b = resolve_build(build, spec)
    the_spec = b.spec()
    messages = []
    mounted = ensure_bpffs()
    if mounted:
        messages.append(mounted)
    with enter_netns(netns):
        ifindex = if_index(iface)
        n = pick_node(the_spec, iface, node, interface_addresses(iface))
        ns_inode = netns_inode()
        warning = ephemeral_port_warning(n.name, the_spec.cluster.snat_port_range)
    if warning:
        messages.append(warning)
    with node_lock(n.name):
        previous = NodeRecord.load(n.name)
        if previous and (previous.iface, previous.netns_inode) != (iface, ns_inode):
            raise UsageError(f"node '{n.name}' is loaded on {previous.where()}; unload it there first")
        _refuse_other_owner(n.name, iface, ns_inode)
        result = _load_node(b, the_spec, n, iface, ifindex, netns, ns_inode, previous)
        result.messages[:0] = messages
        return result


def _load_node(
    b: Build, spec: Spec, n: Node, iface: str, ifindex: int, netns: str | None, ns_inode: int,
    previous: NodeRecord | None,
) -> LoadResult:
    pins = pin_dir(n.name)
    undo = _Undo()
    if not pins.is_dir():
        pins.mkdir(parents=True)
        undo.push(f"pin dir {pins}", lambda: remove_pins(n.name) and None)
    existed_before = {p.name for p in pins.iterdir()}
    try:
        with bpf.BpfObject.open(b.object_path(n.name), pin_root_path=pins) as obj:
            obj.load()
            for name in sorted(p.name for p in pins.iterdir() if p.name not in existed_before):
                undo.push(f"pin {pins / name}", lambda p=pins / name: p.unlink(missing_ok=True))

            maps = {name: undo.hold(obj.map(name).map_fd()) for name in SERVICE_MAPS}
            snapshot = {name: dict(m.items()) for name, m in maps.items()}
            with obj.map("ct_v4").map_fd() as ct:
                want = desired_entries(spec, n, maps, ct)
            undo.push("contents of the service maps", lambda: sync_service_maps(
                maps, snapshot, {name: dict(m.items()) for name, m in maps.items()}))
            sync_service_maps(maps, want, snapshot)

            programs, created_qdisc = _attach(obj, ifindex, netns, undo)
            created_qdisc = created_qdisc or bool(previous and previous.created_qdisc)
        now = _now()
        record = NodeRecord(
            node=n.name, iface=iface, netns=netns, netns_inode=ns_inode, pin_dir=str(pins),
            spec=spec.metadata.name, build=str(b.dir.resolve()),
            loaded_at=previous.loaded_at if previous else now, updated_at=now,
            programs=programs, created_qdisc=created_qdisc,
        )
        record.save()
        return LoadResult(n.name, iface, str(pins), previous is not None, programs)
    except BaseException as e:
        for failure in undo.run():
            e.add_note(failure)  # the cause stays the error; what could not be undone follows it
        raise
    finally:
        undo.held.close()


def _attach(obj: bpf.BpfObject, ifindex: int, netns: str | None, undo: _Undo) -> tuple[dict, bool]:
    """Attach (or atomically replace) both programs; returns their records and whether
    the clsact qdisc was created."""
    programs: dict = {}
    with enter_netns(netns):
        created_qdisc = bpf.tc_hook_create(ifindex, bpf.BPF_TC_INGRESS)
        if created_qdisc:
            undo.push("clsact qdisc", lambda: _in_netns(netns, bpf.tc_hook_destroy, ifindex))
        for hook, point, prog_name in HOOKS:
            prog = obj.program(prog_name)
            old_id = bpf.tc_query(ifindex, point, TC_HANDLE, TC_PRIORITY)
            if old_id is not None and _same_program(old_id, prog.fd):
                programs[hook] = _prog_record(prog_name, old_id)  # unchanged: keep it
                continue
            # Hold the replaced program: once tc lets go of it, only this fd keeps it alive.
            old_fd = undo.hold(bpf.prog_get_fd_by_id(old_id)) if old_id is not None else None
            prog_id = bpf.tc_attach(ifindex, point, prog.fd, TC_HANDLE, TC_PRIORITY, replace=old_id is not None)
            if old_fd is None:
                undo.push(f"{hook} filter", lambda p=point: _in_netns(netns, bpf.tc_detach, ifindex, p, TC_HANDLE, TC_PRIORITY))
            else:
                undo.push(f"{hook} program", lambda p=point, fd=old_fd: _in_netns(netns, bpf.tc_attach, ifindex, p, fd, TC_HANDLE, TC_PRIORITY, True))
            programs[hook] = _prog_record(prog_name, prog_id)
    return programs, created_qdisc


def _in_netns(netns: str | None, fn: Callable, *args: object) -> None:
    with enter_netns(netns):
        fn(*args)


# ---------------------------------------------------------------- unload


@dataclass
class UnloadResult:
    node: str
    iface: str
    detached: list[str]
    removed_pins: list[str]
    removed_qdisc: bool


def _refuse_other_owner(name: str, iface: str, ns_inode: int) -> None:
    """One node per interface: another node's datapath there is not taken over."""
    for r in NodeRecord.all():
        if r.node != name and (r.iface, r.netns_inode) == (iface, ns_inode):
            raise UsageError(f"interface '{iface}' here carries node '{r.node}'; unload it first "
                             f"(bpfgen unload --iface {iface} --node {r.node})")


def _node_for_unload(iface: str, node: str | None, ns_inode: int, netns: str | None) -> str:
    if node:
        return node
    for r in NodeRecord.all():
        if r.iface == iface and r.netns_inode == ns_inode:
            return r.node
    where = f"network namespace '{netns}'" if netns else "this network namespace"
    raise UsageError(f"nothing of bpfgen is loaded on interface '{iface}' in {where} (see `bpfgen status`)")


def unload(iface: str, node: str | None = None, netns: str | None = None) -> UnloadResult:
    check_privileges()
    require_host_bpffs()
    if node:
        cleared = _clear_orphan(node)
        if cleared:
            return cleared
    with enter_netns(netns):
        ifindex = if_index(iface)
        here = netns_inode()
    name = _node_for_unload(iface, node, here, netns)
    with node_lock(name):
        record = NodeRecord.load(name)
        if record and (record.iface, record.netns_inode) != (iface, here):
            raise UsageError(f"node '{name}' is loaded on {record.where()}; unload it there")
        if record is None:
            _refuse_other_owner(name, iface, here)
        detached = []
        removed_qdisc = False
        with enter_netns(netns):
            for hook, point, _ in HOOKS:
                if bpf.tc_query(ifindex, point, TC_HANDLE, TC_PRIORITY) is not None:
                    bpf.tc_detach(ifindex, point, TC_HANDLE, TC_PRIORITY)
                    detached.append(hook)
            if record and record.created_qdisc:
                removed_qdisc = bpf.tc_hook_destroy(ifindex)
        removed = remove_pins(name)
        if not (detached or removed or record):
            raise UsageError(f"nothing of bpfgen is loaded for node '{name}'")
        if record:
            record.remove()
        return UnloadResult(name, iface, detached, removed, removed_qdisc)


def _clear_orphan(node: str) -> UnloadResult | None:
    """A node whose record is unreadable, or whose namespace is gone (with all it held
    in the kernel but the pins): its pins and record are removed without tc."""
    with node_lock(node):
        try:
            record = NodeRecord.load(node)
        except UnreadableRecord:
            (record_dir() / f"{node}.json").unlink(missing_ok=True)
            return UnloadResult(node, "?", [], remove_pins(node), False)
        if record is None or not record.namespace_gone():
            return None
        removed = remove_pins(node)
        record.remove()
        return UnloadResult(node, record.iface, [], removed, False)


# ---------------------------------------------------------------- status


def status() -> list[dict]:
    """What is loaded, per node, checked against the kernel where it can be."""
    check_privileges()
    require_host_bpffs()
    rows = []
    for r in NodeRecord.all():
        row = {
            "node": r.node, "iface": r.iface, "netns": r.netns, "pin_dir": r.pin_dir, "spec": r.spec,
            "build": r.build, "loaded_at": r.loaded_at, "updated_at": r.updated_at,
            "programs": r.programs, "pinned": Path(r.pin_dir).is_dir(),
        }
        if r.netns is not None or r.netns_inode == netns_inode():
            try:
                with enter_netns(r.netns):
                    row["attached"] = {
                        hook: bpf.tc_query(if_index(r.iface), point, TC_HANDLE, TC_PRIORITY)
                        for hook, point, _ in HOOKS
                    }
            except BpfgenError as e:
                row["attached"] = {"error": str(e)}
        rows.append(row)
    return rows
