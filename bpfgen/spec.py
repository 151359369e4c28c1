"""The service spec (bpfgen/v1): its models, loading with precise problems, and its JSON Schema.

A spec is YAML (see examples/seed.yaml). Loading it checks every field (pydantic) and every rule
that spans fields, reports all problems at once as a SpecError (each with its YAML path and line),
fills the defaults and allocates the omitted nodePorts. A `Spec` object is always valid and
resolved: constructing one in Python runs the same rules.

    python -m bpfgen.spec                  print the JSON Schema of the format
    python -m bpfgen.spec --write-schema   write it to schemas/bpfgen-v1.schema.json
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import socket
import sys
import typing
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import WithJsonSchema
from pydantic_core import core_schema

from bpfgen import specio
from bpfgen.layout import ip4_str
from bpfgen.errors import Problem, SpecError

API_VERSION = "bpfgen/v1"
KIND = "ServiceSpec"
_SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "bpfgen-v1.schema.json"

_PROGRAMMATIC = "<spec>"  # the file name of problems found in a Spec built in Python


# --- field types -------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    """A value as a short phrase for messages: 'eighty', 123, a list, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value) if isinstance(value, str) else str(value)


_LETTER_OR_DIGIT = "starting and ending with a letter or digit"
_LETTER_FIRST = "starting with a letter and ending with a letter or digit"


def _label(what: str, pattern: str, max_length: int, ends: str = _LETTER_OR_DIGIT) -> Any:
    """A string type for a name that must match pattern (whose ends says how it starts and ends)
    and be at most max_length long."""
    regex = re.compile(pattern)
    rule = f"at most {max_length} lowercase letters, digits or '-', {ends}"

    def check(value: str) -> str:
        if len(value) > max_length:
            raise ValueError(f"{what} {value!r} is too long: {len(value)} characters, at most {max_length}")
        if not regex.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid {what}: use {rule}")
        return value

    schema = {"type": "string", "pattern": f"^{pattern}$", "maxLength": max_length}
    return Annotated[StrictStr, AfterValidator(check), WithJsonSchema(schema)]


_DNS_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"  # RFC 1123
_DNS_1035_LABEL = "[a-z]([-a-z0-9]*[a-z0-9])?"

BuildName = _label("name", _DNS_LABEL, 63)
NodeName = _label("node name", _DNS_LABEL, 15)  # used in pin paths and C identifiers
Namespace = _label("namespace", _DNS_LABEL, 63)
PortName = _label("port name", _DNS_LABEL, 15)
ServiceName = _label("service name", _DNS_1035_LABEL, 63, _LETTER_FIRST)


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is out of range 1-65535")
    return value


Port = Annotated[
    StrictInt, AfterValidator(_port), WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 65535})
]


def _ipv4(value: Any) -> IPv4Address:
    if isinstance(value, IPv4Address):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected an IPv4 address, got {_describe(value)}")
    # Fast path (a large cluster has 100,000s of addresses): the C parser, then a check that
    # the text was the canonical dotted quad that ipaddress would have accepted.
    try:
        packed = socket.inet_pton(socket.AF_INET, value)
        if socket.inet_ntop(socket.AF_INET, packed) == value:
            return IPv4Address(packed)
    except OSError:
        pass
    try:
        return IPv4Address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a valid IPv4 address") from None


