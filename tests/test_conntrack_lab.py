"""Conntrack and SNAT state under real traffic, end to end in the lab (issue 8): real
sockets from the lab's client through node0's NodePort to pods on node1 (SNAT path),
whatever the datapath's implementation. Every test is bounded in time: loops stop at the
first failure and at a deadline.

Two labs, one per class (class-scoped, so only one is up at a time: the loader's pins and
records follow the environment, which each lab sets while it is up):
- TestRate: tests/specs/lab/snat-1000.yaml, one backend, a 1000-port snatPortRange.
- TestState: tests/specs/lab/conntrack-small.yaml, two backends, capacity.flows 256 and
  halfOpenFlows 1024.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import struct
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from bpfgen import lab as labmod
from bpfgen.build import compile_spec
from bpfgen.labnet import read_line
from bpfgen.loader import load
from bpfgen.netns import enter_netns

from conftest import lab_up, tuple_key  # noqa: E402
import packets as pk  # noqa: E402  (tests/packets.py)
from packets import csum  # noqa: E402

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "tests" / "specs" / "lab"
RATE_SPEC = SPECS / "snat-1000.yaml"
SMALL_SPEC = SPECS / "conntrack-small.yaml"
NODE0, NODE1 = "172.26.50.101", "172.26.50.102"
NODEPORT = 30645
SECOND_CLIENT = "172.26.50.181"  # a second address on the client's interface
SLOW_CONNECT = 0.5
# Sequential connections per variant here; bench/connrate.py runs the long version (100k).
SEQUENTIAL = int(os.environ.get("BPFGEN_TEST_SEQUENTIAL", "20000"))


def _prepare(the_lab, spec: Path, tmp: Path) -> None:
    the_lab.tmp = tmp
    _load(the_lab, spec)
    for _ in range(3):  # neighbours resolved along the way, so no first connect waits for ARP
        labmod.client_request(the_lab, "TCP", NODE0, NODEPORT)


def _lab(spec: Path, tmp: Path):
    return lab_up(spec, tmp, "c", _prepare)


def _load(lab, spec: Path) -> dict:
    """spec compiled and loaded (an update when a build is loaded already) on every node;
    the results by node."""
    build = compile_spec(spec, lab.tmp / f"build-{secrets.token_hex(3)}")
    return {name: load("eth0", build=build.dir, netns=lab.node_ns(name)) for name in lab.nodes}


def _spec_variant(lab, base: Path, change) -> Path:
    """A copy of base changed by change(doc), written beside the lab's builds."""
    doc = yaml.safe_load(base.read_text())
    change(doc)
    path = lab.tmp / f"spec-{secrets.token_hex(3)}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _client_socket(lab, kind: int = socket.SOCK_STREAM) -> socket.socket:
    with enter_netns(lab.client_ns):
        return socket.socket(socket.AF_INET, kind)


def _echo_connection(lab, host: str = NODE0, port: int = NODEPORT) -> tuple[socket.socket, dict]:
    """A long-lived connection: the server's answer (what it saw), then an echo."""
    s = _client_socket(lab)
    s.settimeout(5)
    s.connect((host, port))
    s.sendall(b"echo\n")
    return s, json.loads(read_line(s))


def _echoes(s: socket.socket, token: bytes) -> bool:
    s.sendall(token + b"\n")
    return read_line(s) == token + b"\n"


def _sequential(lab, count: int, *, sources: tuple[str, ...] = ("",), client_closes: bool = False,
                deadline: float = 120.0, stop: threading.Event | None = None) -> dict:
    """count connect/request/answer/close loops through node0's NodePort, taking the source
    addresses in turn; stops at the first failed or slow connect (or at the deadline), or
    without a problem once stop is set."""
    done, worst, start = 0, 0.0, time.monotonic()
    problem = None
    with enter_netns(lab.client_ns):
        while done < count and problem is None and not (stop and stop.is_set()):
            if time.monotonic() - start > deadline:
                problem = f"deadline of {deadline} s"
                break
            s = socket.socket()
            s.settimeout(3)
            try:
                if sources[done % len(sources)]:
                    s.bind((sources[done % len(sources)], 0))
                t = time.monotonic()
                s.connect((NODE0, NODEPORT))
                took = time.monotonic() - t
                worst = max(worst, took)
                if took > SLOW_CONNECT:
                    problem = f"connect {done} from {s.getsockname()} took {took:.2f} s"
                if client_closes:  # the client sends the first FIN (the server waits for it)
                    s.sendall(b"echo\n")
                    read_line(s)
                else:  # the pod answers and closes first
                    s.sendall(b"hi\n")
                    read_line(s)
                    while s.recv(4096):
                        pass
                done += 1
            except OSError as e:
                problem = f"connection {done}: {e!r}"
            finally:
                s.close()
    elapsed = time.monotonic() - start
    return {"done": done, "problem": problem, "worst": worst, "rate": done / elapsed if elapsed else 0.0}


