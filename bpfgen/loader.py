"""`bpfgen load` / `unload`: a node's datapath into the kernel and out again.

load reads as: cheap checks (privileges, bpffs, interface, locks) -> the build's plan ->
either a data-only update (the same object and configuration are attached: the pinned
maps get the difference, the programs stay) or a full load (open the object, set the
node's configuration and map sizes, load with the pins reused, fill the maps, attach or
replace the programs) -> record. A load that fails part-way undoes what it did: the
maps' previous contents come back, a previous program is attached again, new pins and
a new qdisc are removed.
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import os
import struct
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import layout
from . import libbpf as bpf
from . import plan as planning
from .build import Build, check_object, find_build, open_build
from .errors import BpfgenError, UsageError
from .host import interface_addresses, port_ranges, release_ports, reserve_ports, format_ports
from .netns import enter_netns, ifindex as if_index
from .plan import SERVICE_MAPS, Changes, Plan
from .render import TIMEOUTS
from .state import (
    NodeRecord,
    UnreadableRecord,
    check_node_name,
    check_privileges,
    ensure_bpffs,
    iface_lock,
    netns_inode,
    node_lock,
    pin_dir,
    pinned_nodes,
    record_dir,
    remove_pins,
    require_host_bpffs,
)

TC_HANDLE = 0xB9F
TC_PRIORITY = 0xB9F
HOOKS = (("ingress", bpf.BPF_TC_INGRESS, "from_netdev"), ("egress", bpf.BPF_TC_EGRESS, "to_netdev"))
CONFIG_MAP = ".rodata.config"
UPDATE_BATCH = 65536  # entries per bpf_map_update_batch of a migration


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- service maps


def read_maps(maps: dict[str, bpf.MapFd]) -> planning.Contents:
    return {name: dict(maps[name].lookup_batch()) for name in SERVICE_MAPS}


CONNTRACK_MAPS = ("ct_v4", "ct_half_v4", "ct_udp_v4")  # established TCP flows, those still opening, UDP


def _ct_reader(ct: bpf.MapFd, *names: str) -> struct.Struct:
    return layout.CT_ENTRY.reader(*names, size=ct.value_buf_size)


def conntrack_refs(cts: list[bpf.MapFd]) -> tuple[set[int], set[int]]:
    """Backend ids and reverse-NAT ids that live conntrack entries refer to (a scan of
    every entry: a batch at a time, three fields read of each)."""
    now = layout.datapath_now()
    backends, revnats = set(), set()
    for ct in cts:
        refs = _ct_reader(ct, "expires", "backend_id", "rev_nat_id")
        for _, values in ct.scan():
            # (dead entries not yet evicted or collected hold nothing)
            live = [(b, r) for expires, b, r in refs.iter_unpack(values) if expires >= now]
            backends.update(b for b, _ in live)
            revnats.update(r for _, r in live)
    return backends, revnats


def apply_changes(maps: dict[str, bpf.MapFd], changes: Changes) -> None:
    for name, keys, values in changes.writes:
        maps[name].update_batch(keys, values)
    for name, keys in changes.deletes:
        maps[name].delete_batch(keys)
    for name, keys, values in changes.finals:
        maps[name].update_batch(keys, values)


_NOT_SERVING = layout.FLAGS["BACKEND_NOT_SERVING"]


def removed_backends(changes: Changes) -> set[int]:
    """The backend ids a change removed. (A new backend never takes an id live conntrack
    entries hold, so the flows of one replaced are those of an id removed.)"""
    return {layout.ID_KEY.unpack(k) for name, keys in changes.deletes if name == "backend_v4" for k in keys}


def gone_backends(changes: Changes) -> set[int]:
    """The backend ids a change removed or made not serving."""
    ids = removed_backends(changes)
    for name, keys, values in changes.writes:
        if name == "backend_v4":
            ids |= {layout.ID_KEY.unpack(k) for k, v in zip(keys, values)
                    if layout.BACKEND.unpack(v)["flags"] & _NOT_SERVING}
    return ids


_CLOSE_TIMEOUT = dict(TIMEOUTS)["CT_CLOSE_TIMEOUT"]


def _close_reply_entry(ct: bpf.MapFd, key: bytes, value: bytes, now: int) -> None:
    """The reply entry of the TCP connection whose forward entry (key, value) was cleared,
    made closing, as a RST would: it lives on only while the old backend still sends
    (each of its packets gives it the close timeout again), and then its SNAT port is free
    and the backend's next packet, of no flow, meets the node's stack, which resets it.
    Else it would hold its port, and room in ct_v4, for the established timeout (6 h): a
    node whose backends leave with connections open would fill ct_v4 with them. (A
    removed backend is almost always gone, its sockets with it.) The entry is read and
    written back whole: a packet of the flow at that very moment may lose what it wrote
    (a refresh, or a FIN's flags, whose port then rests the close timeout, not TIME_WAIT's)."""
    fwd, t = layout.CT_ENTRY.unpack(value), layout.TUPLE.unpack(key)
    partner = layout.TUPLE.pack(saddr=fwd["xl_saddr"], daddr=fwd["xl_daddr"], sport=fwd["xl_sport"],
                                dport=fwd["xl_dport"], proto=t["proto"], dir=layout.FLAGS["CT_OUT"])
    raw = ct.lookup(partner)
    if raw is None:
        return
    reply = layout.CT_ENTRY.unpack(raw)
    if any(reply[f] != fwd[f] for f in ("backend_id", "snat_port", "nat_cookie")):
        return  # (another flow's, as the datapath's same_flow tells)
    reply["flags"] |= layout.FLAGS["CT_CLOSING"]
    reply["expires"] = min(reply["expires"], now + _CLOSE_TIMEOUT)
    try:
        ct.update(partner, layout.CT_ENTRY.pack(**reply), bpf.BPF_EXIST)
    except bpf.LibbpfError:
        pass  # gone meanwhile (collected, or the datapath moved it)


def _clear_flows_of(ct: bpf.MapFd, backends: set[int], forward_only: bool = False,
                    close_replies: bool = False) -> int:
    """Deletes ct's live entries of flows to backends (forward_only, for TCP: only the
    entries their packets towards the backend find; close_replies: their reply entries
    are made closing), scanning it a batch at a time; each is read again just before, so
    that an entry a new flow wrote at the key meanwhile stays."""
    now = layout.datapath_now()
    refs = _ct_reader(ct, "expires", "backend_id")
    direction = layout.TUPLE.reader("dir", size=ct.key_size)
    ks = ct.key_size
    cleared = 0
    for keys, values in ct.scan():
        for i, (expires, backend_id) in enumerate(refs.iter_unpack(values)):
            if backend_id not in backends or expires < now:
                continue
            if forward_only and direction.unpack_from(keys, i * ks)[0] not in layout.CT_FORWARD_DIRS:
                continue
            k = keys[i * ks:(i + 1) * ks]
            again = ct.lookup(k)
            if again is not None and refs.unpack(again)[1] == backend_id and ct.delete(k):
                cleared += 1
                if close_replies:
                    _close_reply_entry(ct, k, again, now)
    return cleared


def clear_flows(pins: Path, changes: Changes) -> tuple[int, int]:
    """Ends, at their next packet rather than at the datapath's once-a-second check, the live
    flows a change leaves without their backend. UDP flows to the backends it removed or
    made not serving lose both entries, as kube-proxy flushes them (the next datagram picks a
    live one). TCP connections to the backends it removed (kube-proxy leaves those; the
    issue asks for a reset, not a hang) lose the entry of their packets towards the backend:
    the next segment, of no known flow, reaches a live backend, which resets it. Their
    reply entries stay, closing, so that their SNAT ports stay taken while the old backend
    still sends; flows to a terminating backend go on.
    Returns how many UDP entries and TCP connections."""
    gone = gone_backends(changes)
    if not gone:
        return 0, 0
    removed = removed_backends(changes)
    with bpf.MapFd.from_pin(pins / "ct_udp_v4") as ct:
        udp = _clear_flows_of(ct, gone)
    tcp = 0
    if removed:
        # (a half-open flow's reply entry lives the SYN timeout at most; an update of an
        # entry of an LRU map takes a free element first, which may evict another flow's)
        for name in ("ct_v4", "ct_half_v4"):
            with bpf.MapFd.from_pin(pins / name) as ct:
                tcp += _clear_flows_of(ct, removed, forward_only=True, close_replies=name == "ct_v4")
    return udp, tcp


def sync_service_maps(maps: dict[str, bpf.MapFd], plan: Plan, node: planning.NodeInfo,
                      ct: list[bpf.MapFd] | None = None, have: planning.Contents | None = None) -> Changes:
    """Make node's service maps hold what the plan says, writing only the difference;
    returns what was written and deleted. ct: the conntrack maps, whose live ids are not reused."""
    have = read_maps(maps) if have is None else have
    held = planning.Held(lambda: conntrack_refs(ct)) if ct is not None else None
    changes = planning.diff_maps(planning.desired(plan, node, have, held), have)
    apply_changes(maps, changes)
    return changes


# ---------------------------------------------------------------- load


@dataclass
class LoadResult:
    node: str
    iface: str
    pin_dir: str
    updated: bool
    programs: dict[str, dict]
    written: int = 0
    deleted: int = 0
    programs_kept: bool = False
    messages: list[str] = field(default_factory=list)


def pick_node(plan: Plan, iface: str, node: str | None, addresses: list[ipaddress.IPv4Address]) -> planning.NodeInfo:
    if node is not None:
        return plan.node(node)
    for n in plan.nodes:
        if n.address in addresses:
            return n
    have = ", ".join(map(str, addresses)) or "none"
    raise UsageError(
        f"cannot tell which node interface '{iface}' is: its addresses ({have}) match no node of "
        f"spec {plan.name}; pass --node"
    )


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


def _prog_record(name: str, prog_id: int) -> dict:
    with bpf.prog_get_fd_by_id(prog_id) as fd:
        info = bpf.prog_info(fd)
    return {"name": name, "id": prog_id, "tag": info.tag}


BuildSource = Build | str | Path | Callable[[], Build] | None


def _resolve(build: BuildSource) -> Build:
    if callable(build):
        return build()
    return open_build(build) if build else find_build()


def load(iface: str, build: BuildSource = None, node: str | None = None, netns: str | None = None) -> LoadResult:
    """Load (or update) a node's datapath on iface. build: a Build, its directory, a
    function that makes one (compiling a spec: called only after the cheap checks), or
    None for the single build under out/."""
    if node is not None:
        check_node_name(node)
    check_privileges()
    messages = []
    mounted = ensure_bpffs()
    if mounted:
        messages.append(mounted)
    with enter_netns(netns):
        ifindex = if_index(iface)
        addresses = interface_addresses(iface)
        ns_inode = netns_inode()
    with ExitStack() as locks:
        locks.enter_context(iface_lock(ns_inode, ifindex, iface))
        if node is not None:
            locks.enter_context(node_lock(node))
        b = _resolve(build)
        plan = b.plan()
        n = pick_node(plan, iface, node, addresses)
        if node is None:
            check_node_name(n.name)
            locks.enter_context(node_lock(n.name))
        check_object(b)
        previous = NodeRecord.load(n.name)
        if previous and previous.stale():
            messages.append(f"note: the record of node {n.name} ({previous.where()}) names programs the kernel "
                            "no longer has; taking the node over")
            previous = None
        if previous and (previous.iface, previous.netns_inode) != (iface, ns_inode):
            raise UsageError(f"node '{n.name}' is loaded on {previous.where()}; unload it there first")
        _refuse_other_owner(n.name, iface, ns_inode, ifindex, netns)
        result = _load_node(b, plan, n, iface, ifindex, netns, ns_inode, previous)
        result.messages[:0] = messages
        return result


def _attached(record: NodeRecord, ifindex: int, netns: str | None) -> bool:
    """tc still runs the programs the record names."""
    with enter_netns(netns):
        return all(bpf.tc_query(ifindex, point, TC_HANDLE, TC_PRIORITY) == record.programs.get(hook, {}).get("id")
                   for hook, point, _ in HOOKS)


def _load_node(b: Build, plan: Plan, n: planning.NodeInfo, iface: str, ifindex: int, netns: str | None,
               ns_inode: int, previous: NodeRecord | None) -> LoadResult:
    pins = pin_dir(n.name)
    config = planning.config(plan, n)
    sizes = planning.map_sizes(plan)
    same_datapath = (previous is not None and previous.object_sha256 == b.object_sha256
                     and previous.config == config.hex() and previous.maps == sizes
                     and all((pins / name).exists() for name in sizes) and _attached(previous, ifindex, netns))
    undo = _Undo()
    try:
        collector, migrated = None, set()
        if same_datapath:
            changes = _update_data(pins, plan, n, previous, undo)
            programs, created_qdisc = previous.programs, previous.created_qdisc
        else:
            changes, programs, created_qdisc, collector, migrated = _load_object(b, pins, plan, n, config, sizes,
                                                                                 ifindex, netns, undo)
            created_qdisc = created_qdisc or bool(previous and previous.created_qdisc)
        collector_id = previous.collector_id if previous else 0
        if collector is not None:
            collector_id = _arm(collector, previous, undo)
        reserved, warning = _reserve(plan, netns, previous, undo)
        now = _now()
        plan_bytes = b.plan_bytes()
        record_ids = _pinned_map_ids(pins)
        NodeRecord(
            node=n.name, iface=iface, netns=netns, netns_inode=ns_inode, pin_dir=str(pins),
            spec=plan.name, build=str(b.dir.resolve()),
            loaded_at=previous.loaded_at if previous else now, updated_at=now,
            programs=programs, created_qdisc=created_qdisc,
            object_sha256=b.object_sha256, config=config.hex(), maps=sizes,
            map_ids=record_ids, plan_sha256=hashlib.sha256(plan_bytes).hexdigest(),
            reserved_ports=format_ports(reserved), collector_id=collector_id,
        ).save(plan_bytes)
        result = LoadResult(n.name, iface, str(pins), previous is not None, programs,
                            changes.written, changes.deleted, programs_kept=same_datapath)
        try:  # (the update is applied and recorded: what is not cleared the datapath ends within a second)
            cleared_udp, cleared_tcp = clear_flows(pins, changes)
        except (bpf.LibbpfError, OSError) as e:
            cleared_udp = cleared_tcp = 0
            result.messages.append(f"warning: flows to removed endpoints were not cleared ({e}); the datapath ends "
                                   f"them within a second (node {n.name})")
        if cleared_udp:
            result.messages.append(f"cleared {cleared_udp} conntrack entries of UDP flows to endpoints that serve no "
                                   f"more (node {n.name})")
        if cleared_tcp:
            result.messages.append(f"cleared the conntrack entries of {cleared_tcp} TCP connections to removed "
                                   f"endpoints: their next segments go to a live endpoint, which resets them "
                                   f"(node {n.name})")
        if warning:
            result.messages.append(f"{warning} (node {n.name})")
        if previous is not None:
            # (a map migrated into a resized one has a new id, and its entries)
            gone = [name for name in ("ct_v4", "snat_v4") if name not in migrated and
                    previous.map_ids.get(name) not in (None, record_ids.get(name))]
            if gone:
                result.messages.append(f"note: {' and '.join(gone)} of node {n.name} were created afresh (the pinned "
                                       "maps of the last load were gone): connections tracked before are lost")
        return result
    except BaseException as e:
        for failure in undo.run():
            e.add_note(failure)  # the cause stays the error; what could not be undone follows it
        raise
    finally:
        undo.held.close()


def _reserve(plan: Plan, netns: str | None, previous: NodeRecord | None, undo: _Undo) -> tuple[set[int], str | None]:
    """The node's reserved ports as this plan wants them; returns the ports bpfgen holds
    reserved now (what it added, this time or before) and a warning."""
    before = port_ranges(previous.reserved_ports) if previous else set()
    with enter_netns(netns):
        wanted, added, warning = reserve_ports(plan.node_port_range, plan.snat_port_range)
        undo.push("reserved ports", lambda: _in_netns(netns, release_ports, added))
        release_ports(before - wanted)
    return (before & wanted) | added, warning


def _pinned_map_ids(pins: Path, names: Iterable[str] = tuple(m.name for m in layout.MAPS)) -> dict[str, int]:
    """The ids of the maps pinned in pins (those that are there)."""
    ids = {}
    for name in names:
        try:
            with bpf.MapFd.from_pin(pins / name) as m:
                ids[name] = m.info.id
        except bpf.LibbpfError:
            continue
    return ids


def _sync_with_undo(maps: dict[str, bpf.MapFd], ct: list[bpf.MapFd], plan: Plan, n: planning.NodeInfo,
                    undo: _Undo) -> Changes:
    snapshot = read_maps(maps)
    undo.push("contents of the service maps",
              lambda: apply_changes(maps, planning.diff_maps(snapshot, read_maps(maps))))
    return sync_service_maps(maps, plan, n, ct, have=snapshot)


class _MapsView(planning.KernelView):
    def __init__(self, maps: dict[str, bpf.MapFd]):
        self.maps = maps

    def frontend_ids(self, keys: list[bytes]) -> dict[bytes, int]:
        out = {}
        for k in keys:
            v = self.maps["svc_v4"].lookup(k)
            if v is not None:
                out[k] = layout.SVC_VALUE.unpack(v)["id"]
        return out

    def frontend_ids_in_use(self) -> set[int]:
        return {layout.ID_KEY.unpack(k) for k, _ in self.maps["revnat_v4"].lookup_batch()}

    def backends(self) -> dict[bytes, tuple[int, bytes]]:
        return {v[:7]: (layout.ID_KEY.unpack(k), v) for k, v in self.maps["backend_v4"].lookup_batch()}


def _applied_plan(previous: NodeRecord, map_ids: dict[str, int]) -> Plan | None:
    """The plan the last load wrote into these very maps, if bpfgen still has it."""
    if not previous.plan_sha256 or any(previous.map_ids.get(name) != i for name, i in map_ids.items()):
        return None
    try:
        data = previous.plan_path.read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != previous.plan_sha256:
        return None
    try:
        return Plan.from_json(data.decode(), str(previous.plan_path))
    except UsageError:
        return None


def _update_data(pins: Path, plan: Plan, n: planning.NodeInfo, previous: NodeRecord, undo: _Undo) -> Changes:
    """The attached programs stay: only the service maps change. From the plan the last
    load applied, only the services that differ are looked at; without it (or when the
    maps are not as that load left them), every entry is compared."""
    maps = {name: undo.hold(bpf.MapFd.from_pin(pins / name)) for name in SERVICE_MAPS}
    ct = [undo.hold(bpf.MapFd.from_pin(pins / name)) for name in CONNTRACK_MAPS]
    old = _applied_plan(previous, _map_ids(maps))
    if old is not None:
        try:
            changes = planning.incremental(old, plan, n, _MapsView(maps), planning.Held(lambda: conntrack_refs(ct)))
        except planning.StaleState:
            changes = None
        if changes is not None:
            before = _values_of(maps, changes)
            undo.push("contents of the service maps", lambda: _restore(maps, before))
            apply_changes(maps, changes)
            return changes
    return _sync_with_undo(maps, ct, plan, n, undo)


def _map_ids(maps: dict[str, bpf.MapFd]) -> dict[str, int]:
    return {name: m.info.id for name, m in maps.items()}


def _values_of(maps: dict[str, bpf.MapFd], changes: Changes) -> dict[str, dict[bytes, bytes | None]]:
    """What the keys a change touches hold now (None: absent)."""
    before: dict[str, dict[bytes, bytes | None]] = {name: {} for name in SERVICE_MAPS}
    for name, keys, _ in changes.writes + changes.finals:
        for k in keys:
            before[name][k] = maps[name].lookup(k)
    for name, keys in changes.deletes:
        for k in keys:
            before[name][k] = maps[name].lookup(k)
    return before


def _restore(maps: dict[str, bpf.MapFd], before: dict[str, dict[bytes, bytes | None]]) -> None:
    present = {name: {k: v for k, v in kv.items() if v is not None} for name, kv in before.items()}
    absent = {name: {k: b"" for k, v in kv.items() if v is None} for name, kv in before.items()}
    # The address filters' words (never absent) against what they hold now: their bits back
    # before the frontends, the change's own cleared after them (a word that was 0 too).
    words = {name: present.pop(name, {}) for name in planning.ADDRESS_FILTERS}
    filt = planning.diff_maps(words, {name: {k: maps[name].lookup(k) for k in kv} for name, kv in words.items()})
    # what was there written back, what was not deleted, each in the order of references
    apply_changes(maps, Changes(filt.writes + planning.diff_maps(present, {}).writes,
                                planning.diff_maps({}, absent).deletes, filt.finals))


def _load_object(b: Build, pins: Path, plan: Plan, n: planning.NodeInfo, config: bytes, sizes: dict[str, int],
                 ifindex: int, netns: str | None, undo: _Undo) -> tuple[Changes, dict, bool, bpf.Fd, set[str]]:
    """A new object loaded over the node's pins (maps whose capacity changed migrated into
    resized ones) and attached; returns its changes, programs, whether it created the
    qdisc, its collector program and the names of the maps it migrated."""
    if not pins.is_dir():
        pins.mkdir(parents=True, mode=0o700)
        undo.push(f"pin dir {pins}", lambda: remove_pins(n.name) and None)
    resized = _set_aside_resized(pins, sizes, undo)
    existed_before = {p.name for p in pins.iterdir()}
    with bpf.BpfObject.open(b.object_path, pin_root_path=pins) as obj:
        configure(obj, config, sizes)
        obj.load()
        for name in sorted(p.name for p in pins.iterdir() if p.name not in existed_before):
            undo.push(f"pin {pins / name}", lambda p=pins / name: p.unlink(missing_ok=True))
        for name, old in resized.items():
            _migrate(old, obj.map(name), sizes[name])
        maps = {name: undo.hold(obj.map(name).map_fd()) for name in SERVICE_MAPS}
        ct = [undo.hold(obj.map(name).map_fd()) for name in CONNTRACK_MAPS]
        changes = _sync_with_undo(maps, ct, plan, n, undo)
        programs, created_qdisc = _attach(obj, ifindex, netns, undo)
        # (armed by load once the programs are attached, before the record is written)
        collector = undo.hold(bpf.prog_get_fd_by_id(bpf.prog_info(obj.program(COLLECTOR_PROGRAM).fd).id))
    # The programs now use the new maps: the old ones go with their last pin.
    for old in resized.values():
        old.close()
        (pins / _aside(old.name)).unlink(missing_ok=True)
    return changes, programs, created_qdisc, collector, set(resized)


ASIDE = "resizing_"  # (bpffs refuses dots in names)


def _aside(name: str) -> str:
    return ASIDE + name


def _set_aside_resized(pins: Path, sizes: dict[str, int], undo: _Undo) -> dict[str, bpf.MapFd]:
    """Pinned maps whose capacity setting changed (same layout otherwise): their pins move
    aside so that the load creates maps of the new size, into which their entries are
    copied; a failed load puts them back. Maps of another layout are left for libbpf to
    refuse."""
    resized = {}
    for m in layout.MAPS:
        path = pins / m.name
        if not path.exists():
            continue
        old = undo.hold(bpf.MapFd.from_pin(path))
        same_layout = (old.info.type, old.info.key_size, old.info.value_size, old.info.map_flags) == (
            getattr(bpf, f"BPF_MAP_TYPE_{m.type}"), m.key.size, m.value.size, m.flags)
        if not same_layout or old.info.max_entries == sizes[m.name]:
            continue
        aside = pins / _aside(m.name)
        os.rename(path, aside)
        undo.push(f"resized map {m.name}", lambda path=path, aside=aside: (
            path.unlink(missing_ok=True), os.rename(aside, path)))
        resized[m.name] = old
    return resized


def _migrate(old: bpf.MapFd, new_map: bpf.BpfMap, size: int) -> None:
    """The entries of a map into its resized successor (an array: the slots that fit)."""
    ks, vs = old.key_size, old.value_buf_size
    with new_map.map_fd() as new:
        # (read whole before anything is written: packed, a batch at a time, not an object
        # per entry, so that a full conntrack table costs its own size in memory)
        batches = list(old.scan(UPDATE_BATCH))
        held = sum(len(keys) // ks for keys, _ in batches)
        if held > size and old.info.type not in bpf.LRU_TYPES | bpf.ARRAY_TYPES:
            raise UsageError(f"map {old.name} holds {held} entries, more than its new size {size}; "
                             "raise the capacity setting again")
        while batches:
            keys, values = batches.pop(0)
            pairs = [(keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs]) for i in range(len(keys) // ks)]
            if old.info.type in bpf.ARRAY_TYPES:
                pairs = [(k, v) for k, v in pairs if layout.ID_KEY.unpack(k) < size and any(v)]
            new.update_batch([k for k, _ in pairs], [v for _, v in pairs])


COLLECTOR_PROGRAM = "collector_arm"


def arm_collector(prog: int | bpf.Fd) -> int:
    """Arm ct_v4's collector (a timer in the pinned collector_v4, which runs while that pin
    lives) with the callbacks of a loaded object (prog: its collector_arm program),
    replacing an earlier load's; it also sweeps once. Returns the dead entries removed."""
    if bpf.prog_info(prog).type == bpf.BPF_PROG_TYPE_SYSCALL:
        retval = bpf.prog_run_syscall(prog)
    else:  # (a tc program: the collector of an object built by an earlier bpfgen)
        retval = bpf.prog_test_run(prog, bytes(64)).retval
    rc = ctypes.c_int32(retval).value
    if rc < 0:
        raise bpf.LibbpfError("arming the conntrack collector (bpf_timer)", -rc)
    return rc