def _ipv4_cidr(value: Any) -> IPv4Network:
    if isinstance(value, IPv4Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected an IPv4 CIDR, got {_describe(value)}")
    try:
        network = IPv4Network(value, strict=False) if "/" in value else None
    except ValueError:
        network = None
    if network is None:
        raise ValueError(f"{value!r} is not a valid IPv4 CIDR (ADDRESS/PREFIX, e.g. 10.0.1.0/24)")
    if network.network_address != IPv4Address(value.split("/")[0]):
        raise ValueError(f"{value!r} has host bits set (did you mean {network}?)")
    return network


IPv4 = Annotated[IPv4Address, BeforeValidator(_ipv4), PlainSerializer(ip4_str, return_type=str, when_used="json")]
IPv4Cidr = Annotated[IPv4Network, BeforeValidator(_ipv4_cidr)]
Protocol = Literal["TCP", "UDP"]
ServiceType = Literal["NodePort", "ClusterIP"]


_RANGE_PATTERN = "^[0-9]+-[0-9]+$"


class PortRange:
    """An inclusive range of ports, written "LO-HI" in YAML and JSON. An immutable value.

    (Not a dataclass: pydantic would write a dataclass default into the JSON Schema as an object.)
    """

    __slots__ = ("lo", "hi")

    def __init__(self, lo: int, hi: int):
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"invalid range '{lo}-{hi}': expected LO-HI with 1 <= LO <= HI <= 65535")
        self.lo = lo
        self.hi = hi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PortRange) and (self.lo, self.hi) == (other.lo, other.hi)

    def __hash__(self) -> int:
        return hash((self.lo, self.hi))

    def __repr__(self) -> str:
        return f"PortRange({self.lo}, {self.hi})"

    @classmethod
    def parse(cls, text: str) -> PortRange:
        """PortRange from "LO-HI"; ValueError if malformed."""
        if not re.fullmatch(_RANGE_PATTERN, text):
            raise ValueError(f"malformed range {text!r}: expected LO-HI, e.g. 30000-32767")
        lo, hi = text.split("-")
        return cls(int(lo), int(hi))

    @property
    def size(self) -> int:
        return self.hi - self.lo + 1

    def overlaps(self, other: PortRange) -> bool:
        return self.lo <= other.hi and other.lo <= self.hi

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.lo <= port <= self.hi

    def __str__(self) -> str:
        return f"{self.lo}-{self.hi}"

    @classmethod
    def _validate(cls, value: Any) -> PortRange:
        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise ValueError(f"expected a range LO-HI as a string, got {_describe(value)}")
        return cls.parse(value)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        return {"type": "string", "pattern": _RANGE_PATTERN}


# --- models ------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=to_camel,
        field_title_generator=lambda name, field: field.alias or to_camel(name),  # JSON Schema titles
    )


class Metadata(_Model):
    """Names the spec."""

    name: BuildName = Field(description="Names the build directory out/<name>/ (a DNS label).")


def _count(what: str, lo: int, hi: int) -> Any:
    """An integer setting within lo..hi."""

    def check(value: int) -> int:
        if not lo <= value <= hi:
            raise ValueError(f"{what} {value} is out of range {lo}-{hi}")
        return value

    return Annotated[StrictInt, AfterValidator(check), WithJsonSchema({"type": "integer", "minimum": lo, "maximum": hi})]


# The limits of the settings below: the datapath's id spaces (frontend and backend ids are
# 32-bit; a service's backend slot is 16-bit) and a bound on the kernel memory of one node.
MAX_FRONTENDS = 1 << 22
MAX_BACKEND_SLOTS = 1 << 24
MAX_BACKENDS = 1 << 22
MAX_FLOWS = 1 << 23
MAX_BACKENDS_PER_SERVICE = 65535
MAX_SOURCE_RANGES = 1024  # loadBalancerSourceRanges of one service
MAX_CLUSTER_NODES = 15000  # three times Kubernetes' largest supported cluster (5,000 nodes)


class Capacity(_Model):
    """How much a node's maps hold. The map sizes follow these settings, never the number of
    services, so adding or removing services never changes a map's layout."""

    frontends: _count("frontends", 1, MAX_FRONTENDS) = Field(
        default=131072, description="Frontends per node (a ClusterIP or NodePort of one service port).")
    backend_slots: _count("backendSlots", 1, MAX_BACKEND_SLOTS) = Field(
        default=1048576, description="Backend slots per node: the sum over frontends of their backends.")
    backends: _count("backends", 1, MAX_BACKENDS) = Field(
        default=262144, description="Distinct backends (address, port, protocol) per node.")
    flows: _count("flows", 1, MAX_FLOWS) = Field(
        default=262144, description="TCP connections a node tracks at once.")
    half_open_flows: _count("halfOpenFlows", 1, MAX_FLOWS) = Field(
        default=65536,
        description="TCP flows not yet established (SYN seen, or picked up mid-stream) a node tracks at once, apart "
                    "from the established ones: a SYN flood evicts only these.")
    udp_flows: _count("udpFlows", 1, MAX_FLOWS) = Field(
        default=131072, description="UDP flows a node tracks at once, apart from the TCP ones.")
    next_hops: _count("nextHops", 1, MAX_FLOWS) = Field(
        default=65536,
        description="Next hops towards backends a node keeps from its route lookups (one per source, destination "
                    "and interface, each good for a second), so that a new flow to a backend seen in that second "
                    "needs none.")
    affinity_clients: _count("affinityClients", 1, MAX_FLOWS) = Field(
        default=65536, description="Client addresses whose ClientIP session affinity a node remembers at once.")
    source_ranges: _count("sourceRanges", 1, MAX_FRONTENDS) = Field(
        default=16384, description="loadBalancerSourceRanges entries per node (each range of each frontend).")


