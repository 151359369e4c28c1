"""Kubernetes input end to end in the lab: the example kubectl dump's cluster emulated in
namespaces (a pod for every endpoint, serving or not), the datapath loaded on every node,
real sockets from the client and from a node."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from bpfgen import kube
from bpfgen import lab as labmod
from bpfgen import views
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
