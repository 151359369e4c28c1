"""The spec format: loading, defaults, nodePort allocation, round trips and the problems reported."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from bpfgen.errors import Problem, SpecError
from bpfgen.spec import Cluster, Node, PortRange, Spec, load_spec, parse_spec, spec_to_dict

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "seed.yaml"
SPECS = Path(__file__).resolve().parent / "specs"
BAD = SPECS / "bad"
EXPECTED = json.loads((BAD / "expected.json").read_text())
GOOD = sorted((SPECS / "good").glob("*.yaml"))

MINIMAL = """\
apiVersion: bpfgen/v1
kind: ServiceSpec
metadata:
  name: lab
nodes:
  - name: node0
    address: 192.168.1.10
services:
  - name: web
    type: NodePort
    ports:
      - port: 8080
"""


def spec_text(services: list[dict], cluster: dict | None = None) -> str:
    """A spec with one node and the given services, as YAML."""
    document = {
        "apiVersion": "bpfgen/v1",
        "kind": "ServiceSpec",
        "metadata": {"name": "lab"},
        "nodes": [{"name": "node0", "address": "192.168.1.10"}],
        "services": services,
    }
    if cluster is not None:
        document["cluster"] = cluster
    return yaml.safe_dump(document)


def node_port_service(name: str, *ports: dict) -> dict:
    return {"name": name, "type": "NodePort", "ports": list(ports)}


def node_ports(spec: Spec) -> dict[tuple[str, int], int]:
    return {(s.key, j): p.node_port for s in spec.services for j, p in enumerate(s.ports)}


def problems_of(text: str) -> list[Problem]:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "t.yaml")
    return caught.value.problems


# --- loading -----------------------------------------------------------------------------------


def test_seed_loads_with_the_expected_values():
    spec = load_spec(SEED)
    assert (spec.api_version, spec.kind, spec.metadata.name) == ("bpfgen/v1", "ServiceSpec", "seed-lab")
    assert spec.cluster.node_port_range == PortRange(30000, 32767)
    assert spec.cluster.snat_port_range == PortRange(32768, 65535)
    assert [(n.name, n.address, n.pod_cidr) for n in spec.nodes] == [
        ("node0", IPv4Address("172.26.50.101"), None),
        ("node1", IPv4Address("172.26.50.102"), IPv4Network("10.0.1.0/24")),
    ]
    (nginx,) = spec.services
    assert (nginx.key, nginx.type) == ("default/nginx", "NodePort")
    assert nginx.cluster_ip == IPv4Address("10.106.91.98")
    assert [(p.name, p.protocol, p.port, p.target_port, p.node_port) for p in nginx.ports] == [
        ("http", "TCP", 80, 80, 30645),
        ("dns-like", "UDP", 80, 80, 30645),
    ]
    assert [(b.address, b.node) for b in nginx.backends] == [(IPv4Address("10.0.1.72"), "node1")]
    assert spec.node("node1") is spec.nodes[1]
    with pytest.raises(KeyError):
        spec.node("node9")


def test_defaults_are_filled_in():
    spec = parse_spec(MINIMAL)
    assert spec.cluster == Cluster(
        node_port_range=PortRange(30000, 32767), snat_port_range=PortRange(61000, 65535)
    )
    (web,) = spec.services
    assert (web.namespace, web.cluster_ip, web.backends) == ("default", None, [])
    (port,) = web.ports
    assert (port.name, port.protocol, port.target_port) == (None, "TCP", 8080)
    assert port.node_port in spec.cluster.node_port_range


def test_endpoint_conditions_default_as_kubernetes_has_them():
    """serving defaults to ready; an endpoint given no conditions is ready (all such share
    one immutable conditions object); a ready that is no bool is one problem, its own."""
    def backends(*conditions: dict | None) -> list:
        service = node_port_service("web", {"port": 80})
        service["backends"] = [{"address": f"10.0.0.{i + 1}", **({} if c is None else {"conditions": c})}
                               for i, c in enumerate(conditions)]
        return parse_spec(spec_text([service])).services[0].backends

    given = backends(None, None, {"ready": False}, {"ready": False, "serving": True, "terminating": True},
                     {"ready": True, "serving": None}, {"serving": False})
    assert [(c.ready, c.serving, c.terminating, c.state) for c in (b.conditions for b in given)] == [
        (True, True, False, "ready"), (True, True, False, "ready"), (False, False, False, "not-serving"),
        (False, True, True, "terminating"), (True, True, False, "ready"), (True, False, False, "ready")]
    assert given[0].conditions is given[1].conditions
    with pytest.raises(ValidationError):
        given[0].conditions.ready = False
    service = node_port_service("web", {"port": 80})
    service["backends"] = [{"address": "10.0.0.1", "conditions": {"ready": "yes"}}]
    [problem] = problems_of(spec_text([service]))
    assert problem.path.endswith("conditions.ready"), problem


def test_cluster_ip_ports_have_no_node_port():
    db = {"name": "db", "type": "ClusterIP", "clusterIP": "10.0.0.1", "ports": [{"port": 5432}]}
    spec = parse_spec(spec_text([db]))
    assert spec.services[0].ports[0].node_port is None


@pytest.mark.parametrize("path", GOOD, ids=lambda path: path.name)
def test_good_specs_load(path: Path):
    load_spec(path)


def test_a_spec_built_in_python_is_checked_and_resolved():
    spec = Spec(
        api_version="bpfgen/v1",
        kind="ServiceSpec",
        metadata={"name": "lab"},
        nodes=[Node(name="node0", address="192.168.1.10")],
        services=[{"name": "web", "type": "NodePort", "ports": [{"port": 80}]}],
    )
    assert spec.services[0].ports[0].target_port == 80
    assert spec.services[0].ports[0].node_port in spec.cluster.node_port_range
    with pytest.raises(SpecError, match="node 'node9' is not defined in nodes"):
        Spec(
            api_version="bpfgen/v1",
            kind="ServiceSpec",
            metadata={"name": "lab"},
            nodes=[Node(name="node0", address="192.168.1.10")],
            services=[{"name": "web", "type": "NodePort", "ports": [{"port": 80}],
                       "backends": [{"address": "10.0.0.1", "node": "node9"}]}],
        )


def test_port_range():
    nodes = PortRange.parse("30000-32767")
    assert (nodes.lo, nodes.hi, nodes.size, str(nodes)) == (30000, 32767, 2768, "30000-32767")
    assert 30000 in nodes and 32767 in nodes and 29999 not in nodes and 32768 not in nodes
    assert nodes.overlaps(PortRange(32767, 40000)) and not nodes.overlaps(PortRange(32768, 65535))
    for bad in ("30000", "1-2-3", "0-10", "10-5", "1-65536", " 1-2"):
        with pytest.raises(ValueError):
            PortRange.parse(bad)


# --- nodePort allocation -----------------------------------------------------------------------


def test_allocation_is_deterministic_and_does_not_depend_on_order():
    web = node_port_service("web", {"port": 80, "name": "http"}, {"port": 443, "name": "https"})
    api = node_port_service("api", {"port": 8080, "protocol": "UDP"})
    first = parse_spec(spec_text([web, api]))
    assert parse_spec(spec_text([web, api])) == first
    # other key order in every mapping, other service order: the same ports per service
    reordered = {key: web[key] for key in reversed(list(web))}
    reordered["ports"] = [{key: port[key] for key in reversed(list(port))} for port in web["ports"]]
    assert node_ports(parse_spec(spec_text([api, reordered]))) == node_ports(first)


def test_allocation_is_stable_across_versions():
    # Changing the algorithm changes the ports of deployed builds: do it on purpose only.
    assert parse_spec(MINIMAL).services[0].ports[0].node_port == 32672


def test_allocation_never_collides_with_explicit_or_other_allocated_ports():
    explicit = node_port_service("fixed", *({"port": 1000 + i, "nodePort": 30000 + i} for i in range(5)))
    omitted = node_port_service("free", *({"port": 2000 + i} for i in range(5)))
    spec = parse_spec(spec_text([omitted, explicit], cluster={"nodePortRange": "30000-30009"}))
    assert sorted(node_ports(spec).values()) == list(range(30000, 30010))


def test_allocation_ignores_the_protocol_of_taken_ports():
    explicit = node_port_service("fixed", {"port": 53, "protocol": "UDP", "nodePort": 30000})
    omitted = node_port_service("free", {"port": 53})
    spec = parse_spec(spec_text([explicit, omitted], cluster={"nodePortRange": "30000-30001"}))
    assert spec.services[1].ports[0].node_port == 30001


def test_a_full_node_port_range_is_an_error_on_the_port():
    explicit = node_port_service("fixed", {"port": 80, "nodePort": 30000})
    omitted = node_port_service("free", {"port": 80}, {"port": 81})
    problems = problems_of(spec_text([explicit, omitted], cluster={"nodePortRange": "30000-30001"}))
    assert [(p.path, p.message) for p in problems] == [
        ("services[1].ports[1].nodePort", "no free port left in nodePortRange 30000-30001 to allocate"),
    ]


# --- round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [SEED, *GOOD], ids=lambda path: path.name)
def test_spec_to_dict_round_trips(path: Path):
    spec = load_spec(path)
    data = spec_to_dict(spec)
    assert parse_spec(json.dumps(data)) == spec
    assert spec_to_dict(parse_spec(yaml.safe_dump(data, sort_keys=False))) == data
    assert list(data) == ["apiVersion", "kind", "metadata", "cluster", "nodes", "services"]


def test_spec_to_dict_is_resolved():
    data = spec_to_dict(parse_spec(MINIMAL))
    assert data["cluster"] == {
        "nodePortRange": "30000-32767", "snatPortRange": "61000-65535",
        "capacity": {"frontends": 131072, "backendSlots": 1048576, "backends": 262144, "flows": 262144,
                     "halfOpenFlows": 65536, "udpFlows": 131072, "nextHops": 65536, "affinityClients": 65536,
                     "sourceRanges": 16384},
    }
    assert data["services"][0]["namespace"] == "default"
    (port,) = data["services"][0]["ports"]
    assert port == {"protocol": "TCP", "port": 8080, "targetPort": 8080, "nodePort": 32672}


# --- problems ----------------------------------------------------------------------------------


def test_all_problems_are_reported_at_once():
    text = MINIMAL.replace("name: lab", "name: Lab").replace("192.168.1.10", "192.168.1.300") + """\
  - name: db
    type: ClusterIP
    ports:
      - port: 5432
        nodePort: 40000
        protocol: tcp
  - name: cache
    type: NodePort
    ports:
      - port: 6379
        nodePrt: 30001
    backends:
      - address: 10.0.0.1
        node: node0
      - address: 10.0.0.1
        node: node0