class Cluster(_Model):
    """Cluster-wide settings."""

    node_port_range: PortRange = Field(
        default=PortRange(30000, 32767), description="Where nodePorts are taken from."
    )
    snat_port_range: PortRange = Field(
        default=PortRange(61000, 65535),
        description="Source ports for SNAT; disjoint from nodePortRange. The default lies above Linux's default"
        " ephemeral ports (32768-60999), so that load can reserve it on a stock node.",
    )
    capacity: Capacity = Field(default_factory=Capacity)


class Node(_Model):
    """A node of the cluster."""

    name: NodeName = Field(description="A DNS label of at most 15 characters.")
    address: IPv4
    pod_cidr: IPv4Cidr | None = Field(default=None, alias="podCIDR")


class ServicePort(_Model):
    """A port a service exposes."""

    name: PortName | None = Field(default=None, description="Unique within the service.")
    protocol: Protocol = "TCP"
    port: Port = Field(description="The port on the clusterIP.")
    target_port: Port | None = Field(default=None, description="The backend port; defaults to port.")
    node_port: Port | None = Field(
        default=None, description="NodePort services only; allocated inside nodePortRange if omitted."
    )

    @model_validator(mode="after")
    def _default_target_port(self) -> ServicePort:
        if self.target_port is None:
            self.target_port = self.port
        return self


class EndpointConditions(_Model):
    """An endpoint's conditions, as an EndpointSlice has them. Which endpoints take new flows
    is kube-proxy's rule: the ready ones; with none ready, those serving and terminating."""

    # (immutable: the backends given no conditions share one; a large cluster has 100,000s)
    model_config = ConfigDict(frozen=True)

    ready: StrictBool = True
    serving: StrictBool | None = Field(default=None, description="Defaults to ready.")
    terminating: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _default_serving(cls, data: Any) -> Any:
        # (serving as ready says, when it is not given; a ready that is no bool is its own error)
        if isinstance(data, dict) and data.get("serving") is None and isinstance(data.get("ready", True), bool):
            data = {**data, "serving": data.get("ready", True)}
        return data

    @property
    def state(self) -> str:
        """ready | terminating (serving and terminating: used when no endpoint is ready) |
        not-serving (never takes a new flow; its established TCP flows go on)."""
        if self.ready:
            return "ready"
        if self.serving and self.terminating:
            return "terminating"
        return "not-serving"


_READY = EndpointConditions()


class Backend(_Model):
    """An endpoint (pod) of a service."""

    address: IPv4
    node: NodeName | None = Field(
        default=None,
        description="The node that hosts the backend (one of nodes); omitted: on no node, remote from every node.",
    )
    conditions: EndpointConditions = Field(default_factory=lambda: _READY)


class ClientIPConfig(_Model):
    timeout_seconds: _count("timeoutSeconds", 1, 86400) = Field(
        default=10800, description="How long a client address keeps its backend after its last new connection.")


class SessionAffinityConfig(_Model):
    client_ip: ClientIPConfig = Field(default_factory=ClientIPConfig, alias="clientIP")


