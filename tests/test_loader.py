"""Tests of `bpfgen load / unload / status / maps dump` (bpfgen.loader, bpfgen.state).

Every test is a `kernel` test: it makes its own network namespace(s) (`netns` fixture,
class `Netns`: eth0 <-> peer0, both inside), keeps pins under a private directory of
bpffs and records under tmp (`isolated_state`), and attaches only inside its namespace.
Deleting the namespace removes its interfaces with their qdiscs and filters; the pin
directory is removed by `isolated_state`; so nothing is left even when a test fails.

What bpfgen says is checked against independent oracles: `tc -n NS filter/qdisc show`,
`bpftool prog show id`, `bpftool map show/dump/lookup pinned`, the pin directory.

Specs used besides examples/seed.yaml are in tests/specs/loader/:
  added.yaml        seed + a backend of nginx + a new service "web" (same code)
  removed.yaml      seed without nginx's UDP port (same code)
  snat-code.yaml    seed with a smaller snatPortRange (new from_netdev code, same layout)
  moved.yaml        seed with node0 at another address (both programs change)
  incompatible.yaml seed with a tiny snatPortRange (snat_v4 max_entries 4096, not 65536)
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from bpfgen import layout
from bpfgen import libbpf as L
from bpfgen.build import compile_object, compile_spec
from bpfgen.cli import cli
from bpfgen.render import TIMEOUTS

from conftest import SEED, Netns

pytestmark = pytest.mark.kernel

SPECS = Path(__file__).parent / "specs" / "loader"
IFACE = "eth0"
NODE = "node0"
NODE_ADDR = "172.26.50.101"
MAP_NAMES = [m.name for m in layout.MAPS]
# The maps compared before and after a refused change (the counter arrays, whose every slot
# bpftool prints, are left out: nothing writes them without traffic).
TABLE_MAPS = [m.name for m in layout.MAPS if not m.type.endswith("ARRAY")]
TC_PREF = 0xB9F  # bpfgen's filter priority and handle
PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP"}

try:  # click < 8.2 mixes stderr into output unless told not to; 8.2+ always separates
    RUNNER = CliRunner(mix_stderr=False)
except TypeError:
    RUNNER = CliRunner()


# ---------------------------------------------------------------- running bpfgen


def _isolated() -> None:
    # Never touch the real /sys/fs/bpf/bpfgen or /run/bpfgen (isolated_state sets these).
    assert "BPFGEN_PIN_ROOT" in os.environ and "BPFGEN_RUN_DIR" in os.environ, "bpfgen run without isolated_state"


def bpfgen(*args: str):
    """The CLI in this process (click's runner); returns click's Result."""
    _isolated()
    return RUNNER.invoke(cli, list(args), catch_exceptions=True)


def bpfgen_proc(*args: str, prefix: tuple[str, ...] = (), cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI as a real process (python -m bpfgen.cli), optionally under a wrapper
    (nsenter, ip netns exec, setpriv); the environment (BPFGEN_*) is inherited."""
    _isolated()
    return subprocess.run([*prefix, sys.executable, "-m", "bpfgen.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=os.environ.copy(), timeout=120)


def ok(result) -> str:
    """Assert a CliRunner result or a CompletedProcess succeeded; returns its stderr."""
    if isinstance(result, subprocess.CompletedProcess):
        assert result.returncode == 0, f"rc={result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        return result.stderr
    assert result.exit_code == 0, (
        f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}\nexception: {result.exception!r}"
    )
    return result.stderr


def clean_error(result, exit_code: int | None = None, one_line: bool = True) -> str:
    """Assert a clean failure: non-zero exit, a `bpfgen: ` message on stderr, no
    traceback, nothing on stdout; one line unless told otherwise. Returns stderr."""
    if isinstance(result, subprocess.CompletedProcess):
        code, out, err = result.returncode, result.stdout, result.stderr
    else:
        code, out, err = result.exit_code, result.stdout, result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert code != 0, f"expected a failure, got exit 0\nstderr: {err}"
    if exit_code is not None:
        assert code == exit_code, f"exit {code}, expected {exit_code}\nstderr: {err}"
    assert "Traceback" not in err and "Traceback" not in out, err
    assert out == "", f"stdout should be empty on an error: {out!r}"
    lines = err.strip().splitlines()
    assert lines and lines[0].startswith("bpfgen: "), err
    if one_line:
        assert len(lines) == 1, f"expected one line:\n{err}"
    return err


def load_ids(stderr: str) -> dict[str, int]:
    m = re.search(r"ingress from_netdev id (\d+), egress to_netdev id (\d+)", stderr)
    assert m, stderr
    return {"ingress": int(m.group(1)), "egress": int(m.group(2))}


def uses_pinned_maps(prog: dict, pins: Path) -> bool:
    """bpftool's prog: its maps are the pinned ones, and one .rodata.config of its own."""
    others = set(prog["map_ids"]) - set(map_ids(pins).values())
    return bool(prog["map_ids"]) and [bpftool("map", "show", "id", str(i))["name"] for i in others] == [".rodata.config"]


def load(ns: Netns, build: Path, *extra: str) -> str:
    return ok(bpfgen("load", "--iface", IFACE, "--build", str(build), "--netns", ns.name, *extra))


# ---------------------------------------------------------------- oracles


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=60)


def tc_filters(ns: Netns, hook: str) -> list[dict]:
    """The bpf filters on eth0's hook, from tc: [{pref, handle, id, name, tag}]."""
    out = run("tc", "-n", ns.name, "-j", "filter", "show", "dev", IFACE, hook).stdout
    rows = []
    for f in json.loads(out or "[]"):
        opts = f.get("options")
        if not opts:
            continue  # the chain's header line
        prog = opts.get("prog", {})
        rows.append({"kind": f.get("kind"), "pref": f.get("pref"), "handle": opts.get("handle"),
                     "id": prog.get("id"), "name": prog.get("name"), "tag": prog.get("tag")})
    return rows


def attached(ns: Netns) -> dict[str, int | None]:
    """Program id of bpfgen's filter (pref/handle 0xb9f) per hook, from tc."""
    result: dict[str, int | None] = {}
    for hook in ("ingress", "egress"):
        ours = [f for f in tc_filters(ns, hook) if f["pref"] == TC_PREF]
        assert len(ours) <= 1, ours
        result[hook] = ours[0]["id"] if ours else None
        if ours:
            assert ours[0]["kind"] == "bpf" and int(ours[0]["handle"], 16) == TC_PREF, ours
    return result


def qdisc_kinds(ns: Netns) -> list[str]:
    return [q["kind"] for q in json.loads(run("tc", "-n", ns.name, "-j", "qdisc", "show", "dev", IFACE).stdout)]


def bpftool(*args: str, check: bool = True):
    proc = run("bpftool", "-j", *args, check=False)
    if check:
        assert proc.returncode == 0, f"bpftool {' '.join(args)}: {proc.stderr or proc.stdout}"
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else None


def prog_exists(prog_id: int) -> bool:
    return run("bpftool", "prog", "show", "id", str(prog_id), check=False).returncode == 0


def wait_gone(prog_ids: list[int], timeout: float = 10.0) -> list[int]:
    """Programs are freed after an RCU grace period: wait until none of prog_ids exists."""
    deadline = time.monotonic() + timeout
    alive = list(prog_ids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if prog_exists(p)]
        if alive:
            time.sleep(0.1)
    return alive


def map_ids(pins: Path) -> dict[str, int]:
    return {p.name: bpftool("map", "show", "pinned", str(p))["id"] for p in sorted(pins.iterdir())}


def hexargs(data: bytes) -> list[str]:
    return ["hex", *(f"{b:02x}" for b in data)]


def bpftool_lookup(path: Path, key: bytes) -> bytes | None:
    found = bpftool("map", "lookup", "pinned", str(path), "key", *hexargs(key), check=False)
    return None if found is None else bytes(int(b, 16) for b in found["value"])


def ip_of(raw: int) -> str:
    """bpftool prints a network-order __u32 as the host integer of its bytes."""
    return str(ipaddress.IPv4Address(int(raw).to_bytes(4, sys.byteorder)))


def port_of(raw: int) -> int:
    return int.from_bytes(int(raw).to_bytes(2, sys.byteorder), "big")


def _from_bpftool(field: layout.Field, raw):
    if field.type == "ip4":
        return ip_of(raw)
    if field.type == "port":
        return port_of(raw)
    if field.type == "proto":
        return PROTO_NAMES.get(raw, raw)
    return raw


def _view(shape, formatted):
    """bpftool's BTF-formatted raw value as bpfgen shows it (pads hidden, addresses dotted)."""
    if isinstance(shape, layout.Struct):
        assert set(formatted) == {f.name for f in shape.fields}, (shape.name, formatted)
        return {f.name: _from_bpftool(f, formatted[f.name]) for f in shape.fields if not f.name.startswith("pad")}
    return formatted


def bpftool_entries(path: Path) -> list[dict]:
    """A pinned map's entries from bpftool, in bpfgen's form (for comparing)."""
    mdef = next(m for m in layout.MAPS if m.name == path.name)
    result = []
    for e in bpftool("map", "dump", "pinned", str(path)):
        f = e["formatted"]
        if mdef.type.endswith("ARRAY") and not any(int(b, 16) for b in e.get("value", [])) and not any(
                int(b, 16) for v in e.get("values", []) for b in v["value"]):
            continue  # bpfgen leaves out array slots that are zero on every CPU (bpftool's raw bytes say)
        if "values" in f:
            result.append({"key": _view(mdef.key, f["key"]),
                           "values": [{"cpu": v["cpu"], "value": _view(mdef.value, v["value"])} for v in f["values"]]})
        else:
            result.append({"key": _view(mdef.key, f["key"]), "value": _view(mdef.value, f["value"])})
    return result


def _sorted(entries: list[dict]) -> list[dict]:
    return sorted(entries, key=lambda e: json.dumps(e, sort_keys=True))


def bpftool_services(pins: Path) -> dict[str, dict]:
    """The service table rebuilt from bpftool's dumps of svc_v4 and backend_v4:
    frontend -> {id, type, backends}."""
    backends = {}
    for e in bpftool("map", "dump", "pinned", str(pins / "backend_v4")):
        v = e["formatted"]["value"]
        backends[e["formatted"]["key"]] = f"{ip_of(v['addr'])}:{port_of(v['port'])}/{PROTO_NAMES[v['proto']]}"
    masters, slots = {}, {}
    for e in bpftool("map", "dump", "pinned", str(pins / "svc_v4")):
        k, v = e["formatted"]["key"], e["formatted"]["value"]
        fe = f"{ip_of(k['addr'])}:{port_of(k['port'])}/{PROTO_NAMES[k['proto']]}"
        if k["slot"] == 0:
            masters[fe] = v
        else:
            slots[(fe, k["slot"])] = v["backend_id"]
    assert len(slots) == sum(v["count"] for v in masters.values()), "stray backend slots in svc_v4"
    return {
        fe: {"id": v["id"], "type": "NodePort" if v["flags"] & layout.FLAGS["SVC_NODEPORT"] else "ClusterIP",
             "backends": [backends[slots[(fe, s)]] for s in range(1, v["count"] + 1)]}
        for fe, v in masters.items()
    }


def bpfgen_services(*args: str) -> dict[str, dict]:
    result = bpfgen("service", "list", "-o", "json", *args)
    ok(result)
    return {f"{r['frontend']}/{r['protocol']}": {"id": r["id"], "type": r["type"],
                                                 "backends": [f"{b['address']}/{b['protocol']}" for b in r["backends"]]}
            for r in json.loads(result.stdout)}


def check_services(pins: Path, expected: dict[str, tuple[str, list[str]]], *args: str) -> dict[str, dict]:
    """bpfgen's service list equals bpftool's view equals `expected` (frontend -> type,
    backends); every frontend has its reverse-NAT entry. Returns the table (with ids)."""
    ours, theirs = bpfgen_services(*args), bpftool_services(pins)
    assert ours == theirs
    assert {fe: (r["type"], r["backends"]) for fe, r in ours.items()} == expected
    ids = [r["id"] for r in ours.values()]
    assert len(set(ids)) == len(ids) and all(i > 0 for i in ids), ids
    revnat = {e["key"]: {k: e["value"][k] for k in ("addr", "port")} for e in bpftool_entries(pins / "revnat_v4")}
    assert revnat == {r["id"]: {"addr": fe.split(":")[0], "port": int(fe.split(":")[1].split("/")[0])}
                      for fe, r in ours.items()}
    return ours


def records(run_dir: Path) -> list[str]:
    """The node records, and beside each the plan it applied (<node>.applied-plan)."""
    d = run_dir / "nodes"
    names = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    assert {n.removesuffix(".applied-plan") for n in names if n.endswith(".applied-plan")} <= {
        n.removesuffix(".json") for n in names}, names  # no plan without its record
    return [n for n in names if not n.endswith(".applied-plan")]


def assert_nothing_left(ns: Netns, pins: Path, run_dir: Path) -> None:
    """Nothing of bpfgen: no pins, no filters, no clsact qdisc, no record."""
    assert not pins.exists() or not any(pins.iterdir()), sorted(pins.rglob("*"))
    for hook in ("ingress", "egress"):
        assert tc_filters(ns, hook) == [], hook
    assert "clsact" not in qdisc_kinds(ns)
    assert records(run_dir) == []
    assert not (run_dir / "nodes").is_dir() or not any((run_dir / "nodes").iterdir())


# ---------------------------------------------------------------- conntrack / SNAT state written "by a packet"

CT_KEY = layout.TUPLE.pack(saddr="192.0.2.10", daddr=NODE_ADDR, sport=40000, dport=30645, proto=6,
                           dir=layout.FLAGS["CT_SERVICE"])
NAT_KEY = layout.TUPLE.pack(saddr=NODE_ADDR, daddr="10.0.1.72", sport=40001, dport=80, proto=6,
                            dir=layout.FLAGS["NAT_OUT"])
NAT_VALUE = layout.NAT_ENTRY.pack(addr=NODE_ADDR, port=40001)


def ct_value() -> bytes:
    expires = layout.datapath_now() + 3600
    return layout.CT_ENTRY.pack(expires=expires, backend_id=1, rev_nat_id=2, flags=layout.FLAGS["CT_ESTABLISHED"])


def write_state(pins: Path) -> bytes:
    """Write a conntrack and an SNAT entry into the pinned maps with bpftool."""
    value = ct_value()
    run("bpftool", "map", "update", "pinned", str(pins / "ct_v4"), "key", *hexargs(CT_KEY), "value", *hexargs(value))
    run("bpftool", "map", "update", "pinned", str(pins / "snat_v4"), "key", *hexargs(NAT_KEY),
        "value", *hexargs(NAT_VALUE))
    assert bpftool_lookup(pins / "ct_v4", CT_KEY) == value
    return value


def assert_state(pins: Path, ct: bytes) -> None:
    assert bpftool_lookup(pins / "ct_v4", CT_KEY) == ct, "the conntrack entry is gone or changed"
    assert bpftool_lookup(pins / "snat_v4", NAT_KEY) == NAT_VALUE, "the SNAT entry is gone or changed"
    rows = json.loads(ok_stdout(bpfgen("ct", "list", "--node", NODE, "-o", "json")))
    assert [(r["dir"], r["src"], r["dst"], r["backend_id"], r["rev_nat_id"]) for r in rows] == [
        ("SVC", "192.0.2.10:40000", f"{NODE_ADDR}:30645", 1, 2)
    ]


def ok_stdout(result) -> str:
    ok(result)
    return result.stdout


# ---------------------------------------------------------------- expected service tables

NGINX_CIP, NGINX_NP = "10.106.91.98:80", f"{NODE_ADDR}:30645"
SEED_TABLE = {
    f"{NGINX_CIP}/TCP": ("ClusterIP", ["10.0.1.72:80/TCP"]),
    f"{NGINX_NP}/TCP": ("NodePort", ["10.0.1.72:80/TCP"]),
    f"{NGINX_CIP}/UDP": ("ClusterIP", ["10.0.1.72:80/UDP"]),
    f"{NGINX_NP}/UDP": ("NodePort", ["10.0.1.72:80/UDP"]),
}
ADDED_TABLE = {
    f"{NGINX_CIP}/TCP": ("ClusterIP", ["10.0.1.72:80/TCP", "10.0.1.73:80/TCP"]),
    f"{NGINX_NP}/TCP": ("NodePort", ["10.0.1.72:80/TCP", "10.0.1.73:80/TCP"]),
    f"{NGINX_CIP}/UDP": ("ClusterIP", ["10.0.1.72:80/UDP", "10.0.1.73:80/UDP"]),
    f"{NGINX_NP}/UDP": ("NodePort", ["10.0.1.72:80/UDP", "10.0.1.73:80/UDP"]),
    "10.106.91.99:8080/TCP": ("ClusterIP", ["10.0.1.80:8000/TCP"]),
    f"{NODE_ADDR}:30080/TCP": ("NodePort", ["10.0.1.80:8000/TCP"]),
}
REMOVED_TABLE = {
    f"{NGINX_CIP}/TCP": ("ClusterIP", ["10.0.1.72:80/TCP"]),
    f"{NGINX_NP}/TCP": ("NodePort", ["10.0.1.72:80/TCP"]),
}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory, seed_build) -> dict[str, Path]:
    """Build dirs: "seed" (the session's) and one per spec of tests/specs/loader/."""
    out = {"seed": seed_build.dir}
    for spec in sorted(SPECS.glob("*.yaml")):
        out[spec.stem] = compile_spec(spec, tmp_path_factory.mktemp(f"build-{spec.stem}")).dir
    return out


