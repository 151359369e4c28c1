"""Kubernetes objects as a spec, without a kernel: kubectl dumps (List or stream, YAML or
JSON) converted to bpfgen/v1 (every endpoint a backend with its conditions; session affinity,
traffic policies, healthCheckNodePort, loadBalancerSourceRanges), kube-proxy's skipped
services, errors naming the object, the file, the line and the path, and the notes."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from bpfgen import kube, plan as P
from bpfgen.cli import cli
from bpfgen.errors import SpecError
from bpfgen.spec import load_spec, parse_spec

pytestmark = pytest.mark.filterwarnings("ignore::bpfgen.kube.SpecNote")

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "examples" / "kubernetes" / "cluster.yaml"
DUMP = yaml.safe_load(CLUSTER.read_text())
CP = kube.node_name("lab-control-plane")


def items(kind: str | None = None, name: str | None = None) -> list[dict]:
    return [i for i in DUMP["items"] if (kind is None or i["kind"] == kind) and (name is None or i["metadata"]["name"] == name)]


def spec_of(objects: list[dict], filename: str = "c.yaml", stream: bool = False):
    if stream:
        return parse_spec(yaml.safe_dump_all(objects), filename)
    return parse_spec(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": objects}), filename)


def problems_of(objects: list[dict], filename: str = "c.yaml") -> tuple[list, str]:
    text = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": objects})
    with pytest.raises(SpecError) as err:
        parse_spec(text, filename)
    return err.value.problems, text


def line_of(text: str, needle: str, after: str | None = None) -> int:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line) if after else 0
    return next(i for i, line in enumerate(lines) if i >= start and needle in line) + 1


def node(name: str, address: str, cidr: str | None = None) -> dict:
    spec = {"podCIDR": cidr, "podCIDRs": [cidr]} if cidr else {}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "uid": "u", "resourceVersion": "1"},
            "spec": spec, "status": {"addresses": [{"type": "Hostname", "address": name},
                                                   {"type": "InternalIP", "address": address}],
                                     "capacity": {"cpu": "2"}, "conditions": []}}


NODES = [node("n0", "172.26.50.101", "10.0.0.0/24"), node("n1", "172.26.50.102", "10.0.1.0/24")]


def service(name: str, ns: str = "shop", labels: dict | None = None, status: dict | None = None, **spec) -> dict:
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("clusterIP", "10.96.0.7")
    spec.setdefault("ports", [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}])
    meta = {"name": name, "namespace": ns, "uid": "x", "annotations": {"a": "b"},
            "managedFields": [{"manager": "kubectl", "operation": "Update"}]}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec,
            "status": status or {"loadBalancer": {}}}


def ready(address: str, node_name: str | None = "n1", **conditions) -> dict:
    e = {"addresses": [address], "conditions": {"ready": True, "serving": True, "terminating": False, **conditions}}
    if node_name:
        e["nodeName"] = node_name
    return e


def eps(name: str, svc: str, endpoints: list[dict], ns: str = "shop", ports: list[dict] | None = None,
        labels: dict | None = None, address_type: str = "IPv4") -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": address_type,
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc, **(labels or {})},
                         "ownerReferences": [{"kind": "Service", "name": svc}], "resourceVersion": "7"},
            "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints}


def svc_of(spec, key: str):
    return next(s for s in spec.services if s.key == key)


def backends(spec, key: str) -> list[tuple[str, str | None]]:
    return [(str(b.address), b.node) for b in svc_of(spec, key).backends]


def states(spec, key: str) -> list[tuple[str, str]]:
    return [(str(b.address), b.conditions.state) for b in svc_of(spec, key).backends]


# --- the example dump --------------------------------------------------------------------------


def test_the_example_dump_converts():
    spec = load_spec(CLUSTER)
    assert spec.metadata.name == "cluster"  # from the file name
    assert [(n.name, str(n.address), str(n.pod_cidr)) for n in spec.nodes] == [
        (CP, "172.26.50.101", "10.0.0.0/24"), ("lab-worker", "172.26.50.102", "10.0.1.0/24"),
        ("lab-worker2", "172.26.50.103", "10.0.2.0/24")]
    assert [s.key for s in spec.services] == [
        "default/kubernetes", "kube-system/kube-dns", "shop/cart", "shop/checkout", "shop/empty", "shop/local",
        "shop/sticky", "shop/web"]
    web = svc_of(spec, "shop/web")
    assert web.type == "NodePort" and str(web.cluster_ip) == "10.96.120.15"  # the IPv4 one of clusterIPs
    assert [(p.name, p.port, p.target_port, p.node_port) for p in web.ports] == [("http", 80, 8080, 30080)]
    # two slices merge; every endpoint is a backend, with its conditions (the datapath picks)
    assert backends(spec, "shop/web") == [("10.0.1.10", "lab-worker"), ("10.0.1.11", "lab-worker"),
                                          ("10.0.2.10", "lab-worker2"), ("10.0.2.11", "lab-worker2")]
    assert states(spec, "shop/web") == [("10.0.1.10", "ready"), ("10.0.1.11", "not-serving"),
                                        ("10.0.2.10", "ready"), ("10.0.2.11", "terminating")]
    assert [str(a) for a in web.external_ips] == ["198.51.100.10"]
    assert (web.session_affinity, web.external_traffic_policy, web.internal_traffic_policy) == ("None", "Cluster",
                                                                                                "Cluster")
    # the only serving endpoint is terminating; the other is neither ready nor serving
    assert states(spec, "shop/cart") == [("10.0.2.20", "terminating"), ("10.0.2.21", "not-serving")]
    assert backends(spec, "shop/cart") == [("10.0.2.20", "lab-worker2"), ("10.0.2.21", "lab-worker2")]
    checkout = svc_of(spec, "shop/checkout")
    assert checkout.type == "NodePort" and [str(a) for a in checkout.load_balancer_ips] == ["198.51.100.20"]
    dns = svc_of(spec, "kube-system/kube-dns")
    assert [(p.protocol, p.port, p.target_port) for p in dns.ports] == [("UDP", 53, 5353), ("TCP", 53, 5353),
                                                                        ("TCP", 9153, 9153)]
    # the apiserver's endpoint has no nodeName: its address is the control plane's
    assert backends(spec, "default/kubernetes") == [("172.26.50.101", CP)]
    notes = "\n".join(spec.notes)
    for skipped in ("shop/db: headless", "shop/payments: ExternalName", "shop/mesh-gateway: labelled "
                    "service.kubernetes.io/service-proxy-name", "EndpointSlice shop/web-v6xk8: addressType IPv6",
                    f"Node lab-control-plane is node '{CP}'"):
        assert skipped in notes


def test_the_example_dump_has_affinity_local_and_empty_services():
    spec = load_spec(CLUSTER)
    sticky = svc_of(spec, "shop/sticky")
    assert (sticky.type, str(sticky.cluster_ip), sticky.session_affinity, sticky.affinity_timeout) == (
        "NodePort", "10.96.130.25", "ClientIP", 600)
    assert [(p.protocol, p.port, p.target_port, p.node_port) for p in sticky.ports] == [("TCP", 80, 8080, 30082)]
    assert backends(spec, "shop/sticky") == [("10.0.1.60", "lab-worker"), ("10.0.1.61", "lab-worker"),
                                             ("10.0.2.60", "lab-worker2")]
    local = svc_of(spec, "shop/local")
    assert (local.type, str(local.cluster_ip), local.external_traffic_policy, local.internal_traffic_policy,
            local.health_check_node_port) == ("NodePort", "10.96.140.30", "Local", "Cluster", 30084)
    assert [(p.protocol, p.port, p.target_port, p.node_port) for p in local.ports] == [("TCP", 80, 8080, 30083)]
    assert [str(a) for a in local.load_balancer_ips] == ["198.51.100.30"]
    assert [str(r) for r in local.load_balancer_source_ranges] == ["172.26.50.180/32"]
    # its endpoints on one node, not the first one of the dump
    assert {b.node for b in local.backends} == {"lab-worker"} and states(spec, "shop/local") == [
        ("10.0.1.70", "ready"), ("10.0.1.71", "ready")]
    empty = svc_of(spec, "shop/empty")
    assert empty.backends == [] and [(p.protocol, p.port, p.target_port, p.node_port) for p in empty.ports] == [
        ("TCP", 80, 8080, 30085), ("UDP", 514, 5514, 30086)]  # an empty slice: the Service's targetPorts
    assert not [n for n in spec.notes if "shop/sticky" in n or "shop/local" in n or "shop/empty" in n]


def test_the_lab_of_the_example_has_a_pod_per_endpoint_and_its_client_in_the_source_range():
    from ipaddress import IPv4Address

    from bpfgen import lab

    spec = load_spec(CLUSTER)
    the_lab = lab.plan(spec, str(CLUSTER), "k")
    assert {p.address for p in the_lab.pods} == {str(b.address) for s in spec.services for b in s.backends}
    assert {"10.0.1.11", "10.0.2.11", "10.0.2.21"} <= {p.address for p in the_lab.pods}  # not serving, but there
    [source_range] = svc_of(spec, "shop/local").load_balancer_source_ranges
    assert IPv4Address(the_lab.client_address) in source_range
    assert not any(n.address in source_range for n in spec.nodes)  # the client alone


def test_json_list_and_yaml_stream_are_the_same_spec(tmp_path: Path):
    spec = load_spec(CLUSTER)
    as_json = tmp_path / "cluster.json"
    as_json.write_text(json.dumps(DUMP, indent=4))
    assert load_spec(as_json) == spec
    stream = tmp_path / "cluster-stream.yaml"
    stream.write_text(yaml.safe_dump_all(DUMP["items"]))
    streamed = load_spec(stream)
    assert streamed.services == spec.services and streamed.nodes == spec.nodes
    assert streamed.metadata.name == "cluster-stream"
    assert parse_spec(CLUSTER.read_text()).metadata.name == "cluster"  # no file name: fixed


def test_the_example_is_package_data():
    import importlib.resources

    assert (importlib.resources.files("bpfgen.examples") / "kubernetes" / "cluster.yaml").is_file()


def test_validate_prints_the_notes_once():
    r = CliRunner().invoke(cli, ["validate", str(CLUSTER)])
    assert r.exit_code == 0, r.stderr
    assert "ok (3 nodes, 8 services)" in r.stderr
    assert r.stderr.count("bpfgen: note: skipped Service shop/db: headless") == 1


def test_load_spec_issues_the_notes_as_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = load_spec(CLUSTER)
    assert [str(w.message) for w in caught if w.category is kube.SpecNote] == spec.notes


def test_the_plan_has_external_and_load_balancer_frontends():
    plan = P.Plan.from_spec(load_spec(CLUSTER))
    assert P.Plan.from_json(plan.to_json(), "plan.json") == plan
    worker = plan.node("lab-worker")
    kinds = {(f.addr, f.port, f.kind) for f in P.frontends(plan, worker)}
    assert ("198.51.100.10", 80, "ExternalIP") in kinds and ("198.51.100.20", 443, "LoadBalancer") in kinds
    assert ("172.26.50.102", 30443, "NodePort") in kinds
    flags = {f.kind: f.flags for f in P.frontends(plan, worker)}
    assert len(set(flags.values())) == 4
    # the apiserver's host endpoint is local to the control plane only
    [api] = [f for f in P.frontends(plan, plan.node(CP)) if f.service == "default/kubernetes"]
    assert api.backends == (("172.26.50.101", 6443, 6, True),)


# --- the rules ---------------------------------------------------------------------------------


def test_server_side_fields_and_other_kinds_are_tolerated():
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"whatever": 1}}
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}}
    old = {"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice", "metadata": {"name": "e"}}
    web = service("web")
    web["metadata"].update({"resourceVersion": "9", "creationTimestamp": "2025-01-01T00:00:00Z", "generation": 3})
    web["status"]["conditions"] = [{"type": "x"}]
    spec = spec_of([*NODES, pod, pod, cm, old, web, eps("web-1", "web", [ready("10.0.1.5")])])
    assert backends(spec, "shop/web") == [("10.0.1.5", "n1")]
    assert "skipped 2 v1 Pod objects (bpfgen reads Node, Service and EndpointSlice)" in spec.notes
    assert "skipped 1 v1 ConfigMap object (bpfgen reads Node, Service and EndpointSlice)" in spec.notes
    assert any("EndpointSlice default/e: apiVersion discovery.k8s.io/v1beta1" in n for n in spec.notes)


def test_named_target_ports_come_from_the_slices_and_slices_merge():
    web = service("web", ports=[{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web"},
                                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}])
    ports = [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]
    objects = [*NODES, web, eps("web-b", "web", [ready("10.0.1.6")], ports=ports),
               eps("web-a", "web", [ready("10.0.0.5", "n0")], ports=ports),
               eps("other", "web", [ready("10.0.1.9")], ns="elsewhere", ports=ports)]
    spec = spec_of(objects)
    s = svc_of(spec, "shop/web")
    assert [(p.protocol, p.target_port) for p in s.ports] == [("TCP", 8080), ("UDP", 5353)]
    assert backends(spec, "shop/web") == [("10.0.0.5", "n0"), ("10.0.1.6", "n1")]  # slices by name
    assert any("EndpointSlice elsewhere/other: no Service elsewhere/web" in n for n in spec.notes)


def test_a_slice_disagreeing_on_the_target_port_is_ignored():
    objects = [*NODES, service("web"), eps("web-a", "web", [ready("10.0.1.5"), ready("10.0.1.6")]),
               eps("web-b", "web", [ready("10.0.1.7")], ports=[{"name": "http", "port": 9090, "protocol": "TCP"}])]
    spec = spec_of(objects)
    assert backends(spec, "shop/web") == [("10.0.1.5", "n1"), ("10.0.1.6", "n1")]
    assert svc_of(spec, "shop/web").ports[0].target_port == 8080
    assert any("ignored EndpointSlice shop/web-b" in n for n in spec.notes)


@pytest.mark.parametrize("endpoint, conditions", [
    (ready("10.0.1.1"), (True, True, False)),
    (ready("10.0.1.2", ready=False), (False, True, False)),
    (ready("10.0.1.3", ready=False, terminating=True), (False, True, True)),
    (ready("10.0.1.4", ready=False, serving=False, terminating=True), (False, False, True)),
    (ready("10.0.1.5", ready=False, serving=False), (False, False, False)),
    ({"addresses": ["10.0.1.8"]}, (True, True, False)),  # no conditions: ready (nil is true), not terminating
    ({"addresses": ["10.0.1.8"], "conditions": {}}, (True, True, False)),
    ({"addresses": ["10.0.1.8"], "conditions": {"ready": False, "terminating": True}}, (False, False, True)),  # serving nil: as ready
    ({"addresses": ["10.0.1.8"], "conditions": {"serving": False}}, (True, False, False)),  # as the slice says
], ids=["ready", "not-ready", "terminating", "terminating-not-serving", "not-serving", "nil-conditions",
        "empty-conditions", "nil-serving", "ready-not-serving"])
def test_every_endpoint_is_a_backend_with_its_conditions(endpoint: dict, conditions: tuple[bool, bool, bool]):
    spec = spec_of([*NODES, service("web"), eps("web-a", "web", [endpoint])])
    [b] = svc_of(spec, "shop/web").backends
    assert str(b.address) == endpoint["addresses"][0] and b.node == endpoint.get("nodeName")
    assert (b.conditions.ready, b.conditions.serving, b.conditions.terminating) == conditions
    assert spec._origin.locate("services[0].backends[0].conditions.ready").path == "items[3].endpoints[0].conditions.ready"


def test_all_endpoints_are_backends_in_slice_order():
    endpoints = [ready("10.0.1.2", ready=False), ready("10.0.1.3", ready=False, terminating=True),
                 ready("10.0.1.4", ready=False, serving=False, terminating=True), ready("10.0.1.1")]
    spec = spec_of([*NODES, service("web"), eps("web-a", "web", endpoints)])
    assert states(spec, "shop/web") == [("10.0.1.2", "not-serving"), ("10.0.1.3", "terminating"),
                                        ("10.0.1.4", "not-serving"), ("10.0.1.1", "ready")]


def test_an_endpoint_in_two_slices_is_one_backend_the_readier_one():
    spec = spec_of([*NODES, service("web"), eps("web-a", "web", [ready("10.0.1.5", ready=False)]),
                    eps("web-b", "web", [ready("10.0.1.5")])])
    assert states(spec, "shop/web") == [("10.0.1.5", "ready")]
    spec = spec_of([*NODES, service("web"), eps("web-a", "web", [ready("10.0.1.5", ready=False, serving=False)]),
                    eps("web-b", "web", [ready("10.0.1.5", ready=False, terminating=True)])])
    assert states(spec, "shop/web") == [("10.0.1.5", "terminating")]


def test_endpoint_placement():
    objects = [*NODES, service("web"), eps("web-a", "web", [
        ready("10.0.1.5", "n1"), ready("172.26.50.101", None), ready("192.168.9.9", None), ready("10.0.3.3", "gone")])]
    spec = spec_of(objects)
    assert backends(spec, "shop/web") == [("10.0.1.5", "n1"), ("172.26.50.101", "n0"), ("192.168.9.9", None),
                                          ("10.0.3.3", None)]
    assert any("endpoint 10.0.3.3 is on node 'gone', which is not in the input" in n for n in spec.notes)
    plan = P.Plan.from_spec(spec)
    for n in plan.nodes:  # on no node: remote from every node
        [fe] = P.frontends(plan, n)
        assert [local for addr, _, _, local in fe.backends if addr in ("192.168.9.9", "10.0.3.3")] == [False, False]


@pytest.mark.parametrize("obj, why", [
    (service("db", clusterIP="None"), "headless (clusterIP None)"),
    (service("ext", type="ExternalName", externalName="x.example.com"), "ExternalName"),
    (service("mesh", clusterIP="10.96.0.5", labels={"service.kubernetes.io/service-proxy-name": "other"}),
     "labelled service.kubernetes.io/service-proxy-name=other"),
    (service("v6", clusterIP="fd00::5", clusterIPs=["fd00::5"], ipFamilies=["IPv6"]), "no IPv4 clusterIP"),
    (service("noip", clusterIP=""), "no clusterIP"),
    (service("sctp", clusterIP="10.96.0.6", ports=[{"port": 9, "protocol": "SCTP"}]), "no TCP or UDP port"),
])
def test_services_kube_proxy_skips(obj: dict, why: str):
    name = obj["metadata"]["name"]
    spec = spec_of([*NODES, obj, eps(f"{name}-a", name, [ready("10.0.1.5")])])
    assert spec.services == []
    assert any(n.startswith(f"skipped Service shop/{name}: {why}") for n in spec.notes), spec.notes


def test_a_headless_labelled_slice_is_skipped():
    objects = [*NODES, service("web", clusterIP="10.96.0.7"),
               eps("web-a", "web", [ready("10.0.1.5")], labels={"service.kubernetes.io/headless": ""}),
               eps("web-b", "web", [ready("10.0.1.6")]), eps("web-c", "web", [ready("10.0.1.7")], address_type="FQDN")]
    spec = spec_of(objects)
    assert backends(spec, "shop/web") == [("10.0.1.6", "n1")]
    assert any("ignored EndpointSlice shop/web-c: addressType FQDN" in n for n in spec.notes)


def test_load_balancer_services():
    lb = {"loadBalancer": {"ingress": [{"ip": "203.0.113.5", "ipMode": "VIP"}, {"hostname": "lb.example.com"}]}}
    with_node_ports = service("a", clusterIP="10.96.0.8", type="LoadBalancer", externalIPs=["203.0.113.9", "2001:db8::1"],
                              ports=[{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080,
                                      "nodePort": 31000}], status=lb)
    without = service("b", clusterIP="10.96.0.9", type="LoadBalancer", allocateLoadBalancerNodePorts=False,
                      ports=[{"port": 81, "protocol": "TCP"}], status={"loadBalancer": {"ingress": [{"ip": "203.0.113.6"}]}})
    spec = spec_of([*NODES, with_node_ports, without])
    a, b = spec.services
    assert (a.type, a.ports[0].node_port, a.ports[0].target_port) == ("NodePort", 31000, 8080)
    assert [str(x) for x in a.load_balancer_ips] == ["203.0.113.5"] and [str(x) for x in a.external_ips] == ["203.0.113.9"]
    assert (b.type, b.ports[0].node_port, b.ports[0].target_port) == ("ClusterIP", None, 81)
    assert [str(x) for x in b.load_balancer_ips] == ["203.0.113.6"]
    assert any("shop/a: externalIPs other than IPv4 ignored" in n for n in spec.notes)
    assert any("shop/a: load balancer ingress without an IPv4 ip ignored" in n for n in spec.notes)


def test_session_affinity_and_traffic_policies_are_carried():
    sticky = service("sticky", type="NodePort", sessionAffinity="ClientIP",
                     sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}}, externalTrafficPolicy="Local",
                     internalTrafficPolicy="Local", healthCheckNodePort=31999,
                     ports=[{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 31000}])
    default = service("default", clusterIP="10.96.0.8", sessionAffinity="ClientIP")
    plain = service("plain", clusterIP="10.96.0.9")
    spec = spec_of([*NODES, sticky, default, plain, eps("sticky-a", "sticky", [ready("10.0.1.5")])])
    s = svc_of(spec, "shop/sticky")
    assert (s.session_affinity, s.affinity_timeout, s.external_traffic_policy, s.internal_traffic_policy,
            s.health_check_node_port) == ("ClientIP", 600, "Local", "Local", 31999)
    d = svc_of(spec, "shop/default")
    assert (d.session_affinity, d.session_affinity_config, d.affinity_timeout) == ("ClientIP", None, 10800)
    p = svc_of(spec, "shop/plain")
    assert (p.session_affinity, p.affinity_timeout, p.external_traffic_policy, p.internal_traffic_policy) == (
        "None", 0, "Cluster", "Cluster")
    assert not [n for n in spec.notes if "Service shop/" in n]
    where = spec._origin.locate("services[0].sessionAffinityConfig.clientIP.timeoutSeconds")
    assert (where.label, where.path) == ("Service shop/sticky", "items[2].spec.sessionAffinityConfig.clientIP.timeoutSeconds")


def test_session_affinity_config_without_client_ip_is_ignored_with_a_note():
    web = service("web", sessionAffinity="None", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    spec = spec_of([*NODES, web])
    assert svc_of(spec, "shop/web").session_affinity_config is None
    assert "Service shop/web: sessionAffinityConfig ignored (sessionAffinity is None)" in spec.notes


def test_an_invalid_session_affinity_names_the_object_file_and_line():
    (problem,), text = problems_of([*NODES, service("x", sessionAffinity="Sticky")], "cluster.yaml")
    assert problem.file == "cluster.yaml" and problem.path == "items[2].spec.sessionAffinity"
    assert problem.message.startswith("Service shop/x: invalid sessionAffinity 'Sticky': expected ")
    assert "'ClientIP'" in problem.message and problem.line == line_of(text, "sessionAffinity: Sticky")


@pytest.mark.parametrize("spec, path, needle, message", [
    ({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}}},
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "timeoutSeconds: 86401", "timeoutSeconds 86401 is out of range"),
    ({"type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 70000},
     "spec.healthCheckNodePort", "healthCheckNodePort: 70000", "port 70000 is out of range"),
    ({"type": "LoadBalancer", "loadBalancerSourceRanges": ["203.0.113.0/24", "10.0.0.300/8"]},
     "spec.loadBalancerSourceRanges[1]", "10.0.0.300/8", "'10.0.0.300/8' is not a valid IPv4 CIDR"),
], ids=["timeout", "health-check-node-port", "source-range"])
def test_bpfgen_rules_on_the_new_fields_name_the_object(spec: dict, path: str, needle: str, message: str):
    lb = {"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}]}}
    (problem,), text = problems_of([*NODES, service("x", status=lb, **spec)], "c.yaml")
    assert problem.path == f"items[2].{path}" and problem.line == line_of(text, needle)
    assert problem.message.startswith(f"Service shop/x: {message}"), problem.message


@pytest.mark.parametrize("policy", [None, "Cluster"])
def test_health_check_node_port_is_dropped_without_local(policy: str | None):
    extra = {"externalTrafficPolicy": policy} if policy else {}
    web = service("web", type="LoadBalancer", healthCheckNodePort=31999, **extra,
                  ports=[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 31000}])
    spec = spec_of([*NODES, web])
    assert svc_of(spec, "shop/web").health_check_node_port is None
    assert ("Service shop/web: healthCheckNodePort 31999 ignored (externalTrafficPolicy is Cluster, not Local)"
            in spec.notes)


def test_load_balancer_source_ranges():
    lb = {"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}]}}
    ranges = ["203.0.113.0/24", " 198.51.100.7/32 ", "2001:db8::/32", "192.0.2.9/24"]
    kept = service("kept", clusterIP="10.96.0.8", type="LoadBalancer", loadBalancerSourceRanges=ranges, status=lb)
    pending = service("pending", clusterIP="10.96.0.9", type="LoadBalancer", loadBalancerSourceRanges=ranges)
    v6 = service("v6", clusterIP="10.96.0.10", type="LoadBalancer", loadBalancerSourceRanges=["2001:db8::/32"],
                 status={"loadBalancer": {"ingress": [{"ip": "203.0.113.6"}]}})
    spec = spec_of([*NODES, kept, pending, v6])
    assert [str(r) for r in svc_of(spec, "shop/kept").load_balancer_source_ranges] == [
        "203.0.113.0/24", "198.51.100.7/32", "192.0.2.0/24"]
    where = spec._origin.locate("services[0].loadBalancerSourceRanges[2]")
    assert (where.label, where.path) == ("Service shop/kept", "items[2].spec.loadBalancerSourceRanges[3]")
    assert "Service shop/kept: loadBalancerSourceRanges 192.0.2.9/24 taken as 192.0.2.0/24 (host bits cleared)" in spec.notes
    assert "Service shop/kept: loadBalancerSourceRanges other than IPv4 ignored (as kube-proxy does)" in spec.notes
    # no load balancer ingress ip yet: nothing to apply them to
    pending = svc_of(spec, "shop/pending")
    assert pending.load_balancer_ips == [] and pending.load_balancer_source_ranges == []
    assert ("Service shop/pending: loadBalancerSourceRanges ignored (no IPv4 load balancer ingress ip in "
            "status.loadBalancer to apply them to)") in spec.notes
    assert svc_of(spec, "shop/v6").load_balancer_source_ranges == []
    assert ("Service shop/v6: loadBalancerSourceRanges other than IPv4 ignored (as kube-proxy does): every "
            "client is admitted") in spec.notes


def test_long_node_names_are_mapped_deterministically():
    long = "ip-10-0-1-23.eu-west-1.compute.internal"
    mapped = kube.node_name(long)
    assert mapped == kube.node_name(long) and len(mapped) <= 15 and mapped.startswith("ip-10-0-1")
    assert kube.node_name("worker-1") == "worker-1"
    assert kube.node_name("ip-10-0-1-24.eu-west-1.compute.internal") != mapped
    spec = spec_of([node(long, "172.26.50.101"), service("web", clusterIP="10.96.0.7"),
                    eps("web-a", "web", [ready("10.0.0.5", long)])])
    assert spec.nodes[0].name == mapped and backends(spec, "shop/web") == [("10.0.0.5", mapped)]
    assert f"Node {long} is node '{mapped}' to bpfgen" in spec.notes[0]


def test_nodes_pick_an_ipv4_internal_address_and_pod_cidr():
    dual = node("n0", "fd00::1")
    dual["status"]["addresses"] += [{"type": "ExternalIP", "address": "172.26.50.99"},
                                    {"type": "InternalIP", "address": "172.26.50.101"}]
    dual["spec"] = {"podCIDRs": ["fd00:10::/64", "10.0.0.0/24"], "podCIDR": "fd00:10::/64"}
    nothing = node("n9", "fd00::9")
    spec = spec_of([dual, nothing])
    assert [(n.name, str(n.address), str(n.pod_cidr)) for n in spec.nodes] == [("n0", "172.26.50.101", "10.0.0.0/24")]
    assert "skipped Node n9: no IPv4 InternalIP or ExternalIP in status.addresses" in spec.notes


def test_a_settings_document_names_the_spec_and_sets_the_cluster():
    settings = {"apiVersion": "bpfgen/v1", "kind": "Settings", "metadata": {"name": "prod"},
                "cluster": {"nodePortRange": "30000-30100", "capacity": {"frontends": 64}}}
    spec = spec_of([settings, *NODES, service("web", clusterIP="10.96.0.7")], stream=True)
    assert spec.metadata.name == "prod" and spec.cluster.node_port_range.hi == 30100
    assert spec.cluster.capacity.frontends == 64


# --- errors ------------------------------------------------------------------------------------


def test_an_unknown_field_in_a_service_port_names_the_object_file_line_and_path():
    web = service("web", clusterIP="10.96.0.7", ports=[{"name": "http", "port": 80, "nodPort": 30080}])
    (problem,), text = problems_of([*NODES, web], "cluster.yaml")
    assert problem.file == "cluster.yaml" and problem.path == "items[2].spec.ports[0].nodPort"
    assert problem.message == "Service shop/web: unknown field 'nodPort' (did you mean 'nodePort'?)"
    assert problem.line == line_of(text, "nodPort")
    assert str(problem).startswith(f"cluster.yaml:{problem.line}: items[2].spec.ports[0].nodPort: Service shop/web:")


def test_unknown_fields_in_slices_and_nodes_are_errors():
    bad_node = node("n1", "172.26.50.102")
    bad_node["status"]["addresses"][1]["adress"] = "x"
    bad_node["spec"]["podCIDRS"] = ["10.0.1.0/24"]
    slice_ = eps("web-a", "web", [ready("10.0.1.5", readdy=True)])
    slice_["endpoints"][0]["nodename"] = "n1"
    problems, text = problems_of([NODES[0], bad_node, service("web", clusterIP="10.96.0.7"), slice_])
    got = {(p.path, p.message) for p in problems}
    assert got == {
        ("items[1].spec.podCIDRS", "Node n1: unknown field 'podCIDRS' (did you mean 'podCIDRs'?)"),
        ("items[1].status.addresses[1].adress", "Node n1: unknown field 'adress' (did you mean 'address'?)"),
        ("items[3].endpoints[0].conditions.readdy",
         "EndpointSlice shop/web-a: unknown field 'readdy' (did you mean 'ready'?)"),
        ("items[3].endpoints[0].nodename", "EndpointSlice shop/web-a: unknown field 'nodename' (did you mean 'nodeName'?)"),
    }
    assert all(p.line is not None for p in problems)


def test_bpfgen_rules_name_the_kubernetes_object():
    web = service("web", clusterIP="10.96.0.7", type="NodePort",
                  ports=[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 29999}])
    api = service("api", clusterIP="10.96.0.7", type="NodePort",  # web's clusterIP
                  ports=[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30001}])
    db = service("db", clusterIP="10.96.0.8")
    bad = eps("db-a", "db", [ready("10.0.1.300")])
    problems, text = problems_of([*NODES, web, api, db, bad], "c.yaml")
    got = {p.path: p for p in problems}
    assert got["items[2].spec.ports[0].nodePort"].message == (
        "Service shop/web: nodePort 29999 is outside nodePortRange 30000-32767")
    assert got["items[2].spec.ports[0].nodePort"].line == line_of(text, "nodePort: 29999")
    dup = got["items[3].spec.ports[0].port"]
    assert dup.message.startswith("Service shop/api: duplicate port 10.96.0.7:80/TCP (also Service shop/web, line ")
    assert got["items[5].endpoints[0].addresses[0]"].message == (
        "EndpointSlice shop/db-a: '10.0.1.300' is not a valid IPv4 address")


def test_a_settings_problem_points_into_the_settings_document():
    settings = {"apiVersion": "bpfgen/v1", "kind": "Settings", "cluster": {"snatPortRange": "30000-40000"}}
    text = yaml.safe_dump_all([*NODES, settings])
    with pytest.raises(SpecError) as err:
        parse_spec(text, "c.yaml")
    (problem,) = err.value.problems
    assert problem.path == "cluster.snatPortRange" and "overlaps nodePortRange" in problem.message
    assert problem.line == line_of(text, "snatPortRange")


def test_capacity_without_settings_says_where_to_raise_it():
    settings = {"apiVersion": "bpfgen/v1", "kind": "Settings", "cluster": {"capacity": {"frontends": 1}}}
    spec_text = yaml.safe_dump_all([settings, *NODES, service("web", clusterIP="10.96.0.7"),
                                    service("api", clusterIP="10.96.0.8")])
    with pytest.raises(SpecError, match="raise cluster.capacity.frontends"):
        parse_spec(spec_text, "c.yaml")


def test_no_nodes_and_mixed_inputs_are_refused():
    with pytest.raises(SpecError, match="no Node object with an IPv4 address"):
        spec_of([service("web", clusterIP="10.96.0.7")])
    bpfgen_spec = yaml.safe_load((REPO / "examples" / "seed.yaml").read_text())
    with pytest.raises(SpecError, match="a bpfgen/v1 ServiceSpec is a file of its own"):
        spec_of([*NODES, bpfgen_spec], stream=True)
    with pytest.raises(SpecError, match="an object needs a kind and an apiVersion"):
        spec_of([*NODES, {"metadata": {"name": "x"}}])


def test_a_wrong_type_in_a_read_part_is_an_error():
    web = service("web", clusterIP="10.96.0.7", ports=[{"name": "http", "port": "eighty"}])
    (problem,), _ = problems_of([*NODES, web])
    assert problem.path == "items[2].spec.ports[0].port" and problem.message.startswith("Service shop/web: ")


def test_bpfgen_specs_still_take_their_own_path():
    seed = (REPO / "examples" / "seed.yaml").read_text()
    assert parse_spec(seed).metadata.name == "seed-lab"
    with pytest.raises(SpecError, match="invalid kind"):
        parse_spec(seed.replace("kind: ServiceSpec", "kind: Settings"))


def test_bpfgen_v1_backends_may_be_on_no_node():
    data = yaml.safe_load((REPO / "examples" / "seed.yaml").read_text())
    data["services"][0]["backends"].append({"address": "192.168.7.7"})
    data["services"][0]["externalIPs"] = ["198.51.100.1"]
    spec = parse_spec(yaml.safe_dump(data))
    assert spec.services[0].backends[1].node is None
    plan = P.Plan.from_spec(spec)
    fes = P.frontends(plan, plan.node("node1"))
    assert {f.kind for f in fes} == {"ClusterIP", "NodePort", "ExternalIP"}
    assert all(not b[3] & 1 for f in fes for b in f.backends if b[0] == "192.168.7.7")
    dup = copy.deepcopy(data)
    dup["services"][0]["externalIPs"] = ["10.106.91.98"]  # the clusterIP: the same frontends
    with pytest.raises(SpecError, match="duplicate frontend 10.106.91.98:80/TCP"):
        parse_spec(yaml.safe_dump(dup))


# --------------------------------------------------------------- settings in a second file

SETTINGS = """\
apiVersion: bpfgen/v1
kind: Settings
metadata:
  name: prod
