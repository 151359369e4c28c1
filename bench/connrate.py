"""Sustained connection rate through a NodePort to a remote backend, in the lab (issue 8).

    .venv/bin/python bench/connrate.py [--seconds 30] [--slice 5]

The lab of tests/specs/lab/snat-1000.yaml: the client reaches pod 10.0.1.72 (on node1)
through node0's NodePort 30645 (DNAT, SNAT to node0, reverse NAT), once with the default
snatPortRange and once with its 1000 ports. Each loop is connect, request, answer, close;
the pod answers and closes first. The same loop straight to the pod (client -> node1 ->
pod, no NAT: a route in the client's namespace) is interleaved with it in slices, so the
two arms see the same machine; the client (this process, plain sockets) and the server (a
single-threaded accept loop replacing the lab's server in the pod) are the same in both.
Run with one client address and with two (a second address on the client's interface,
taken in turn).

Then --sequential connections (100,000) in a row through the 1000-port range, once with
the pod closing first and once with the client closing first (the lab's own server, which
waits for the client's FIN), with their failed and slowest connects.

A third arm, half as long, reaches a second address of the pod routed through node0 both
ways by plain kernel forwarding (no NAT): the cost of the hops the NodePort path adds,
apart from bpfgen's own. Prints connections/s of each arm, the ratio NAT / no NAT (the
target's), failed connects (none answered within 3 s, or an error) and the slowest
connect. Targets: >= 0.9x, zero failed, no
connect slower than 0.5 s. Needs root; everything lives in the lab's namespaces.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bpfgen.errors import unwind_on_sigterm  # noqa: E402
from bpfgen.labnet import read_line  # noqa: E402

SPEC = REPO / "tests" / "specs" / "lab" / "snat-1000.yaml"
NODE0, NODE1, POD, NODEPORT = "172.26.50.101", "172.26.50.102", "10.0.1.72", 30645
SECOND_CLIENT = "172.26.50.181"
# A second address of the pod, routed by the client through node0 and on to node1, its
# replies back the same way, by plain kernel forwarding (no NAT, nothing for bpfgen to
# do): the hops the NAT path adds, measured apart (the target's reference stays the loop
# straight to the pod).
VIA_NODE0 = "10.0.1.73"
SLOW = 0.5
SEQUENTIAL_DEADLINE = 120.0  # seconds: a stalling datapath would take hours for 100k

SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 80))
s.listen(4096)
print("ready", flush=True)
reply = b'{"proto": "TCP"}\n'
while True:
    c, _ = s.accept()
    try:
        c.settimeout(5)
        c.recv(4096)
        c.sendall(reply)
    except OSError:
        pass
    c.close()  # the pod closes first
"""


def _connection(host: str, port: int, source: str = "", client_closes: bool = False) -> float:
    """One connect/request/answer/close (the caller is in the client's namespace): how long
    the connect took. With client_closes the lab's server echoes after its answer until the
    client closes; else the pod closes first. OSError if it failed."""
    with socket.socket() as s:
        s.settimeout(3)
        if source:
            s.bind((source, 0))
        t = time.monotonic()
        s.connect((host, port))
        took = time.monotonic() - t
        if client_closes:
            s.sendall(b"echo\n")
            read_line(s)
        else:
            s.sendall(b"hi\n")
            while s.recv(4096):
                pass
    return took


def _loops(connections, keep_going) -> dict:
    """Connections while keep_going(count so far): failed ones, the slowest connect."""
    done = failed = slow = 0
    worst = 0.0
    start = time.monotonic()
    while keep_going(done + failed, start):
        try:
            took = connections(done + failed)
        except OSError:
            failed += 1
            continue
        worst = max(worst, took)
        slow += took > SLOW
        done += 1
    return {"done": done, "failed": failed, "worst": worst, "slow": slow, "elapsed": time.monotonic() - start}


def loop(host: str, port: int, seconds: float, sources: tuple[str, ...]) -> dict:
    """connect/request/answer/close for seconds, from the source addresses in turn."""
    return _loops(lambda i: _connection(host, port, sources[i % len(sources)]),
                  lambda n, start: time.monotonic() < start + seconds)


def sequential(count: int, client_closes: bool) -> dict:
    """count connect/request/answer/close loops through the NodePort, without a deadline:
    failed connects and the slowest connect (the caller is in the client's namespace)."""
    return _loops(lambda i: _connection(NODE0, NODEPORT, client_closes=client_closes),
                  lambda n, start: n < count and time.monotonic() - start <= SEQUENTIAL_DEADLINE)


def merge(a: dict | None, b: dict) -> dict:
    if a is None:
        return dict(b)
    return {"done": a["done"] + b["done"], "failed": a["failed"] + b["failed"], "worst": max(a["worst"], b["worst"]),
            "slow": a["slow"] + b["slow"], "elapsed": a["elapsed"] + b["elapsed"]}


