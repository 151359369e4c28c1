"""Kubernetes input end to end in the lab: the example kubectl dump's cluster emulated in
namespaces (a pod for every endpoint, serving or not), the datapath loaded on every node,
real sockets from the client and from a node."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from bpfgen import kube
from bpfgen import lab as labmod
from bpfgen import views
from bpfgen.labnet import read_line
from bpfgen.spec import load_spec

from conftest import lab_up  # noqa: E402

pytestmark = [pytest.mark.kernel, pytest.mark.filterwarnings("ignore::bpfgen.kube.SpecNote")]

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "examples" / "kubernetes" / "cluster.yaml"
CP = kube.node_name("lab-control-plane")
NODE_CP, NODE_W1, NODE_W2 = "172.26.50.101", "172.26.50.102", "172.26.50.103"
WEB_READY = {"10.0.1.10:8080", "10.0.2.10:8080"}  # one per slice


def _lab(spec: Path, tmp: Path):
    return lab_up(spec, tmp, "k")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    with _lab(CLUSTER, tmp_path_factory.mktemp("kube-lab")) as the_lab:
        yield the_lab


def _pod(lab: labmod.Lab, address: str) -> labmod.Pod:
    return next(p for p in lab.pods if p.address == address)


def _from_node(lab: labmod.Lab, node: str, proto: str, host: str, port: int) -> dict:
    proc = subprocess.run(
        ["nsenter", f"--net=/run/netns/{lab.node_ns(node)}", sys.executable, "-m", "bpfgen.labnet", "request",
         proto, host, str(port)], capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _spread(lab: labmod.Lab, host: str, port: int, n: int = 40) -> Counter:
    return Counter(labmod.client_request(lab, "TCP", host, port)["pod"] for _ in range(n))


def test_the_lab_has_a_pod_for_every_endpoint(lab) -> None:
    addresses = {p.address for p in lab.pods}
    assert {"10.0.1.11", "10.0.2.11", "10.0.2.21"} <= addresses  # not serving, but there
    assert _pod(lab, NODE_CP).host  # the apiserver's endpoint: the control plane itself


def test_named_target_port_is_reached(lab) -> None:
    r = labmod.client_request(lab, "TCP", NODE_CP, 30080)
    assert r["pod"] in WEB_READY  # targetPort "http", resolved by the slices to 8080
    assert r["reply_from"] == f"{NODE_CP}:30080"


def test_two_slices_both_used_and_a_not_ready_endpoint_unused(lab) -> None:
    seen = _spread(lab, NODE_CP, 30080)
    assert set(seen) == WEB_READY, seen  # both slices' ready endpoints, nothing else
    assert labmod.pod_log(_pod(lab, "10.0.1.11")) == []  # not ready
    assert labmod.pod_log(_pod(lab, "10.0.2.11")) == []  # terminating beside ready ones


def test_terminating_endpoint_serves_when_it_is_the_only_serving_one(lab) -> None:
    seen = _spread(lab, NODE_W1, 30081, 10)
    assert set(seen) == {"10.0.2.20:8080"}
    assert labmod.pod_log(_pod(lab, "10.0.2.21")) == []  # terminating and not serving: never


def test_external_and_load_balancer_ips_are_reached_from_the_client(lab) -> None:
    r = labmod.client_request(lab, "TCP", "198.51.100.10", 80)
    assert r["pod"] in WEB_READY and r["reply_from"] == "198.51.100.10:80"
    r = labmod.client_request(lab, "TCP", "198.51.100.20", 443)
    assert r["pod"] == "10.0.1.20:8443" and r["reply_from"] == "198.51.100.20:443"


def test_udp_cluster_ip_with_a_named_target_port_from_a_node(lab) -> None:
    r = _from_node(lab, "lab-worker", "udp", "10.96.0.10", 53)
    assert r["pod"] in {"10.0.0.2:5353", "10.0.0.3:5353"}  # targetPort "dns" -> 5353
    assert r["reply_from"] == "10.96.0.10:53"


def test_the_apiserver_host_endpoint_is_reached_from_a_worker(lab) -> None:
    r = _from_node(lab, "lab-worker2", "tcp", "10.96.0.1", 443)
    assert r["pod"] == f"{NODE_CP}:6443" and r["reply_from"] == "10.96.0.1:443"


def test_skipped_services_are_not_served(lab) -> None:
    frontends = {row["frontend"] for node in lab.nodes for row in views.service_list(node)}
    assert not any(f.startswith("10.96.77.7:") or f.endswith(":30090") for f in frontends)  # service-proxy-name
    assert {"10.96.120.15:80", "198.51.100.10:80", "198.51.100.20:443"} <= frontends
    with pytest.raises(labmod.LabError):
        labmod.client_request(lab, "TCP", NODE_CP, 30090)
    assert labmod.pod_log(_pod(lab, "10.0.2.20")) != []  # (the lab works: cart was used above)
    assert not any(p.address in ("10.0.1.30", "10.0.1.40") for p in lab.pods)  # headless, other proxy's


def test_terminating_fallback_ends_when_an_endpoint_is_ready_again(tmp_path: Path) -> None:
    """The same cluster with cart's terminating endpoint beside a ready one: it is unused."""
    dump = yaml.safe_load(CLUSTER.read_text())
    [cart] = [i for i in dump["items"] if i["kind"] == "EndpointSlice" and i["metadata"]["name"] == "cart-m4n7c"]
    cart["endpoints"].append({"addresses": ["10.0.1.50"], "conditions": {"ready": True, "serving": True,
                                                                        "terminating": False}, "nodeName": "lab-worker"})
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(dump))
    assert [(str(b.address), b.conditions.state) for b in load_spec(path).services[2].backends] == [
        ("10.0.2.20", "terminating"), ("10.0.2.21", "not-serving"), ("10.0.1.50", "ready")]
    with _lab(path, tmp_path) as the_lab:
        seen = _spread(the_lab, NODE_CP, 30081, 12)
        assert set(seen) == {"10.0.1.50:8080"}
        assert labmod.pod_log(_pod(the_lab, "10.0.2.20")) == []


