"""Kubernetes objects as a spec: what `kubectl get nodes,services,endpointslices -A -o yaml`
(or `-o json`) prints, turned into the bpfgen/v1 data that `Spec` validates.

The input is a `v1 List` (its `items`) or a multi-document YAML stream of objects, YAML or
JSON. What is read, and how:

- `v1 Node`: the node's name, its first IPv4 InternalIP (else ExternalIP) and its first IPv4
  podCIDR (`spec.podCIDRs`, else `spec.podCIDR`). bpfgen's node names are DNS labels of at most
  15 characters (they become pin paths): a longer or dotted Kubernetes name is mapped to its
  first 10 characters (letters, digits, '-') plus '-' and 4 hex digits of its sha256
  (`ip-10-0-1-23.ec2.internal` -> `ip-10-0-1--96d1`), and a note says so. A node without an
  IPv4 address is skipped with a note.
- `v1 Service`: ClusterIP, NodePort and LoadBalancer services (a LoadBalancer one is a NodePort
  service to bpfgen, or a ClusterIP one when it has no nodePorts); its IPv4 clusterIP (of
  `clusterIP`/`clusterIPs`); its TCP and UDP ports; `spec.externalIPs` and
  `status.loadBalancer.ingress[].ip` as more frontends on each port; `sessionAffinity` and
  its `sessionAffinityConfig.clientIP.timeoutSeconds` (the config only with ClientIP, as the
  apiserver has it: otherwise ignored with a note); `externalTrafficPolicy` and
  `internalTrafficPolicy`; `healthCheckNodePort` with externalTrafficPolicy Local (otherwise
  ignored with a note); `loadBalancerSourceRanges`, its IPv4 ranges (host bits cleared, with
  a note) when the service has an IPv4 load balancer ingress ip, else ignored with a note (its
  ranges other than IPv4 are ignored with a note, as kube-proxy ignores them: with no IPv4 one
  left, every client is admitted). Skipped as kube-proxy skips them, with a note: headless
  (`clusterIP: None`), ExternalName, those labelled `service.kubernetes.io/service-proxy-name`,
  those without an IPv4 clusterIP.
- `discovery.k8s.io/v1 EndpointSlice`: the slices of a service (label
  `kubernetes.io/service-name`, same namespace) merge. A slice's port named like the Service
  port gives the target port (so named targetPorts work). Every endpoint is a backend with its
  `conditions` as the slice says them (nil ready: true; nil serving: as ready; nil
  terminating: false); an address in two slices is one backend, the readier one's. Which
  backends take new flows (kube-proxy's CategorizeEndpoints: the ready ones; with none ready,
  those serving and terminating) is the datapath's to decide, not this module's: the others
  keep their established flows. An endpoint's `nodeName` places it; one without nodeName
  whose address is a node's address is that node's host; the others are on no node (remote
  from every node). Slices labelled `service.kubernetes.io/headless`, of address types other
  than IPv4, or of no known service are skipped with a note.
- `bpfgen/v1 Settings` (optional, in the same stream or in a second file: `--settings`,
  `spec.load_spec(path, settings)`): `metadata.name` and the `cluster`
  block of bpfgen/v1 (ranges, capacities). Without it the defaults apply (Kubernetes'
  nodePortRange 30000-32767) and the spec is named after the file (`cluster.yaml` ->
  `cluster`).

Every server-side field (uid, resourceVersion, managedFields, annotations, status...) is
tolerated, and objects of other kinds are skipped with a note; but inside the parts bpfgen reads
(a Service's spec and its ports, its status.loadBalancer, an EndpointSlice's endpoints, ports
and conditions, a Node's spec and status.addresses) every field must be a Kubernetes one:
a misspelt one is an error naming the object (`Service shop/web`), the file, the line and the
YAML path. Problems found by bpfgen's own rules name the object the same way.

Notes are on `Spec.notes` and are also issued as `SpecNote` warnings (the CLI prints them).
"""

from __future__ import annotations

import difflib
import hashlib
import re
import typing
import warnings
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic.alias_generators import to_camel

from bpfgen.errors import Problem, SpecError
from bpfgen.specio import Document, join_path

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
DEFAULT_NAME = "cluster"
SETTINGS_KIND = "Settings"