def _arm(collector: bpf.Fd, previous: NodeRecord | None, undo: _Undo) -> int:
    """Arm the new object's collector; a load failing after this arms the last load's
    again (whose program the collector's timer held until now). Returns the program's id."""
    old = None
    if previous is not None and previous.collector_id:
        try:
            old = undo.hold(bpf.prog_get_fd_by_id(previous.collector_id))
            if bpf.prog_info(old).name != COLLECTOR_PROGRAM:
                old = None  # (an id of another program now)
        except bpf.LibbpfError:
            old = None  # gone, with the maps it collected
    arm_collector(collector)
    if old is not None:
        undo.push("conntrack collector", lambda: arm_collector(old) and None)
    return bpf.prog_info(collector).id


def configure(obj: bpf.BpfObject, config: bytes, sizes: dict[str, int]) -> None:
    """Before load: the node's settings into .rodata.config, every map's size."""
    obj.map(CONFIG_MAP).set_initial_value(config)
    for name, size in sizes.items():
        obj.map(name).set_max_entries(size)


def open_datapath(b: Build, plan: Plan, node: planning.NodeInfo, pins: Path) -> bpf.BpfObject:
    """The build's object opened for node, configured, loaded with its maps pinned in pins
    (for tools and tests that run the programs without attaching them)."""
    obj = bpf.BpfObject.open(b.object_path, pin_root_path=pins)
    try:
        configure(obj, planning.config(plan, node), planning.map_sizes(plan))
        obj.load()
    except BaseException:
        obj.close()
        raise
    return obj


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


