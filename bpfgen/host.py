"""Facts of the host (or of the network namespace the calling thread is in) that loading
depends on: an interface's link type and addresses, the ephemeral port range."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

from .errors import UsageError


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


def port_ranges(text: str) -> set[int]:
    """Ports of a sysctl list like "1000-1010,2000" (ip_local_reserved_ports)."""
    ports: set[int] = set()
    for part in text.replace(",", " ").split():
        lo, _, hi = part.partition("-")
        ports.update(range(int(lo), int(hi or lo) + 1))
    return ports


RESERVED = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
MIN_EPHEMERAL = 1024  # ports the node keeps for its own connections, at the least


def format_ports(ports: set[int]) -> str:
    """Ports as a sysctl list: "30000-32767,40000"."""
    out, run = [], []
    for p in sorted(ports):
        if run and p == run[-1] + 1:
            run.append(p)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [p]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def reserve_ports(node_ports: tuple[int, int], snat: tuple[int, int]) -> tuple[set[int], set[int], str | None]:
    """Keep the node's own connections off the ports the datapath answers on: the
    nodePortRange, and the snatPortRange unless that would leave the node fewer than
    MIN_EPHEMERAL ephemeral ports (then a warning says what to narrow), are added to
    net.ipv4.ip_local_reserved_ports of the calling thread's namespace. Returns the ports
    it wanted reserved, those it added (to give back) and the warning, if any."""
    lo, hi = map(int, EPHEMERAL.read_text().split())
    reserved = port_ranges(RESERVED.read_text())
    wanted = set(range(node_ports[0], node_ports[1] + 1))
    snat_ports = set(range(snat[0], snat[1] + 1))
    free_after = {p for p in range(lo, hi + 1) if p not in reserved and p not in wanted and p not in snat_ports}
    warning = None
    if len(free_after) >= MIN_EPHEMERAL:
        wanted |= snat_ports
    else:
        clash = [p for p in range(max(lo, snat[0]), min(hi, snat[1]) + 1) if p not in reserved]
        if clash:
            warning = (f"warning: the node hands out ephemeral ports {lo}-{hi}, {len(clash)} of them inside "
                       f"snatPortRange {snat[0]}-{snat[1]}, and reserving those would leave its own connections "
                       f"fewer than {MIN_EPHEMERAL} ports: replies to them could be taken for SNAT replies. Narrow "
                       f"net.ipv4.ip_local_port_range (e.g. 1024-{min(node_ports[0], snat[0]) - 1}) or snatPortRange")
    added = wanted - reserved
    if added:
        RESERVED.write_text(format_ports(reserved | added) + "\n")
    return wanted, added, warning


def release_ports(added: set[int]) -> None:
    """Give back what reserve_ports added (ports reserved by others stay)."""
    if not added:
        return
    reserved = port_ranges(RESERVED.read_text())
    RESERVED.write_text(format_ports(reserved - added) + "\n")