def _drops(node: str) -> dict:
    from click.testing import CliRunner

    from bpfgen.cli import cli

    r = CliRunner().invoke(cli, ["maps", "dump", "drop_stats", "--node", node, "-o", "json"])
    return {"exit": r.exit_code, "dump": r.stdout[-2000:]}


# ------------------------------------------------------------------ a 1000-port range


@pytest.fixture(scope="class")
def rate_lab(tmp_path_factory: pytest.TempPathFactory):
    with _lab(RATE_SPEC, tmp_path_factory.mktemp("rate-lab")) as the_lab:
        labmod.ip(the_lab.client_ns, "addr", "add", f"{SECOND_CLIENT}/24", "dev", "eth0")
        # the client may reuse its own TIME_WAIT ports (the client-closes-first loop)
        labmod.sysctl(the_lab.client_ns, "net.ipv4.tcp_tw_reuse", 1)
        yield the_lab


class TestRate:
    @pytest.fixture
    def lab(self, rate_lab):
        return rate_lab

    def test_a_half_closed_request_is_answered_after_the_closing_timeout(self, lab) -> None:
        """The client sends its request and shuts down its write side (nc -N, ssh host cmd
        <file); the pod answers 12 s later, longer than the 10 s closing timeout: one FIN
        must not put the flow in the closing state."""
        s = _client_socket(lab)
        with s:
            s.settimeout(20)
            s.connect((NODE0, NODEPORT))
            s.sendall(b"delay 12\n")
            s.shutdown(socket.SHUT_WR)
            t = time.monotonic()
            answer = json.loads(read_line(s))
            assert time.monotonic() - t > 11
            assert answer["local"] == "10.0.1.72:80" and answer["peer"].startswith(NODE0 + ":")
            assert s.recv(4096) == b""  # and then the pod's FIN

    @pytest.mark.parametrize("client_closes", [
        pytest.param(True),
        pytest.param(False),
    ], ids=["client-closes-first", "pod-closes-first"])
    def test_sequential_connections_through_1000_snat_ports(self, lab, client_closes: bool) -> None:
        """SEQUENTIAL connections in a row, many times the 1000 ports of the range: none
        fails, none waits for a SYN retransmit (a connect slower than 0.5 s)."""
        r = _sequential(lab, SEQUENTIAL, client_closes=client_closes)
        assert r["problem"] is None and r["done"] == SEQUENTIAL, (r, _drops("node0"))

    def test_new_and_long_lived_connections_ride_through_an_update_every_second(self, lab) -> None:
        """Updates every second for 15 s, alternately adding 300 NodePort services and
        removing them (service, reverse-NAT and backend entries written and deleted, the
        conntrack scans of an update, the reserved ports), while a client opens
        connections in a row through the NodePort and 10 long-lived connections idle: no
        connect fails or waits for a SYN retransmit, and every long-lived one still echoes."""
        def more_services(doc):
            for i in range(300):
                doc["services"].append({"name": f"extra{i}", "type": "NodePort",
                                        "ports": [{"protocol": "TCP", "port": 8000 + i, "targetPort": 80}],
                                        "backends": [{"address": "10.0.1.72", "node": "node1"}]})

        builds = [compile_spec(spec, lab.tmp / f"build-{secrets.token_hex(3)}").dir
                  for spec in (_spec_variant(lab, RATE_SPEC, more_services), RATE_SPEC)]
        stop, result = threading.Event(), {}
        with ExitStack() as stack:
            conns = [stack.enter_context(_echo_connection(lab)[0]) for _ in range(10)]
            loop = threading.Thread(target=lambda: result.update(_sequential(lab, 10**9, deadline=60, stop=stop)))
            loop.start()
            updates = 0
            try:
                end = time.monotonic() + 15
                while time.monotonic() < end and loop.is_alive():
                    t = time.monotonic()
                    for name in lab.nodes:
                        load("eth0", build=builds[updates % 2], netns=lab.node_ns(name))
                    updates += 1
                    time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
            finally:
                stop.set()
                loop.join(30)
                _load(lab, RATE_SPEC)
            assert updates >= 6, updates
            assert result["problem"] is None and result["done"] > 1000, (result, updates, _drops("node0"))
            broken = [i for i, s in enumerate(conns) if not _echoes(s, b"after %d" % i)]
            assert not broken, f"long-lived connections {broken} broken by the updates"

    def test_two_client_addresses_share_the_range_without_a_stall(self, lab) -> None:
        """Two client addresses in turn through the same 1000 ports: a port that one of them
        just used is not handed to the other while the backend may hold it in TIME_WAIT,
        and neither waits for a port."""
        n = SEQUENTIAL // 4
        r = _sequential(lab, n, sources=(lab.client_address, SECOND_CLIENT))
        assert r["problem"] is None and r["done"] == n, (r, _drops("node0"))