# ---------------------------------------------------------------- kube-proxy's semantics
# Each test is named after the Kubernetes e2e test ([sig-network] Services should ...) it mirrors.

STICKY_CLUSTER_IP, STICKY_NODE_PORT = "10.96.130.25", 30082
LOCAL_LB, LOCAL_NODE_PORT, LOCAL_PODS = "198.51.100.30", 30083, {"10.0.1.70:8080", "10.0.1.71:8080"}
EMPTY_CLUSTER_IP, EMPTY_TCP, EMPTY_UDP = "10.96.150.35", 30085, 30086
OUTSIDE_CLIENT = "172.26.50.181"  # a second address of the client: outside shop/local's source range


def _drop_count(node: str, reason: str) -> int:
    from bpfgen import layout

    [m] = views.dump(node, "drop_stats")
    index = layout.DROP_REASONS.value(reason)
    return sum(v["value"]["packets"] for e in m["entries"] if e["key"] == index for v in e["values"])


def _row(node: str, frontend: str) -> dict:
    return next(r for r in views.service_list(node) if r["frontend"] == frontend)


def _reload(lab: labmod.Lab, tmp: Path, change=None) -> None:
    """The example dump (changed by change(dump), if given) loaded on every node again."""
    from conftest import load_every_node

    dump = yaml.safe_load(CLUSTER.read_text())
    if change:
        change(dump)
    where = tmp / f"v{len(list(tmp.glob('v*')))}"
    where.mkdir()
    (where / "cluster.yaml").write_text(yaml.safe_dump(dump))
    load_every_node(lab, where / "cluster.yaml", where)


def _set_conditions(dump: dict, address: str, **conditions: bool) -> None:
    for item in dump["items"]:
        if item["kind"] == "EndpointSlice":
            for e in item.get("endpoints") or []:
                if address in e["addresses"]:
                    e["conditions"] = dict(conditions)


