"""End to end in the lab: real TCP/UDP clients and servers in namespaces, the datapath
loaded on every node, checked from both ends of each connection and in the maps."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bpfgen import lab as labmod
from bpfgen.cli import cli
from bpfgen.netns import enter_netns
from bpfgen.spec import load_spec

from conftest import lab_up, namespaces  # noqa: E402

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "examples" / "seed.yaml"
SPEC = load_spec(SEED)
NODE0, NODE1 = (str(n.address) for n in SPEC.nodes)
NODEPORT = SPEC.services[0].ports[0].node_port
CLUSTER_IP = str(SPEC.services[0].cluster_ip)
POD = str(SPEC.services[0].backends[0].address)
SNAT = SPEC.cluster.snat_port_range


_namespaces = namespaces


def _lab(spec: Path, tmp: Path):
    return lab_up(spec, tmp, "t")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    """The seed lab, loaded on both nodes."""
    with _lab(SEED, tmp_path_factory.mktemp("lab")) as the_lab:
        yield the_lab


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def _addr(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[0]


def test_both_nodes_run_one_object_each_with_its_own_address(lab) -> None:
    """One build, one object: the nodes' programs are the same code, configured apart, and
    each node's NodePort answers from its own address."""
    from bpfgen import layout
    from bpfgen import libbpf as bpf
    from bpfgen.loader import status

    rows = {r["node"]: r for r in status()}
    tags, configs = set(), {}
    for node, row in rows.items():
        prog = row["programs"]["ingress"]
        tags.add(prog["tag"])
        with bpf.prog_get_fd_by_id(prog["id"]) as fd:
            for map_id in bpf.prog_map_ids(fd):
                with bpf.map_get_fd_by_id(map_id) as m:
                    if m.name == ".rodata.config":
                        configs[node] = layout.CONFIG.unpack(m.lookup(layout.ID_KEY.pack(0)))
    assert len(tags) == 1 and sorted(rows) == ["node0", "node1"]
    assert {n: str(c["node_ip"]) for n, c in configs.items()} == {"node0": NODE0, "node1": NODE1}
    for address in (NODE0, NODE1):
        assert labmod.client_request(lab, "TCP", address, NODEPORT)["reply_from"] == f"{address}:{NODEPORT}"


@pytest.mark.parametrize("proto", ["TCP", "UDP"])
def test_nodeport_to_a_remote_backend_is_snated_and_reversed(lab, proto: str) -> None:
    r = labmod.client_request(lab, proto, NODE0, NODEPORT)
    assert r["pod"] == f"{POD}:80"
    assert _addr(r["pod_saw_peer"]) == NODE0  # SNAT to node0's address...
    assert _port(r["pod_saw_peer"]) in SNAT  # ...and a port of snatPortRange
    assert r["reply_from"] == f"{NODE0}:{NODEPORT}"  # the client sees exactly what it sent to
    assert _addr(r["client"]) == lab.client_address


@pytest.mark.parametrize("proto", ["TCP", "UDP"])
def test_nodeport_to_a_local_backend_keeps_the_client_address(lab, proto: str) -> None:
    r = labmod.client_request(lab, proto, NODE1, NODEPORT)
    assert r["pod_saw_peer"] == r["client"]  # no SNAT: the pod sees the client itself
    assert r["reply_from"] == f"{NODE1}:{NODEPORT}"


def test_200_concurrent_connections_get_distinct_snat_ports(lab) -> None:
    with enter_netns(lab.client_ns):
        socks = [socket.create_connection((NODE0, NODEPORT), timeout=10) for _ in range(200)]
    try:
        for s in socks:
            s.sendall(b"hi\n")
        seen = []
        for s in socks:
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                assert chunk, "connection closed without an answer"
                data += chunk
            seen.append(json.loads(data)["peer"])
            assert s.getpeername() == (NODE0, NODEPORT)
    finally:
        for s in socks:
            s.close()
    assert len(seen) == 200
    assert {_addr(p) for p in seen} == {NODE0}
    ports = [_port(p) for p in seen]
    assert len(set(ports)) == 200 and all(p in SNAT for p in ports)