# ------------------------------------------------------------------ a small flow capacity


FLOWS = 256  # capacity.flows of conntrack-small.yaml


def _spoofed_syns(lab, count: int) -> int:
    """count SYNs to node0's NodePort from random addresses of the lab's subnet (none of
    them a lab address) and random ports, hand-built and sent on the client's interface."""
    node_mac = json.loads(labmod.ip(lab.node_ns("node0"), "-j", "link", "show", "eth0").stdout)[0]["address"]
    own_mac = json.loads(labmod.ip(lab.client_ns, "-j", "link", "show", "eth0").stdout)[0]["address"]
    eth = bytes.fromhex(node_mac.replace(":", "")) + bytes.fromhex(own_mac.replace(":", "")) + b"\x08\x00"
    taken = {NODE0, NODE1, lab.client_address, SECOND_CLIENT}
    hosts = [f"172.26.50.{i}" for i in range(2, 255) if f"172.26.50.{i}" not in taken]
    dst = socket.inet_aton(NODE0)
    rng = random.Random(8)

    with enter_netns(lab.client_ns):
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with raw:
        raw.bind(("eth0", 0))
        seen, sent = set(), 0
        while sent < count:
            src, sport = socket.inet_aton(rng.choice(hosts)), rng.randrange(1024, 65536)
            if (src, sport) in seen:
                continue
            seen.add((src, sport))
            tcp = struct.pack("!HHIIBBHHH", sport, NODEPORT, rng.getrandbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
            tcp = tcp[:16] + struct.pack("!H", csum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
            iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), sent & 0xFFFF, 0, 64, 6, 0, src, dst)
            iph = iph[:10] + struct.pack("!H", csum(iph)) + iph[12:]
            raw.send(eth + iph + tcp)
            sent += 1
    return sent


FLOOD = 70_000  # spoofed SYNs, as in the issue


def _drop_count(node: str, reason: str) -> int:
    """node's drops of one reason (drop_stats, summed over CPUs)."""
    from bpfgen import layout
    from bpfgen import libbpf as bpf
    from bpfgen.state import pin_dir

    with bpf.MapFd.from_pin(pin_dir(node) / "drop_stats") as m:
        values = m.lookup_percpu(layout.ID_KEY.pack(layout.DROP_REASONS.value(reason)))
    return sum(layout.DROP_STATS.unpack(v)["packets"] for v in values)


def _ct_entries(node: str) -> int:
    """How many entries node's ct_v4 holds."""
    from bpfgen import libbpf as bpf
    from bpfgen.state import pin_dir

    with bpf.MapFd.from_pin(pin_dir(node) / "ct_v4") as m:
        return len(m.lookup_batch())


def _ct_entry(node: str, key: bytes) -> bytes | None:
    from bpfgen import libbpf as bpf
    from bpfgen.state import pin_dir

    with bpf.MapFd.from_pin(pin_dir(node) / "ct_v4") as m:
        return m.lookup(key)


