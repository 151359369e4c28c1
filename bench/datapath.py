#!/usr/bin/env python3
"""Per-packet cost of the NodePort datapath, measured with BPF_PROG_TEST_RUN.

Loads node0 of examples/seed.yaml (its backend is remote: DNAT + SNAT + fib redirect)
in a private network namespace and pin dir, and times from_netdev on: a packet that
is not for a service, the first packet of a new NodePort flow, a packet of an
established flow, and a reply; and an empty tc program as the floor. Run as root:

    python3 bench/datapath.py [--repeat N] [--flows N]
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bpfgen import libbpf as bpf  # noqa: E402
from bpfgen import layout  # noqa: E402
from bpfgen.build import compile_object, compile_spec  # noqa: E402
from bpfgen.loader import desired_entries, sync_map, SERVICE_MAPS  # noqa: E402
from bpfgen.netns import enter_netns  # noqa: E402
from tests.packets import ACK, SYN, tcp  # noqa: E402

CLIENT, NODE0, NODE1, POD = "172.26.50.180", "172.26.50.101", "172.26.50.102", "10.0.1.72"
NODEPORT = 30645


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def per_packet(prog_fd: int, packet: bytes, repeat: int) -> float:
    return bpf.prog_test_run(prog_fd, packet, repeat=repeat).duration_ns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200_000, help="runs per steady-state case")
    parser.add_argument("--flows", type=int, default=3000, help="new flows timed (one run each)")
    args = parser.parse_args()

    ns = f"bgb-{secrets.token_hex(3)}"
    pins = Path("/sys/fs/bpf") / f"bpfgen-bench-{ns}"
    tmp = Path(tempfile.mkdtemp(prefix="bpfgen-bench-"))
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        sh("ip", "-n", ns, "addr", "add", f"{NODE0}/24", "dev", "eth0")
        for dev in ("eth0", "peer0", "lo"):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        for addr in (NODE1, CLIENT):
            sh("ip", "-n", ns, "neigh", "replace", addr, "lladdr", "02:00:00:00:00:09", "dev", "eth0", "nud", "permanent")
        sh("ip", "-n", ns, "route", "add", "10.0.1.0/24", "via", NODE1)
        sh("nsenter", f"--net=/run/netns/{ns}", "sysctl", "-qw", "net.ipv4.ip_forward=1")

        build = compile_spec(REPO / "examples" / "seed.yaml", tmp / "build")
        spec = build.spec()
        compile_object_path = tmp / "empty.bpf.c"
        compile_object_path.write_text((REPO / "bench" / "empty.bpf.c").read_text())
        compile_object(compile_object_path, tmp / "empty.bpf.o")
        pins.mkdir(parents=True)
        with enter_netns(ns), bpf.BpfObject.open(build.object_path("node0"), pin_root_path=pins) as obj, \
                bpf.BpfObject.open(tmp / "empty.bpf.o") as empty:
            obj.load()
            empty.load()
            maps = {n: obj.map(n).map_fd() for n in SERVICE_MAPS}
            want = desired_entries(spec, spec.node("node0"), maps)
            for n, m in maps.items():
                sync_map(m, want[n], dict(m.items()), masters_last=n == "svc_v4")
            prog = obj.program("from_netdev").fd

            results = {}
            floor_packet = tcp(CLIENT, 40000, NODE0, 22, ACK)
            results["empty tc program (floor)"] = per_packet(empty.program("empty").fd, floor_packet, args.repeat)
            # A new flow can only be timed one run at a time (the second run finds the
            # flow); one run carries the harness's timer cost, so that is subtracted.
            single = [per_packet(empty.program("empty").fd, floor_packet, 1) for _ in range(args.flows)]
            single_overhead = sum(single) / len(single) - results["empty tc program (floor)"]
            per_packet(prog, floor_packet, args.repeat)  # warm up
            results["not for a service (to the node)"] = per_packet(prog, tcp(CLIENT, 40000, NODE0, 22, ACK), args.repeat)
            results["not for a service (passing by)"] = per_packet(prog, tcp(CLIENT, 40000, "172.26.50.99", 80, ACK), args.repeat)
            # New flows: distinct client ports below snatPortRange, so SNAT allocates a port too.
            firsts = [per_packet(prog, tcp(CLIENT, 1024 + i, NODE0, NODEPORT, SYN), 1) for i in range(args.flows)]
            results["first packet of a new NodePort flow"] = sum(firsts) / len(firsts) - single_overhead
            results["established flow"] = per_packet(prog, tcp(CLIENT, 1024, NODE0, NODEPORT, ACK), args.repeat)
            ct = maps_ct(obj)
            snat_port = ct_snat_port(ct, 1024)
            results["reply (reverse SNAT + reverse DNAT)"] = per_packet(prog, tcp(POD, 80, NODE0, snat_port, ACK), args.repeat)
            for m in maps.values():
                m.close()
            ct.close()
    finally:
        sh("ip", "netns", "del", ns)
        subprocess.run(["rm", "-rf", str(pins), str(tmp)])

    floor = results["empty tc program (floor)"]
    print(f"{'case':<40}{'ns/packet':>10}{'x floor':>9}")
    for case, ns_per in results.items():
        print(f"{case:<40}{ns_per:>10.0f}{ns_per / floor:>9.1f}")
    return 0


def maps_ct(obj: bpf.BpfObject) -> bpf.MapFd:
    return obj.map("ct_v4").map_fd()


def ct_snat_port(ct: bpf.MapFd, client_port: int) -> int:
    for k, v in ct.items():
        t = layout.TUPLE.unpack(k)
        if t["sport"] == client_port and t["dir"] == layout.FLAGS["CT_SERVICE"]:
            return layout.CT_ENTRY.unpack(v)["snat_port"]
    raise SystemExit("the timed flow has no conntrack entry")


if __name__ == "__main__":
    sys.exit(main())