def run_config(name: str, spec: Path, seconds: float, slice_: float, tmp: Path, count: int = 0) -> list[tuple]:
    from bpfgen import lab as labmod
    from bpfgen.build import compile_spec
    from bpfgen.loader import load
    from bpfgen.netns import enter_netns

    prefix = f"r{secrets.token_hex(3)}"
    lab = labmod.up(spec, prefix)
    server = None
    rows = []
    try:
        build = compile_spec(spec, tmp / f"build-{prefix}")
        for node in lab.nodes:
            load("eth0", build=build.dir, netns=lab.node_ns(node))
        labmod.ip(lab.client_ns, "addr", "add", f"{SECOND_CLIENT}/24", "dev", "eth0")
        labmod.ip(lab.client_ns, "route", "add", f"{POD}/32", "via", NODE1)  # the no-NAT arm
        [pod] = lab.pods
        # the routed arm: client -> node0 -> node1 -> pod, replies straight back from node1
        labmod.ip(pod.ns, "addr", "add", f"{VIA_NODE0}/32", "dev", "eth0")
        labmod.ip(lab.node_ns("node1"), "route", "add", f"{VIA_NODE0}/32", "dev",
                  f"veth{lab.pods.index(pod)}")
        labmod.ip(lab.node_ns("node0"), "route", "add", f"{VIA_NODE0}/32", "via", NODE1)
        labmod.ip(lab.client_ns, "route", "add", f"{VIA_NODE0}/32", "via", NODE0)
        # its replies back through node0 too (as the NAT path's are): by their source
        labmod.ip(lab.node_ns("node1"), "rule", "add", "from", VIA_NODE0, "lookup", "100")
        for client in (lab.client_address, SECOND_CLIENT):
            labmod.ip(lab.node_ns("node1"), "route", "add", f"{client}/32", "via", NODE0, "table", "100")
        for conf in ("all", "eth0"):  # (node0 forwards out of the interface it got them on)
            labmod.sysctl(lab.node_ns("node0"), f"net.ipv4.conf.{conf}.send_redirects", 0)
        if count:  # with the lab's own server, which can wait for the client's FIN
            labmod.sysctl(lab.client_ns, "net.ipv4.tcp_tw_reuse", 1)  # the client's TIME_WAIT ports
            with enter_netns(lab.client_ns):
                sequential(3, False)
                for client_closes in (False, True):
                    r = sequential(count, client_closes)
                    print(f"{name:<22} {count} sequential, {'client' if client_closes else 'pod'} closes first: "
                          f"{r['done']} answered (of {count}) in {r['elapsed']:.0f} s ({r['done'] / r['elapsed']:.0f}/s), "
                          f"failed {r['failed']}, {r['slow']} connects over 0.5 s, slowest {r['worst'] * 1000:.0f} ms",
                          flush=True)
        labmod._stop_server(pod)
        time.sleep(0.3)
        server = subprocess.Popen(["nsenter", f"--net=/run/netns/{pod.ns}", sys.executable, "-c", SERVER, "0.0.0.0"],
                                  stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
        assert server.stdout.readline().strip() == b"ready"
        for clients, sources in (("one client", ("",)), ("two addresses", (lab.client_address, SECOND_CLIENT))):
            with enter_netns(lab.client_ns):
                loop(NODE0, NODEPORT, 0.3, sources)  # neighbours resolved
                loop(POD, 80, 0.3, sources)
                loop(VIA_NODE0, 80, 0.3, sources)
                nat = direct = routed = None
                left = seconds
                while left > 0:
                    step = min(slice_, left)
                    nat = merge(nat, loop(NODE0, NODEPORT, step, sources))
                    direct = merge(direct, loop(POD, 80, step, sources))
                    routed = merge(routed, loop(VIA_NODE0, 80, step / 2, sources))
                    left -= step
            rows.append((name, clients, nat, direct, routed))
            print_row(rows[-1])
            time.sleep(2)
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait()
        labmod.down(prefix)
    return rows


def print_row(row: tuple) -> None:
    name, clients, nat, direct, routed = row
    rate = nat["done"] / nat["elapsed"]
    base = direct["done"] / direct["elapsed"]
    hop = routed["done"] / routed["elapsed"]
    print(f"{name:<22} {clients:<14} NAT {rate:8.0f}/s  no NAT {base:8.0f}/s  ratio {rate / base:5.2f}x  "
          f"(routed through node0 {hop:.0f}/s: {hop / base:.2f}x of no NAT; NAT {rate / hop:.2f}x of it)  "
          f"failed {nat['failed']} (no NAT {direct['failed']})  slowest connect {nat['worst'] * 1000:.0f} ms "
          f"(no NAT {direct['worst'] * 1000:.0f} ms), {nat['slow']} over 0.5 s, {nat['done']} connections", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0, help="seconds of each arm (NAT and no NAT)")
    p.add_argument("--slice", type=float, default=5.0, help="seconds of one interleaved slice")
    p.add_argument("--sequential", type=int, default=100_000,
                   help="connections in a row through the 1000-port range, pod and client closing first (0: none)")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    unwind_on_sigterm()  # (a SIGTERM unwinds through the cleanup, like Ctrl-C)
    with tempfile.TemporaryDirectory(prefix="connrate-") as tmp_:
        tmp = Path(tmp_)
        os.environ.setdefault("BPFGEN_PIN_ROOT", f"/sys/fs/bpf/bpfgen-bench-{secrets.token_hex(4)}")
        os.environ.setdefault("BPFGEN_RUN_DIR", str(tmp / "run"))
        doc = yaml.safe_load(SPEC.read_text())
        del doc["cluster"]["snatPortRange"]
        default = tmp / "snat-default.yaml"
        default.write_text(yaml.safe_dump(doc, sort_keys=False))
        print(f"{args.seconds:.0f} s per arm, slices of {args.slice:.0f} s, NodePort {NODE0}:{NODEPORT} -> "
              f"pod {POD} on node1 (SNAT), against the same loop straight to the pod")
        try:
            for name, spec, count in (("default snatPortRange", default, 0),
                                      ("1000-port snatPortRange", SPEC, args.sequential)):
                run_config(name, spec, args.seconds, args.slice, tmp, count)
        finally:
            subprocess.run(["rm", "-rf", os.environ["BPFGEN_PIN_ROOT"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