def _service_entry(node: str, s: socket.socket) -> bytes | None:
    """The CT_SERVICE entry in node's ct_v4 of the client's connection s to node's NodePort."""
    return _ct_entry(node, tuple_key((*s.getsockname()[:2], *s.getpeername()[:2]), "CT_SERVICE"))


def _frontend_packets(node: str) -> int:
    from click.testing import CliRunner

    from bpfgen.cli import cli

    r = CliRunner().invoke(cli, ["maps", "dump", "svc_stats", "--node", node, "-o", "json"])
    assert r.exit_code == 0, r.stderr
    [stats] = json.loads(r.stdout)
    return sum(v["value"]["packets"] for e in stats["entries"] for v in e["values"])


def _pod_log_lines(pod) -> list[dict]:
    return labmod.pod_log(pod)


@pytest.fixture(scope="class")
def state_lab(tmp_path_factory: pytest.TempPathFactory):
    with _lab(SMALL_SPEC, tmp_path_factory.mktemp("state-lab")) as the_lab:
        # The client's ports outside snatPortRange: a flow whose state was lost cannot come
        # back on the very same SNAT port by taking the client's own port, so a lost flow shows.
        labmod.sysctl(the_lab.client_ns, "net.ipv4.ip_local_port_range", "10000 29999")
        yield the_lab