@pytest.fixture
def state(isolated_state: Path) -> dict[str, Path]:
    """Private pin root and run dir; node0's pins live in pins/node0."""
    return {"root": isolated_state, "pins": isolated_state / NODE, "run": Path(os.environ["BPFGEN_RUN_DIR"])}


@pytest.fixture
def other_netns():
    """Netns factory for extra namespaces (removed afterwards)."""
    made: list[Netns] = []

    def make(address: str | None) -> Netns:
        ns = Netns(address)
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.remove()


@pytest.fixture
def loaded(builds, state, netns: Netns) -> dict:
    """seed loaded on eth0 of `netns` with --netns."""
    stderr = load(netns, builds["seed"])
    return {"ids": load_ids(stderr), "stderr": stderr}


# ---------------------------------------------------------------- load, checked by oracles


def test_load_with_netns_matches_tc_bpftool_and_pins(builds, state, netns: Netns):
    stderr = load(netns, builds["seed"])
    assert f"loaded node {NODE} on {IFACE}" in stderr and str(state["pins"]) in stderr
    ids = load_ids(stderr)

    # tc: one bpfgen filter per hook, direct-action, carrying the programs bpfgen named
    assert "clsact" in qdisc_kinds(netns)
    for hook, name in (("ingress", "from_netdev"), ("egress", "to_netdev")):
        (f,) = tc_filters(netns, hook)
        assert (f["name"], f["id"], f["pref"], int(f["handle"], 16)) == (name, ids[hook], TC_PREF, TC_PREF)
        prog = bpftool("prog", "show", "id", str(ids[hook]))
        assert prog["name"] == name and prog["type"] == "sched_cls" and prog["tag"] == f["tag"]
        # the program uses the pinned maps, not copies of them, and its node's configuration
        assert uses_pinned_maps(prog, state["pins"])

    # pins: every map under <pin root>/<node>/, as bpftool sees them
    assert sorted(p.name for p in state["pins"].iterdir()) == sorted(MAP_NAMES)
    for name in MAP_NAMES:
        info = bpftool("map", "show", "pinned", str(state["pins"] / name))
        assert info["name"] == name

    # maps filled: service table, backends, reverse NAT (bpfgen and bpftool agree)
    table = check_services(state["pins"], SEED_TABLE)
    assert sorted(r["id"] for r in table.values()) == [1, 2, 3, 4]
    assert sorted(e["value"]["addr"] + ":" + str(e["value"]["port"]) + "/" + e["value"]["proto"]
                  for e in bpftool_entries(state["pins"] / "backend_v4")) == ["10.0.1.72:80/TCP", "10.0.1.72:80/UDP"]
    assert bpftool_entries(state["pins"] / "ct_v4") == [] and bpftool_entries(state["pins"] / "snat_v4") == []

    # status -o json says the same as the kernel
    (row,) = json.loads(ok_stdout(bpfgen("status", "-o", "json")))
    assert row["node"] == NODE and row["iface"] == IFACE and row["netns"] == netns.name
    assert row["pin_dir"] == str(state["pins"]) and row["pinned"] is True and row["spec"] == "seed-lab"
    assert {h: p["id"] for h, p in row["programs"].items()} == ids == attached(netns)
    assert row["attached"] == ids
    for hook, p in row["programs"].items():
        assert p["tag"] == bpftool("prog", "show", "id", str(p["id"]))["tag"]
    text = ok_stdout(bpfgen("status"))
    assert f"{NODE}: {IFACE} (netns {netns.name}) spec seed-lab" in text
    assert f"ingress=from_netdev#{ids['ingress']}, egress=to_netdev#{ids['egress']}" in text


