#!/usr/bin/env python3
"""Control-plane cost of bpfgen against kube-proxy's iptables and nftables rules.

Generates one cluster (N NodePort services with a clusterIP, M backends each, spread
over K nodes) and times, as whole subprocesses (wall time, CPU time and peak RSS from
wait4), R times interleaved with fresh namespaces and pins each time:

  compile          bpfgen compile SPEC -o BUILD
  fresh load       bpfgen load of node0 into a scratch network namespace (veth eth0)
  update compile   compile of the spec with one backend address changed, same BUILD
  update load      bpfgen load of that build over the loaded node (an update in place)
  update load, busy  with --conntrack N (default 500,000) live flows written into
                   node0's ct_v4 first, the load of the spec back to the first one: an
                   update that removes a backend scans conntrack (the ids live flows
                   hold are not handed out again; the removed backend's connections are
                   cleared), so this is its cost on a busy node
  unload           bpfgen unload
  iptables-restore kube-proxy's iptables-mode rules for the same services, as one
                   `iptables-restore --noflush --counters` input, in its own namespace
  nft -f           kube-proxy's nftables-mode transaction, in its own namespace

and, for reading only, the same iptables input with the legacy backend and (nft
backend) without --noflush, which iptables-nft 1.8.9 restores far faster: with
--noflush its time grows about quadratically (about 30 s for 2,000 x 10 here, so the
default size takes many minutes per run); and `bpfgen compile` of one service over
200 nodes against over 2 nodes.

Reading it: the table gives medians over the runs (peak RSS: the largest seen). A
process's peak RSS is the largest of it and the children it waited for (compile:
clang); about 10 MB is the floor (the launcher that spawns them). The ratios compare bpfgen with a full kube-proxy sync of the same services
(iptables-restore is what kube-proxy runs on every full sync); PASS/MISS are against
the targets and informational: the exit code is 0 unless a step failed.
The rules generated follow pkg/proxy/iptables/proxier.go and
pkg/proxy/nftables/proxier.go (Cluster traffic policy, a cluster CIDR local detector,
nodePortAddresses unset), and the iptables input also holds the ~14 jump rules from
the built-in chains that kube-proxy adds with separate iptables calls.

Run as root, after scripts/dev.sh (it installs iptables and nftables):

    .venv/bin/python bench/controlplane.py [--services N] [--backends M] [--nodes K] [--runs R]

Nothing is created in the root network namespace; every namespace (bcp-<hex>), pin
dir (/sys/fs/bpf/bpfgen-bench-<hex>-<run>) and the temp dir are removed at the end,
also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BPFGEN = REPO / ".venv" / "bin" / "bpfgen"
sys.path.insert(0, str(REPO))  # (bpfgen's layout and bindings, imported where the cluster's maps are written)
BPFFS = Path("/sys/fs/bpf")

NODE_NET = ipaddress.ip_network("172.26.0.0/16")   # node addresses: .0.1, .0.2, ...
POD_NET = ipaddress.ip_network("10.128.0.0/9")     # one podCIDR block per node; kube-proxy's cluster CIDR
SVC_NET = ipaddress.ip_network("10.96.0.0/12")     # clusterIPs
NAMESPACE, PORT_NAME, PORT, TARGET_PORT = "bench", "http", 80, 8080
MASQ_MARK = "0x004000"                              # kube-proxy's default masqueradeBit 14, "%#08x"


class StepFailed(Exception):
    pass


# ---------------------------------------------------------------- the cluster


@dataclass
class Service:
    name: str
    cluster_ip: str
    node_port: int
    backends: list[tuple[str, str]]  # (pod address, node name)


@dataclass
class Cluster:
    nodes: list[tuple[str, str, str]]  # (name, address, podCIDR)
    services: list[Service]
    node_port_range: tuple[int, int]
    spare: list[str]  # per node, an unused pod address (for the one-backend update)


def make_cluster(n_services: int, n_backends: int, n_nodes: int) -> Cluster:
    per_node = -(-n_services * n_backends // n_nodes) + 1  # +1: the update's new address
    host_bits = max(8, (per_node + 1).bit_length())
    if n_nodes << host_bits > POD_NET.num_addresses or n_nodes > NODE_NET.num_addresses - 2:
        sys.exit(f"controlplane: {n_nodes} nodes x {per_node} pods do not fit in {POD_NET}")
    if n_services > min(SVC_NET.num_addresses - 2, 30000):
        sys.exit("controlplane: too many services for the clusterIP and nodePort ranges")
    blocks = [POD_NET.network_address + (i << host_bits) for i in range(n_nodes)]
    nodes = [(f"node{i}", str(NODE_NET.network_address + i + 1), f"{blocks[i]}/{32 - host_bits}")
             for i in range(n_nodes)]
    used = [0] * n_nodes
    services = []
    for s in range(n_services):
        backends = []
        for j in range(n_backends):
            k = (s * n_backends + j) % n_nodes
            used[k] += 1
            backends.append((str(blocks[k] + used[k]), nodes[k][0]))
        services.append(Service(f"svc-{s}", str(SVC_NET.network_address + s + 1), 30000 + s, backends))
    high = 32767 if n_services <= 2768 else max(45000, 30000 + n_services - 1)
    spare = [str(blocks[k] + used[k] + 1) for k in range(n_nodes)]
    return Cluster(nodes, services, (30000, high), spare)


def spec_json(c: Cluster, name: str) -> str:
    lo, hi = c.node_port_range
    doc = {
        "apiVersion": "bpfgen/v1",
        "kind": "ServiceSpec",
        "metadata": {"name": name},
        "cluster": {"nodePortRange": f"{lo}-{hi}", "snatPortRange": f"{hi + 1}-65535"},
        "nodes": [{"name": n, "address": a, "podCIDR": p} for n, a, p in c.nodes],
        "services": [{
            "name": s.name, "namespace": NAMESPACE, "type": "NodePort", "clusterIP": s.cluster_ip,
            "ports": [{"name": PORT_NAME, "protocol": "TCP", "port": PORT, "targetPort": TARGET_PORT,
                       "nodePort": s.node_port}],
            "backends": [{"address": a, "node": n} for a, n in s.backends],
        } for s in c.services],
    }
    return json.dumps(doc, separators=(",", ":"))


def one_backend_changed(c: Cluster) -> tuple[Cluster, str]:
    """The cluster with backend 0 of the middle service moved to a fresh pod address."""
    i = len(c.services) // 2
    s = c.services[i]
    addr, node = s.backends[0]
    k = next(n for n, (name, _, _) in enumerate(c.nodes) if name == node)
    changed = Service(s.name, s.cluster_ip, s.node_port, [(c.spare[k], node)] + s.backends[1:])
    what = f"{NAMESPACE}/{s.name} backend {addr} -> {c.spare[k]}"
    return Cluster(c.nodes, c.services[:i] + [changed] + c.services[i + 1:], c.node_port_range, c.spare), what


# ---------------------------------------------------------------- kube-proxy's rules


def b32sha(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()


def iptables_rules(c: Cluster) -> tuple[str, dict[str, int]]:
    """What kube-proxy's iptables proxier restores on a full sync (iptables/proxier.go)."""
    cidr = str(POD_NET)
    large = sum(len(s.backends) for s in c.services) > 1000  # largeClusterEndpointsThreshold
    f_chains = ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
                "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL"]
    f_rules = [
        '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 '
        "! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
        "--ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    n_chains = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
    n_rules = [
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}",
    ]
    for s in c.services:
        spn = f"{NAMESPACE}/{s.name}:{PORT_NAME}"
        h = b32sha(spn + "tcp")[:16]
        svc, ext = f"KUBE-SVC-{h}", f"KUBE-EXT-{h}"
        match = f"-m tcp -p tcp -d {s.cluster_ip} --dport {PORT}"
        n_rules.append(f'-A KUBE-SERVICES -m comment --comment "{spn} cluster IP" {match} -j {svc}')
        n_rules.append(f"-A KUBE-NODEPORTS -m comment --comment {spn} -m tcp -p tcp --dport {s.node_port} -j {ext}")
        n_chains += [ext, svc]
        n_rules.append(f'-A {ext} -m comment --comment "masquerade traffic for {spn} external destinations" -j KUBE-MARK-MASQ')
        n_rules.append(f"-A {ext} -j {svc}")
        n_rules.append(f'-A {svc} -m comment --comment "{spn} cluster IP" {match} ! -s {cidr} -j KUBE-MARK-MASQ')
        seps = [(f"KUBE-SEP-{b32sha(spn + 'tcp' + f'{a}:{TARGET_PORT}')[:16]}", a) for a, _ in s.backends]
        for i, (sep, a) in enumerate(seps):
            comment = "" if large else f' -m comment --comment "{spn} -> {a}:{TARGET_PORT}"'
            left = len(seps) - i
            prob = f" -m statistic --mode random --probability {1 / left:0.10f}" if left > 1 else ""
            n_rules.append(f"-A {svc}{comment}{prob} -j {sep}")
        for sep, a in seps:
            n_chains.append(sep)
            comment = "" if large else f" -m comment --comment {spn}"
            n_rules.append(f"-A {sep}{comment} -s {a} -j KUBE-MARK-MASQ")
            n_rules.append(f"-A {sep}{comment} -m tcp -p tcp -j DNAT --to-destination {a}:{TARGET_PORT}")
    n_rules.append('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the '
                   'last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    # The jumps from the built-in chains (iptablesJumpChains, iptablesKubeletJumpChains);
    # kube-proxy ensures these with one iptables call each on a full sync.
    new = "-m conntrack --ctstate NEW "
    f_jumps = [("INPUT", new, "kubernetes externally-visible service portals", "KUBE-EXTERNAL-SERVICES"),
               ("FORWARD", new, "kubernetes externally-visible service portals", "KUBE-EXTERNAL-SERVICES"),
               ("INPUT", "", "kubernetes health check service ports", "KUBE-NODEPORTS"),
               ("FORWARD", new, "kubernetes service portals", "KUBE-SERVICES"),
               ("OUTPUT", new, "kubernetes service portals", "KUBE-SERVICES"),
               ("FORWARD", "", "kubernetes forwarding rules", "KUBE-FORWARD"),
               ("INPUT", new, "kubernetes load balancer firewall", "KUBE-PROXY-FIREWALL"),
               ("OUTPUT", new, "kubernetes load balancer firewall", "KUBE-PROXY-FIREWALL"),
               ("FORWARD", new, "kubernetes load balancer firewall", "KUBE-PROXY-FIREWALL"),
               ("INPUT", "", "", "KUBE-FIREWALL"), ("OUTPUT", "", "", "KUBE-FIREWALL")]
    n_jumps = [("OUTPUT", "", "kubernetes service portals", "KUBE-SERVICES"),
               ("PREROUTING", "", "kubernetes service portals", "KUBE-SERVICES"),
               ("POSTROUTING", "", "kubernetes postrouting rules", "KUBE-POSTROUTING")]

    def jumps(rows: list) -> list[str]:
        return [f"-A {src} {extra}" + (f'-m comment --comment "{cm}" ' if cm else "") + f"-j {dst}"
                for src, extra, cm, dst in rows]

    text = "\n".join(["*filter", *(f":{ch} - [0:0]" for ch in f_chains), *f_rules, *jumps(f_jumps), "COMMIT",
                      "*nat", *(f":{ch} - [0:0]" for ch in n_chains), *n_rules, *jumps(n_jumps), "COMMIT", ""])
    counts = {"nat rules": len(n_rules), "filter rules": len(f_rules), "jump rules": len(f_jumps) + len(n_jumps),
              "chains": len(f_chains) + len(n_chains)}
    return text, counts


def nft_rules(c: Cluster) -> tuple[str, dict[str, int]]:
    """kube-proxy's nftables transaction on a full sync (nftables/proxier.go, knftables syntax)."""
    t = "ip kube-proxy"
    out = [f'add table {t} {{ comment "rules for kube-proxy" ; }}']
    rules = elements = chains = 0

    def chain(name: str, base: str = "") -> None:
        nonlocal chains
        chains += 1
        out.append(f"add chain {t} {name}" + (f" {{ {base} ; }}" if base else ""))
        out.append(f"flush chain {t} {name}")

    def rule(ch: str, body: str) -> None:
        nonlocal rules
        rules += 1
        out.append(f"add rule {t} {ch} {body}")

    def element(m: str, body: str) -> None:
        nonlocal elements
        elements += 1
        out.append(f"add element {t} {m} {{ {body} }}")

    for name, kind, hook, prio in [("filter-prerouting", "filter", "prerouting", -110),
                                   ("filter-input", "filter", "input", -110),
                                   ("filter-forward", "filter", "forward", -110),
                                   ("filter-output", "filter", "output", -110),
                                   ("nat-prerouting", "nat", "prerouting", -100),
                                   ("nat-output", "nat", "output", -100),
                                   ("nat-postrouting", "nat", "postrouting", 100)]:
        chain(name, f"type {kind} hook {hook} priority {prio}")
    made = set()
    for dst, src, extra in [("endpoints-check", "filter-input", "ct state new "),
                            ("endpoints-check", "filter-forward", "ct state new "),
                            ("endpoints-check", "filter-output", "ct state new "),
                            ("firewall-check", "filter-prerouting", "ct state new "),
                            ("firewall-check", "filter-output", "ct state new "),
                            ("services", "nat-output", ""), ("services", "nat-prerouting", ""),
                            ("masquerading", "nat-postrouting", "")]:
        if dst not in made:
            chain(dst)
            made.add(dst)
        rule(src, f"{extra}jump {dst}")
    chain("mark-for-masquerade")
    rule("mark-for-masquerade", f"mark set mark or {MASQ_MARK}")
    rule("masquerading", f"mark and {MASQ_MARK} == 0 return")
    rule("masquerading", f"mark set mark xor {MASQ_MARK}")
    rule("masquerading", "masquerade fully-random")
    key3, key2 = "ipv4_addr . inet_proto . inet_service : verdict", "inet_proto . inet_service : verdict"
    for name, key, comment in [
            ("no-endpoint-services", key3, "vmap to drop or reject packets to services with no endpoints"),
            ("no-endpoint-nodeports", key2, "vmap to drop or reject packets to service nodeports with no endpoints"),
            ("firewall-ips", key3, "destinations that are subject to LoadBalancerSourceRanges"),
            ("service-ips", key3, "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
            ("service-nodeports", key2, "NodePort traffic")]:
        out.append(f'add map {t} {name} {{ type {key} ; comment "{comment}" ; }}')
        out.append(f"flush map {t} {name}")
    chains += 1
    out.append(f'add chain {t} reject-chain {{ comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }}')
    out.append(f"flush chain {t} reject-chain")
    rule("reject-chain", "reject")
    rule("endpoints-check", "ip daddr . meta l4proto . th dport vmap @no-endpoint-services")
    rule("endpoints-check", "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports")
    rule("firewall-check", "ip daddr . meta l4proto . th dport vmap @firewall-ips")
    rule("services", "ip daddr . meta l4proto . th dport vmap @service-ips")
    rule("services", "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports")

    def base(name: str) -> str:  # hashAndTruncate
        return f"{b32sha(name)[:8]}-{name}"

    for s in c.services:
        spn = f"{NAMESPACE}/{s.name}/tcp/{PORT_NAME}"
        svc, ext = f"service-{base(spn)}", f"external-{base(spn)}"
        eps = [(f"endpoint-{base(f'{spn}__{a}/{TARGET_PORT}')}", a) for a, _ in s.backends]
        for ep, _ in eps:
            chain(ep)
        chain(svc)
        chain(ext)
        element("service-ips", f"{s.cluster_ip} . tcp . {PORT} : goto {svc}")
        element("service-nodeports", f"tcp . {s.node_port} : goto {ext}")
        rule(svc, f"ip daddr {s.cluster_ip} tcp dport {PORT} ip saddr != {POD_NET} jump mark-for-masquerade")
        rule(ext, "jump mark-for-masquerade")
        rule(ext, f"goto {svc}")
        vmap = " , ".join(f"{i} : goto {ep}" for i, (ep, _) in enumerate(eps))
        rule(svc, f"numgen random mod {len(eps)} vmap {{ {vmap} }}")
        for ep, a in eps:
            rule(ep, f"ip saddr {a} jump mark-for-masquerade")
            rule(ep, f"meta l4proto tcp dnat to {a}:{TARGET_PORT}")
    return "\n".join(out) + "\n", {"rules": rules, "map elements": elements, "chains": chains}


# ---------------------------------------------------------------- processes and namespaces


@dataclass
class Sample:
    wall: float
    cpu: float
    rss_mb: float
    stderr: str


# The timed processes are started by this small launcher, started before anything big is
# generated: a child's ru_maxrss counts the memory of the process it was spawned from (the
# kernel keeps the old mm's high-water mark across exec), so spawning from the benchmark
# itself would add the generated rules to every figure. The floor is the launcher's RSS.
LAUNCHER = """
import json, os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the benchmark's to handle
for line in sys.stdin:
    argv, env, stdin, out, err = json.loads(line)
    fds = [(os.POSIX_SPAWN_OPEN, 0, stdin or os.devnull, os.O_RDONLY, 0),
           (os.POSIX_SPAWN_OPEN, 1, out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
           (os.POSIX_SPAWN_OPEN, 2, err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)]
    start = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, env, file_actions=fds, setsigdef=(signal.SIGINT,))
    print(pid, flush=True)
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    print(json.dumps([wall, os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime, ru.ru_maxrss]), flush=True)
"""


class Bench:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.netns: list[str] = []
        self.pins: list[Path] = []
        self.child = 0  # the timed process while it runs
        self.launcher = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER], text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, label: str, argv: list[str], env: dict | None = None, stdin: Path | None = None) -> Sample:
        """Run argv to its end; its wall time, CPU time and peak RSS (wait4, in the launcher)."""
        out, err = self.tmp / "stdout", self.tmp / "stderr"
        job = [argv, dict(env or os.environ), str(stdin) if stdin else None, str(out), str(err)]
        self.launcher.stdin.write(json.dumps(job) + "\n")
        self.launcher.stdin.flush()
        self.child = int(self.launcher.stdout.readline())
        wall, code, cpu, rss_kb = json.loads(self.launcher.stdout.readline())
        self.child = 0
        text = err.read_text(errors="replace")
        if code != 0:
            raise StepFailed(f"{label} failed (exit {code}): {' '.join(argv)}\n"
                             f"{text}{out.read_text(errors='replace')[-2000:]}")
        return Sample(wall, cpu, rss_kb / 1024, text)

    def new_netns(self) -> str:
        name = f"bcp-{secrets.token_hex(4)}"
        sh("ip", "netns", "add", name)
        self.netns.append(name)
        return name

    def del_netns(self, name: str) -> None:
        sh("ip", "netns", "del", name)
        self.netns.remove(name)

    def node_netns(self, address: str, snat: str) -> str:
        """A namespace holding node0's interface: eth0 <-> peer0, eth0 with the node's address,
        the SNAT ports reserved (else load warns that the node's own sockets may take them)."""
        ns = self.new_netns()
        sh("nsenter", f"--net=/run/netns/{ns}", "sysctl", "-qw", f"net.ipv4.ip_local_reserved_ports={snat}")
        sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        sh("ip", "-n", ns, "addr", "add", f"{address}/{NODE_NET.prefixlen}", "dev", "eth0")
        for dev in ("lo", "eth0", "peer0"):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        return ns

    def cleanup(self) -> list[str]:
        problems = []
        if self.child:  # interrupted while a timed process ran: stop it (the launcher reaps it)
            try:
                os.kill(self.child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.launcher.kill()
        self.launcher.wait()
        for ns in list(self.netns):
            try:
                self.del_netns(ns)
            except subprocess.CalledProcessError as e:
                problems.append(f"namespace {ns}: {e.stderr.decode().strip()}")
        for p in self.pins:
            try:
                shutil.rmtree(p, ignore_errors=False) if p.exists() else None
            except OSError as e:
                problems.append(f"pin dir {p}: {e}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


def _ct_capacity() -> int:
    """ct_v4's size with the default capacity settings."""
    from bpfgen.render import default_capacity, map_sizes

    return map_sizes(default_capacity())["ct_v4"]


CT_CAPACITY = _ct_capacity()


def fill_conntrack(pins: Path, count: int, backends: int, node_addr: str) -> None:
    """count live established flows in the node's ct_v4 (client 192.0.0.0/8 to the node's
    NodePort 30000, spread over the backend ids): forward entries alone, enough for the
    update's two scans, which are what this measures (it clears the few of the backend it
    removes)."""
    from bpfgen import layout
    from bpfgen import libbpf as bpf

    expires = layout.datapath_now() + 6 * 3600
    ct_service, established = layout.FLAGS["CT_SERVICE"], layout.FLAGS["CT_ESTABLISHED"]
    with bpf.MapFd.from_pin(pins / "ct_v4") as ct:
        for start in range(0, count, 65536):
            ids = range(start, min(count, start + 65536))
            keys = [layout.TUPLE.pack(saddr=ipaddress.IPv4Address(0xC0000000 + i), daddr=node_addr,
                                      sport=1024 + i % 60000, dport=30000, proto=6, dir=ct_service) for i in ids]
            values = [layout.CT_ENTRY.pack(expires=expires, backend_id=1 + i % backends, rev_nat_id=1 + i % 1000,
                                           flags=established) for i in ids]
            ct.update_batch(keys, values)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def ensure_bpffs() -> str:
    with open("/proc/self/mounts") as f:
        if any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in f):
            return ""
    sh("mount", "-t", "bpf", "bpf", str(BPFFS))
    return f"mounted bpffs on {BPFFS} (left mounted)"


# ---------------------------------------------------------------- the benchmark


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--backends", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--conntrack", type=int, default=500000,
                    help="live flows in ct_v4 for the busy update (0: no such step)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("controlplane: run as root (namespaces, BPF, iptables)")
    for tool in ("ip", "nsenter", "iptables-restore", "nft"):
        if not shutil.which(tool):
            sys.exit(f"controlplane: {tool} not found (scripts/dev.sh installs it)")
    if not BPFGEN.exists():
        sys.exit(f"controlplane: {BPFGEN} missing (run scripts/dev.sh test first)")
    if args.nodes < 1 or args.services < 1 or args.backends < 1 or args.runs < 1:
        sys.exit("controlplane: sizes and runs must be >= 1")
    if not 0 <= args.conntrack <= CT_CAPACITY:
        sys.exit(f"controlplane: --conntrack takes 0 to {CT_CAPACITY} (ct_v4's default size)")

    # A SIGTERM unwinds like Ctrl-C, through the cleanup below.
    from bpfgen.errors import unwind_on_sigterm

    unwind_on_sigterm()
    tag = secrets.token_hex(4)
    bench = Bench(Path(tempfile.mkdtemp(prefix=f"bcp-{tag}-")))
    tmp = bench.tmp
    failed = None
    samples: dict[str, list[Sample]] = {}
    try:
        note = ensure_bpffs()
        # Every file before any timing.
        t0 = time.perf_counter()
        cluster = make_cluster(args.services, args.backends, args.nodes)
        changed, what = one_backend_changed(cluster)
        spec, spec2 = tmp / "spec.json", tmp / "spec-update.json"
        spec.write_text(spec_json(cluster, "bench-cp"))
        spec2.write_text(spec_json(changed, "bench-cp"))
        ipt_text, ipt_counts = iptables_rules(cluster)
        (tmp / "iptables.rules").write_text(ipt_text)
        nft_text, nft_counts = nft_rules(cluster)
        (tmp / "kube-proxy.nft").write_text(nft_text)
        wide = {}
        for k in (2, 200):
            wide[k] = tmp / f"spec-1x{k}.json"
            wide[k].write_text(spec_json(make_cluster(1, args.backends, k), f"bench-cp-{k}"))
        node0, node0_addr, _ = cluster.nodes[0]
        print(f"bpfgen control plane: {args.services} services x {args.backends} backends over {args.nodes} "
              f"nodes, {args.runs} run(s); files generated in {time.perf_counter() - t0:.1f} s")
        if note:
            print(note)
        ipt_backend = sh("iptables-restore", "--version").strip()
        print(f"iptables input: {sum(v for k, v in ipt_counts.items() if 'rules' in k)} rules "
              f"({', '.join(f'{v} {k}' for k, v in ipt_counts.items())}), "
              f"{len(ipt_text) / 1e6:.1f} MB; {ipt_backend}")
        print(f"nft input: {nft_counts['rules']} rules + {nft_counts['map elements']} map elements, "
              f"{nft_counts['chains']} chains, {len(nft_text) / 1e6:.1f} MB; {sh('nft', '--version').strip()}")
        print(f"update: {what}\n")

        def timed(label: str, argv: list[str], **kw) -> None:
            samples.setdefault(label, []).append(bench.run(label, argv, **kw))

        # kube-proxy's own invocations first (the targets are against the first); then, to
        # show the cost of the backend and of --noflush, the legacy backend and a flushing
        # restore (the same in an empty namespace).
        rules = tmp / "iptables.rules"
        kube_proxy = [("iptables-restore", ["iptables-restore", "-w", "5", "--noflush", "--counters"], rules),
                      ("nft -f", ["nft", "-f", str(tmp / "kube-proxy.nft")], None)]
        if "nf_tables" in ipt_backend:
            kube_proxy.append(("iptables-restore (flush)", ["iptables-restore", "-w", "5", "--counters"], rules))
        if shutil.which("iptables-legacy-restore") and "legacy" not in ipt_backend:
            kube_proxy.append(("iptables-legacy-restore", ["iptables-legacy-restore", "-w", "5", "--noflush",
                                                           "--counters"], rules))
        bg = str(BPFGEN)
        for r in range(args.runs):
            pins = BPFFS / f"bpfgen-bench-{tag}-{r}"
            bench.pins.append(pins)
            env = dict(os.environ, BPFGEN_PIN_ROOT=str(pins), BPFGEN_RUN_DIR=str(tmp / "run" / str(r)))
            build = tmp / f"build-{r}"
            ns = bench.node_netns(node0_addr, f"{cluster.node_port_range[1] + 1}-65535")
            node = ["--iface", "eth0", "--node", node0, "--netns", ns]
            timed("compile", [bg, "compile", str(spec), "-o", str(build)], env=env)
            timed("fresh load", [bg, "load", "--build", str(build), *node], env=env)
            timed("update compile", [bg, "compile", str(spec2), "-o", str(build)], env=env)
            timed("update load", [bg, "load", "--build", str(build), *node], env=env)
            if args.conntrack:
                sh(str(BPFGEN), "compile", str(spec), "-o", str(build))
                fill_conntrack(pins / node0, args.conntrack, args.services * args.backends, node0_addr)
                timed("update load, busy", [bg, "load", "--build", str(build), *node], env=env)
            timed("unload", [bg, "unload", *node], env=env)
            bench.del_netns(ns)
            shutil.rmtree(build)

            for label, argv, stdin in kube_proxy:
                ns = bench.new_netns()
                timed(label, ["nsenter", f"--net=/run/netns/{ns}", *argv], stdin=stdin)
                bench.del_netns(ns)

            for k in (2, 200):
                out = tmp / f"build-1x{k}"
                timed(f"compile 1 svc, {k} nodes", [bg, "compile", str(wide[k]), "-o", str(out)], env=env)
                shutil.rmtree(out)
            print(f"run {r + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1].wall:.2f} s" for k, v in samples.items()),
                  flush=True)
    except StepFailed as e:
        failed = str(e)
    except KeyboardInterrupt:
        failed = "interrupted"
    finally:
        problems = bench.cleanup()
    for p in problems:
        print(f"cleanup: {p}", file=sys.stderr)
    if failed:
        print(f"\ncontrolplane: {failed}", file=sys.stderr)
    if not samples:
        return 1

    med = {k: statistics.median(s.wall for s in v) for k, v in samples.items()}
    print(f"\n{'step':<26}{'wall s':>10}{'cpu s':>10}{'peak RSS MB':>13}  (medians of {args.runs})")
    for k, v in samples.items():
        print(f"{k:<26}{med[k]:>10.3f}{statistics.median(s.cpu for s in v):>10.3f}"
              f"{max(s.rss_mb for s in v):>13.1f}")

    rss = max(s.rss_mb for k, v in samples.items() for s in v if not k.startswith(("iptables", "nft")))
    # Targets against kube-proxy's own restore; the other baselines are for reading only.
    others = [k for k in med if k.startswith("iptables") and k != "iptables-restore"]
    baselines = [("iptables-restore", True), *[(min(others, key=med.get), False) for _ in others[:1]],
                 ("nft -f", False)]
    checks = [(f"{name} / {base}", med[step] / med[base], target if with_target else None)
              for step, name, target in (("fresh load", "fresh load", 0.1),
                                         ("update load", "one-backend update (load)", 0.05))
              for base, with_target in baselines if step in med and base in med]
    if "update load, busy" in med:
        checks.append((f"update load with {args.conntrack} flows / update load",
                       med["update load, busy"] / med["update load"], None))
    if "compile 1 svc, 200 nodes" in med:
        checks.append(("compile 200 nodes / compile 2 nodes",
                       med["compile 1 svc, 200 nodes"] / med["compile 1 svc, 2 nodes"], 1.2))
    print()
    for name, ratio, target in checks:
        verdict = "" if target is None else f"<= {target:<5} {'PASS' if ratio <= target else 'MISS'}"
        print(f"{name:<56}{ratio:>8.3f}  {verdict}")
    print(f"{'peak RSS of any bpfgen process (MB)':<56}{rss:>8.1f}  <= 300   {'PASS' if rss <= 300 else 'MISS'}")
    for step in ("update load", "update load, busy"):
        if step in samples:
            print(f"\nbpfgen load ({step}) said on stderr:")
            print("  " + (samples[step][-1].stderr.strip() or "(nothing)").replace("\n", "\n  "))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