def _refuse_other_owner(name: str, iface: str, ns_inode: int, ifindex: int, netns: str | None) -> None:
    """One node per interface: another node's datapath there is not taken over, whether
    its record says so or only the kernel does (the record lost: the attached program
    uses the maps pinned for another node)."""
    for r in NodeRecord.all():
        if r.node != name and (r.iface, r.netns_inode) == (iface, ns_inode) and not r.stale():
            raise UsageError(f"interface '{iface}' here carries node '{r.node}'; unload it first "
                             f"(bpfgen unload --iface {iface} --node {r.node})")
    owner = tc_owner(ifindex, netns)
    if owner is not None and owner != name:
        raise UsageError(f"interface '{iface}' here runs the programs of node '{owner}' (its maps are pinned in "
                         f"{pin_dir(owner)}, its record is missing); unload it first "
                         f"(bpfgen unload --iface {iface} --node {owner})")


def tc_owner(ifindex: int, netns: str | None) -> str | None:
    """The node whose pinned maps the program on the interface's ingress uses, if any."""
    with enter_netns(netns):
        prog_id = bpf.tc_query(ifindex, bpf.BPF_TC_INGRESS, TC_HANDLE, TC_PRIORITY)
    if prog_id is None:
        return None
    try:
        with bpf.prog_get_fd_by_id(prog_id) as fd:
            used = set(bpf.prog_map_ids(fd))
    except bpf.LibbpfError:
        return None
    for node in pinned_nodes():
        if set(_pinned_map_ids(pin_dir(node), SERVICE_MAPS).values()) & used:
            return node
    return None