class TestState:
    @pytest.fixture
    def lab(self, state_lab):
        return state_lab

    def test_long_lived_connections_survive_growing_and_shrinking_updates(self, lab) -> None:
        """20 established connections keep echoing across updates that add 300 services,
        remove them again, and raise capacity.flows (conntrack and SNAT copied into resized
        maps) and lower it back."""
        def more_services(doc):
            for i in range(300):
                doc["services"].append({"name": f"extra{i}", "type": "NodePort",
                                        "ports": [{"protocol": "TCP", "port": 8000 + i, "targetPort": 80}],
                                        "backends": [{"address": "10.0.1.72", "node": "node1"}]})

        def more_flows(doc):
            doc["cluster"]["capacity"]["flows"] = 16 * FLOWS

        grown = _spec_variant(lab, SMALL_SPEC, more_services)
        bigger = _spec_variant(lab, SMALL_SPEC, more_flows)
        with ExitStack() as stack:
            conns = []
            for _ in range(20):
                s, _ = _echo_connection(lab)
                stack.enter_context(s)
                conns.append(s)
            try:
                for step, spec in (("300 services added", grown), ("and removed", SMALL_SPEC),
                                   ("capacity.flows raised", bigger), ("and lowered", SMALL_SPEC)):
                    _load(lab, spec)
                    broken = []
                    for i, s in enumerate(conns):
                        try:
                            if not _echoes(s, b"%s %d" % (step.encode(), i)):
                                broken.append(i)
                        except OSError as e:
                            broken.append((i, repr(e)))
                    assert not broken, f"after the update '{step}': connections {broken} broken"
            finally:
                _load(lab, SMALL_SPEC)

    def test_a_blind_rst_leaves_the_connection_and_a_real_one_closes_it(self, lab) -> None:
        """A RST with the client's address and port but a sequence number far from the
        connection's (an off-path sender's guess) reaches the pod, which drops it, and
        changes no state: the connection echoes on, its entries established. The client's
        own RST (SO_LINGER 0) closes the flow."""
        from bpfgen import layout

        closing = layout.FLAGS["CT_CLOSING"] | layout.FLAGS["CT_BACKEND_DONE"]
        s, _ = _echo_connection(lab)
        with s:
            client, frontend = s.getsockname()[:2], s.getpeername()[:2]
            with enter_netns(lab.client_ns):
                sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # (ETH_P_ALL: outgoing too)
            with sniff:
                sniff.bind(("eth0", 3))  # (host order: Python swaps it)
                sniff.settimeout(3)
                s.sendall(b"echo\n")
                while True:  # the client's segment as it left: its next sequence number
                    frame = sniff.recv(65535)
                    ip = frame[14:]
                    ihl = (ip[0] & 15) * 4
                    tcp = ip[ihl:]
                    if ip[9] == 6 and ip[12:16] == socket.inet_aton(client[0]) and \
                            struct.unpack("!H", tcp[:2])[0] == client[1] and len(ip) > ihl + (tcp[12] >> 4) * 4:
                        seq = struct.unpack("!I", tcp[4:8])[0] + len(ip) - ihl - (tcp[12] >> 4) * 4
                        break
                assert read_line(s) == b"echo\n"
                for blind in (seq + 2**31, seq + 2**30, seq - 2**20):
                    rst = pk.tcp_segment(client[0], frontend[0], client[1], frontend[1], pk.RST,
                                         seq=blind & 0xFFFFFFFF, window=0)
                    # (with the MACs of the client's own segments: to node0)
                    sniff.send(frame[:14] + pk.ipv4_header(client[0], frontend[0], pk.IPPROTO_TCP, len(rst)) + rst)
            time.sleep(0.2)
            entry = layout.CT_ENTRY.unpack(_service_entry("node0", s))
            assert not entry["flags"] & closing, entry
            assert _echoes(s, b"after blind resets")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            key = tuple_key((*client, *frontend), "CT_SERVICE")
        # (closed with SO_LINGER 0: the client's RST)
        time.sleep(0.2)
        entry = layout.CT_ENTRY.unpack(_ct_entry("node0", key))
        assert entry["flags"] & closing == closing, entry

    def test_a_spoofed_syn_flood_does_not_evict_established_flows(self, lab) -> None:
        """FLOOD spoofed SYNs (about 70 x capacity.halfOpenFlows) (half-open flows that never complete) while 20
        established connections sit idle: they stay usable."""
        with ExitStack() as stack:
            conns = []
            for _ in range(20):
                s, _ = _echo_connection(lab)
                stack.enter_context(s)
                conns.append(s)
            before = _frontend_packets("node0")
            assert _spoofed_syns(lab, FLOOD) == FLOOD
            time.sleep(0.5)
            assert _frontend_packets("node0") - before >= FLOOD  # the flood reached the datapath
            broken = []
            for i, s in enumerate(conns):
                s.settimeout(3)
                try:
                    if not _echoes(s, b"after the flood %d" % i):
                        broken.append(i)
                except OSError as e:
                    broken.append((i, repr(e)))
            assert not broken, (f"{len(broken)} of 20 idle established connections broken by the flood: {broken}",
                                _drops("node0"))

    def test_a_full_established_table_resets_a_new_connection_and_keeps_the_others(self, lab) -> None:
        """Established connections up to capacity.flows fill node0's ct_v4 (it never
        evicts): the next connection is reset at once (a counted CT_FULL drop) while every
        established one keeps echoing; once some close, the collector frees their entries
        (the closing timeout, then its next sweep) and a new connection gets in; once all
        have closed, the table empties again."""
        with ExitStack() as stack:
            conns, refused = [], None
            before = _drop_count("node0", "CT_FULL")
            # (earlier tests' closed flows may still hold entries: the room they leave)
            room = (2 * FLOWS - _ct_entries("node0")) // 2
            for i in range(2 * FLOWS):
                try:
                    s, _ = _echo_connection(lab)
                except OSError as e:
                    refused = (i, e)
                    break
                stack.enter_context(s)
                conns.append(s)
            assert refused is not None, f"{2 * FLOWS} connections established in a table of {FLOWS} flows"
            assert room - 2 <= len(conns) <= FLOWS, (room, len(conns), refused)
            assert isinstance(refused[1], ConnectionResetError), refused  # reset, not left to time out
            assert _drop_count("node0", "CT_FULL") > before
            broken = [i for i, s in enumerate(conns) if not _echoes(s, b"still here %d" % i)]
            assert not broken, f"established connections broken while the table was full: {broken}"
            for s in conns[:10]:
                s.close()
            deadline = time.monotonic() + 30  # closing timeout 10 s, a sweep every 5 s
            while True:
                try:
                    s, _ = _echo_connection(lab)
                    stack.enter_context(s)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "no connection got in after ten closed"
                    time.sleep(0.5)
            assert all(_echoes(s, b"at the end %d" % i) for i, s in enumerate(conns[10:]))
        deadline = time.monotonic() + 30
        while _ct_entries("node0") > 8:
            assert time.monotonic() < deadline, f"ct_v4 still holds {_ct_entries('node0')} entries of closed flows"
            time.sleep(0.5)

    def test_a_one_way_udp_flow_keeps_its_snat_port_while_other_flows_churn(self, lab) -> None:
        """A one-way UDP flow (statsd, syslog: no replies) sends now and then while ten times
        capacity.flows of other UDP flows come and go: the pod sees it from one SNAT port
        throughout."""
        pods = {p.address: p for p in lab.pods}

        def seen_last(pod_count_before: dict) -> str:
            # the pod that got the flow logs it last; wait for the logs to settle
            for _ in range(50):
                time.sleep(0.1)
                logs = {a: _pod_log_lines(p) for a, p in pods.items()}
                grown = [a for a, lines in logs.items() if len(lines) > pod_count_before[a]]
                if grown:
                    [a] = grown
                    return f"{a} {logs[a][-1]['peer']}"
            raise AssertionError("the one-way flow's datagram reached no pod")

        def counts() -> dict:
            return {a: len(_pod_log_lines(p)) for a, p in pods.items()}

        def settle() -> None:
            last = None
            for _ in range(100):
                now = counts()
                if now == last:
                    return
                last = now
                time.sleep(0.2)

        flow = _client_socket(lab, socket.SOCK_DGRAM)
        with flow:
            flow.bind((lab.client_address, 5140))
            flow.connect((NODE0, NODEPORT))
            before = counts()
            flow.send(b"quiet one-way 0")
            first = seen_last(before)
            churn_port = 20000
            for round_ in range(1, 6):
                # two capacities' worth of other flows per round, ten in all
                with enter_netns(lab.client_ns):
                    for _ in range(2 * FLOWS):
                        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                            other.bind((lab.client_address, churn_port))
                            other.sendto(b"quiet churn", (NODE0, NODEPORT))
                        churn_port += 1
                settle()
                before = counts()
                flow.send(b"quiet one-way %d" % round_)
                assert seen_last(before) == first, f"round {round_}: the flow came back on another SNAT port"

    def test_a_removed_backends_connection_is_reset_and_new_flows_avoid_it(self, lab) -> None:
        """A connection to one of two backends; an update removes that backend: the update
        clears the flow's conntrack entry towards the backend, so the next send on the
        connection gets a reset (not a hang, and not a second later at the datapath's
        check), and new connections all go to the remaining backend. The reply entry (what
        the pod saw: node0's SNAT port to it) is left closing: it holds the port no longer
        than the close timeout after the backend's last packet, not the established one."""
        from bpfgen import layout
        from bpfgen.render import TIMEOUTS

        s, seen = _echo_connection(lab)
        with s:
            gone = seen["local"].rsplit(":", 1)[0]
            snat_addr, snat_port = seen["peer"].rsplit(":", 1)
            reply_key = tuple_key((snat_addr, int(snat_port), gone, 80), "CT_OUT")
            before = layout.CT_ENTRY.unpack(_ct_entry("node0", reply_key))
            assert not before["flags"] & layout.FLAGS["CT_CLOSING"]
            assert _echoes(s, b"before")

            def without(doc):
                doc["services"][0]["backends"] = [b for b in doc["services"][0]["backends"] if b["address"] != gone]

            try:
                assert _service_entry("node0", s) is not None
                results = _load(lab, _spec_variant(lab, SMALL_SPEC, without))
                assert _service_entry("node0", s) is None  # the update ended it (not the datapath)
                reply = layout.CT_ENTRY.unpack(_ct_entry("node0", reply_key))
                assert reply["flags"] & layout.FLAGS["CT_CLOSING"], reply
                assert reply["expires"] <= layout.datapath_now() + dict(TIMEOUTS)["CT_CLOSE_TIMEOUT"], reply
                assert any("TCP connections to removed endpoints" in m for m in results["node0"].messages), \
                    results["node0"].messages
                s.settimeout(1)
                try:
                    s.sendall(b"after\n")
                    outcome = f"answered: {read_line(s)!r}"
                except ConnectionResetError:
                    outcome = "reset"
                except OSError as e:  # a hang (timeout) or a close without a reset
                    outcome = repr(e)
                assert outcome == "reset", outcome
                for _ in range(10):
                    r = labmod.client_request(lab, "TCP", NODE0, NODEPORT)
                    assert not r["pod"].startswith(gone + ":"), r
            finally:
                _load(lab, SMALL_SPEC)