def _request_from(lab: labmod.Lab, source: str, host: str, port: int, timeout: float = 2.0) -> dict:
    """One TCP request from the client's namespace, from the address source."""
    from bpfgen.netns import enter_netns

    with enter_netns(lab.client_ns):
        s = socket.socket()
    with s:
        s.settimeout(timeout)
        s.bind((source, 0))
        s.connect((host, port))
        s.sendall(b"hi\n")
        return json.loads(read_line(s))


def test_have_session_affinity_work_for_nodeport_service(lab) -> None:
    for node in (NODE_CP, NODE_W1):
        seen = _spread(lab, node, STICKY_NODE_PORT, 20)
        assert len(seen) == 1 and sum(seen.values()) == 20, seen  # 20 of 20 on one endpoint
    rows = [r for r in views.affinity_list(CP) if r["client"] == lab.client_address]
    assert len(rows) == 1 and rows[0]["live"] and 0 < rows[0]["expires_in"] <= 600, rows
    assert rows[0]["backend"] == next(iter(_spread(lab, NODE_CP, STICKY_NODE_PORT, 1)))
    row = _row(CP, f"{NODE_CP}:{STICKY_NODE_PORT}")
    assert row["session_affinity"] == {"type": "ClientIP", "timeout_seconds": 600}


def test_have_session_affinity_work_for_service_with_type_clusterIP(lab) -> None:
    seen = Counter(_from_node(lab, CP, "tcp", STICKY_CLUSTER_IP, 80)["pod"] for _ in range(20))
    assert len(seen) == 1, seen
    # the frontends of one port share the client's endpoint: the node's NodePort keeps it too
    r = _from_node(lab, CP, "tcp", STICKY_CLUSTER_IP, 80)
    assert r["pod"] in seen and r["reply_from"] == f"{STICKY_CLUSTER_IP}:80"


def test_without_session_affinity_connections_spread(lab) -> None:
    seen = _spread(lab, NODE_CP, 30080, 20)
    assert set(seen) == WEB_READY, seen


def test_external_traffic_policy_local_keeps_the_client_address(lab) -> None:
    r = labmod.client_request(lab, "TCP", NODE_W1, LOCAL_NODE_PORT)
    assert r["pod"] in LOCAL_PODS
    assert r["pod_saw_peer"].split(":")[0] == r["client"].split(":")[0]  # no SNAT: the client itself
    assert r["reply_from"] == f"{NODE_W1}:{LOCAL_NODE_PORT}"
    row = _row(kube.node_name("lab-worker"), f"{NODE_W1}:{LOCAL_NODE_PORT}")
    assert (row["traffic_policy"], row["health_check_node_port"]) == ("Local", 30084)
    assert {b["address"] for b in row["backends"]} == LOCAL_PODS and all(b["local"] for b in row["backends"])


def test_external_traffic_policy_local_drops_on_a_node_without_a_local_endpoint(lab) -> None:
    before = _drop_count(CP, "NO_LOCAL_BACKEND")
    with pytest.raises(labmod.LabError, match="timed out"):
        labmod.client_request(lab, "TCP", NODE_CP, LOCAL_NODE_PORT)
    assert _drop_count(CP, "NO_LOCAL_BACKEND") > before
    row = _row(CP, f"{NODE_CP}:{LOCAL_NODE_PORT}")
    assert (row["traffic_policy"], row["no_backend"], row["backends"]) == ("Local", "drop", [])
    # its ClusterIP (internalTrafficPolicy Cluster) still reaches them from this node
    assert _from_node(lab, CP, "tcp", "10.96.140.30", 80)["pod"] in LOCAL_PODS