cluster:
  snatPortRange: 40000-49999
  capacity:
    flows: 1000
"""


def test_settings_may_come_in_a_second_file(tmp_path: Path) -> None:
    (tmp_path / "settings.yaml").write_text(SETTINGS)
    spec = load_spec(CLUSTER, tmp_path / "settings.yaml")
    assert (spec.metadata.name, str(spec.cluster.snat_port_range), spec.cluster.capacity.flows) == (
        "prod", "40000-49999", 1000)
    out = CliRunner().invoke(cli, ["compile", str(CLUSTER), "--settings", str(tmp_path / "settings.yaml"),
                                   "-o", str(tmp_path / "out")])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["snatPortRange"] == [40000, 49999]


def test_a_problem_in_the_settings_file_names_that_file(tmp_path: Path) -> None:
    bad = tmp_path / "settings.yaml"
    bad.write_text(SETTINGS.replace("flows: 1000", "flows: -3"))
    out = CliRunner().invoke(cli, ["validate", str(CLUSTER), "--settings", str(bad)])
    assert out.exit_code == 2
    assert f"{bad}:8: cluster.capacity.flows: flows -3 is out of range" in out.stderr


@pytest.mark.parametrize("case", ["bpfgen-v1-spec", "not-settings"])
def test_a_settings_file_is_only_settings_beside_kubernetes_objects(tmp_path: Path, case: str) -> None:
    settings = tmp_path / "settings.yaml"
    if case == "bpfgen-v1-spec":
        settings.write_text(SETTINGS)
        spec, expected = REPO / "examples" / "seed.yaml", "a settings file is read only beside Kubernetes objects"
    else:
        settings.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {}\n")
        spec, expected = CLUSTER, "a settings file holds one bpfgen/v1 Settings document"
    out = CliRunner().invoke(cli, ["validate", str(spec), "--settings", str(settings)])
    assert out.exit_code == 2 and expected in out.stderr and "Traceback" not in out.output