def test_clusterip_is_reachable_from_the_node(lab) -> None:
    proc = subprocess.run(
        ["nsenter", f"--net=/run/netns/{lab.node_ns('node0')}", sys.executable, "-m", "bpfgen.labnet", "request", "tcp",
         CLUSTER_IP, "80"], capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["reply_from"] == f"{CLUSTER_IP}:80"
    assert _addr(r["pod_saw_peer"]) == NODE0


def test_maps_dump_shows_a_live_connection(lab) -> None:
    with enter_netns(lab.client_ns):
        s = socket.create_connection((NODE0, NODEPORT), timeout=10)
    try:
        client_ip, client_port = s.getsockname()
        for _ in range(20):  # (the client's ACK, which moves the flow into ct_v4, may be on its way)
            r = CliRunner().invoke(cli, ["maps", "dump", "ct_v4", "--node", "node0", "-o", "json"])
            assert r.exit_code == 0, r.stderr
            [ct] = json.loads(r.stdout)
            if any((e["key"]["saddr"], e["key"]["sport"]) == (client_ip, client_port) for e in ct["entries"]):
                break
            time.sleep(0.05)
        [svc] = [e for e in ct["entries"] if (e["key"]["saddr"], e["key"]["sport"]) == (client_ip, client_port)]
        assert (svc["key"]["daddr"], svc["key"]["dport"], svc["key"]["proto"]) == (NODE0, NODEPORT, "TCP")
        assert svc["value"]["xl_saddr"] == NODE0
        snat_port = svc["value"]["snat_port"]
        # the flow as it leaves node0, from the SNAT port
        [out] = [e for e in ct["entries"] if (e["key"]["saddr"], e["key"]["sport"]) == (NODE0, snat_port)]
        assert (out["key"]["daddr"], out["key"]["dport"]) == (POD, 80)
        assert out["value"]["backend_id"] == svc["value"]["backend_id"]

        r = CliRunner().invoke(cli, ["maps", "dump", "snat_v4", "--node", "node0", "-o", "json"])
        [nat] = json.loads(r.stdout)
        pairs = {(e["key"]["saddr"], e["key"]["sport"], e["value"]["addr"], e["value"]["port"]) for e in nat["entries"]}
        assert (POD, 80, client_ip, client_port) in pairs  # IN: XLATE_DST (the port's claim)
        # (OUT, XLATE_SRC, is the flow's conntrack entry: the SNAT table holds claims only)

        r = CliRunner().invoke(cli, ["nat", "list", "--node", "node0"])
        assert f"TCP OUT {client_ip}:{client_port} -> {POD}:80 XLATE_SRC {NODE0}:{snat_port}" in r.stdout
        assert f"TCP IN {POD}:80 -> {NODE0}:{snat_port} XLATE_DST {client_ip}:{client_port}" in r.stdout
    finally:
        s.close()


def test_service_list_reads_the_kernel(lab) -> None:
    r = CliRunner().invoke(cli, ["service", "list", "--node", "node0", "-o", "json"])
    assert r.exit_code == 0, r.stderr
    rows = {(x["frontend"], x["protocol"]): x for x in json.loads(r.stdout)}
    np = rows[(f"{NODE0}:{NODEPORT}", "TCP")]
    assert np["type"] == "NodePort" and [b["address"] for b in np["backends"]] == [f"{POD}:80"]
    assert rows[(f"{CLUSTER_IP}:80", "TCP")]["type"] == "ClusterIP"
    text = CliRunner().invoke(cli, ["service", "list", "--node", "node0"]).stdout
    assert text.splitlines()[0].split() == ["ID", "Frontend", "Service", "Type", "Backend"]
    assert f"1 => {POD}:80/TCP" in text


def test_counters_count_frontend_packets(lab) -> None:
    labmod.client_request(lab, "TCP", NODE0, NODEPORT)
    r = CliRunner().invoke(cli, ["maps", "dump", "svc_stats", "--node", "node0", "-o", "json"])
    [stats] = json.loads(r.stdout)
    total = sum(v["value"]["packets"] for e in stats["entries"] for v in e["values"])
    assert total > 0
    text = CliRunner().invoke(cli, ["maps", "dump", "svc_stats", "--node", "node0"]).stdout
    assert "per-CPU values summed" in text


def test_the_node_of_the_namespace_is_picked_without_flags(lab) -> None:
    proc = subprocess.run(
        ["nsenter", f"--net=/run/netns/{lab.node_ns('node1')}", sys.executable, "-m", "bpfgen.cli", "service", "list",
         "-o", "json"], capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert any(r["frontend"] == f"{NODE1}:{NODEPORT}" for r in json.loads(proc.stdout))


def test_lab_demo_runs_the_walk_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             isolated_state: Path) -> None:
    monkeypatch.chdir(tmp_path)
    prefix = f"d{secrets.token_hex(3)}"
    r = CliRunner().invoke(cli, ["lab", "demo", "--prefix", prefix, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    tcp = report["requests"][0]
    assert tcp["reply_from"] == f"{NODE0}:{NODEPORT}" and _addr(tcp["pod_saw_peer"]) == NODE0
    assert any(n["xlate"] == "XLATE_SRC" for n in report["nat"])
    assert not any(ns.startswith(prefix + "-") for ns in _namespaces())
    assert not any(isolated_state.glob("*/*"))


@pytest.mark.parametrize("again", [False, True], ids=["one-sigterm", "signals-during-the-cleanup"])
def test_a_lab_demo_stopped_by_sigterm_removes_what_it_made(tmp_path: Path, isolated_state: Path, again: bool) -> None:
    """A SIGTERM (a supervisor's, a CI job's timeout) unwinds like Ctrl-C: `bpfgen lab demo`
    exits 1 with a one-line message and leaves no namespace, pin or record behind; more
    SIGTERMs and SIGINTs while it cleans up do not cut the cleanup short."""
    prefix = f"s{secrets.token_hex(3)}"
    env = {**os.environ, "BPFGEN_PIN_ROOT": str(isolated_state), "BPFGEN_RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.Popen([sys.executable, "-c", "from bpfgen.cli import main; main()", "lab", "demo", "--prefix",
                             prefix], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(ns.startswith(prefix + "-") for ns in _namespaces()):  # (the lab being made)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.5)
        proc.terminate()
        if again:
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
                for sig in (signal.SIGTERM, signal.SIGINT):
                    if proc.poll() is None:
                        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if any(ns.startswith(prefix + "-") for ns in _namespaces()):
            labmod.down(prefix)  # (what it left behind, so that the failure below leaves nothing)
    assert proc.returncode == 1, stderr
    assert stderr.strip().splitlines()[-1] == "bpfgen: interrupted" and "Traceback" not in stderr
    assert not any(ns.startswith(prefix + "-") for ns in _namespaces())
    assert not any(isolated_state.glob("*/*"))
    assert not any((tmp_path / "run").glob("**/*.json"))


def _read_json_line(s: socket.socket) -> tuple[dict, bytes]:
    data = b""
    while b"\n" not in data:
        chunk = s.recv(65536)
        assert chunk, "closed before the answer"
        data += chunk
    line, _, rest = data.partition(b"\n")
    return json.loads(line), rest


def _bulk_download(ns: str, host: str, port: int, size: int) -> int:
    with enter_netns(ns):
        s = socket.create_connection((host, port), timeout=20)
    with s:
        s.sendall(b"send %d\n" % size)
        _, got = _read_json_line(s)
        total = len(got)
        while total < size:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            total += len(chunk)
    return total


@pytest.mark.parametrize("size", [4 << 20])
def test_bulk_transfers_through_the_nodeport_both_ways(lab, size: int) -> None:
    """Large segments (GSO/GRO on veth) are translated and forwarded, not dropped."""
    assert _bulk_download(lab.client_ns, NODE0, NODEPORT, size) == size
    with enter_netns(lab.client_ns):
        s = socket.create_connection((NODE0, NODEPORT), timeout=20)
    with s:
        s.sendall(b"recv %d\n" % size)
        _read_json_line(s)
        s.sendall(b"y" * size)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(64)
            assert chunk
            answer += chunk
    assert int(answer) == size


def test_bulk_download_from_a_clusterip_on_the_node(lab) -> None:
    assert _bulk_download(lab.node_ns("node0"), CLUSTER_IP, 80, 4 << 20) == 4 << 20


@pytest.fixture(scope="module")
def pods_lab(tmp_path_factory: pytest.TempPathFactory):
    with _lab(REPO / "tests" / "specs" / "lab" / "pods.yaml", tmp_path_factory.mktemp("pods-lab")) as the_lab:
        yield the_lab


@pytest.mark.parametrize("proto", ["TCP", "UDP"])
def test_a_pod_reaches_a_clusterip_whose_backend_is_on_another_node(pods_lab, proto: str) -> None:
    """pod 10.0.0.10 on node0 -> ClusterIP 10.96.0.80:80 -> 10.0.1.10:8080 on node1: node0's
    egress translates it, its ingress translates the reply back; no SNAT."""
    [pod] = [p for p in pods_lab.pods if p.address == "10.0.0.10"]
    proc = subprocess.run(
        ["nsenter", f"--net=/run/netns/{pod.ns}", sys.executable, "-m", "bpfgen.labnet", "request", proto,
         "10.96.0.80", "80"], capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["reply_from"] == "10.96.0.80:80"
    assert r["pod"] == "10.0.1.10:8080"
    assert r["pod_saw_peer"] == r["client"] and _addr(r["client"]) == "10.0.0.10"


def test_pod_logs_and_the_lab_record_are_root_only(lab) -> None:
    """They hold client addresses."""
    import stat

    run = Path(lab.pods[0].log).parent  # (another module lab may have moved BPFGEN_RUN_DIR since)
    paths = [Path(p.log) for p in lab.pods] + [run / f"lab-{lab.prefix}.json"]
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.parametrize("prefix", ["../../tmp/x", "a/b", "UPPER", "toolongprefix", ""])
def test_a_lab_prefix_that_would_become_another_path_is_refused(prefix: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BPFGEN_RUN_DIR", str(tmp_path / "run"))
    for command in (["lab", "down", "--prefix", prefix], ["lab", "up", "--prefix", prefix]):
        r = CliRunner().invoke(cli, command)
        assert r.exit_code == 2, r.output
        assert "invalid lab prefix" in r.stderr and "Traceback" not in r.stderr
    assert not any(ns.startswith(prefix) for ns in _namespaces()) or prefix == ""