def test_be_rejected_when_no_endpoints_exist(lab) -> None:
    for proto, port in (("TCP", EMPTY_TCP), ("UDP", EMPTY_UDP)):
        t = time.monotonic()
        with pytest.raises(labmod.LabError, match="refused"):
            labmod.client_request(lab, proto, NODE_CP, port)
        assert time.monotonic() - t < 1.0  # (the request's own start-up included)
    # from a node, through its egress: rejected too
    proc = subprocess.run(
        ["nsenter", f"--net=/run/netns/{lab.node_ns('lab-worker')}", sys.executable, "-m", "bpfgen.labnet",
         "request", "tcp", EMPTY_CLUSTER_IP, "80"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "refused" in proc.stderr, proc.stderr
    assert _row(CP, f"{NODE_CP}:{EMPTY_TCP}")["no_backend"] == "reject"


def test_load_balancer_source_ranges_admit_inside_and_refuse_outside_clients(lab) -> None:
    # the load balancer sends this IP to the node with the endpoints
    labmod.ip(lab.client_ns, "route", "replace", f"{LOCAL_LB}/32", "via", NODE_W1)
    labmod.ip(lab.client_ns, "addr", "add", f"{OUTSIDE_CLIENT}/24", "dev", "eth0")
    w1 = kube.node_name("lab-worker")
    try:
        inside = labmod.client_request(lab, "TCP", LOCAL_LB, 80)
        assert inside["pod"] in LOCAL_PODS and inside["reply_from"] == f"{LOCAL_LB}:80"
        before = _drop_count(w1, "SOURCE_RANGE")
        with pytest.raises(OSError):
            _request_from(lab, OUTSIDE_CLIENT, LOCAL_LB, 80)
        assert _drop_count(w1, "SOURCE_RANGE") > before
        # the NodePort of the same service has no source ranges
        assert _request_from(lab, OUTSIDE_CLIENT, NODE_W1, LOCAL_NODE_PORT)["peer"].startswith(OUTSIDE_CLIENT + ":")
        assert _row(w1, f"{LOCAL_LB}:80")["source_ranges"] == ["172.26.50.180/32"]
    finally:
        labmod.ip(lab.client_ns, "addr", "del", f"{OUTSIDE_CLIENT}/24", "dev", "eth0", check=False)
        labmod.ip(lab.client_ns, "route", "replace", f"{LOCAL_LB}/32", "via", NODE_CP)


def test_an_established_connection_is_kept_while_its_endpoint_terminates(lab, tmp_path: Path) -> None:
    from bpfgen.netns import enter_netns

    with enter_netns(lab.client_ns):
        s = socket.socket()
    with s:
        s.settimeout(5)
        s.connect((NODE_CP, 30080))
        s.sendall(b"echo\n")
        pod = json.loads(read_line(s))["local"]
        leaving = pod.split(":")[0]
        try:
            _reload(lab, tmp_path, lambda d: _set_conditions(d, leaving, ready=False, serving=True, terminating=True))
            row = _row(CP, f"{NODE_CP}:30080")
            assert [(b["address"], b["state"], b["new_flows"]) for b in row["backends"] if b["address"] == pod] == [
                (pod, "terminating", False)]
            for i in range(5):  # the connection goes on...
                s.sendall(b"still %d\n" % i)
                assert read_line(s) == b"still %d\n" % i
                time.sleep(0.3)
            # ...while new ones avoid the endpoint
            assert set(_spread(lab, NODE_CP, 30080, 12)) == WEB_READY - {pod}
        finally:
            _reload(lab, tmp_path)


def test_be_able_to_preserve_udp_traffic_when_server_pod_cycles(lab, tmp_path: Path) -> None:
    """A UDP flow (one socket) whose endpoint goes away moves to a live one at its next
    datagram: its conntrack state is cleared at the update."""
    from bpfgen.netns import enter_netns

    with enter_netns(lab.node_ns("lab-worker")):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(3)
        s.connect(("10.96.0.10", 53))

        def ask() -> str:
            s.send(b"hi\n")
            return json.loads(s.recv(4096))["local"]

        first = ask()
        assert ask() == first  # one flow, one endpoint
        try:
            _reload(lab, tmp_path, lambda d: _set_conditions(d, first.split(":")[0], ready=False))
            then = ask()
            assert then != first and then in {"10.0.0.2:5353", "10.0.0.3:5353"}
        finally:
            _reload(lab, tmp_path)


def _request_in(ns: str, proto: str, host: str, port: int) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "bpfgen.labnet", "request",
                           proto, host, str(port)], capture_output=True, text=True, timeout=30)