class Service(_Model):
    """A Kubernetes-like service."""

    name: ServiceName = Field(description="A DNS-1035 label, unique within its namespace.")
    namespace: Namespace = "default"
    type: ServiceType
    cluster_ip: IPv4 | None = Field(
        default=None, alias="clusterIP", description="Required for ClusterIP services."
    )
    ports: list[ServicePort] = Field(min_length=1)
    backends: list[Backend] = []
    external_ips: list[IPv4] = Field(
        default=[], alias="externalIPs", description="More frontends on each port (ExternalIP), on every node."
    )
    load_balancer_ips: list[IPv4] = Field(
        default=[], alias="loadBalancerIPs",
        description="The load balancer's addresses: more frontends on each port (LoadBalancer), on every node.",
    )
    session_affinity: Literal["None", "ClientIP"] = Field(
        default="None", description="ClientIP: a client address keeps its backend on every frontend of a port.")
    session_affinity_config: SessionAffinityConfig | None = None
    external_traffic_policy: Literal["Cluster", "Local"] = Field(
        default="Cluster",
        description="Local: NodePort, LoadBalancer and external IP traffic goes only to this node's endpoints, "
                    "without SNAT (a node without one drops it).")
    internal_traffic_policy: Literal["Cluster", "Local"] = Field(
        default="Cluster", description="Local: ClusterIP traffic goes only to this node's endpoints.")
    health_check_node_port: Port | None = Field(
        default=None, description="externalTrafficPolicy Local: the port a load balancer checks (recorded, shown).")
    load_balancer_source_ranges: list[IPv4Cidr] = Field(
        default=[], max_length=MAX_SOURCE_RANGES,
        description="Client ranges admitted to the loadBalancerIPs (empty: every client).")

    @property
    def affinity_timeout(self) -> int:
        """Seconds of ClientIP affinity (0: none)."""
        if self.session_affinity != "ClientIP":
            return 0
        return (self.session_affinity_config or SessionAffinityConfig()).client_ip.timeout_seconds

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Spec(_Model):
    """A bpfgen service spec: nodes and the services to compile into eBPF programs."""

    api_version: Literal[API_VERSION]
    kind: Literal[KIND]
    metadata: Metadata
    cluster: Cluster = Field(default_factory=Cluster)
    nodes: list[Node] = Field(min_length=1, max_length=MAX_CLUSTER_NODES)
    services: list[Service] = []
    # Where the spec came from when it was not written as bpfgen/v1 (a kube.Origin: notes
    # about what was skipped, where each part was in the Kubernetes objects); not in the data.
    _origin: Any = PrivateAttr(default=None)

    @property
    def notes(self) -> list[str]:
        """What reading the spec skipped or decided (Kubernetes input); [] for bpfgen/v1."""
        return list(self._origin.notes) if self._origin is not None else []

    @model_validator(mode="after")
    def _check_and_resolve(self) -> Spec:
        found = _rule_problems(self.cluster, self.nodes, self.services)
        found += _allocate_node_ports(self.services, self.cluster.node_port_range)
        if found:
            raise SpecError([Problem(_PROGRAMMATIC, path, message) for path, message in found])
        return self

    def node(self, name: str) -> Node:
        """The node called name; KeyError if there is none."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


# --- rules across fields -----------------------------------------------------------------------

Found = list[tuple[str, str]]  # (YAML path, message)


def _first(seen: dict, key: Any, where: str) -> str | None:
    """Where key was seen first if that is not here (a duplicate), else None; remembers key."""
    first = seen.setdefault(key, where)
    return None if first == where else first


def _rule_problems(
    cluster: Cluster | None, nodes: list[Node | None], services: list[Service | None]
) -> Found:
    """The problems with the rules that span fields. None entries failed validation: skipped."""
    found: Found = []
    if cluster is not None and cluster.snat_port_range.overlaps(cluster.node_port_range):
        found.append((
            "cluster.snatPortRange",
            f"snatPortRange {cluster.snat_port_range} overlaps nodePortRange {cluster.node_port_range}",
        ))
    found += _node_problems(nodes)

    node_names = None if None in nodes else {node.name for node in nodes}
    node_by_address = {node.address: node.name for node in nodes if node is not None}
    node_port_range = cluster.node_port_range if cluster is not None else None
    service_keys: dict[str, str] = {}
    node_ports: dict[tuple[int, str], str] = {}
    cluster_ports: dict[tuple[IPv4Address, int, str], str] = {}
    for i, service in enumerate(services):
        if service is None:
            continue
        at = f"services[{i}]"
        if first := _first(service_keys, service.key, at):
            found.append((f"{at}.name", f"duplicate service {service.key} (also {first})"))
        if service.type == "ClusterIP" and service.cluster_ip is None:
            found.append((f"{at}.clusterIP", "a ClusterIP service needs a clusterIP"))
        if (node_name := node_by_address.get(service.cluster_ip)) is not None:
            message = f"clusterIP {service.cluster_ip} is the address of node '{node_name}'"
            found.append((f"{at}.clusterIP", message))
        found += _port_problems(service, at, node_port_range, node_ports, cluster_ports)
        found += _backend_problems(service, at, node_names)
    if cluster is not None:
        found += _capacity_problems(cluster.capacity, [s for s in services if s is not None])
    return found


def _capacity_problems(capacity: Capacity, services: list[Service]) -> Found:
    """What the services need of a node's maps beyond the capacity settings."""
    found: Found = []
    frontends = slots = 0
    backends: set[tuple[IPv4Address, int, str]] = set()
    for i, service in enumerate(services):
        if len(service.backends) > MAX_BACKENDS_PER_SERVICE:
            found.append((f"services[{i}].backends", f"{len(service.backends)} backends, more than a service can "
                          f"have ({MAX_BACKENDS_PER_SERVICE})"))
        per_port = ((service.cluster_ip is not None) + (service.type == "NodePort") + len(service.external_ips)
                    + len(service.load_balancer_ips))
        frontends += per_port * len(service.ports)
        slots += per_port * len(service.ports) * len(service.backends)
        backends.update((b.address, p.target_port, p.protocol) for p in service.ports for b in service.backends)
    for setting, need, have in (("frontends", frontends, capacity.frontends),
                                ("backendSlots", slots, capacity.backend_slots),
                                ("backends", len(backends), capacity.backends)):
        if need > have:
            found.append((f"cluster.capacity.{setting}",
                          f"the services need {need} {setting} per node, more than capacity.{setting} {have}; "
                          f"raise cluster.capacity.{setting}"))
    return found