def _node_for_unload(iface: str, node: str | None, ns_inode: int, netns: str | None) -> str:
    if node:
        return node
    for r in NodeRecord.all():
        if r.iface == iface and r.netns_inode == ns_inode:
            return r.node
    where = f"network namespace '{netns}'" if netns else "this network namespace"
    raise UsageError(f"nothing of bpfgen is loaded on interface '{iface}' in {where} (see `bpfgen status`)")


def unload(iface: str, node: str | None = None, netns: str | None = None) -> UnloadResult:
    if node is not None:
        check_node_name(node)
    check_privileges()
    require_host_bpffs()
    if node:
        cleared = _clear_orphan(node)
        if cleared:
            return cleared
    with enter_netns(netns):
        ifindex = if_index(iface)
        here = netns_inode()
    with iface_lock(here, ifindex, iface):
        name = _node_for_unload(iface, node, here, netns)
        with node_lock(name):
            record = NodeRecord.load(name)
            if record and (record.iface, record.netns_inode) != (iface, here):
                raise UsageError(f"node '{name}' is loaded on {record.where()}; unload it there")
            if record is None:
                _refuse_other_owner(name, iface, here, ifindex, netns)
            detached = []
            removed_qdisc = False
            with enter_netns(netns):
                for hook, point, _ in HOOKS:
                    if bpf.tc_query(ifindex, point, TC_HANDLE, TC_PRIORITY) is not None:
                        bpf.tc_detach(ifindex, point, TC_HANDLE, TC_PRIORITY)
                        detached.append(hook)
                if record and record.created_qdisc:
                    removed_qdisc = bpf.tc_hook_destroy(ifindex)
                if record:
                    release_ports(port_ranges(record.reserved_ports))
            removed = remove_pins(name)
            if not (detached or removed or record):
                raise UsageError(f"nothing of bpfgen is loaded for node '{name}'")
            if record:
                record.remove()
            return UnloadResult(name, iface, detached, removed, removed_qdisc)


