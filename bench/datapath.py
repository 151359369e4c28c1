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
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bpfgen import libbpf as bpf  # noqa: E402
from bpfgen import layout  # noqa: E402
from bpfgen.build import compile_object, compile_spec  # noqa: E402
from bpfgen.loader import SERVICE_MAPS, open_datapath, sync_service_maps  # noqa: E402
from bpfgen.netns import enter_netns  # noqa: E402
from tests.packets import ACK, SYN, tcp  # noqa: E402

CLIENT, NODE0, NODE1, POD = "172.26.50.180", "172.26.50.101", "172.26.50.102", "10.0.1.72"
NODEPORT = 30645


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def per_packet(prog_fd: int, packet: bytes, repeat: int) -> float:
    return bpf.prog_test_run(prog_fd, packet, repeat=repeat).duration_ns


def median_single(prog_fd: int, packets: list[bytes]) -> float:
    """The median time of one run per packet, each on a fresh skb."""
    return statistics.median(bpf.prog_test_run(prog_fd, p, repeat=1).duration_ns for p in packets)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200_000, help="runs of the empty program for the floor")
    parser.add_argument("--runs", type=int, default=5000, help="single runs timed per case")
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
        plan = build.plan()
        with enter_netns(ns), open_datapath(build, plan, plan.node("node0"), pins) as obj, \
                bpf.BpfObject.open(tmp / "empty.bpf.o") as empty:
            empty.load()
            maps = {n: obj.map(n).map_fd() for n in SERVICE_MAPS}
            sync_service_maps(maps, plan, plan.node("node0"))
            prog = obj.program("from_netdev").fd

            empty_fd = empty.program("empty").fd
            floor_packet = tcp(CLIENT, 40000, NODE0, 22, ACK)
            floor = per_packet(empty_fd, floor_packet, args.repeat)
            # A test run repeats on one skb, which the first run translates: every case is
            # timed one run at a time on a fresh packet (median of many), and the harness
            # cost of a single run (the empty program's median, less its floor) comes off.
            harness = median_single(empty_fd, [floor_packet] * args.runs) - floor
            established_flow = (CLIENT, 1024, NODE0, NODEPORT)
            first_packets = [tcp(CLIENT, 1024 + i, NODE0, NODEPORT, SYN) for i in range(args.runs)]
            results = {
                "empty tc program (floor)": floor,
                "not for a service (passing by)": median_single(
                    prog, [tcp(CLIENT, 40000, "172.26.50.99", 80, ACK)] * args.runs) - harness,
                "not for a service (to the node)": median_single(prog, [floor_packet] * args.runs) - harness,
                # distinct client ports below snatPortRange: SNAT allocates a port for each
                "first packet of a new NodePort flow": median_single(prog, first_packets) - harness,
                "established flow": median_single(prog, [tcp(*established_flow, ACK)] * args.runs) - harness,
            }
            ct = obj.map("ct_v4").map_fd()
            snat_port = ct_snat_port(ct, 1024)
            results["reply (reverse SNAT + reverse DNAT)"] = median_single(
                prog, [tcp(POD, 80, NODE0, snat_port, ACK)] * args.runs) - harness
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


def ct_snat_port(ct: bpf.MapFd, client_port: int) -> int:
    for k, v in ct.items():
        t = layout.TUPLE.unpack(k)
        if t["sport"] == client_port and t["dir"] == layout.FLAGS["CT_SERVICE"]:
            return layout.CT_ENTRY.unpack(v)["snat_port"]
    raise SystemExit("the timed flow has no conntrack entry")


if __name__ == "__main__":
    sys.exit(main())