_DNS_LABEL = re.compile("[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_NODE_NAME_MAX = 15


class SpecNote(UserWarning):
    """A note about Kubernetes input: what was skipped or decided (not a problem)."""


# --- the parts of the objects bpfgen reads -----------------------------------------------------


class _Strict(BaseModel):
    """A part bpfgen reads: every Kubernetes field is listed (the ignored ones too); any other
    field is an error."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel)


class _Loose(BaseModel):
    """A part that also holds server-side fields bpfgen does not read: they are tolerated."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel)


Protocol = Literal["TCP", "UDP", "SCTP"]


class ObjectMeta(_Loose):
    name: StrictStr
    namespace: StrictStr | None = None
    labels: dict[StrictStr, StrictStr] | None = None


class ServicePort(_Strict):
    name: StrictStr | None = None
    protocol: Protocol = "TCP"
    app_protocol: StrictStr | None = None
    port: StrictInt
    target_port: StrictInt | StrictStr | None = None
    node_port: StrictInt | None = None


class ClientIPConfig(_Strict):
    timeout_seconds: StrictInt | None = None


class SessionAffinityConfig(_Strict):
    client_ip: ClientIPConfig | None = Field(default=None, alias="clientIP")


class ServiceSpec(_Strict):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    ports: list[ServicePort] | None = None
    selector: dict[StrictStr, StrictStr] | None = None
    cluster_ip: StrictStr | None = Field(default=None, alias="clusterIP")
    cluster_ips: list[StrictStr] | None = Field(default=None, alias="clusterIPs")
    external_ips: list[StrictStr] | None = Field(default=None, alias="externalIPs")
    external_name: StrictStr | None = None
    external_traffic_policy: Literal["Cluster", "Local"] | None = None
    internal_traffic_policy: Literal["Cluster", "Local"] | None = None
    health_check_node_port: StrictInt | None = None
    session_affinity: Literal["None", "ClientIP"] | None = None
    session_affinity_config: SessionAffinityConfig | None = None
    load_balancer_ip: StrictStr | None = Field(default=None, alias="loadBalancerIP")
    load_balancer_source_ranges: list[StrictStr] | None = None
    load_balancer_class: StrictStr | None = None
    allocate_load_balancer_node_ports: StrictBool | None = None
    publish_not_ready_addresses: StrictBool | None = None
    ip_families: list[Literal["IPv4", "IPv6"]] | None = None
    ip_family_policy: Literal["SingleStack", "PreferDualStack", "RequireDualStack"] | None = None
    traffic_distribution: StrictStr | None = None
    topology_keys: list[StrictStr] | None = None  # alpha, removed in 1.22; old dumps may have it


class PortStatus(_Strict):
    port: StrictInt
    protocol: Protocol
    error: StrictStr | None = None


class LoadBalancerIngress(_Strict):
    ip: StrictStr | None = None
    hostname: StrictStr | None = None
    ip_mode: Literal["VIP", "Proxy"] | None = None
    ports: list[PortStatus] | None = None


class LoadBalancerStatus(_Strict):
    ingress: list[LoadBalancerIngress] | None = None


class ServiceStatus(_Loose):  # conditions: not read
    load_balancer: LoadBalancerStatus | None = None


class KubeService(_Loose):
    metadata: ObjectMeta
    spec: ServiceSpec
    status: ServiceStatus | None = None


class NodeSpec(_Strict):
    pod_cidr: StrictStr | None = Field(default=None, alias="podCIDR")
    pod_cidrs: list[StrictStr] | None = Field(default=None, alias="podCIDRs")
    provider_id: StrictStr | None = Field(default=None, alias="providerID")
    unschedulable: StrictBool | None = None
    taints: list[Any] | None = None
    config_source: Any = None
    external_id: StrictStr | None = Field(default=None, alias="externalID")


class NodeAddress(_Strict):
    type: StrictStr
    address: StrictStr


class NodeStatus(_Loose):  # capacity, conditions, nodeInfo, images...: not read
    addresses: list[NodeAddress] | None = None


class KubeNode(_Loose):
    metadata: ObjectMeta
    spec: NodeSpec = Field(default_factory=NodeSpec)
    status: NodeStatus | None = None


class EndpointConditions(_Strict):
    ready: StrictBool | None = None
    serving: StrictBool | None = None
    terminating: StrictBool | None = None


class ForZone(_Strict):
    name: StrictStr


class ForNode(_Strict):
    name: StrictStr


class EndpointHints(_Strict):
    for_zones: list[ForZone] | None = None
    for_nodes: list[ForNode] | None = None


class Endpoint(_Strict):
    addresses: list[StrictStr] = Field(min_length=1)
    conditions: EndpointConditions = Field(default_factory=EndpointConditions)
    hostname: StrictStr | None = None
    target_ref: dict[StrictStr, Any] | None = None
    node_name: StrictStr | None = None
    zone: StrictStr | None = None
    hints: EndpointHints | None = None
    deprecated_topology: dict[StrictStr, StrictStr] | None = None

    @property
    def ready(self) -> bool:  # nil: ready
        return self.conditions.ready is not False

    @property
    def serving(self) -> bool:  # nil: as ready
        return self.ready if self.conditions.serving is None else self.conditions.serving

    @property
    def terminating(self) -> bool:  # nil: not terminating
        return self.conditions.terminating is True


class EndpointPort(_Strict):
    name: StrictStr | None = None
    protocol: Protocol = "TCP"
    port: StrictInt | None = None
    app_protocol: StrictStr | None = None


class KubeEndpointSlice(_Loose):
    metadata: ObjectMeta
    address_type: Literal["IPv4", "IPv6", "FQDN"]
    endpoints: list[Endpoint] | None = None
    ports: list[EndpointPort] | None = None


class Settings(_Strict):
    """bpfgen/v1 Settings: what a bpfgen/v1 ServiceSpec would say beside the objects."""

    api_version: Literal["bpfgen/v1"]
    kind: Literal["Settings"]
    metadata: dict[StrictStr, Any] | None = None  # name (checked as the spec's metadata)
    cluster: dict[StrictStr, Any] | None = None  # checked as the spec's cluster block


_MODELS: dict[tuple[str, str], type[BaseModel]] = {
    ("v1", "Node"): KubeNode,
    ("v1", "Service"): KubeService,
    ("discovery.k8s.io/v1", "EndpointSlice"): KubeEndpointSlice,
    ("bpfgen/v1", SETTINGS_KIND): Settings,
}


# --- telling the input apart -------------------------------------------------------------------


def is_kubernetes(documents: list[Document]) -> bool:
    """Whether documents are Kubernetes objects (any has an apiVersion that is not bpfgen's,
    and is not a ServiceSpec with a wrong apiVersion) rather than a bpfgen/v1 spec."""
    for document in documents:
        data = document.data
        if isinstance(data, dict) and data.get("kind") != "ServiceSpec":
            version = data.get("apiVersion")
            if isinstance(version, str) and not version.startswith("bpfgen/"):
                return True
    return False


# --- where things came from --------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where a part of the bpfgen/v1 data was in the input."""

    document: Document
    path: str  # YAML path in the document
    label: str  # the object, e.g. "Service shop/web"

    @property
    def line(self) -> int | None:
        return self.document.line_of(self.path)


@dataclass(eq=False)
class Origin:
    """How a spec was made from Kubernetes objects."""

    filename: str
    notes: list[str] = field(default_factory=list)
    sources: dict[str, Source] = field(default_factory=dict)  # bpfgen/v1 path -> Source
    node_names: dict[str, str] = field(default_factory=dict)  # Kubernetes node name -> bpfgen's
    has_settings: bool = False
    copied: set[str] = field(default_factory=set)  # paths of parts copied whole (see locate)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Origin) and self.notes == other.notes

    def locate(self, path: str) -> Source | None:
        """The source of path, or of its nearest ancestor that has one (a part copied whole
        from the input, like the Settings' cluster block: the same path below it)."""
        rest = ""
        while True:
            source = self.sources.get(path)
            if source is not None:
                if rest and path in self.copied:
                    return Source(source.document, source.path + rest, source.label)
                return source
            if not path:
                return None
            parent = _parent(path)
            rest = path[len(parent):] + rest
            path = parent


_LAST_STEP = re.compile(r"(\.[^.\[\]]+|\[\d+\])$")


def _parent(path: str) -> str:
    match = _LAST_STEP.search(path)
    return path[: match.start()] if match else ""


# --- the conversion ----------------------------------------------------------------------------


def node_name(name: str) -> str:
    """The bpfgen node name of a Kubernetes node: the name itself if it is a DNS label of at
    most 15 characters, else its first 10 letters, digits or '-', '-' and 4 hex digits of its
    sha256 (deterministic, and distinct for distinct names but by a 1 in 65536 chance)."""
    if len(name) <= _NODE_NAME_MAX and _DNS_LABEL.fullmatch(name):
        return name
    clean = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    head = clean[:10].rstrip("-") or "node"
    return f"{head}-{hashlib.sha256(name.encode()).hexdigest()[:4]}"


def _spec_name(filename: str) -> str:
    """The name of a spec read from filename: its stem as a DNS label, or "cluster"."""
    if filename.startswith("<"):
        return DEFAULT_NAME
    clean = re.sub(r"[^a-z0-9-]+", "-", Path(filename).stem.lower())[:63].strip("-")
    return clean or DEFAULT_NAME


def _ipv4(text: Any) -> IPv4Address | None:
    try:
        return IPv4Address(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _ipv4_net(text: Any) -> IPv4Network | None:
    try:
        return IPv4Network(text, strict=False) if isinstance(text, str) and "." in text else None
    except ValueError:
        return None


@dataclass
class _Object:
    document: Document
    path: str
    data: Any
    index: int  # order in the input

    def at(self, *steps: Any) -> str:
        return _join(self.path, *steps)


def _join(path: str, *steps: Any) -> str:
    for step in steps:
        path = join_path(path, step)
    return path


def _label(kind: str, data: Any, namespaced: bool) -> str:
    meta = data.get("metadata") if isinstance(data, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    name = name if isinstance(name, str) else "<unnamed>"
    if namespaced:
        namespace = meta.get("namespace") if isinstance(meta, dict) else None
        name = f"{namespace if isinstance(namespace, str) else 'default'}/{name}"
    return f"{kind} {name}"


class _Converter:
    def __init__(self, documents: list[Document], filename: str):
        self.documents = documents
        self.filename = filename
        self.origin = Origin(filename)
        self.problems: list[Problem] = []
        self.skipped_kinds: Counter[str] = Counter()

    # problems and notes

    def note(self, message: str) -> None:
        self.origin.notes.append(message)

    def problem(self, obj: _Object | None, path: str, message: str, label: str | None = None) -> None:
        document = obj.document if obj else (self.documents[0] if self.documents else None)
        line = document.line_of(path) if document is not None else None
        filename = document.filename if document is not None else self.filename  # (a settings file's own)
        self.problems.append(Problem(filename, path, f"{label}: {message}" if label else message, line))

    def source(self, bpfgen_path: str, obj: _Object, label: str, *steps: Any) -> None:
        self.origin.sources[bpfgen_path] = Source(obj.document, obj.at(*steps), label)

    # reading

    def objects(self) -> list[_Object]:
        found: list[_Object] = []
        for document in self.documents:
            data = document.data
            if data is None:
                continue  # an empty document of a stream
            if isinstance(data, dict) and isinstance(data.get("items"), list) and str(data.get("kind", "")).endswith("List"):
                for i, item in enumerate(data["items"]):
                    found.append(_Object(document, f"items[{i}]", item, len(found)))
            else:
                found.append(_Object(document, "", data, len(found)))
        return found

    def parse(self, obj: _Object) -> tuple[str, BaseModel] | None:
        data = obj.data
        if not isinstance(data, dict):
            self.problem(obj, obj.path, f"expected a Kubernetes object (a mapping), got {_describe(data)}")
            return None
        kind, version = data.get("kind"), data.get("apiVersion")
        if not isinstance(kind, str) or not isinstance(version, str):
            self.problem(obj, obj.path, "an object needs a kind and an apiVersion")
            return None
        model = _MODELS.get((version, kind))
        if model is None:
            if (version, kind) == ("bpfgen/v1", "ServiceSpec"):
                self.problem(obj, obj.path, "a bpfgen/v1 ServiceSpec is a file of its own; beside Kubernetes "
                             "objects, give the cluster settings as a bpfgen/v1 Settings document")
            elif kind in ("Node", "Service", "EndpointSlice"):
                self.note(f"skipped {kind} {_label(kind, data, kind != 'Node').split(' ', 1)[1]}: apiVersion "
                          f"{version}, bpfgen reads {next(v for v, k in _MODELS if k == kind)}")
            else:
                self.skipped_kinds[f"{version} {kind}"] += 1
            return None
        label = _label(kind, data, kind in ("Service", "EndpointSlice"))
        try:
            return label, model.model_validate(data)
        except ValidationError as err:
            for error in err.errors():
                path, message = _describe_error(error, model)
                self.problem(obj, join_path(obj.path, path) if path else obj.path, message,
                             label if kind != SETTINGS_KIND else None)
            return None

    def run(self) -> dict:
        nodes: list[tuple[_Object, str, KubeNode]] = []
        services: list[tuple[_Object, str, KubeService]] = []
        slices: list[tuple[_Object, str, KubeEndpointSlice]] = []
        settings: list[tuple[_Object, Settings]] = []
        for obj in self.objects():
            parsed = self.parse(obj)
            if parsed is None:
                continue
            label, model = parsed
            if isinstance(model, KubeNode):
                nodes.append((obj, label, model))
            elif isinstance(model, KubeService):
                services.append((obj, label, model))
            elif isinstance(model, KubeEndpointSlice):
                slices.append((obj, label, model))
            else:
                settings.append((obj, model))
        for kind, count in sorted(self.skipped_kinds.items()):
            self.note(f"skipped {count} {kind} object{'s' if count > 1 else ''} (bpfgen reads Node, Service "
                      f"and EndpointSlice)")
        for obj, _ in settings[1:]:
            self.problem(obj, obj.path, f"a second bpfgen/v1 Settings document (the first is on line "
                         f"{settings[0][0].document.line_of(settings[0][0].path)})")
        if self.problems:
            raise SpecError(self.problems)

        data: dict[str, Any] = {"apiVersion": "bpfgen/v1", "kind": "ServiceSpec",
                                "metadata": {"name": _spec_name(self.filename)}}
        if settings:
            obj, model = settings[0]
            self.origin.has_settings = True
            for name in ("metadata", "cluster"):
                if getattr(model, name) is not None:
                    data[name] = getattr(model, name)
                    self.source(name, obj, "", name)
                    self.origin.copied.add(name)
        data["nodes"] = self.nodes(nodes)
        data["services"] = self.services(services, slices)
        return data

    # nodes

    def nodes(self, nodes: list[tuple[_Object, str, KubeNode]]) -> list[dict]:
        out: list[dict] = []
        self.node_by_address: dict[str, str] = {}
        for obj, label, node in nodes:
            addresses = (node.status.addresses if node.status else None) or []
            pick = next(((k, a) for kind in ("InternalIP", "ExternalIP") for k, a in enumerate(addresses)
                         if a.type == kind and _ipv4(a.address)), None)
            if pick is None:
                self.note(f"skipped {label}: no IPv4 InternalIP or ExternalIP in status.addresses")
                continue
            name = node_name(node.metadata.name)
            if name != node.metadata.name:
                self.note(f"{label} is node '{name}' to bpfgen (node names are DNS labels of at most "
                          f"{_NODE_NAME_MAX} characters)")
            self.origin.node_names[node.metadata.name] = name
            at = f"nodes[{len(out)}]"
            entry = {"name": name, "address": pick[1].address}
            self.source(at, obj, label)
            self.source(f"{at}.name", obj, label, "metadata", "name")
            self.source(f"{at}.address", obj, label, "status", "addresses", pick[0], "address")
            cidrs = [(("podCIDRs", k), c) for k, c in enumerate(node.spec.pod_cidrs or [])]
            if node.spec.pod_cidr is not None:
                cidrs.append((("podCIDR",), node.spec.pod_cidr))
            cidr = next(((where, c) for where, c in cidrs if _ipv4_net(c)), None)
            if cidr is not None:
                entry["podCIDR"] = cidr[1]
                self.source(f"{at}.podCIDR", obj, label, "spec", *cidr[0])
            self.node_by_address.setdefault(pick[1].address, name)
            out.append(entry)
        return out

    # services

    def services(self, services: list[tuple[_Object, str, KubeService]],
                 slices: list[tuple[_Object, str, KubeEndpointSlice]]) -> list[dict]:
        by_service: dict[tuple[str, str], list[tuple[_Object, str, KubeEndpointSlice]]] = {}
        known = {(s.metadata.namespace or "default", s.metadata.name) for _, _, s in services}
        for obj, label, slice_ in slices:
            labels = slice_.metadata.labels or {}
            owner = labels.get(SERVICE_NAME_LABEL)
            key = (slice_.metadata.namespace or "default", owner)
            if HEADLESS_LABEL in labels:
                if key not in known:
                    self.note(f"skipped {label}: labelled {HEADLESS_LABEL}")
                continue  # the headless service's note says it
            if owner is None:
                self.note(f"skipped {label}: no label {SERVICE_NAME_LABEL}")
                continue
            if key not in known:
                self.note(f"skipped {label}: no Service {key[0]}/{owner} in the input")
                continue
            if slice_.address_type != "IPv4":
                self.note(f"ignored {label}: addressType {slice_.address_type} (bpfgen is IPv4)")
                continue
            by_service.setdefault(key, []).append((obj, label, slice_))
        out: list[dict] = []
        for obj, label, svc in services:
            key = (svc.metadata.namespace or "default", svc.metadata.name)
            entry = self.service(obj, label, svc, sorted(by_service.get(key, []), key=lambda s: s[2].metadata.name),
                                 f"services[{len(out)}]")
            if entry is not None:
                out.append(entry)
        return out

    def service(self, obj: _Object, label: str, svc: KubeService,
                slices: list[tuple[_Object, str, KubeEndpointSlice]], at: str) -> dict | None:
        spec, labels = svc.spec, svc.metadata.labels or {}
        if spec.type == "ExternalName":
            self.note(f"skipped {label}: ExternalName (a DNS name, nothing to proxy)")
            return None
        if spec.cluster_ip == "None":
            self.note(f"skipped {label}: headless (clusterIP None)")
            return None
        if PROXY_NAME_LABEL in labels:
            self.note(f"skipped {label}: labelled {PROXY_NAME_LABEL}={labels[PROXY_NAME_LABEL]} "
                      f"(another proxy owns it)")
            return None
        ips = [(("clusterIP",), spec.cluster_ip)] if spec.cluster_ip else []
        ips += [(("clusterIPs", k), ip) for k, ip in enumerate(spec.cluster_ips or [])]
        cluster_ip = next(((where, ip) for where, ip in ips if _ipv4(ip)), None)
        if cluster_ip is None and ips:
            self.note(f"skipped {label}: no IPv4 clusterIP ({', '.join(ip for _, ip in ips)}; bpfgen is IPv4)")
            return None
        if cluster_ip is None and spec.type == "ClusterIP":
            self.note(f"skipped {label}: no clusterIP")
            return None

        ports = []  # (index in spec.ports, port)
        for j, port in enumerate(spec.ports or []):
            if port.protocol == "SCTP":
                self.note(f"{label}: port {port.name or port.port}/SCTP ignored (bpfgen proxies TCP and UDP)")
            else:
                ports.append((j, port))
        if not ports:
            self.note(f"skipped {label}: no TCP or UDP port")
            return None

        node_ports = [p.node_port for _, p in ports if p.node_port is not None]
        is_node_port = spec.type == "NodePort" or (spec.type == "LoadBalancer" and node_ports)
        if spec.type == "LoadBalancer" and node_ports and len(node_ports) < len(ports):
            self.note(f"{label}: some ports have no nodePort; bpfgen allocates them")
        entry: dict[str, Any] = {
            "name": svc.metadata.name,
            "namespace": svc.metadata.namespace or "default",
            "type": "NodePort" if is_node_port else "ClusterIP",
        }
        self.source(at, obj, label)
        self.source(f"{at}.name", obj, label, "metadata", "name")
        self.source(f"{at}.namespace", obj, label, "metadata", "namespace")
        self.source(f"{at}.type", obj, label, "spec", "type")
        if cluster_ip is not None:
            entry["clusterIP"] = cluster_ip[1]
            self.source(f"{at}.clusterIP", obj, label, "spec", *cluster_ip[0])

        targets, backends = self.endpoints(label, ports, slices, at)
        entry["ports"] = []
        for k, (j, port) in enumerate(ports):
            where = f"{at}.ports[{k}]"
            out = {"protocol": port.protocol, "port": port.port}
            if port.name:
                out["name"] = port.name
            target = targets[k]
            if target is not None:
                out["targetPort"] = target[0]
                if target[1] is not None:
                    self.origin.sources[f"{where}.targetPort"] = target[1]
            if is_node_port and port.node_port is not None:
                out["nodePort"] = port.node_port
            entry["ports"].append(out)
            self.source(where, obj, label, "spec", "ports", j)
            for name in ("name", "protocol", "port", "nodePort"):
                self.source(f"{where}.{name}", obj, label, "spec", "ports", j, name)
            if target is None or target[1] is None:
                self.source(f"{where}.targetPort", obj, label, "spec", "ports", j, "targetPort")

        external = [(k, ip) for k, ip in enumerate(spec.external_ips or []) if _ipv4(ip)]
        if len(external) < len(spec.external_ips or []):
            self.note(f"{label}: externalIPs other than IPv4 ignored")
        if external:
            entry["externalIPs"] = [ip for _, ip in external]
            for n, (k, _) in enumerate(external):
                self.source(f"{at}.externalIPs[{n}]", obj, label, "spec", "externalIPs", k)
        ingress = (svc.status.load_balancer.ingress if svc.status and svc.status.load_balancer else None) or []
        lb = [(k, i.ip) for k, i in enumerate(ingress) if _ipv4(i.ip)]
        if spec.type == "LoadBalancer" and lb:
            entry["loadBalancerIPs"] = [ip for _, ip in lb]
            for n, (k, _) in enumerate(lb):
                self.source(f"{at}.loadBalancerIPs[{n}]", obj, label, "status", "loadBalancer", "ingress", k, "ip")
        if spec.type == "LoadBalancer" and len(lb) < len(ingress):
            self.note(f"{label}: load balancer ingress without an IPv4 ip ignored")
        self.policies(obj, label, spec, entry, at)

        entry["backends"] = []
        for n, (endpoint, node, source) in enumerate(backends):
            backend: dict[str, Any] = {"address": endpoint.addresses[0]}
            if node is not None:
                backend["node"] = node
            backend["conditions"] = {"ready": endpoint.ready, "serving": endpoint.serving,
                                     "terminating": endpoint.terminating}
            entry["backends"].append(backend)
            where = f"{at}.backends[{n}]"
            self.origin.sources[where] = source
            for name, steps in (("address", ("addresses", 0)), ("node", ("nodeName",)), ("conditions", ("conditions",)),
                                *((f"conditions.{c}", ("conditions", c)) for c in ("ready", "serving", "terminating"))):
                self.origin.sources[f"{where}.{name}"] = Source(source.document, _join(source.path, *steps), source.label)
        return entry

    def policies(self, obj: _Object, label: str, spec: ServiceSpec, entry: dict, at: str) -> None:
        """Session affinity, the traffic policies, healthCheckNodePort and
        loadBalancerSourceRanges of a service (after its loadBalancerIPs)."""
        if spec.session_affinity is not None:
            entry["sessionAffinity"] = spec.session_affinity
            self.source(f"{at}.sessionAffinity", obj, label, "spec", "sessionAffinity")
        config = spec.session_affinity_config
        if config is not None and spec.session_affinity != "ClientIP":
            self.note(f"{label}: sessionAffinityConfig ignored (sessionAffinity is {spec.session_affinity or 'None'})")
        elif config is not None:
            entry["sessionAffinityConfig"] = {}
            self.source(f"{at}.sessionAffinityConfig", obj, label, "spec", "sessionAffinityConfig")
            if config.client_ip is not None:
                entry["sessionAffinityConfig"]["clientIP"] = {}
                self.source(f"{at}.sessionAffinityConfig.clientIP", obj, label, "spec", "sessionAffinityConfig",
                            "clientIP")
                if config.client_ip.timeout_seconds is not None:
                    entry["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] = config.client_ip.timeout_seconds
                    self.source(f"{at}.sessionAffinityConfig.clientIP.timeoutSeconds", obj, label, "spec",
                                "sessionAffinityConfig", "clientIP", "timeoutSeconds")
        for name, value in (("externalTrafficPolicy", spec.external_traffic_policy),
                            ("internalTrafficPolicy", spec.internal_traffic_policy)):
            if value is not None:
                entry[name] = value
                self.source(f"{at}.{name}", obj, label, "spec", name)
        if spec.health_check_node_port is not None:
            if spec.external_traffic_policy == "Local":
                entry["healthCheckNodePort"] = spec.health_check_node_port
                self.source(f"{at}.healthCheckNodePort", obj, label, "spec", "healthCheckNodePort")
            else:
                self.note(f"{label}: healthCheckNodePort {spec.health_check_node_port} ignored (externalTrafficPolicy "
                          f"is {spec.external_traffic_policy or 'Cluster'}, not Local)")
        ranges = []  # (index in the field, range)
        for k, text in enumerate(spec.load_balancer_source_ranges or []):
            text = text.strip()
            if ":" in text:
                continue  # IPv6 (noted below)
            network = _ipv4_net(text) if "/" in text else None
            if network is not None and str(network) != text:
                self.note(f"{label}: loadBalancerSourceRanges {text} taken as {network} (host bits cleared)")
                text = str(network)
            ranges.append((k, text))  # (not a CIDR: bpfgen's rules say so, naming the object)
        others = len(spec.load_balancer_source_ranges or []) - len(ranges)
        if others:
            self.note(f"{label}: loadBalancerSourceRanges other than IPv4 ignored (as kube-proxy does)"
                      + ("" if ranges else ": every client is admitted"))
        if ranges and not entry.get("loadBalancerIPs"):
            self.note(f"{label}: loadBalancerSourceRanges ignored (no IPv4 load balancer ingress ip in "
                      f"status.loadBalancer to apply them to)")
        elif ranges:
            entry["loadBalancerSourceRanges"] = [r for _, r in ranges]
            for n, (k, _) in enumerate(ranges):
                self.source(f"{at}.loadBalancerSourceRanges[{n}]", obj, label, "spec", "loadBalancerSourceRanges", k)
            self.source(f"{at}.loadBalancerSourceRanges", obj, label, "spec", "loadBalancerSourceRanges")

    def endpoints(self, label: str, ports: list[tuple[int, ServicePort]],
                  slices: list[tuple[_Object, str, KubeEndpointSlice]], at: str,
                  ) -> tuple[list[tuple[int, Source | None] | None], list[tuple[Endpoint, str | None, Source]]]:
        """The target port of each port (and where it came from; None: the Service's own) and
        the backends (endpoint, bpfgen node, source) of the service's slices: all of them,
        whatever their conditions."""
        # Each port's target: the slices' port of the Service port's name, by the most endpoints.
        found: list[dict[int, int]] = []  # per slice: k -> its port's number
        for obj, slabel, slice_ in slices:
            mine: dict[int, int] = {}
            for k, (_, port) in enumerate(ports):
                for m, sport in enumerate(slice_.ports or []):
                    if (sport.name or "") == (port.name or "") and sport.protocol == port.protocol and sport.port:
                        mine[k] = m
                        break
            found.append(mine)
        targets: list[tuple[int, Source | None] | None] = []
        for k, (_, port) in enumerate(ports):
            votes: Counter[int] = Counter()
            where: dict[int, Source] = {}
            for (obj, slabel, slice_), mine in zip(slices, found):
                if k in mine:
                    number = slice_.ports[mine[k]].port
                    votes[number] += len(slice_.endpoints or []) or 1 / 1024  # an empty slice still says
                    where.setdefault(number, Source(obj.document, obj.at("ports", mine[k], "port"), slabel))
            if votes:
                order = list(where)
                number = max(votes, key=lambda n: (votes[n], -order.index(n)))
                targets.append((number, where[number]))
            elif isinstance(port.target_port, int):
                targets.append((port.target_port, None))  # (from the Service port)
            else:
                targets.append(None)  # bpfgen's default: the port (a named one: nothing serves it)
        fixed = [t[0] if t else p.port for t, (_, p) in zip(targets, ports)]
        # The endpoints of the slices that agree on every port.
        candidates: list[tuple[Endpoint, str | None, Source]] = []
        for (obj, slabel, slice_), mine in zip(slices, found):
            agree = all(k in mine and slice_.ports[mine[k]].port == fixed[k] for k in range(len(ports)))
            if not agree:
                if slice_.endpoints:
                    self.note(f"ignored {slabel}: its ports do not give every port of {label} the target "
                              f"port the other slices give it")
                continue
            for e, endpoint in enumerate(slice_.endpoints or []):
                candidates.append((endpoint, endpoint.node_name, Source(obj.document, obj.at("endpoints", e), slabel)))
        seen: dict[str, int] = {}
        merged: list[tuple[Endpoint, str | None, Source]] = []
        for endpoint, k8s_node, source in candidates:
            address = endpoint.addresses[0]
            if address in seen:  # in two slices (moving between them): the readier one
                i = seen[address]
                if (endpoint.ready, endpoint.serving) > (merged[i][0].ready, merged[i][0].serving):
                    merged[i] = (endpoint, k8s_node, source)
                continue
            seen[address] = len(merged)
            merged.append((endpoint, k8s_node, source))
        return targets, [(endpoint, self.place(endpoint, k8s_node, source), source)
                         for endpoint, k8s_node, source in merged]

    def place(self, endpoint: Endpoint, k8s_node: str | None, source: Source) -> str | None:
        """The bpfgen node of an endpoint: its nodeName's; without one, the node whose address
        it is (a host endpoint); else none."""
        if k8s_node is not None:
            name = self.origin.node_names.get(k8s_node)
            if name is None:
                self.note(f"{source.label}: endpoint {endpoint.addresses[0]} is on node '{k8s_node}', which is "
                          f"not in the input: remote from every node")
            return name
        return self.node_by_address.get(endpoint.addresses[0])


# --- pydantic errors ---------------------------------------------------------------------------


def _describe(value: Any) -> str:
    from bpfgen.spec import _describe as describe

    return describe(value)


def _describe_error(error: Any, root: type[BaseModel]) -> tuple[str, str]:
    """A pydantic error in a Kubernetes object as (path in the object, message)."""
    from bpfgen.spec import _describe_error as describe_error

    path, message = describe_error(error)
    loc = error["loc"]
    if error["type"] == "extra_forbidden":
        message = f"unknown field '{loc[-1]}'{_did_you_mean(root, loc)}"
    elif error["type"] == "literal_error":
        message = f"invalid {loc[-1]} {_describe(error.get('input'))}: expected {error['ctx']['expected']}"
    return path, message


def _did_you_mean(root: type[BaseModel], loc: tuple) -> str:
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        found = next((f for name, f in model.model_fields.items() if (f.alias or to_camel(name)) == part), None)
        model = _model_in(found.annotation) if found else None
        if model is None:
            return ""
    known = {(f.alias or to_camel(name)).lower(): f.alias or to_camel(name) for name, f in model.model_fields.items()}
    close = difflib.get_close_matches(str(loc[-1]).lower(), known, n=1, cutoff=0.6)
    return f" (did you mean '{known[close[0]]}'?)" if close else ""


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_model_in, typing.get_args(annotation))), None)


# --- the spec ----------------------------------------------------------------------------------

_ALSO = re.compile(r"\(also ((?:services|nodes)\[\d+\][^)]*)\)")


def to_spec(documents: list[Document], filename: str) -> Any:
    """The Spec of Kubernetes objects; SpecError naming the objects if there are problems."""
    from bpfgen import spec as spec_module

    converter = _Converter(documents, filename)
    data = converter.run()
    origin = converter.origin
    spec, found = spec_module.validate_data(data)
    if found:
        raise SpecError(sorted((_problem(origin, converter, path, message) for path, message in found),
                               key=lambda p: p.line or 0))
    spec._origin = origin
    for note in origin.notes:
        warnings.warn(note, SpecNote, stacklevel=3)
    return spec


def _problem(origin: Origin, converter: _Converter, path: str, message: str) -> Problem:
    """A problem bpfgen's rules found in the converted data, where it is in the input."""

    def also(match: re.Match) -> str:
        source = origin.locate(match[1])
        if source is None or not source.label:
            return match[0]
        return f"(also {source.label}, line {source.line})"

    message = _ALSO.sub(also, message)
    if path == "nodes" or path.startswith("nodes") and not origin.sources:
        return Problem(origin.filename, "", "no Node object with an IPv4 address: bpfgen needs the cluster's nodes "
                       "(kubectl get nodes,services,endpointslices -A -o yaml)",
                       None)
    source = origin.locate(path)
    if source is None:
        if path.startswith(("cluster", "metadata")) and not origin.has_settings:
            message += (" (the default; set it in a bpfgen/v1 Settings document beside the objects: "
                        "apiVersion: bpfgen/v1, kind: Settings, cluster: ...)")
        document = converter.documents[0] if converter.documents else None
        return Problem(origin.filename, "", f"{path}: {message}" if path else message,
                       document.line_of("") if document else None)
    return Problem(source.document.filename, source.path, f"{source.label}: {message}" if source.label else message,
                   source.line)
