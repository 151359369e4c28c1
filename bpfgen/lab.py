"""`bpfgen lab`: the spec's cluster emulated in network namespaces.

One namespace per node, per backend pod and for a client, all nodes and the client on
one L2 segment (a bridge in a switch namespace). Every address lives inside these
namespaces; nothing is created in the root namespace (veths are made inside their
namespaces with `ip -n`). A pod sits behind its node on a veth (proxy ARP on the node
side, a /32 route to it), runs a server answering TCP and UDP on its target ports and
reporting the peer address it saw, and the other nodes route to it via its node.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import BpfgenError, UsageError
from .files import write_file
from .layout import HAIRPIN_ADDRESS
from .spec import Spec, load_spec
from .state import check_privileges, run_dir

def example(name: str) -> Path:
    """A spec of examples/, installed with bpfgen as package data (bpfgen.examples)."""
    return Path(str(importlib.resources.files("bpfgen.examples") / name))


DEFAULT_SPEC = example("seed.yaml")
DEFAULT_PREFIX = "bgl"
CLIENT_HOST = 180  # the walk's client is .180 of the nodes' subnet
NODE_IFACE = "eth0"


class LabError(BpfgenError):
    pass


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run("ip", "-n", ns, *args, check=check)


def sysctl(ns: str, key: str, value: str | int) -> None:
    # /proc/sys/net is per network namespace: write it from inside (nsenter keeps our mounts).
    run("nsenter", f"--net=/run/netns/{ns}", "sysctl", "-qw", f"{key}={value}")


@dataclass
class Pod:
    name: str
    ns: str
    address: str
    node: str
    tcp: list[int]
    udp: list[int]
    log: str
    pid: int = 0
    host: bool = False  # a host endpoint: the server runs in the node's namespace, on its address


@dataclass
class Lab:
    prefix: str
    spec: str
    switch: str
    client_ns: str
    client_address: str
    nodes: dict[str, dict] = field(default_factory=dict)  # name -> ns, address, iface
    pods: list[Pod] = field(default_factory=list)

    @property
    def namespaces(self) -> list[str]:
        return [self.client_ns, *(n["ns"] for n in self.nodes.values()), *(p.ns for p in self.pods if not p.host),
                self.switch]

    @staticmethod
    def record_path(prefix: str) -> Path:
        check_prefix(prefix)  # (it becomes a path and namespace names)
        return run_dir() / f"lab-{prefix}.json"

    def save(self) -> None:
        run_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
        write_file(self.record_path(self.prefix), json.dumps(asdict(self), indent=2) + "\n", 0o600)

    @classmethod
    def load(cls, prefix: str) -> Lab | None:
        path = cls.record_path(prefix)
        try:
            data = json.loads(path.read_text())
            data["pods"] = [Pod(**p) for p in data["pods"]]
            return cls(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise LabError(f"{path}: unreadable lab record ({e}); remove the lab's namespaces "
                           f"(ip netns list | grep '^{prefix}-') and the file by hand") from None

    def node_ns(self, node: str) -> str:
        return self.nodes[node]["ns"]


_PREFIX = re.compile(r"[a-z0-9][-a-z0-9]{0,7}")


def check_prefix(prefix: str) -> None:
    if not _PREFIX.fullmatch(prefix):
        raise UsageError(f"invalid lab prefix {prefix!r}: at most 8 lowercase letters, digits or dashes, "
                         "starting with a letter or digit")


def plan(spec: Spec, spec_path: str, prefix: str) -> Lab:
    """Names and addresses of the lab for spec; nothing is created."""
    check_prefix(prefix)
    subnet = ipaddress.IPv4Network(f"{spec.nodes[0].address}/24", strict=False)
    taken = {n.address for n in spec.nodes} | {b.address for s in spec.services for b in s.backends}
    candidates = [subnet.network_address + CLIENT_HOST, *subnet.hosts()]
    client = next((a for a in candidates if a not in taken), None)
    if client is None:
        raise UsageError(f"no free address for the client in {subnet}")
    for n in spec.nodes:
        if n.address not in subnet:
            raise UsageError(f"the lab puts every node on one /24: node {n.name} ({n.address}) is outside {subnet}")
    lab = Lab(prefix, spec_path, f"{prefix}-sw", f"{prefix}-client", str(client))
    for n in spec.nodes:
        lab.nodes[n.name] = {"ns": f"{prefix}-{n.name}", "address": str(n.address), "iface": NODE_IFACE}
    # A pod for each backend, whatever its conditions (so that one can see a backend that does
    # not serve gets nothing). A backend at a node's address is that node's host: its server
    # runs in the node's namespace. A backend on no node sits behind the first node (the
    # network routes to it; every node's datapath treats it as remote).
    node_of_address = {str(n.address): n.name for n in spec.nodes}
    wanted = [(str(b.address), b.node, [(p.protocol, p.target_port) for p in svc.ports])
              for svc in spec.services for b in svc.backends]
    pods: dict[str, Pod] = {}
    for address, node, ports in wanted:
        pod = pods.get(address)
        if pod is None:
            i = len(pods)
            host = node_of_address.get(address)
            pod = pods[address] = Pod(
                f"pod{i}", lab.nodes[host]["ns"] if host else f"{prefix}-pod{i}", address,
                host or node or spec.nodes[0].name, [], [], str(run_dir() / f"{prefix}-pod{i}.log"), host=bool(host),
            )
        for protocol, port in ports:
            listed = pod.tcp if protocol == "TCP" else pod.udp
            if port not in listed:
                listed.append(port)
    lab.pods = list(pods.values())
    return lab


def _local_port_range(spec: Spec) -> str:
    """Node sockets' ephemeral ports, kept clear of the NodePort and SNAT ranges."""
    low = min(spec.cluster.node_port_range.lo, spec.cluster.snat_port_range.lo) - 1
    return f"1024 {max(low, 1025)}"


