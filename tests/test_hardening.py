"""Hostile input and broken state: names that would become paths elsewhere, links planted
where bpfgen writes, damaged builds, state the kernel no longer matches, concurrent use.
Every case in temporary directories and the test's own namespaces, never real paths."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from bpfgen.build import compile_spec

from conftest import SEED, Netns
from test_loader import (  # noqa: F401  (fixtures)
    IFACE, NODE, attached, bpfgen, bpfgen_proc, builds, clean_error, load, load_ids, loaded, ok, ok_stdout,
    other_netns, records, state,
)

pytestmark = pytest.mark.kernel


# ---------------------------------------------------------------- names that become paths


@pytest.mark.parametrize("command", [["unload", "--iface", IFACE], ["load", "--iface", IFACE],
                                     ["maps", "dump"], ["ct", "list"]], ids=["unload", "load", "maps-dump", "ct-list"])
@pytest.mark.parametrize("name", ["../../../../tmp/x/victim", "a/b", "..", "Node0", "x" * 16])
def test_a_node_name_that_is_not_a_dns_label_is_refused_everywhere(state, netns: Netns, tmp_path: Path,
                                                                   command: list[str], name: str):
    victim = tmp_path / "x"
    victim.mkdir()
    (victim / "victim.json").write_text("{}")
    (victim / "victim").mkdir()
    (victim / "victim" / "keep").write_text("keep")
    err = clean_error(bpfgen(*command, "--node", name, "--netns", netns.name), exit_code=2)
    assert "invalid node name" in err
    assert sorted(p.name for p in victim.rglob("*")) == ["keep", "victim", "victim.json"]
    assert not list(state["run"].glob("**/*.lock")) if state["run"].exists() else True


def test_a_symlinked_pin_directory_is_refused(builds, state, netns: Netns, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("x")
    state["root"].mkdir(parents=True, exist_ok=True)
    state["pins"].symlink_to(elsewhere)
    err = clean_error(bpfgen("load", "--iface", IFACE, "--build", str(builds["seed"]), "--netns", netns.name),
                      exit_code=1)
    assert "symbolic link" in err
    err = clean_error(bpfgen("unload", "--iface", IFACE, "--node", NODE, "--netns", netns.name))
    assert "symbolic link" in err
    assert (elsewhere / "precious").read_text() == "x" and attached(netns) == {"ingress": None, "egress": None}


def test_compile_never_writes_through_a_planted_symlink(tmp_path: Path):
    out = tmp_path / "build"
    out.mkdir()
    target = tmp_path / "victim"
    target.write_text("untouched")
    for name in ("datapath.bpf.c", "bpfgen_layout.h", "spec.json", "plan.json", "manifest.json", "datapath.bpf.o"):
        (out / name).symlink_to(target)
    build = compile_spec(SEED, out)
    assert target.read_text() == "untouched"
    for name in build.manifest["files"] + ["manifest.json"]:
        assert not (out / name).is_symlink() and (out / name).is_file(), name


def test_records_and_plans_are_root_only(builds, state, netns: Netns, loaded):
    nodes = state["run"] / "nodes"
    assert stat.S_IMODE(nodes.stat().st_mode) & 0o077 == 0
    for p in nodes.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name


def test_maps_dump_with_a_namespace_that_does_not_exist_fails(builds, state, netns: Netns, loaded):
    err = clean_error(bpfgen("maps", "dump", "--node", NODE, "--netns", "bgt-nosuchns"), exit_code=2)
    assert "bgt-nosuchns" in err and "does not exist" in err


# ---------------------------------------------------------------- damaged builds


@pytest.mark.parametrize("damage", ["empty-manifest", "manifest-not-json", "truncated-object", "not-elf",
                                    "object-gone", "plan-edited", "old-format"])
def test_a_damaged_build_is_one_line_and_exit_2(state, netns: Netns, tmp_path: Path, damage: str):
    build = compile_spec(SEED, tmp_path / "build")
    d = build.dir
    manifest = json.loads((d / "manifest.json").read_text())
    if damage == "empty-manifest":
        (d / "manifest.json").write_text("{}")
    elif damage == "manifest-not-json":
        (d / "manifest.json").write_text("{ not json")
    elif damage == "truncated-object":
        data = build.object_path.read_bytes()
        build.object_path.write_bytes(data[: len(data) // 2])
    elif damage == "not-elf":
        build.object_path.write_text("not an object\n")
    elif damage == "object-gone":
        build.object_path.unlink()
    elif damage == "plan-edited":
        (d / "plan.json").write_text((d / "plan.json").read_text().replace("10.0.1.72", "10.0.1.73"))
    else:
        manifest["format"] = 1
        (d / "manifest.json").write_text(json.dumps(manifest))
    err = clean_error(bpfgen("load", "--iface", IFACE, "--build", str(d), "--netns", netns.name), exit_code=2)
    assert str(d) in err and "compile the spec again" in err or "not a bpfgen build" in err or "unreadable" in err
    assert attached(netns) == {"ingress": None, "egress": None}
    assert records(state["run"]) == []


# ---------------------------------------------------------------- the kernel is the source of truth


def test_a_node_whose_programs_are_gone_is_taken_over_and_cleared(builds, state, other_netns):
    """Loaded under nsenter (no --netns), its namespace then deleted: the record names
    programs the kernel dropped; load elsewhere takes the node over, unload --node clears."""
    gone = other_netns("172.26.50.101/24")
    ok(bpfgen_proc("load", "--iface", IFACE, "--build", str(builds["seed"]),
                   prefix=("nsenter", f"--net=/run/netns/{gone.name}")))
    gone.remove()
    deadline = time.monotonic() + 20  # the kernel tears a namespace down in the background
    while [r["stale"] for r in json.loads(ok_stdout(bpfgen("status", "-o", "json")))] != [True]:
        assert time.monotonic() < deadline, "the record never turned stale"
        time.sleep(0.2)
    fresh = other_netns("172.26.50.101/24")
    stderr = load(fresh, builds["seed"])
    assert "names programs the kernel no longer has; taking the node over" in stderr
    assert attached(fresh) == load_ids(stderr)
    # the same again, cleared by unload --node
    fresh.remove()
    stderr = ok(bpfgen("unload", "--iface", IFACE, "--node", NODE))
    assert f"unloaded node {NODE}" in stderr and records(state["run"]) == []


def test_a_lost_run_dir_is_seen_and_another_node_is_refused(builds, state, netns: Netns, loaded):
    subprocess.run(["rm", "-rf", str(state["run"])], check=True)
    status = json.loads(ok_stdout(bpfgen("status", "-o", "json")))
    assert status == [{"node": NODE, "record": False, "pin_dir": str(state["pins"]), "pinned": True,
                       "note": status[0]["note"]}] and "no record" in status[0]["note"]
    err = clean_error(bpfgen("load", "--iface", IFACE, "--build", str(builds["seed"]), "--netns", netns.name,
                             "--node", "node1"), exit_code=2)
    assert f"runs the programs of node '{NODE}'" in err
    assert attached(netns) == loaded["ids"]
    # the node itself is taken over by load, and unloads cleanly
    stderr = load(netns, builds["seed"])
    assert "loaded node node0" in stderr
    ok(bpfgen("unload", "--iface", IFACE, "--netns", netns.name))
    assert attached(netns) == {"ingress": None, "egress": None}


def test_pins_removed_by_hand_are_reported_as_fresh_state(builds, state, netns: Netns, loaded):
    subprocess.run(["rm", "-rf", str(state["pins"])], check=True)
    stderr = load(netns, builds["seed"])
    assert "were created afresh" in stderr and "connections tracked before are lost" in stderr


def test_unload_succeeds_when_the_qdisc_was_removed_by_someone_else(builds, state, netns: Netns, loaded):
    subprocess.run(["tc", "-n", netns.name, "qdisc", "del", "dev", IFACE, "clsact"], check=True)
    stderr = ok(bpfgen("unload", "--iface", IFACE, "--netns", netns.name))
    assert "detached nothing" in stderr and records(state["run"]) == []


# ---------------------------------------------------------------- concurrent use


def test_a_second_command_on_the_same_interface_is_locked_out(builds, state, netns: Netns):
    """Whatever node it names: two nodes never end up on one interface."""
    state["run"].mkdir(parents=True, exist_ok=True)
    inode = os.stat(f"/run/netns/{netns.name}").st_ino
    ifindex = json.loads(netns.ip("-j", "link", "show", IFACE))[0]["ifindex"]
    with open(state["run"] / f"iface-{inode}-{ifindex}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "a load of node1", still running
        err = clean_error(bpfgen_proc("load", "--iface", IFACE, "--build", str(builds["seed"]), "--netns",
                                      netns.name, "--node", NODE), exit_code=1)
        assert f"changing interface '{IFACE}' right now" in err
    assert attached(netns) == {"ingress": None, "egress": None}


def test_locks_do_not_accumulate(builds, state, netns: Netns):
    for _ in range(3):
        load(netns, builds["seed"])
        ok(bpfgen("unload", "--iface", IFACE, "--netns", netns.name))
    assert list(state["run"].glob("*.lock")) == []