"""
    problems = problems_of(text)
    assert [(p.line, p.path) for p in problems] == [
        (4, "metadata.name"),
        (7, "nodes[0].address"),
        (18, "services[1].ports[0].protocol"),  # db is invalid: its rules are not checked
        (23, "services[2].ports[0].nodePrt"),
    ]
    assert all(p.file == "t.yaml" for p in problems)


def test_rules_are_checked_on_the_valid_parts_of_an_invalid_spec():
    text = MINIMAL.replace("kind: ServiceSpec", "kind: Service") + """\
  - name: web
    type: NodePort
    ports:
      - port: 80
        nodePort: 40000
"""
    assert [(p.line, p.path, p.message) for p in problems_of(text)] == [
        (2, "kind", "invalid kind 'Service': expected 'ServiceSpec'"),
        (13, "services[1].name", "duplicate service default/web (also services[0])"),
        (17, "services[1].ports[0].nodePort", "nodePort 40000 is outside nodePortRange 30000-32767"),
    ]


def test_line_numbers():
    text = MINIMAL.replace("  - name: web\n", "  - name: web\n    namespace: default\n    namespace: shop\n")
    (duplicate,) = problems_of(text)
    assert (duplicate.line, duplicate.path) == (11, "services[0].namespace")
    assert str(duplicate) == "t.yaml:11: services[0].namespace: duplicate key 'namespace' (first on line 10)"

    # a missing field: the line of its mapping
    (missing,) = problems_of(MINIMAL.replace("      - port: 8080", "      - protocol: UDP"))
    assert (missing.line, missing.path) == (12, "services[0].ports[0].port")
    assert missing.message == "missing required field 'port'"

    # a flow mapping: the line of the key
    (bad,) = problems_of(MINIMAL.replace("      - port: 8080", "      - {protocol: UDP,\n         port: 0}"))
    assert (bad.line, bad.path) == (13, "services[0].ports[0].port")


def test_unreadable_files_are_spec_errors(tmp_path: Path):
    for path, message in [
        (tmp_path / "missing.yaml", "cannot read the file: No such file or directory"),
        (tmp_path, "cannot read the file: Is a directory"),
    ]:
        with pytest.raises(SpecError) as caught:
            load_spec(path)
        assert caught.value.problems == [Problem(str(path), "", message)]
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(latin1)


@pytest.mark.parametrize("text", ["a: [1", "\x07", "a: !tag 1", "--- 1\n--- 2\n", "? [a]\n: 1\n", "1: 2\n"])
def test_odd_documents_are_spec_errors(text: str):
    assert problems_of(text)


# --- the corpus of bad specs -------------------------------------------------------------------


def test_every_bad_spec_has_an_expectation():
    assert sorted(path.name for path in BAD.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_spec(name: str):
    expected = EXPECTED[name]
    path = BAD / name
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    problems = caught.value.problems
    assert all(p.file == str(path) for p in problems)
    matching = [
        p
        for p in problems
        if p.path == expected["path"]
        and expected["contains"] in p.message
        and expected["line"] in (None, p.line)
    ]
    assert matching, f"{expected} not among:\n" + "\n".join(map(str, problems))
    for problem in problems:
        assert "Value error" not in problem.message and "errors.pydantic.dev" not in problem.message


def test_a_spec_of_more_nodes_than_the_cap_is_refused():
    from bpfgen.spec import MAX_CLUSTER_NODES

    nodes = "".join(f"  - {{name: n{i}, address: 10.{i // 65536}.{i // 256 % 256}.{i % 256}}}\n"
                    for i in range(MAX_CLUSTER_NODES + 1))
    text = f"apiVersion: bpfgen/v1\nkind: ServiceSpec\nmetadata: {{name: big}}\nnodes:\n{nodes}"
    with pytest.raises(SpecError) as e:
        parse_spec(text, "big.yaml")
    assert str(e.value.problems[0]) == f"big.yaml:4: nodes: nodes has {MAX_CLUSTER_NODES + 1} entries, at most {MAX_CLUSTER_NODES}"


def test_service_semantics_fields_are_checked_together(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("""\
apiVersion: bpfgen/v1
kind: ServiceSpec
metadata: {name: hc}
nodes: [{name: node0, address: 172.26.50.101}]
services:
  - name: a
    type: NodePort
    externalTrafficPolicy: Local
    healthCheckNodePort: 30001
    ports: [{port: 80, nodePort: 30001}]
  - name: b
    type: NodePort
    sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}
    loadBalancerSourceRanges: [10.0.0.0/8]
    ports: [{port: 81, nodePort: 30002}]
  - name: c
    type: ClusterIP
    clusterIP: 10.96.0.9
    healthCheckNodePort: 30003
    sessionAffinity: ClientIP
    sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}
    ports: [{port: 80}]
""")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    text = str(e.value)
    assert "s.yaml:9: services[0].healthCheckNodePort: healthCheckNodePort 30001 is also a nodePort" in text
    assert "services[1].sessionAffinityConfig: sessionAffinityConfig needs sessionAffinity: ClientIP" in text
    assert "services[1].loadBalancerSourceRanges: loadBalancerSourceRanges needs loadBalancerIPs" in text
    assert "timeoutSeconds 86401 is out of range 1-86400" in text