def _node_problems(nodes: list[Node | None]) -> Found:
    found: Found = []
    names: dict[str, str] = {}
    addresses: dict[IPv4Address, str] = {}
    for i, node in enumerate(nodes):
        if node is None:
            continue
        at = f"nodes[{i}]"
        if first := _first(names, node.name, at):
            found.append((f"{at}.name", f"duplicate node name '{node.name}' (also {first})"))
        if first := _first(addresses, node.address, at):
            found.append((f"{at}.address", f"duplicate node address {node.address} (also {first})"))
    return found


def _port_problems(
    service: Service,
    at: str,
    node_port_range: PortRange | None,
    node_ports: dict[tuple[int, str], str],
    cluster_ports: dict[tuple[IPv4Address, int, str], str],
) -> Found:
    """The problems of a service's ports; node_ports and cluster_ports span all services."""
    found: Found = []
    names: dict[str, str] = {}
    for j, port in enumerate(service.ports):
        where = f"{at}.ports[{j}]"
        if port.name is not None and (first := _first(names, port.name, where)):
            found.append((f"{where}.name", f"duplicate port name '{port.name}' (also {first})"))
        if service.cluster_ip is not None:
            key = (service.cluster_ip, port.port, port.protocol)
            if first := _first(cluster_ports, key, where):
                found.append((
                    f"{where}.port",
                    f"duplicate port {service.cluster_ip}:{port.port}/{port.protocol} (also {first})",
                ))
        for field, addresses in (("externalIPs", service.external_ips), ("loadBalancerIPs", service.load_balancer_ips)):
            for k, address in enumerate(addresses):
                at_ip = f"{at}.{field}[{k}]"
                if first := _first(cluster_ports, (address, port.port, port.protocol), at_ip):
                    found.append((at_ip, f"duplicate frontend {address}:{port.port}/{port.protocol} (also {first})"))
        if port.node_port is None:
            continue
        if service.type != "NodePort":
            found.append((f"{where}.nodePort", f"nodePort is not allowed on a {service.type} service"))
            continue
        if node_port_range is not None and port.node_port not in node_port_range:
            found.append((
                f"{where}.nodePort",
                f"nodePort {port.node_port} is outside nodePortRange {node_port_range}",
            ))
        if first := _first(node_ports, (port.node_port, port.protocol), where):
            found.append((
                f"{where}.nodePort",
                f"duplicate nodePort {port.node_port}/{port.protocol} (also {first})",
            ))
    if (hc := service.health_check_node_port) is not None:
        where = f"{at}.healthCheckNodePort"
        if first := _first(node_ports, (hc, "TCP"), where):
            found.append((where, f"healthCheckNodePort {hc} is also a nodePort ({first})"))
    return found


