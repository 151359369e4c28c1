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


def ephemeral_port_warning(node: str, snat: tuple[int, int]) -> str | None:
    """A warning when the calling thread's namespace hands out ephemeral ports inside
    snatPortRange: a reply to the node's own connection could be taken for an SNAT reply."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        reserved = port_ranges(Path("/proc/sys/net/ipv4/ip_local_reserved_ports").read_text())
    except (OSError, ValueError):
        return None
    clash = [p for p in range(max(lo, snat[0]), min(hi, snat[1]) + 1) if p not in reserved]
    if not clash:
        return None
    snat_range = f"{snat[0]}-{snat[1]}"
    return (f"warning: node {node} hands out ephemeral ports {lo}-{hi}, {len(clash)} of them inside "
            f"snatPortRange {snat_range}; replies to the node's own connections could be taken for SNAT replies. "
            f"Reserve them (sysctl net.ipv4.ip_local_reserved_ports={snat_range}) or narrow "
            "net.ipv4.ip_local_port_range")