def _clear_orphan(node: str) -> UnloadResult | None:
    """A node whose record is unreadable, whose namespace is gone, or whose programs the
    kernel no longer has (its interface was removed): nothing of it is left in the kernel
    but the pins, which are removed with the record, without tc."""
    with node_lock(node):
        try:
            record = NodeRecord.load(node)
        except UnreadableRecord:
            (record_dir() / f"{node}.json").unlink(missing_ok=True)
            return UnloadResult(node, "?", [], remove_pins(node), False)
        if record is None or not (record.namespace_gone() or record.stale()):
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
    records = NodeRecord.all()
    for node in sorted(set(pinned_nodes()) - {r.node for r in records}):
        rows.append({"node": node, "record": False, "pin_dir": str(pin_dir(node)), "pinned": True,
                     "note": "maps pinned but no record (lost /run/bpfgen?): `bpfgen unload --node` clears it, "
                             "`bpfgen load` takes it over"})
    for r in records:
        row = {
            "node": r.node, "record": True, "iface": r.iface, "netns": r.netns, "pin_dir": r.pin_dir,
            "spec": r.spec, "build": r.build, "loaded_at": r.loaded_at, "updated_at": r.updated_at,
            "programs": r.programs, "pinned": Path(r.pin_dir).is_dir(), "stale": r.stale(),
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