def _backend_problems(service: Service, at: str, node_names: set[str] | None) -> Found:
    """The problems of a service's backends; node_names is None if not all nodes are known."""
    found: Found = []
    addresses: dict[IPv4Address, str] = {}
    for k, backend in enumerate(service.backends):
        where = f"{at}.backends[{k}]"
        if node_names is not None and backend.node is not None and backend.node not in node_names:
            found.append((f"{where}.node", f"node '{backend.node}' is not defined in nodes"))
        if first := _first(addresses, backend.address, where):
            found.append((f"{where}.address", f"duplicate backend {backend.address} (also {first})"))
    if service.session_affinity_config is not None and service.session_affinity != "ClientIP":
        found.append((f"{at}.sessionAffinityConfig", "sessionAffinityConfig needs sessionAffinity: ClientIP"))
    if service.load_balancer_source_ranges and not service.load_balancer_ips:
        found.append((f"{at}.loadBalancerSourceRanges", "loadBalancerSourceRanges needs loadBalancerIPs"))
    if service.health_check_node_port is not None and service.external_traffic_policy != "Local":
        found.append((f"{at}.healthCheckNodePort", "healthCheckNodePort needs externalTrafficPolicy: Local"))
    return found


def _allocate_node_ports(services: list[Service], node_port_range: PortRange) -> Found:
    """Give every NodePort port without a nodePort one, deterministically.

    A port starts probing at sha256("namespace/name/portIndex/protocol") mod the range size and
    takes the first port number no other port uses (whatever the protocol). Ports are allocated
    in the order of those keys, so the result depends on nothing but the spec's content.
    """
    taken = {port.node_port for service in services for port in service.ports}
    taken |= {s.health_check_node_port for s in services if s.health_check_node_port is not None}
    wanted = sorted(
        (f"{service.key}/{j}/{port.protocol}", f"services[{i}].ports[{j}].nodePort", port)
        for i, service in enumerate(services)
        if service.type == "NodePort"
        for j, port in enumerate(service.ports)
        if port.node_port is None
    )
    found: Found = []
    for key, path, port in wanted:
        start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
        for step in range(node_port_range.size):
            candidate = node_port_range.lo + (start + step) % node_port_range.size
            if candidate not in taken:
                port.node_port = candidate
                taken.add(candidate)
                break
        else:
            found.append((path, f"no free port left in nodePortRange {node_port_range} to allocate"))
    return found


# --- loading -----------------------------------------------------------------------------------


def load_spec(path: str | os.PathLike[str], settings: str | os.PathLike[str] | None = None) -> Spec:
    """Read and parse the spec file at path; SpecError if it cannot be read or has problems.
    settings: a second file, beside Kubernetes objects, holding their bpfgen/v1 Settings
    document (a bpfgen/v1 spec has its settings in its cluster block)."""
    if settings is None:
        return parse_spec(specio.read_file(path), os.fspath(path))
    from bpfgen import kube

    documents = specio.load_documents(specio.read_file(path), os.fspath(path))
    extra = specio.load_documents(specio.read_file(settings), os.fspath(settings))
    if not kube.is_kubernetes(documents):
        raise SpecError([Problem(os.fspath(settings), "", "a settings file is read only beside Kubernetes objects "
                                 f"(the settings of the bpfgen/v1 spec {os.fspath(path)} are its cluster block)")])
    for document in extra:
        data = document.data
        if not (isinstance(data, dict) and data.get("apiVersion") == API_VERSION and data.get("kind") == kube.SETTINGS_KIND):
            raise SpecError([Problem(os.fspath(settings), "", "a settings file holds one bpfgen/v1 Settings document "
                                     "(apiVersion: bpfgen/v1, kind: Settings)", document.line_of(""))])
    return kube.to_spec(documents + extra, os.fspath(path))


def parse_spec(text: str, filename: str = _PROGRAMMATIC) -> Spec:
    """Parse a spec from YAML (or JSON) text; SpecError with all its problems if it is not valid.

    The text is a bpfgen/v1 ServiceSpec, or Kubernetes objects (a v1 List or a stream of Node,
    Service and EndpointSlice objects, see bpfgen.kube), told apart by their apiVersion."""
    documents = specio.load_documents(text, filename)  # SpecError if malformed or over a limit
    from bpfgen import kube

    if kube.is_kubernetes(documents):
        return kube.to_spec(documents, filename)
    if len(documents) != 1:
        document = specio.load_document(text, filename)  # the problem of a stream, or an empty document
    else:
        document = documents[0]
    data, found = document.data, list(document.duplicates)

    if data is None:
        raise SpecError([Problem(filename, "", "the file is empty")])
    if not isinstance(data, dict):
        message = f"expected a mapping at the top, got {_describe(data)}"
        raise SpecError([Problem(filename, "", message, document.line_of(""))])

    spec, problems = validate_data(data)
    found += problems
    if found:
        problems = [Problem(filename, path, message, document.line_of(path)) for path, message in found]
        raise SpecError(sorted(problems, key=lambda problem: problem.line or 0))
    return spec