def test_allow_pods_to_hairpin_back_to_themselves_through_services(lab) -> None:
    """A pod's flow to a ClusterIP whose endpoints run on its own node (one of them itself)."""
    me = _pod(lab, "10.0.1.70")
    seen = Counter()
    for _ in range(12):
        proc = _request_in(me.ns, "tcp", "10.96.140.30", 80)
        assert proc.returncode == 0, proc.stderr
        r = json.loads(proc.stdout)
        assert r["reply_from"] == "10.96.140.30:80"
        seen[r["pod"]] += 1
    assert set(seen) == LOCAL_PODS, seen  # itself among them
    # and the node itself to its own endpoints
    assert {_from_node(lab, "lab-worker", "tcp", "10.96.140.30", 80)["pod"] for _ in range(8)} <= LOCAL_PODS


def test_internal_traffic_policy_local_keeps_cluster_ip_traffic_on_the_node(lab, tmp_path: Path) -> None:
    def local(dump: dict) -> None:
        [sticky] = [i for i in dump["items"] if i["kind"] == "Service" and i["metadata"]["name"] == "sticky"]
        sticky["spec"]["internalTrafficPolicy"] = "Local"
        sticky["spec"]["sessionAffinity"] = "None"
        del sticky["spec"]["sessionAffinityConfig"]

    try:
        _reload(lab, tmp_path, local)
        w1 = {_from_node(lab, "lab-worker", "tcp", STICKY_CLUSTER_IP, 80)["pod"] for _ in range(12)}
        assert w1 == {"10.0.1.60:8080", "10.0.1.61:8080"}  # its own two (hairpin), never lab-worker2's
        w2 = {_from_node(lab, "lab-worker2", "tcp", STICKY_CLUSTER_IP, 80)["pod"] for _ in range(6)}
        assert w2 == {"10.0.2.60:8080"}
        before = _drop_count(CP, "NO_LOCAL_BACKEND")
        proc = _request_in(lab.node_ns(CP), "tcp", STICKY_CLUSTER_IP, 80)
        assert proc.returncode == 1 and "timed out" in proc.stderr, proc.stderr
        assert _drop_count(CP, "NO_LOCAL_BACKEND") > before
        assert _row(CP, f"{STICKY_CLUSTER_IP}:80")["traffic_policy"] == "Local"
        # the NodePort (externalTrafficPolicy Cluster) still reaches every endpoint
        assert len(_spread(lab, NODE_CP, STICKY_NODE_PORT, 20)) > 1
    finally:
        _reload(lab, tmp_path)


def test_service_and_affinity_lists_show_the_semantics(lab) -> None:
    from click.testing import CliRunner

    from bpfgen.cli import cli

    labmod.client_request(lab, "TCP", NODE_W1, STICKY_NODE_PORT)
    w1 = kube.node_name("lab-worker")
    out = CliRunner().invoke(cli, ["service", "list", "--node", w1])
    assert out.exit_code == 0, out.output
    text = out.stdout
    assert f"{NODE_W1}:{LOCAL_NODE_PORT}/TCP" in text and "[Local; healthCheck :30084]" in text
    assert "[ClientIP 600s]" in text
    assert f"{LOCAL_LB}:80/TCP" in text and "from 172.26.50.180/32" in text
    assert "(no backends: rejected)" in text
    assert "10.0.2.11:8080/TCP (terminating, no new flows)" in text  # web's terminating endpoint
    out = CliRunner().invoke(cli, ["affinity", "list", "--node", w1, "-o", "json"])
    rows = json.loads(out.stdout)
    assert any(r["client"] == lab.client_address and r["live"] for r in rows), rows