def up(spec_path: str | Path | None = None, prefix: str = DEFAULT_PREFIX) -> Lab:
    check_privileges()
    path = str(spec_path or DEFAULT_SPEC)
    spec = load_spec(path)
    if Lab.load(prefix) is not None:
        raise UsageError(f"a lab '{prefix}' is already up; `bpfgen lab down` first")
    lab = plan(spec, path, prefix)
    existing = set(run("ip", "netns", "list").stdout.split())
    clash = [ns for ns in lab.namespaces if ns in existing]
    if clash:
        raise UsageError(f"network namespace {clash[0]} already exists; `bpfgen lab down --prefix {prefix}` or remove it")
    lab.save()  # first, so that down can clean up a half-made lab
    try:
        _build(lab, spec)
    except BaseException as e:
        _down_after(prefix, e)
        raise
    lab.save()
    return lab


def _build(lab: Lab, spec: Spec) -> None:
    sw = lab.switch
    for ns in lab.namespaces:
        run("ip", "netns", "add", ns)
    ip(sw, "link", "add", "br0", "type", "bridge")
    ip(sw, "link", "set", "br0", "up")
    sysctl(sw, "net.bridge.bridge-nf-call-iptables", 0)

    def attach(ns: str, port: str, address: str) -> None:
        ip(ns, "link", "add", NODE_IFACE, "type", "veth", "peer", "name", port, "netns", sw)
        ip(sw, "link", "set", port, "master", "br0", "up")
        ip(ns, "addr", "add", f"{address}/24", "dev", NODE_IFACE)
        ip(ns, "link", "set", NODE_IFACE, "up")
        ip(ns, "link", "set", "lo", "up")

    attach(lab.client_ns, "client", lab.client_address)
    sysctl(lab.client_ns, "net.ipv4.conf.all.accept_redirects", 0)
    for name, n in lab.nodes.items():
        attach(n["ns"], f"n-{name}"[:15], n["address"])
        for key, value in (
            ("net.ipv4.ip_forward", 1),
            ("net.ipv4.conf.all.send_redirects", 0),
            (f"net.ipv4.conf.{NODE_IFACE}.send_redirects", 0),
            ("net.ipv4.conf.all.rp_filter", 0),
            ("net.ipv4.conf.default.rp_filter", 0),
            ("net.ipv4.ip_local_port_range", _local_port_range(spec)),
        ):
            sysctl(n["ns"], key, value)
    for i, pod in enumerate(lab.pods):
        if pod.host:
            continue
        node_ns = lab.node_ns(pod.node)
        veth = f"veth{i}"
        ip(pod.ns, "link", "add", NODE_IFACE, "type", "veth", "peer", "name", veth, "netns", node_ns)
        ip(pod.ns, "addr", "add", f"{pod.address}/32", "dev", NODE_IFACE)
        ip(pod.ns, "link", "set", NODE_IFACE, "up")
        ip(pod.ns, "link", "set", "lo", "up")
        ip(pod.ns, "route", "add", "default", "dev", NODE_IFACE)
        ip(node_ns, "link", "set", veth, "up")
        sysctl(node_ns, f"net.ipv4.conf.{veth}.proxy_arp", 1)
        sysctl(node_ns, f"net.ipv4.conf.{veth}.rp_filter", 0)
        ip(node_ns, "route", "add", f"{pod.address}/32", "dev", veth)
        for other, n in lab.nodes.items():
            if other != pod.node:
                ip(n["ns"], "route", "add", f"{pod.address}/32", "via", lab.nodes[pod.node]["address"])
    # A node reaches a ClusterIP out of its interface, where to_netdev translates it; so it
    # does the hairpin address (its flows to its own pods are SNATed to it, and the pods'
    # replies must cross the interface to be translated back).
    for name, n in lab.nodes.items():
        mac = json.loads(ip(n["ns"], "-j", "link", "show", NODE_IFACE).stdout)[0]["address"]
        addresses = [str(svc.cluster_ip) for svc in spec.services if svc.cluster_ip is not None]
        for address in [HAIRPIN_ADDRESS, *addresses]:
            ip(n["ns"], "route", "replace", f"{address}/32", "dev", NODE_IFACE)
            ip(n["ns"], "neigh", "replace", address, "lladdr", mac, "dev", NODE_IFACE, "nud", "permanent")
    # The network routes external and load balancer IPs to a node (the first one).
    first = lab.nodes[spec.nodes[0].name]["address"]
    for address in sorted({str(a) for svc in spec.services for a in (*svc.external_ips, *svc.load_balancer_ips)}):
        ip(lab.client_ns, "route", "replace", f"{address}/32", "via", first)
    for pod in lab.pods:
        _start_server(pod)
        lab.save()  # its pid, for down


