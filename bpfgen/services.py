"""The frontends a spec gives a node: the one rule of which (address, port, protocol)
a service answers on, used to size the maps and to fill them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .layout import PROTOCOLS
from .spec import Node, Spec


@dataclass(frozen=True)
class Frontend:
    addr: ipaddress.IPv4Address
    port: int
    proto: int
    kind: str  # NodePort | ClusterIP
    service: str  # namespace/name
    backends: tuple[tuple[ipaddress.IPv4Address, int, int, bool], ...]  # addr, port, proto, local

    @property
    def key(self) -> tuple:
        return (self.addr, self.port, self.proto)


def frontends(spec: Spec, node: Node) -> list[Frontend]:
    """Every frontend node serves: a ClusterIP one per port of a service with a clusterIP,
    a NodePort one (on the node's address) per port of a NodePort service."""
    result = []
    for svc in spec.services:
        for port in svc.ports:
            proto = PROTOCOLS[port.protocol]
            backends = tuple((b.address, port.target_port, proto, b.node == node.name) for b in svc.backends)
            if svc.cluster_ip is not None:
                result.append(Frontend(svc.cluster_ip, port.port, proto, "ClusterIP", svc.key, backends))
            if port.node_port is not None:
                result.append(Frontend(node.address, port.node_port, proto, "NodePort", svc.key, backends))
    return result