def validate_data(data: dict) -> tuple[Spec | None, Found]:
    """The Spec of bpfgen/v1 data, or None and its problems as (YAML path, message)."""
    try:
        return Spec.model_validate(data, by_name=False), []
    except ValidationError as err:
        found = [_describe_error(error) for error in err.errors()]
        return None, found + _rule_problems(*_salvage(data))
    except SpecError as err:
        return None, [(problem.path, problem.message) for problem in err.problems]


def _salvage(data: dict) -> tuple[Cluster | None, list[Node | None], list[Service | None]]:
    """The parts of an invalid spec that are valid on their own (None for the others), so that
    the rules across fields can still be checked for them."""

    def valid(model: type[_Model], value: Any) -> Any:
        try:
            return model.model_validate(value, by_name=False)
        except ValidationError:
            return None

    def items(key: str) -> list:
        value = data.get(key)
        return value if isinstance(value, list) else []

    nodes = [valid(Node, node) for node in items("nodes")]
    services = [valid(Service, service) for service in items("services")]
    return valid(Cluster, data.get("cluster", {})), nodes, services


_join = specio.join_path


# --- pydantic errors as short messages ---------------------------------------------------------

_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "list_type": "a list",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
}


def _describe_error(error: Any) -> tuple[str, str]:
    """A pydantic error as (path, message), without pydantic's boilerplate."""
    loc, kind, value = error["loc"], error["type"], error.get("input")
    ctx = error.get("ctx", {})
    name = loc[-1] if loc else "value"
    path = _format_loc(loc)
    if kind == "missing":
        return path, f"missing required field '{name}'"
    if kind == "extra_forbidden":
        return path, f"unknown field '{name}'{_did_you_mean(loc)}"
    if kind == "invalid_key":
        return _join(_format_loc(loc[:-1]), str(value)), f"keys must be strings, got {_describe(value)}"
    if kind == "value_error":
        return path, str(ctx["error"])
    if kind == "literal_error":
        return path, f"invalid {name} {_describe(value)}: expected {ctx['expected']}"
    if kind == "too_short":
        return path, f"{name} must have at least {ctx['min_length']} entry"
    if kind == "too_long":
        return path, f"{name} has {ctx.get('actual_length', 'too many')} entries, at most {ctx['max_length']}"
    if kind in _EXPECTED:
        return path, f"expected {_EXPECTED[kind]}, got {_describe(value)}"
    return path, error["msg"]


def _format_loc(loc: tuple) -> str:
    """A pydantic location as a YAML path: ('services', 0, 'name') -> services[0].name."""
    path = ""
    for part in loc:
        path = _join(path, part)
    return path


def _did_you_mean(loc: tuple) -> str:
    """' (did you mean 'nodePort'?)' for an unknown field at loc that looks like a known one."""
    model: Any = Spec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = next((f for f in model.model_fields.values() if f.alias == part), None)
        model = _model_in(field.annotation) if field else None
        if model is None:
            return ""
    known = {field.alias.lower(): field.alias for field in model.model_fields.values()}
    close = difflib.get_close_matches(to_camel(str(loc[-1])).lower(), known, n=1, cutoff=0.6)
    return f" (did you mean '{known[close[0]]}'?)" if close else ""


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model in an annotation like Cluster, list[Service] or Node | None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_model_in, typing.get_args(annotation))), None)


# --- output ------------------------------------------------------------------------------------


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    """The spec as JSON-able data in the YAML's names, with defaults and nodePorts filled in.
    parse_spec(json.dumps(spec_to_dict(spec))) == spec."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the spec format, as written to schemas/bpfgen-v1.schema.json."""
    schema = Spec.model_json_schema(by_alias=True, mode="validation")
    schema["title"] = f"bpfgen {KIND} ({API_VERSION})"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpfgen.spec", description="Print the JSON Schema of specs.")
    parser.add_argument("--write-schema", action="store_true", help=f"write it to {_SCHEMA_FILE} instead")
    args = parser.parse_args(argv)
    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if args.write_schema:
        _SCHEMA_FILE.parent.mkdir(parents=True, exist_ok=True)
        _SCHEMA_FILE.write_text(text, encoding="utf-8")
        print(f"wrote {_SCHEMA_FILE}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