def _start_server(pod: Pod) -> None:
    args = [sys.executable, "-m", "bpfgen.labnet", "serve", "--log", pod.log, "--bind", pod.address]
    args += [a for p in pod.tcp for a in ("--tcp", str(p))] + [a for p in pod.udp for a in ("--udp", str(p))]
    Path(pod.log).unlink(missing_ok=True)
    # The pod's log holds client addresses: root's alone, a new file (never through a link).
    os.close(os.open(pod.log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{pod.ns}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    pod.pid = proc.pid
    line = proc.stdout.readline().decode().strip() if proc.stdout else ""
    if line != "ready":
        raise LabError(f"the server of {pod.name} did not start: {line or 'no output'}")


def _down_after(prefix: str, failure: BaseException) -> None:
    """Take the lab down after failure; what that could not do is noted on failure."""
    try:
        down(prefix)
    except BpfgenError as cleanup:
        failure.add_note(f"and taking the lab down failed: {cleanup}")


def down(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove everything lab `prefix` made; returns the namespaces removed. What could
    not be removed is an error naming it (the record stays, so down can be run again)."""
    check_privileges()
    lab = Lab.load(prefix)
    if lab is None:
        raise UsageError(f"no lab '{prefix}' is up")
    for pod in lab.pods:
        _stop_server(pod)
        Path(pod.log).unlink(missing_ok=True)
    problems = _unload_nodes(lab)
    existing = set(run("ip", "netns", "list").stdout.split())
    removed = []
    for ns in lab.namespaces:
        if ns in existing:
            proc = run("ip", "netns", "del", ns, check=False)
            if proc.returncode == 0:
                removed.append(ns)
            else:
                problems.append(f"namespace {ns}: {proc.stderr.strip()}")
    if problems:
        raise LabError(f"lab {prefix} is only partly down: " + "; ".join(problems))
    Lab.record_path(prefix).unlink(missing_ok=True)
    return removed


def _stop_server(pod: Pod) -> None:
    """Stop a pod's server: only a process that still is one (the record may be stale)."""
    try:
        cmdline = Path(f"/proc/{pod.pid}/cmdline").read_bytes()
    except OSError:
        return
    if pod.pid and b"bpfgen.labnet" in cmdline:
        try:
            os.killpg(pod.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _unload_nodes(lab: Lab) -> list[str]:
    """Unload bpfgen from the lab's nodes (pins live in the shared bpffs, not in the
    namespaces); returns what failed."""
    from .loader import unload
    from .state import NodeRecord

    problems = []
    for r in NodeRecord.all():
        if r.netns in {n["ns"] for n in lab.nodes.values()}:
            try:
                unload(r.iface, node=r.node, netns=r.netns)
            except BpfgenError as e:
                problems.append(f"unload of node {r.node}: {e}")
    return problems


def client_request(lab: Lab, proto: str, host: str, port: int) -> dict:
    """One request from the lab's client, in its namespace."""
    proc = run(
        "nsenter", f"--net=/run/netns/{lab.client_ns}", sys.executable, "-m", "bpfgen.labnet", "request",
        proto, host, str(port), check=False,
    )
    if proc.returncode != 0:
        raise LabError(f"{proto} request from the client to {host}:{port} failed: {proc.stderr.strip()}")
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise LabError(f"{proto} request from the client to {host}:{port}: unreadable answer {proc.stdout!r}") from None


def pod_log(pod: Pod) -> list[dict]:
    try:
        return [json.loads(line) for line in Path(pod.log).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def demo(spec_path: str | Path | None = None, prefix: str = DEFAULT_PREFIX, keep: bool = False,
         out_dir: str | Path | None = None) -> dict:
    """The walk end to end: lab up, compile, load on every node, requests from the client
    to a NodePort on a node whose backend is remote; returns what each step showed."""
    from . import views
    from .build import compile_spec
    from .loader import load

    path = str(spec_path or DEFAULT_SPEC)
    spec = load_spec(path)
    svc = next((s for s in spec.services if s.type == "NodePort" and s.backends), None)
    if svc is None:
        raise UsageError(f"{path}: the demo needs a NodePort service with a backend")
    hosts = {b.node for b in svc.backends}
    node = next((n for n in spec.nodes if n.name not in hosts), spec.nodes[0])
    lab = Lab.load(prefix)
    owned = lab is None
    if lab is None:
        lab = up(path, prefix)
    elif Path(lab.spec).resolve() != Path(path).resolve():
        raise UsageError(f"lab '{prefix}' is up for {lab.spec}, not {path}; `bpfgen lab down --prefix {prefix}` first")
    try:
        build = compile_spec(path, out_dir)
        loaded = [load(NODE_IFACE, build=build.dir, netns=lab.node_ns(n.name)).node for n in spec.nodes]
        requests = [client_request(lab, p.protocol, str(node.address), p.node_port) for p in svc.ports]
        report = {
            "spec": path,
            "build": str(build.dir),
            "loaded": loaded,
            "node": node.name,
            "requests": requests,
            "services": views.service_list(node.name),
            "conntrack": views.ct_list(node.name),
            "nat": views.nat_list(node.name),
            "pods": {p.name: {"address": p.address, "node": p.node, "saw": pod_log(p)} for p in lab.pods},
            "kept": not owned or keep,
        }
    except BaseException as e:
        if owned and not keep:
            _down_after(prefix, e)
        raise
    if owned and not keep:
        down(prefix)
    return report