def test_load_with_spec_compiles_into_out(state, netns: Netns, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stderr = ok(bpfgen("load", "--iface", IFACE, "--spec", str(SEED), "--netns", netns.name))
    assert (tmp_path / "out" / "seed-lab" / "manifest.json").is_file()
    assert load_ids(stderr) == attached(netns)
    check_services(state["pins"], SEED_TABLE)
    # with the single build under out/, --build is optional
    stderr = ok(bpfgen("load", "--iface", IFACE, "--netns", netns.name))
    assert "updated node node0 on eth0: 0 entries written, 0 deleted, programs kept" in stderr


def test_load_under_nsenter(builds, state, netns: Netns):
    nsenter = ("nsenter", f"--net=/run/netns/{netns.name}")
    proc = bpfgen_proc("load", "--iface", IFACE, "--build", str(builds["seed"]), prefix=nsenter)
    ids = load_ids(ok(proc))
    assert attached(netns) == ids
    assert "clsact" in qdisc_kinds(netns)
    assert sorted(p.name for p in state["pins"].iterdir()) == sorted(MAP_NAMES)  # the host's bpffs

    # status from the host: the record, no namespace name (nsenter gives none)
    (row,) = json.loads(ok_stdout(bpfgen("status", "-o", "json")))
    assert (row["node"], row["iface"], row["netns"]) == (NODE, IFACE, None)
    assert {h: p["id"] for h, p in row["programs"].items()} == ids

    # read commands under nsenter find the node of their namespace without --node
    proc = bpfgen_proc("maps", "dump", "revnat_v4", "-o", "json", prefix=nsenter)
    ok(proc)
    dump = json.loads(proc.stdout)
    assert [m["name"] for m in dump] == ["revnat_v4"]
    assert _sorted(dump[0]["entries"]) == _sorted(bpftool_entries(state["pins"] / "revnat_v4"))
    svc = bpfgen_proc("service", "list", "-o", "json", prefix=nsenter)
    ok(svc)
    assert len(json.loads(svc.stdout)) == 4

    # the same namespace through --netns is the same node: an update, programs unchanged
    stderr = load(netns, builds["seed"])
    assert "updated node node0" in stderr and load_ids(stderr) == ids

    # unload under nsenter leaves nothing
    stderr = ok(bpfgen_proc("unload", "--iface", IFACE, prefix=nsenter))
    assert "removed the clsact qdisc" in stderr
    assert_nothing_left(netns, state["pins"], state["run"])
    assert wait_gone(list(ids.values())) == []


# ---------------------------------------------------------------- maps dump / status


def test_maps_dump_matches_bpftool(builds, state, netns: Netns, loaded):
    ct = write_state(state["pins"])
    with L.MapFd.from_pin(state["pins"] / "svc_stats") as stats:  # one counted frontend, on the last CPU
        stats.update(layout.ID_KEY.pack(2), bytes(stats.value_buf_size - 16) + layout.SVC_STATS.pack(packets=3, bytes=300))
    dump = json.loads(ok_stdout(bpfgen("maps", "dump", "-o", "json")))
    assert [m["name"] for m in dump] == MAP_NAMES
    for m in dump:
        path = state["pins"] / m["name"]
        info = bpftool("map", "show", "pinned", str(path))
        assert (m["id"], m["type"], m["key_size"], m["value_size"], m["max_entries"]) == (
            info["id"], info["type"], info["bytes_key"], info["bytes_value"], info["max_entries"]), m["name"]
        assert _sorted(m["entries"]) == _sorted(bpftool_entries(path)), m["name"]
    by_name = {m["name"]: m for m in dump}
    assert len(by_name["ct_v4"]["entries"]) == 1 and len(by_name["snat_v4"]["entries"]) == 1
    assert by_name["ct_v4"]["entries"][0]["key"] == {
        "saddr": "192.0.2.10", "daddr": NODE_ADDR, "sport": 40000, "dport": 30645, "proto": "TCP",
        "dir": layout.FLAGS["CT_SERVICE"]}
    (counted,) = by_name["svc_stats"]["entries"]  # the zero slots are left out, and counted
    assert counted["key"] == 2 and len(counted["values"]) == L.num_possible_cpus()
    assert counted["values"][-1]["value"] == {"packets": 3, "bytes": 300}
    assert by_name["svc_stats"]["zero_slots"] == by_name["svc_stats"]["max_entries"] - 1

    # one map, by --node and by --netns: the same
    one = json.loads(ok_stdout(bpfgen("maps", "dump", "svc_v4", "--node", NODE, "-o", "json")))
    assert [m["name"] for m in one] == ["svc_v4"]
    assert _sorted(one[0]["entries"]) == _sorted(bpftool_entries(state["pins"] / "svc_v4"))
    via_ns = json.loads(ok_stdout(bpfgen("maps", "dump", "svc_v4", "--netns", netns.name, "-o", "json")))
    assert via_ns == one
    text = ok_stdout(bpfgen("maps", "dump", "svc_v4"))
    assert text.startswith("svc_v4 (hash, 8 entries)")
    assert_state(state["pins"], ct)

    err = clean_error(bpfgen("maps", "dump", "no_such_map"), exit_code=2)
    assert "no map 'no_such_map'" in err and "svc_v4" in err
    err = clean_error(bpfgen("maps", "dump", "--node", "node9"), exit_code=2)
    assert "node9" in err


def test_status_and_reads_when_nothing_loaded(state):
    assert ok_stdout(bpfgen("status", "-o", "json")).strip() == "[]"
    assert "nothing loaded" in ok(bpfgen("status"))
    err = clean_error(bpfgen("maps", "dump"), exit_code=2)
    assert "bpfgen load" in err


# ---------------------------------------------------------------- update


def test_update_changes_maps_in_place_and_keeps_state(builds, state, netns: Netns, loaded):
    pins = state["pins"]
    ids0 = loaded["ids"]
    maps0 = map_ids(pins)
    table0 = check_services(pins, SEED_TABLE)
    ct = write_state(pins)
    (row0,) = json.loads(ok_stdout(bpfgen("status", "-o", "json")))

    # added service and backend: same object and configuration -> only data is written
    stderr = load(netns, builds["added"])
    assert f"updated node {NODE} on {IFACE}: " in stderr and "programs kept" in stderr
    assert load_ids(stderr) == ids0 == attached(netns)
    assert map_ids(pins) == maps0
    table1 = check_services(pins, ADDED_TABLE)
    assert {fe: table1[fe]["id"] for fe in table0} == {fe: r["id"] for fe, r in table0.items()}, "ids moved"
    assert sorted(r["id"] for r in table1.values()) == [1, 2, 3, 4, 5, 6]
    assert len(bpftool_entries(pins / "backend_v4")) == 5
    assert_state(pins, ct)
    (row1,) = json.loads(ok_stdout(bpfgen("status", "-o", "json")))
    assert row1["loaded_at"] == row0["loaded_at"] and row1["programs"] == row0["programs"]

    # removed service, port and backend: gone from every service map
    stderr = load(netns, builds["removed"])
    assert load_ids(stderr) == ids0 == attached(netns)
    assert map_ids(pins) == maps0
    table2 = check_services(pins, REMOVED_TABLE)
    assert {fe: r["id"] for fe, r in table2.items()} == {fe: table0[fe]["id"] for fe in REMOVED_TABLE}
    assert [e["value"] for e in bpftool_entries(pins / "backend_v4")] == [
        {"addr": "10.0.1.72", "port": 80, "proto": "TCP", "flags": 0}]
    assert all(e["key"]["proto"] == "TCP" for e in bpftool_entries(pins / "svc_v4"))
    assert_state(pins, ct)

    # new configuration (snatPortRange is in .rodata.config): both programs replaced
    stderr = load(netns, builds["snat-code"])
    assert "programs replaced" in stderr
    ids3 = load_ids(stderr)
    assert ids3["egress"] != ids0["egress"] and ids3["ingress"] != ids0["ingress"]
    assert attached(netns) == ids3
    for hook in ("ingress", "egress"):
        assert len(tc_filters(netns, hook)) == 1  # replaced in place, not added
    new = bpftool("prog", "show", "id", str(ids3["ingress"]))
    assert new["name"] == "from_netdev" and new["tag"] == row0["programs"]["ingress"]["tag"]  # same code
    assert uses_pinned_maps(new, pins), "the new program must use the pinned maps"
    assert wait_gone([ids0["ingress"], ids0["egress"]]) == [], "a replaced program is still in the kernel"
    assert map_ids(pins) == maps0
    check_services(pins, SEED_TABLE)  # snat-code has seed's services again
    assert_state(pins, ct)
    (row3,) = json.loads(ok_stdout(bpfgen("status", "-o", "json")))
    assert {h: p["id"] for h, p in row3["programs"].items()} == ids3 == row3["attached"]
    assert row3["loaded_at"] == row0["loaded_at"]


def test_a_capacity_change_moves_the_live_entries_into_the_resized_maps(builds, state, netns: Netns, loaded):
    """No update needs `unload`: conntrack and SNAT are copied into maps of the new size."""
    pins = state["pins"]
    ct = write_state(pins)
    maps0 = map_ids(pins)
    stderr = load(netns, builds["incompatible"])  # capacity.flows 2048: ct_v4 of 4096 entries, snat_v4 grows too
    assert f"updated node {NODE} on {IFACE}" in stderr and "programs replaced" in stderr
    assert "created afresh" not in stderr  # (new maps, but with the old ones' entries)
    maps1 = map_ids(pins)
    assert sorted(p.name for p in pins.iterdir()) == sorted(MAP_NAMES)  # nothing set aside is left
    for name in MAP_NAMES:
        assert (maps1[name] != maps0[name]) == (name in ("ct_v4", "snat_v4")), name
        size = bpftool("map", "show", "pinned", str(pins / name))["max_entries"]
        resized = {"ct_v4": 4096, "snat_v4": 2048 + 131072 + 65536}  # snat: flows + udpFlows + halfOpenFlows
        # (the old map of a resized one may be gone already: looked up only for the others)
        expected = resized[name] if name in resized else bpftool("map", "show", "id", str(maps0[name]))["max_entries"]
        assert size == expected
    assert_state(pins, ct)
    check_services(pins, SEED_TABLE)
    new = load_ids(stderr)
    assert attached(netns) == new
    for hook in ("ingress", "egress"):
        assert uses_pinned_maps(bpftool("prog", "show", "id", str(new[hook])), pins)
    assert wait_gone(list(loaded["ids"].values())) == []


def _collected(pins: Path, key: bytes, timeout: float) -> bool:
    """Whether ct_v4's entry at key is removed within timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bpftool_lookup(pins / "ct_v4", key) is None:
            return True
        time.sleep(0.2)
    return False


def test_the_conntrack_scans_of_an_update_read_live_entries_across_batches(builds, state, netns: Netns, loaded):
    """An update reads the ids live conntrack entries hold (so that none is handed out
    again) and clears the entries of flows to backends it removed, scanning ct_v4 a batch
    at a time and reading a few fields of each entry: entries in several batches are all
    seen, dead ones hold nothing and are left to the collector, TCP's reply entries stay
    (forward_only). bpftool writes the entries and checks what is left."""
    from bpfgen.loader import _clear_flows_of, conntrack_refs

    pins, now = state["pins"], layout.datapath_now()

    def key(i: int, direction: str) -> bytes:
        src, dst = (NODE_ADDR, "10.0.1.80") if direction == "CT_OUT" else (ipaddress.IPv4Address(0xC0000000 + i),
                                                                           NODE_ADDR)
        return layout.TUPLE.pack(saddr=src, daddr=dst, sport=1024 + i % 60000, dport=80 if direction == "CT_OUT"
                                 else 30645, proto=6, dir=layout.FLAGS[direction])

    def value(backend: int, rev_nat: int, expires: int, snat_port: int = 0, cookie: int = 0) -> bytes:
        return layout.CT_ENTRY.pack(expires=expires, backend_id=backend, rev_nat_id=rev_nat, xl_saddr=NODE_ADDR,
                                    xl_sport=snat_port, xl_daddr="10.0.1.80", xl_dport=80, snat_port=snat_port,
                                    nat_cookie=cookie, flags=layout.FLAGS["CT_ESTABLISHED"])

    def reply_of(snat_port: int) -> bytes:  # (what the backend's packets to node:snat_port find)
        return layout.TUPLE.pack(saddr=NODE_ADDR, daddr="10.0.1.80", sport=snat_port, dport=80, proto=6,
                                 dir=layout.FLAGS["CT_OUT"])

    filler = 3 * L.LOOKUP_BATCH  # of a backend that stays, in several batches
    cases = {  # name: (key, value, is it cleared)
        "forward": (key(filler, "CT_SERVICE"), value(41, 51, now + 3600, 40001, 7), True),
        "its reply": (reply_of(40001), value(41, 51, now + 3600, 40001, 7), False),
        "forward 2": (key(filler + 1, "CT_SERVICE"), value(41, 51, now + 3600, 40002, 8), True),
        "another flow's reply": (reply_of(40002), value(41, 51, now + 3600, 40002, 9), False),
        "reply": (key(filler + 2, "CT_OUT"), value(41, 52, now + 3600), False),
        "dead": (key(filler + 3, "CT_SERVICE"), value(43, 53, now - 5), False),
    }
    with L.MapFd.from_pin(pins / "ct_v4") as ct:
        ct.update_batch([key(i, "CT_SERVICE") for i in range(filler)], [value(40, 50, now + 3600)] * filler)
        for k, v, _ in cases.values():
            run("bpftool", "map", "update", "pinned", str(pins / "ct_v4"), "key", *hexargs(k), "value", *hexargs(v))
        assert conntrack_refs([ct]) == ({40, 41}, {50, 51, 52})
        assert _clear_flows_of(ct, {41, 43}, forward_only=True, close_replies=True) == 2
    for name, (k, _, cleared) in cases.items():
        assert (bpftool_lookup(pins / "ct_v4", k) is None) == cleared, name
    # the cleared connection's reply entry is closing (its port free after the close
    # timeout), another flow's at that key is left alone
    closing = layout.CT_ENTRY.unpack(bpftool_lookup(pins / "ct_v4", reply_of(40001)))
    assert closing["flags"] == layout.FLAGS["CT_ESTABLISHED"] | layout.FLAGS["CT_CLOSING"]
    assert now <= closing["expires"] <= layout.datapath_now() + dict(TIMEOUTS)["CT_CLOSE_TIMEOUT"]
    assert bpftool_lookup(pins / "ct_v4", reply_of(40002)) == cases["another flow's reply"][1]
    assert bpftool_lookup(pins / "ct_v4", key(filler - 1, "CT_SERVICE")) is not None


def test_ct_nat_list_and_maps_dump_stream_every_entry_of_a_busy_table(builds, state, netns: Netns, loaded):
    """`ct list`, `nat list` and `maps dump` read the tables a batch at a time and write
    rows as they go (a busy node's 500,000 entries are never all held): entries of several
    batches all appear, each as written (bpftool writes one of them), JSON as one list,
    the text a line per entry."""
    pins, now = state["pins"], layout.datapath_now()
    snat, established = layout.FLAGS["CT_SNAT"], layout.FLAGS["CT_ESTABLISHED"]
    count = 2 * L.LOOKUP_BATCH + 5

    def key(i: int) -> bytes:
        return layout.TUPLE.pack(saddr=ipaddress.IPv4Address(0xC6336400 + i), daddr=NODE_ADDR, sport=1024 + i,
                                 dport=30645, proto=6, dir=layout.FLAGS["CT_SERVICE"])

    def value(i: int) -> bytes:
        return layout.CT_ENTRY.pack(expires=now + 3600, backend_id=1 + i % 3, rev_nat_id=2, flags=established | snat,
                                    xl_saddr=NODE_ADDR, snat_port=40000 + i % 20000, xl_daddr="10.0.1.72",
                                    xl_dport=80)

    with L.MapFd.from_pin(pins / "ct_v4") as ct:
        ct.update_batch([key(i) for i in range(count - 1)], [value(i) for i in range(count - 1)])
    run("bpftool", "map", "update", "pinned", str(pins / "ct_v4"), "key", *hexargs(key(count - 1)),
        "value", *hexargs(value(count - 1)))
    rows = json.loads(ok_stdout(bpfgen("ct", "list", "--node", NODE, "-o", "json")))
    assert len(rows) == count
    last = ipaddress.IPv4Address(0xC6336400 + count - 1)
    assert [r for r in rows if r["src"] == f"{last}:{1024 + count - 1}"] == [{
        "table": "tcp", "proto": "TCP", "dir": "SVC", "src": f"{last}:{1024 + count - 1}", "dst": f"{NODE_ADDR}:30645",
        "expires_in": rows[0]["expires_in"], "backend_id": 1 + (count - 1) % 3, "rev_nat_id": 2,
        "flags": ["established", "snat"], "snat": f"{NODE_ADDR}:{40000 + (count - 1) % 20000}"}]
    assert 3595 <= rows[0]["expires_in"] <= 3600
    text = ok_stdout(bpfgen("ct", "list", "--node", NODE)).splitlines()
    assert len(text) == count and f"TCP SVC {last}:{1024 + count - 1} -> {NODE_ADDR}:30645 " in "\n".join(text)
    nat = json.loads(ok_stdout(bpfgen("nat", "list", "--node", NODE, "-o", "json")))
    assert sum(r["dir"] == "OUT" for r in nat) == count
    assert {"proto": "TCP", "dir": "OUT", "src": f"{last}:{1024 + count - 1}", "dst": "10.0.1.72:80",
            "xlate": "XLATE_SRC", "to": f"{NODE_ADDR}:{40000 + (count - 1) % 20000}"} in nat
    # and `maps dump`, which decodes by BTF, the same way: the JSON one list of maps
    [dumped] = json.loads(ok_stdout(bpfgen("maps", "dump", "ct_v4", "--node", NODE, "-o", "json")))
    assert dumped["name"] == "ct_v4" and len(dumped["entries"]) == count
    assert {"saddr": str(last), "sport": 1024 + count - 1} in [
        {f: e["key"][f] for f in ("saddr", "sport")} for e in dumped["entries"]]
    text = ok_stdout(bpfgen("maps", "dump", "ct_v4", "--node", NODE)).splitlines()
    assert text[0] == f"ct_v4 (hash, {count} entries)" and len(text) == count + 1


def test_the_conntrack_collector_runs_on_its_timer_across_a_program_replacement(builds, state, netns: Netns,
                                                                               loaded):
    """ct_v4 never evicts, so its dead entries are collected: by the timer in the pinned
    collector_v4, every CT_GC_INTERVAL seconds, after bpfgen has exited; a live entry
    stays. A program replacement hands the timer to the new program (the old ones leave
    the kernel) and collection goes on; unload_leaves_nothing checks the maps go too."""
    pins = state["pins"]
    interval = dict(TIMEOUTS)["CT_GC_INTERVAL"]
    grace = dict(TIMEOUTS)["SNAT_REUSE_GRACE"]
    ct = write_state(pins)

    def dead_entry(port: int) -> bytes:
        key = layout.TUPLE.pack(saddr="192.0.2.11", daddr=NODE_ADDR, sport=port, dport=30645, proto=6,
                                dir=layout.FLAGS["CT_SERVICE"])
        value = layout.CT_ENTRY.pack(expires=layout.datapath_now() - grace - 2, backend_id=1, rev_nat_id=2)
        run("bpftool", "map", "update", "pinned", str(pins / "ct_v4"), "key", *hexargs(key), "value", *hexargs(value))
        return key

    def collector_id() -> int:
        return json.loads((state["run"] / "nodes" / f"{NODE}.json").read_text())["collector_id"]

    first = collector_id()
    assert bpftool("prog", "show", "id", str(first))["name"] == "collector_arm"
    assert _collected(pins, dead_entry(41000), interval + 3)
    stderr = load(netns, builds["snat-code"])
    assert "programs replaced" in stderr
    assert collector_id() != first
    assert wait_gone([first, *loaded["ids"].values()]) == [], "the timer keeps a replaced program"
    assert _collected(pins, dead_entry(41001), interval + 3)
    assert bpftool_lookup(pins / "ct_v4", CT_KEY) == ct


def test_a_pinned_map_of_another_layout_is_refused_and_nothing_is_left(builds, state, netns: Netns):
    """A map pinned under a bpfgen name with another key or value size (another bpfgen, or
    someone else's) is named, with the difference, and the load changes nothing."""
    state["pins"].mkdir(parents=True)
    run("bpftool", "map", "create", str(state["pins"] / "ct_v4"), "type", "lru_hash", "key", "16", "value", "8",
        "entries", "1024", "name", "ct_v4")
    err = clean_error(bpfgen("load", "--iface", IFACE, "--build", str(builds["seed"]), "--netns", netns.name),
                      exit_code=1)
    assert "ct_v4" in err and "incompatible" in err and "value_size" in err
    assert attached(netns) == {"ingress": None, "egress": None}
    assert sorted(p.name for p in state["pins"].iterdir()) == ["ct_v4"]
    assert records(state["run"]) == []


# ---------------------------------------------------------------- unload


def test_unload_leaves_nothing(builds, state, netns: Netns, loaded):
    pins = state["pins"]
    write_state(pins)
    maps0 = map_ids(pins)
    stderr = ok(bpfgen("unload", "--iface", IFACE, "--netns", netns.name))
    assert f"unloaded node {NODE} from {IFACE}: detached ingress, egress, removed {len(layout.MAPS)} pins" in stderr
    assert "removed the clsact qdisc" in stderr
    assert_nothing_left(netns, pins, state["run"])
    assert not state["root"].exists()
    assert ok_stdout(bpfgen("status", "-o", "json")).strip() == "[]"
    assert wait_gone(list(loaded["ids"].values())) == [], "programs still in the kernel"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
            run("bpftool", "map", "show", "id", str(i), check=False).returncode == 0 for i in maps0.values()):
        time.sleep(0.1)
    assert all(run("bpftool", "map", "show", "id", str(i), check=False).returncode != 0 for i in maps0.values())

    # a second unload: a clean error, nothing to do
    err = clean_error(bpfgen("unload", "--iface", IFACE, "--netns", netns.name), exit_code=2)
    assert "nothing of bpfgen is loaded" in err


OTHER_PROGRAM = """#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("tc")
int other_pass(struct __sk_buff *skb)
{
	return 0; /* TC_ACT_OK */
}

char LICENSE[] SEC("license") = "GPL";
"""


def clang_bpf(src: Path, obj: Path) -> None:
    """Compile with the product's own clang invocation (same flags as `bpfgen compile`)."""
    compile_object(src, obj)


@pytest.fixture(scope="module")
def other_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tc program of someone else, attached with tc itself."""
    d = tmp_path_factory.mktemp("other")
    (d / "other.bpf.c").write_text(OTHER_PROGRAM)
    clang_bpf(d / "other.bpf.c", d / "other.bpf.o")
    return d / "other.bpf.o"


def test_unload_keeps_a_clsact_qdisc_bpfgen_did_not_create(builds, state, netns: Netns, other_program: Path):
    run("tc", "-n", netns.name, "qdisc", "add", "dev", IFACE, "clsact")
    run("tc", "-n", netns.name, "filter", "add", "dev", IFACE, "ingress", "pref", "1", "bpf", "da",
        "obj", str(other_program), "sec", "tc")
    ids = load_ids(load(netns, builds["seed"]))
    assert attached(netns) == ids
    assert sorted(f["name"] for f in tc_filters(netns, "ingress")) == ["from_netdev", "other_pass"]
    stderr = ok(bpfgen("unload", "--iface", IFACE, "--netns", netns.name))
    assert "removed the clsact qdisc" not in stderr
    assert "clsact" in qdisc_kinds(netns)
    assert [f["name"] for f in tc_filters(netns, "ingress")] == ["other_pass"]  # the other filter is kept
    assert tc_filters(netns, "egress") == []
    assert not state["pins"].exists() and records(state["run"]) == []


# ---------------------------------------------------------------- errors a user gets cleanly


def _setpriv(*opts: str) -> tuple[str, ...]:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    return ("setpriv", *opts)


# A non-root user with no capability but CAP_DAC_READ_SEARCH: only so that it can read
# the interpreter and the package where they live (e.g. under /root); not one bpfgen needs.
NOT_ROOT = ("--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all,+dac_read_search",
            "--ambient-caps=+dac_read_search", "--bounding-set=-all,+dac_read_search")


@pytest.mark.parametrize("opts, missing, who", [
    pytest.param(NOT_ROOT, ["CAP_BPF", "CAP_NET_ADMIN"], "not root", id="not-root"),
    pytest.param(("--inh-caps=-net_admin", "--bounding-set=-net_admin"), ["CAP_NET_ADMIN"], "root", id="no-net-admin"),
    pytest.param(("--inh-caps=-bpf,-sys_admin", "--bounding-set=-bpf,-sys_admin"), ["CAP_BPF"], "root", id="no-bpf"),
])
@pytest.mark.parametrize("command", ["load", "unload"])
def test_missing_privileges(state, netns: Netns, opts, missing, who, command, tmp_path: Path):
    # No --build: the privileges are checked before anything else (and a build under
    # pytest's root-only tmp dir would make click refuse the path first for the non-root user).
    args = [command, "--iface", IFACE, "--netns", netns.name]
    err = clean_error(bpfgen_proc(*args, prefix=_setpriv(*opts), cwd=tmp_path), exit_code=1)
    for cap in missing:
        assert cap in err
    for cap in {"CAP_BPF", "CAP_NET_ADMIN"} - set(missing):
        assert cap not in err
    assert who in err
    assert_nothing_left(netns, state["pins"], state["run"])
    assert not state["root"].exists()


def test_interface_does_not_exist(builds, state, netns: Netns):
    err = clean_error(bpfgen("load", "--iface", "nosuch0", "--build", str(builds["seed"]), "--netns", netns.name),
                      exit_code=2)
    assert "interface 'nosuch0' does not exist" in err and netns.name in err
    assert_nothing_left(netns, state["pins"], state["run"])
    err = clean_error(bpfgen("load", "--iface", IFACE, "--build", str(builds["seed"]), "--netns", "bgt-nosuchns"),
                      exit_code=2)
    assert "bgt-nosuchns" in err and "does not exist" in err
    assert not state["root"].exists()


def test_the_interface_is_checked_before_the_spec_is_read(state, netns: Netns, tmp_path: Path):
    """Cheap checks first: a bad interface is reported before a (large, here broken) spec
    is read or compiled."""
    spec = tmp_path / "broken.yaml"
    spec.write_text("apiVersion: bpfgen/v1\nkind: Nope\n")
    err = clean_error(bpfgen("load", "--iface", "nosuch0", "--spec", str(spec), "--netns", netns.name), exit_code=2)
    assert "interface 'nosuch0' does not exist" in err and "Nope" not in err
    assert not (tmp_path / "out").exists()


def test_one_backend_moved_writes_its_entries_alone_and_keeps_the_programs(builds, state, netns: Netns, loaded,
                                                                           tmp_path: Path):
    data = yaml.safe_load(SEED.read_text())
    data["services"][0]["backends"][0]["address"] = "10.0.1.99"
    spec = tmp_path / "moved-backend.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    build = compile_spec(spec, tmp_path / "build")
    maps0 = map_ids(state["pins"])
    stderr = load(netns, build.dir)
    ports = len(data["services"][0]["ports"])
    assert f"updated node {NODE} on {IFACE}: {ports} entries written, 0 deleted, programs kept" in stderr
    assert load_ids(stderr) == loaded["ids"] == attached(netns)
    assert map_ids(state["pins"]) == maps0
    backends = sorted(f"{e['value']['addr']}:{e['value']['port']}" for e in bpftool_entries(state["pins"] / "backend_v4"))
    assert backends == ["10.0.1.99:80", "10.0.1.99:80"]


def test_no_build_found(state, netns: Netns, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = clean_error(bpfgen("load", "--iface", IFACE, "--netns", netns.name), exit_code=2)
    assert "no build found" in err and "bpfgen compile" in err
    err = clean_error(bpfgen("load", "--iface", IFACE, "--build", str(tmp_path / "nope"), "--netns", netns.name),
                      exit_code=2)
    assert "not a bpfgen build" in err
    err = clean_error(bpfgen("load", "--iface", IFACE, "--build", "x", "--spec", str(SEED)), exit_code=2)
    assert "not both" in err
    assert_nothing_left(netns, state["pins"], state["run"])


@pytest.mark.parametrize("address", ["172.26.99.1/24", None], ids=["foreign-address", "no-address"])
def test_node_cannot_be_determined(builds, state, other_netns, address):
    ns = other_netns(address)
    err = clean_error(bpfgen("load", "--iface", IFACE, "--build", str(builds["seed"]), "--netns", ns.name),
                      exit_code=2)
    assert "cannot tell which node" in err and "--node" in err
    assert (address.split("/")[0] if address else "none") in err
    assert_nothing_left(ns, state["pins"], state["run"])
    err = clean_error(bpfgen("load", "--iface", IFACE, "--build", str(builds["seed"]), "--netns", ns.name,
                             "--node", "node7"), exit_code=2)
    assert "node 'node7' is not in spec" in err and "node0" in err
    assert_nothing_left(ns, state["pins"], state["run"])


REJECTED_FROM_NETDEV = """SEC("tc")
int from_netdev(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;

	return *(__u32 *)data; /* no bounds check: the verifier must refuse this */
}
"""


@pytest.fixture(scope="module")
def rejected_build(builds, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed build with node0's from_netdev replaced by one the verifier rejects
    (same maps, so pins and layout are those of a seed load)."""
    d = tmp_path_factory.mktemp("rejected") / "build"
    shutil.copytree(builds["seed"], d)
    src = d / "datapath.bpf.c"
    text, n = re.subn(r'SEC\("tc"\)\nint from_netdev\(struct __sk_buff \*skb\)\n\{\n.*?\n\}\n',
                      REJECTED_FROM_NETDEV, src.read_text(), flags=re.S)
    assert n == 1
    src.write_text(text)
    (d / "datapath.bpf.o").unlink()
    clang_bpf(src, d / "datapath.bpf.o")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["object_sha256"] = hashlib.sha256((d / "datapath.bpf.o").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_verifier_rejection_leaves_nothing(rejected_build, state, netns: Netns):
    err = clean_error(bpfgen("load", "--iface", IFACE, "--build", str(rejected_build), "--netns", netns.name),
                      exit_code=1, one_line=False)
    lines = err.strip().splitlines()
    assert "load object" in lines[0] and "datapath.bpf.o" in lines[0]
    assert "verifier log" in err
    assert re.search(r"invalid access to packet|outside of the packet", err), err
    assert_nothing_left(netns, state["pins"], state["run"])
    assert not state["root"].exists()


def test_verifier_rejection_on_update_keeps_the_load(rejected_build, builds, state, netns: Netns, loaded):
    pins = state["pins"]
    ct = write_state(pins)
    before = {name: _sorted(bpftool_entries(pins / name)) for name in TABLE_MAPS}
    maps0 = map_ids(pins)
    err = clean_error(bpfgen("load", "--iface", IFACE, "--build", str(rejected_build), "--netns", netns.name),
                      exit_code=1, one_line=False)
    assert re.search(r"invalid access to packet|outside of the packet", err), err
    assert attached(netns) == loaded["ids"]
    assert map_ids(pins) == maps0
    assert {name: _sorted(bpftool_entries(pins / name)) for name in TABLE_MAPS} == before
    assert_state(pins, ct)


def test_second_load_at_the_same_time_is_locked_out(builds, state, netns: Netns):
    state["run"].mkdir(parents=True, exist_ok=True)
    with open(state["run"] / f"{NODE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "the first load", still running
        proc = bpfgen_proc("load", "--iface", IFACE, "--build", str(builds["seed"]), "--netns", netns.name)
        err = clean_error(proc, exit_code=1)
        assert f"another bpfgen command is changing node '{NODE}'" in err
        assert_nothing_left(netns, state["pins"], state["run"])
        assert not state["root"].exists()
    # once the lock is free the load goes through
    assert load_ids(ok(bpfgen_proc("load", "--iface", IFACE, "--build", str(builds["seed"]),
                                   "--netns", netns.name))) == attached(netns)


def test_second_update_at_the_same_time_is_locked_out(builds, state, netns: Netns, loaded):
    pins = state["pins"]
    before = {name: _sorted(bpftool_entries(pins / name)) for name in TABLE_MAPS}
    with open(state["run"] / f"{NODE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = clean_error(bpfgen_proc("load", "--iface", IFACE, "--build", str(builds["added"]),
                                      "--netns", netns.name), exit_code=1)
        assert "another bpfgen command" in err
        err = clean_error(bpfgen_proc("unload", "--iface", IFACE, "--netns", netns.name), exit_code=1)
        assert "another bpfgen command" in err
    assert attached(netns) == loaded["ids"]
    assert {name: _sorted(bpftool_entries(pins / name)) for name in TABLE_MAPS} == before


# ---------------------------------------------------------------- ip netns exec


def test_ip_netns_exec_load_refuses_with_a_hint(builds, state, netns: Netns):
    proc = bpfgen_proc("load", "--iface", IFACE, "--build", str(builds["seed"]),
                       prefix=("ip", "netns", "exec", netns.name))
    err = clean_error(proc, exit_code=2)
    assert "ip netns exec" in err and "--netns" in err and "nsenter" in err
    assert_nothing_left(netns, state["pins"], state["run"])
    assert not state["root"].exists()


def test_ip_netns_exec_unload_refuses_or_removes_everything(builds, state, netns: Netns, loaded):
    proc = bpfgen_proc("unload", "--iface", IFACE, prefix=("ip", "netns", "exec", netns.name))
    if proc.returncode != 0:  # refused: with a hint, and the load is intact
        err = clean_error(proc)
        assert "--netns" in err and "nsenter" in err
        assert attached(netns) == loaded["ids"]
        assert sorted(p.name for p in state["pins"].iterdir()) == sorted(MAP_NAMES)
        assert records(state["run"]) == [f"{NODE}.json"]
    else:  # reached the host's bpffs: nothing left
        assert_nothing_left(netns, state["pins"], state["run"])


@pytest.mark.parametrize("command", [["maps", "dump", "-o", "json"], ["service", "list", "-o", "json"],
                                     ["status", "-o", "json"]], ids=["maps-dump", "service-list", "status"])
def test_ip_netns_exec_reads_refuse_or_reach_the_host_bpffs(builds, state, netns: Netns, loaded, command):
    proc = bpfgen_proc(*command, prefix=("ip", "netns", "exec", netns.name))
    if proc.returncode != 0:
        err = clean_error(proc)
        assert "--netns" in err and "nsenter" in err, err
        return
    rows = json.loads(proc.stdout)
    if command[0] == "status":
        assert rows[0]["pinned"] is True, rows
    elif command[0] == "maps":
        assert [m["name"] for m in rows] == MAP_NAMES
    else:
        assert len(rows) == 4


# ---------------------------------------------------------------- a load that fails part-way


def _fail_egress_attach(monkeypatch, before_raising=lambda: None) -> list[str]:
    """Make attaching (or replacing) the egress program fail, after the maps were
    filled and the ingress program attached. monkeypatch: a monkeypatch.context(), so
    that undoing it keeps isolated_state's environment."""
    calls: list[str] = []
    real = L.tc_attach

    def tc_attach(ifindex, attach_point, prog_fd, handle, priority, replace=False):
        if attach_point == L.BPF_TC_EGRESS:
            calls.append("egress")
            before_raising()
            raise L.LibbpfError("tc attach to egress (injected failure)", 5)
        calls.append("ingress")
        return real(ifindex, attach_point, prog_fd, handle, priority, replace=replace)

    monkeypatch.setattr(L, "tc_attach", tc_attach)
    return calls


def test_fresh_load_failing_part_way_leaves_nothing(builds, state, netns: Netns, monkeypatch):
    with monkeypatch.context() as m:
        calls = _fail_egress_attach(m)
        result = bpfgen("load", "--iface", IFACE, "--build", str(builds["seed"]), "--netns", netns.name)
    assert calls == ["ingress", "egress"]
    err = clean_error(result, exit_code=1)
    assert "injected failure" in err
    assert_nothing_left(netns, state["pins"], state["run"])
    assert not state["root"].exists()
    # and a load afterwards works as on a fresh machine
    stderr = load(netns, builds["seed"])
    assert f"\nloaded node {NODE}" in "\n" + stderr


def test_fresh_load_failing_part_way_reports_only_the_cause(builds, state, netns: Netns, monkeypatch):
    with monkeypatch.context() as m:
        _fail_egress_attach(m)
        result = bpfgen("load", "--iface", IFACE, "--build", str(builds["seed"]), "--netns", netns.name)
    err = clean_error(result, exit_code=1)
    assert "undoing it failed" not in err and "file descriptor is closed" not in err


def test_update_failing_part_way_restores_the_maps(builds, state, netns: Netns, loaded, monkeypatch):
    pins = state["pins"]
    ct = write_state(pins)
    before = {name: _sorted(bpftool_entries(pins / name)) for name in ("svc_v4", "backend_v4", "revnat_v4",
                                                                         "fe_addr_v4")}
    status0 = ok_stdout(bpfgen("status", "-o", "json"))
    with monkeypatch.context() as m:
        calls = _fail_egress_attach(m)
        result = bpfgen("load", "--iface", IFACE, "--build", str(builds["moved"]), "--netns", netns.name,
                        "--node", NODE)
    assert calls[:2] == ["ingress", "egress"]  # moved.yaml changes both programs (then undo may re-attach)
    err = clean_error(result, exit_code=1)
    assert "injected failure" in err
    assert_state(pins, ct)
    assert ok_stdout(bpfgen("status", "-o", "json")) == status0
    check_services(pins, SEED_TABLE)
    assert {name: _sorted(bpftool_entries(pins / name)) for name in before} == before


def test_update_failing_part_way_restores_the_programs(builds, state, netns: Netns, loaded, monkeypatch):
    old = loaded["ids"]

    def after_the_old_program_is_freed():  # a failure that comes a moment later
        wait_gone([old["ingress"]], timeout=5)

    with monkeypatch.context() as m:
        calls = _fail_egress_attach(m, after_the_old_program_is_freed)
        result = bpfgen("load", "--iface", IFACE, "--build", str(builds["moved"]), "--netns", netns.name,
                        "--node", NODE)
    assert calls[:2] == ["ingress", "egress"]
    clean_error(result, exit_code=1, one_line=False)
    now = attached(netns)
    assert now["egress"] == old["egress"]
    assert now["ingress"] == old["ingress"], (
        f"ingress runs program {now['ingress']} "
        f"(tag {bpftool('prog', 'show', 'id', str(now['ingress']))['tag']}), not the previous {old['ingress']}")


def test_an_update_failing_after_arming_the_collector_arms_the_last_one_again(builds, state, netns: Netns, loaded,
                                                                              monkeypatch):
    """The collector's timer holds the program whose callbacks it runs: a replacement that
    fails after arming the new object's (here: writing the record) arms the last load's
    again, which the record names, and collection goes on."""
    from bpfgen import state as state_mod

    record = state["run"] / "nodes" / f"{NODE}.json"
    first = json.loads(record.read_text())["collector_id"]

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(state_mod.NodeRecord, "save", fail)
        clean_error(bpfgen("load", "--iface", IFACE, "--build", str(builds["snat-code"]), "--netns", netns.name),
                    exit_code=1, one_line=False)
    assert attached(netns) == loaded["ids"]
    assert json.loads(record.read_text())["collector_id"] == first
    assert bpftool("prog", "show", "id", str(first))["name"] == "collector_arm"
    key = layout.TUPLE.pack(saddr="192.0.2.12", daddr=NODE_ADDR, sport=41002, dport=30645, proto=6,
                            dir=layout.FLAGS["CT_SERVICE"])
    value = layout.CT_ENTRY.pack(expires=layout.datapath_now() - 5, backend_id=1, rev_nat_id=2)
    run("bpftool", "map", "update", "pinned", str(state["pins"] / "ct_v4"), "key", *hexargs(key), "value",
        *hexargs(value))
    assert _collected(state["pins"], key, dict(TIMEOUTS)["CT_GC_INTERVAL"] + 3)
    # ... by the last load's program: the failed one's is gone from the kernel
    assert [p for p in json.loads(run("bpftool", "-j", "prog", "show").stdout)
            if p.get("name") == "collector_arm" and p["id"] > first] == []


def reserved_ports(ns: Netns) -> str:
    return ns.run("cat", "/proc/sys/net/ipv4/ip_local_reserved_ports").stdout.strip()


def test_load_reserves_the_service_ports_and_unload_gives_them_back(builds, state, netns: Netns):
    """The node's own connections never draw a nodePort or an SNAT port (as Cilium does for
    NodePorts); what someone else reserved stays."""
    netns.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 29999", "net.ipv4.ip_local_reserved_ports=12345")
    stderr = load(netns, builds["seed"])
    assert "warning" not in stderr
    assert reserved_ports(netns) == "12345,30000-65535"
    (row,) = json.loads(ok_stdout(bpfgen("status", "-o", "json")))
    load(netns, builds["snat-code"])  # snatPortRange 32768-60999: 61000-65535 given back
    assert reserved_ports(netns) == "12345,30000-60999"
    ok(bpfgen("unload", "--iface", IFACE, "--netns", netns.name))
    assert reserved_ports(netns) == "12345"


def test_snat_ports_covering_the_ephemeral_range_are_warned_about_not_reserved(builds, state, netns: Netns):
    """Reserving snatPortRange on a stock node (ephemeral 32768-60999) would leave the node
    no port for its own connections: load reserves the nodePorts only and says what to narrow."""
    netns.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 60999")
    stderr = load(netns, builds["seed"])
    assert "warning: the node hands out ephemeral ports 32768-60999, 28232 of them inside snatPortRange" in stderr
    assert "Narrow net.ipv4.ip_local_port_range (e.g. 1024-29999)" in stderr
    assert reserved_ports(netns) == "30000-32767"
    netns.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 29999")
    assert "warning" not in load(netns, builds["seed"])
    assert reserved_ports(netns) == "30000-65535"


def test_the_default_ranges_are_reserved_on_a_stock_node_without_a_warning(builds, state, netns: Netns):
    """The default snatPortRange lies above a stock node's ephemeral ports (32768-60999):
    load reserves it and the nodePorts, with no warning, and unload gives both back."""
    netns.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 60999")
    stderr = load(netns, builds["stock-ranges"])
    assert "warning" not in stderr
    assert reserved_ports(netns) == "30000-32767,61000-65535"
    ok(bpfgen("unload", "--iface", IFACE, "--netns", netns.name))
    assert reserved_ports(netns) == ""


def test_unload_from_another_namespace_refuses_and_changes_nothing(builds, state, netns: Netns):
    """A node loaded in one namespace is not unloaded through a same-named interface of
    another (whose qdisc it would otherwise destroy)."""
    load(netns, builds["seed"])
    ids = attached(netns)
    other = Netns(address=None)
    try:
        err = clean_error(bpfgen("unload", "--iface", IFACE, "--node", NODE, "--netns", other.name), exit_code=2)
        assert f"network namespace '{netns.name}'" in err and f"--netns {netns.name}" in err
        assert "clsact" not in other.ip("-d", "link", "show", IFACE) and not tc_filters(other, "ingress")
    finally:
        other.remove()
    assert attached(netns) == ids
    assert state["pins"].is_dir()
    ok(bpfgen("unload", "--iface", IFACE, "--netns", netns.name))


def test_a_non_ethernet_interface_is_refused(builds, state, netns: Netns):
    err = clean_error(bpfgen("load", "--iface", "lo", "--build", str(builds["seed"]), "--netns", netns.name,
                             "--node", NODE), exit_code=2)
    assert "'lo' is not an Ethernet interface (link type loopback)" in err
    assert not (state["pins"] / NODE).exists() and not tc_filters(netns, "ingress")


def test_a_second_node_on_the_same_interface_is_refused(builds, state, netns: Netns):
    load(netns, builds["seed"])
    ids = attached(netns)
    err = clean_error(bpfgen("load", "--iface", IFACE, "--build", str(builds["seed"]), "--netns", netns.name,
                             "--node", "node1"), exit_code=2)
    assert "carries node 'node0'" in err
    err = clean_error(bpfgen("unload", "--iface", IFACE, "--node", "node1", "--netns", netns.name), exit_code=2)
    assert "carries node 'node0'" in err
    assert attached(netns) == ids and not (state["root"] / "node1").exists()


def test_a_node_whose_namespace_is_gone_is_cleared_by_unload_node(builds, state, other_netns):
    gone = other_netns("172.26.50.101/24")
    load(gone, builds["seed"])
    gone.remove()
    stderr = ok(bpfgen("unload", "--iface", IFACE, "--node", NODE))
    assert f"unloaded node {NODE}" in stderr
    assert not state["root"].exists() and not list((state["run"] / "nodes").glob("*.json"))


def test_an_unreadable_record_blocks_nothing_and_unload_node_clears_it(builds, state, netns: Netns):
    load(netns, builds["seed"])
    record = state["run"] / "nodes" / f"{NODE}.json"
    record.write_text("{ not json")
    ok(bpfgen("status"))  # the other records (none here) still show
    ok(bpfgen("unload", "--iface", IFACE, "--node", NODE, "--netns", netns.name))
    assert not record.exists() and not state["pins"].exists()


def test_a_data_update_failing_part_way_restores_the_address_filter(builds, state, netns: Netns, loaded,
                                                                     monkeypatch, tmp_path: Path):
    """An update that adds a clusterIP and a backend on the node (their filter bits set
    before their frontends) and then fails: the undo takes the bits back with the
    frontends (the filters are arrays: their words are written back, zero ones too)."""
    from bpfgen import loader

    pins = state["pins"]
    doc = yaml.safe_load(SEED.read_text())
    doc["services"].append({"name": "extra", "type": "ClusterIP", "clusterIP": "10.100.7.7",
                            "ports": [{"protocol": "TCP", "port": 81, "targetPort": 80}],
                            "backends": [{"address": "10.0.1.72", "node": "node1"},
                                         {"address": "10.0.0.33", "node": NODE}]})
    spec = tmp_path / "extra.yaml"
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    build = compile_spec(spec, tmp_path / "build").dir
    before = {name: _sorted(bpftool_entries(pins / name)) for name in ("svc_v4", "fe_addr_v4", "be_addr_v4")}

    def fail(*args, **kwargs):
        raise OSError("injected failure")

    with monkeypatch.context() as m:
        m.setattr(loader, "_reserve", fail)
        result = bpfgen("load", "--iface", IFACE, "--build", str(build), "--netns", netns.name, "--node", NODE)
    assert "injected failure" in clean_error(result, exit_code=1)
    assert {name: _sorted(bpftool_entries(pins / name)) for name in before} == before
