"""The planning layer without a kernel: what a node's maps hold, their ids, the minimal
difference between two plans, the node's configuration, and the plan a build stores."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from bpfgen import layout, plan as P
from bpfgen.cli import cli
from bpfgen.errors import UsageError
from bpfgen.spec import parse_spec

from conftest import filter_sharer

REPO = Path(__file__).resolve().parent.parent
SEED = yaml.safe_load((REPO / "examples" / "seed.yaml").read_text())


def plan_of(data: dict) -> P.Plan:
    return P.Plan.from_spec(parse_spec(yaml.safe_dump(data)))


def empty() -> P.Contents:
    return {name: {} for name in P.SERVICE_MAPS}


ZERO_WORD = layout.ADDR_BITS.pack(bits=0)


def apply(have: P.Contents, changes: P.Changes) -> P.Contents:
    """changes applied to have, in their order; the address filter's zero words left out
    (as desired() leaves them)."""
    out = copy.deepcopy(have)
    for name, keys, values in changes.writes:
        out[name].update(zip(keys, values))
    for name, keys in changes.deletes:
        for k in keys:
            del out[name][k]
    for name, keys, values in changes.finals:
        out[name].update(zip(keys, values))
    for name in P.ADDRESS_FILTERS:
        out[name] = {k: v for k, v in out.get(name, {}).items() if v != ZERO_WORD}
    return out


def _filter_bits(contents: P.Contents, name: str = "fe_addr_v4") -> set[tuple[int, int]]:
    return {(layout.ID_KEY.unpack(k), b) for k, v in contents[name].items()
            for b in range(64) if layout.ADDR_BITS.unpack(v)["bits"] >> b & 1}


def _addr_bit(addr: str) -> tuple[int, int]:
    import ipaddress

    return layout.addr_filter_bit(int(ipaddress.IPv4Address(addr)))


def _endpoint_bit(addr: str, port: int) -> tuple[int, int]:
    import ipaddress

    return layout.endpoint_filter_bit(int(ipaddress.IPv4Address(addr)), port)


def test_the_address_filter_gains_bits_before_the_frontends_and_loses_them_after():
    """fe_addr_v4 holds a bit for every clusterIP, external and load-balancer IP. A
    change writes the bits a new address needs before the frontends that have it, and
    clears those of a removed address after its frontends are deleted; a bit another
    address still hashes to stays set. Incremental and full updates agree."""
    base = copy.deepcopy(SEED)
    base["services"][0]["externalIPs"] = ["192.0.2.10"]
    first = plan_of(base)
    node = first.node("node0")
    have = P.desired(first, node, empty())
    assert _filter_bits(have) == {_addr_bit("10.106.91.98"), _addr_bit("192.0.2.10")}

    grown = copy.deepcopy(base)
    sharer = filter_sharer("10.106.91.98", frozenset({"192.0.2.10"}))
    for name, ip in (("extra", "10.100.0.7"), ("sharer", sharer)):
        grown["services"].append({"name": name, "type": "ClusterIP", "clusterIP": ip,
                                  "ports": [{"protocol": "TCP", "port": 81, "targetPort": 80}],
                                  "backends": [{"address": "10.0.1.72", "node": "node1"}]})
    second = plan_of(grown)
    for changes in (P.incremental(first, second, node, DictKernel(have)), P.diff_maps(P.desired(second, node, have), have)):
        order = [name for name, _, _ in changes.writes]
        assert order[0] == "fe_addr_v4" and changes.finals == []
        after = apply(have, changes)
        assert _filter_bits(after) == _filter_bits(have) | {_addr_bit("10.100.0.7"), _addr_bit(sharer)}

    after = apply(have, P.diff_maps(P.desired(second, node, have), have))
    shrunk = copy.deepcopy(grown)
    shrunk["services"] = [s for s in shrunk["services"] if s["name"] != "extra"]
    shrunk["services"][0].pop("externalIPs")
    shrunk["services"][0]["clusterIP"] = "10.106.91.99"  # (the sharer keeps the old clusterIP's bit)
    third = plan_of(shrunk)
    for changes in (P.incremental(second, third, node, DictKernel(after)),
                    P.diff_maps(P.desired(third, node, after), after)):
        assert [name for name, _, _ in changes.finals] == ["fe_addr_v4"]
        result = apply(after, changes)
        assert _filter_bits(result) == {_addr_bit("10.106.91.99"), _addr_bit(sharer)}
        # (while the frontends go, every bit any of them needs is still set)
        midway = apply(after, P.Changes(changes.writes, changes.deletes))
        assert _filter_bits(midway) >= _filter_bits(after) | _filter_bits(result)


def test_the_local_backend_filter_has_the_nodes_own_backends_set_before_and_cleared_after_them():
    """be_addr_v4 holds a bit for every address and target port of a backend on the node
    alone (whatever its state: a terminating one's flows go on), and none of another node's. An update
    adding a backend on the node writes its bit before backend_v4 has it, and one removing
    it clears the bit after it is deleted; incremental and full updates agree."""
    first = plan_of(SEED)
    node0, node1 = first.node("node0"), first.node("node1")
    assert _filter_bits(P.desired(first, node1, empty()), "be_addr_v4") == {_endpoint_bit("10.0.1.72", 80)}
    have = P.desired(first, node0, empty())
    assert _filter_bits(have, "be_addr_v4") == set()

    grown = copy.deepcopy(SEED)
    grown["services"][0]["backends"].append({"address": "10.0.0.9", "node": "node0",
                                             "conditions": {"ready": False, "serving": True, "terminating": True}})
    second = plan_of(grown)
    for changes in (P.incremental(first, second, node0, DictKernel(have)),
                    P.diff_maps(P.desired(second, node0, have), have)):
        order = [name for name, _, _ in changes.writes]
        assert order.index("be_addr_v4") < order.index("backend_v4") and changes.finals == []
        assert _filter_bits(apply(have, changes), "be_addr_v4") == {_endpoint_bit("10.0.0.9", 80)}
    assert _filter_bits(P.desired(second, node1, empty()), "be_addr_v4") == {_endpoint_bit("10.0.1.72", 80)}

    after = apply(have, P.diff_maps(P.desired(second, node0, have), have))
    for changes in (P.incremental(second, first, node0, DictKernel(after)),
                    P.diff_maps(P.desired(first, node0, after), after)):
        assert [name for name, _, _ in changes.finals] == ["be_addr_v4"]
        assert ("backend_v4" in [name for name, _ in changes.deletes])
        assert _filter_bits(apply(after, changes), "be_addr_v4") == set()
        assert _filter_bits(apply(after, P.Changes(changes.writes, changes.deletes)), "be_addr_v4") == \
            {_endpoint_bit("10.0.0.9", 80)}


def decoded(contents: P.Contents) -> dict:
    """The service table: frontend -> (id, [backend addr:port]) from raw map contents."""
    backends = {layout.ID_KEY.unpack(k): layout.BACKEND.unpack(v) for k, v in contents["backend_v4"].items()}
    table: dict = {}
    for k, v in contents["svc_v4"].items():
        key, val = layout.SVC_KEY.unpack(k), layout.SVC_VALUE.unpack(v)
        fe = (str(key["addr"]), key["port"], key["proto"])
        row = table.setdefault(fe, {"id": val["id"], "slots": {}})
        if key["slot"]:
            be = backends[val["backend_id"]]
            row["slots"][key["slot"]] = f"{be['addr']}:{be['port']}"
        else:
            row["count"] = val["count"]
    return table


def test_seed_node0_holds_the_walks_service_table():
    plan = plan_of(SEED)
    table = decoded(P.desired(plan, plan.node("node0"), empty()))
    assert table[("10.106.91.98", 80, 6)] == {"id": 1, "count": 1, "slots": {1: "10.0.1.72:80"}}
    assert table[("172.26.50.101", 30645, 6)] == {"id": 2, "count": 1, "slots": {1: "10.0.1.72:80"}}
    assert sorted(row["id"] for row in table.values()) == list(range(1, len(table) + 1))
    # the backend is local on node1 only
    for node, local in (("node0", 0), ("node1", layout.FLAGS["BACKEND_LOCAL"])):
        contents = P.desired(plan, plan.node(node), empty())
        assert {layout.BACKEND.unpack(v)["flags"] for v in contents["backend_v4"].values()} == {local}


def test_a_second_plan_of_the_same_spec_changes_nothing():
    plan = plan_of(SEED)
    node = plan.node("node0")
    have = P.desired(plan, node, empty())
    changes = P.diff_maps(P.desired(plan, node, have), have)
    assert changes.written == 0 and changes.deleted == 0


def test_one_backend_changed_is_one_entry_written_and_ids_stay():
    data = copy.deepcopy(SEED)
    data["services"][0]["backends"] = [{"address": "10.0.1.72", "node": "node1"},
                                       {"address": "10.0.1.73", "node": "node1"}]
    plan = plan_of(data)
    node = plan.node("node0")
    have = P.desired(plan, node, empty())
    moved = copy.deepcopy(data)
    moved["services"][0]["backends"][1]["address"] = "10.0.1.99"
    new_plan = plan_of(moved)
    changes = P.diff_maps(P.desired(new_plan, node, have), have)
    # the moved backend takes the ids its predecessor left: only its backend entries change
    # (one per port of the service: an endpoint is address, port and protocol)
    ports = len(data["services"][0]["ports"])
    assert [(name, len(keys)) for name, keys, _ in changes.writes] == [("backend_v4", ports)]
    assert changes.deleted == 0
    after = decoded(apply(have, changes))
    assert {fe: row["id"] for fe, row in after.items()} == {fe: row["id"] for fe, row in decoded(have).items()}
    assert "10.0.1.99:80" in after[("172.26.50.101", 30645, 6)]["slots"].values()


def test_an_id_conntrack_still_holds_is_not_handed_out_again():
    data = copy.deepcopy(SEED)
    plan = plan_of(data)
    node = plan.node("node0")
    have = P.desired(plan, node, empty())
    old_ids = {layout.ID_KEY.unpack(k) for k in have["backend_v4"]}
    moved = copy.deepcopy(data)
    for svc in moved["services"]:
        svc["backends"] = [{"address": "10.0.1.99", "node": "node1"}]
    asked = []
    held = P.Held(lambda: (asked.append(1) or old_ids, set()))
    want = P.desired(plan_of(moved), node, have, held)
    new_ids = {layout.ID_KEY.unpack(k) for k in want["backend_v4"]}
    assert asked and not new_ids & old_ids


def test_conntrack_is_read_only_when_a_new_id_is_needed():
    plan = plan_of(SEED)
    node = plan.node("node0")
    have = P.desired(plan, node, empty())
    held = P.Held(lambda: pytest.fail("conntrack read for a change that needs no new id"))
    P.desired(plan, node, have, held)


def test_writes_keep_references_whole():
    """Backends before the slots that name them, slots before the frontends that count
    them; deletions the other way round."""
    plan = plan_of(SEED)
    node = plan.node("node0")
    changes = P.diff_maps(P.desired(plan, node, empty()), empty())
    order = [name for name, _, _ in changes.writes]
    assert order.index("backend_v4") < order.index("svc_v4") and order.index("revnat_v4") < order.index("svc_v4")
    (_, keys, _), = [w for w in changes.writes if w[0] == "svc_v4"]
    slots = [layout.SVC_KEY.unpack(k)["slot"] for k in keys]
    assert slots == sorted(slots, key=lambda s: s == 0)
    undo = P.diff_maps(empty(), P.desired(plan, node, empty()))
    assert [name for name, _ in undo.deletes] == ["svc_v4", "revnat_v4", "backend_v4"]
    (_, keys), = [d for d in undo.deletes if d[0] == "svc_v4"]
    assert [layout.SVC_KEY.unpack(k)["slot"] == 0 for k in keys] == sorted(
        (layout.SVC_KEY.unpack(k)["slot"] == 0 for k in keys), reverse=True)


def test_ids_beyond_the_capacity_are_refused_naming_the_setting():
    """Live connections can hold ids of removed frontends: a plan that fits the capacity
    may still find no free id, and says which setting to raise."""
    data = copy.deepcopy(SEED)
    data["cluster"] = {"capacity": {"frontends": len(plan_of(SEED).services[0].ports) * 2 + 2}}
    plan = plan_of(data)
    node = plan.node("node0")
    everything_held = P.Held(lambda: (set(), set(range(1, 100))))
    with pytest.raises(UsageError, match="raise cluster.capacity.frontends"):
        P.desired(plan, node, empty(), everything_held)


def test_config_is_the_nodes_own():
    plan = plan_of(SEED)
    c0 = layout.CONFIG.unpack(P.config(plan, plan.node("node0")))
    c1 = layout.CONFIG.unpack(P.config(plan, plan.node("node1")))
    assert str(c0["node_ip"]) == "172.26.50.101" and str(c1["node_ip"]) == "172.26.50.102"
    assert (str(c1["pod_net"]), str(c1["pod_mask"])) == ("10.0.1.0", "255.255.255.0")
    assert (str(c0["pod_net"]), str(c0["pod_mask"])) == ("0.0.0.0", "255.255.255.255")  # matches nothing
    assert (c0["nodeport_min"], c0["nodeport_max"], c0["snat_port_min"], c0["snat_port_max"]) == (
        30000, 32767, 32768, 65535)


def test_map_sizes_follow_capacity_not_services():
    small, big = copy.deepcopy(SEED), copy.deepcopy(SEED)
    big["services"] = big["services"] * 1
    big["services"].append({**copy.deepcopy(SEED["services"][0]), "name": "other", "clusterIP": "10.106.91.99"})
    for port in big["services"][-1]["ports"]:
        port.pop("nodePort", None)
    assert P.map_sizes(plan_of(small)) == P.map_sizes(plan_of(big))


def test_the_stored_plan_reads_back_the_same():
    plan = plan_of(SEED)
    assert P.Plan.from_json(plan.to_json(), "plan.json") == plan
    with pytest.raises(UsageError, match="plan.json: not a bpfgen plan"):
        P.Plan.from_json('{"format": 99}', "plan.json")
    with pytest.raises(UsageError, match="not a bpfgen plan"):
        P.Plan.from_json("[1, 2", "plan.json")


@pytest.mark.parametrize("setting, value, message", [
    ("frontends", 3, "the services need 4 frontends per node, more than capacity.frontends 3; "
                     "raise cluster.capacity.frontends"),
    ("backendSlots", 2, "the services need 4 backendSlots per node, more than capacity.backendSlots 2"),
    ("backends", 1, "the services need 2 backends per node, more than capacity.backends 1"),
    ("flows", 0, "flows 0 is out of range"),
    ("frontends", 1 << 30, "frontends 1073741824 is out of range 1-4194304"),
])
def test_validate_refuses_a_spec_beyond_a_capacity_setting(tmp_path: Path, setting: str, value: int, message: str):
    data = copy.deepcopy(SEED)
    data["cluster"] = {"capacity": {setting: value}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    r = CliRunner().invoke(cli, ["validate", str(path)])
    assert r.exit_code == 2, r.output
    assert f"cluster.capacity.{setting}: {message}" in r.stderr
    assert "Traceback" not in r.stderr


class DictKernel(P.KernelView):
    """The maps as dicts, for the incremental planner."""

    def __init__(self, contents: P.Contents):
        self.c = contents

    def frontend_ids(self, keys):
        return {k: layout.SVC_VALUE.unpack(self.c["svc_v4"][k])["id"] for k in keys if k in self.c["svc_v4"]}

    def frontend_ids_in_use(self):
        return {layout.ID_KEY.unpack(k) for k in self.c["revnat_v4"]}

    def backends(self):
        return {v[:7]: (layout.ID_KEY.unpack(k), v) for k, v in self.c["backend_v4"].items()}


def _cluster(n: int) -> dict:
    data = copy.deepcopy(SEED)
    base = data["services"][0]
    data["services"] = []
    for i in range(n):
        svc = copy.deepcopy(base)
        svc["name"] = f"svc{i}"
        svc["clusterIP"] = f"10.106.{i // 200}.{i % 200 + 1}"
        for port in svc["ports"]:
            port.pop("nodePort", None)
        svc["backends"] = [{"address": f"10.0.1.{(i + k) % 50 + 10}", "node": "node1"} for k in range(3)]
        data["services"].append(svc)
    return data


def _table(contents: P.Contents) -> dict:
    return {fe: sorted(row["slots"].values()) for fe, row in decoded(contents).items()}


@pytest.mark.parametrize("change", ["move-backend", "remove-service", "add-service", "rename", "shared-backend-gone"])
def test_an_incremental_update_gives_what_a_full_one_gives(change: str):
    old_data = _cluster(12)
    new_data = copy.deepcopy(old_data)
    if change == "move-backend":
        new_data["services"][5]["backends"][0]["address"] = "10.0.1.99"
    elif change == "remove-service":
        del new_data["services"][3]
    elif change == "add-service":
        extra = copy.deepcopy(new_data["services"][0])
        extra.update(name="extra", clusterIP="10.106.9.9")
        new_data["services"].append(extra)
    elif change == "rename":
        new_data["services"][2]["name"] = "renamed"
    else:  # a backend shared by several services leaves one of them only
        new_data["services"][4]["backends"] = new_data["services"][4]["backends"][1:]
    old, new = plan_of(old_data), plan_of(new_data)
    node = new.node("node0")
    kernel = P.desired(old, node, empty())
    changes = P.incremental(old, new, node, DictKernel(kernel))
    after = apply(kernel, changes)
    assert _table(after) == _table(P.desired(new, node, empty()))
    # every backend an entry names exists, and no backend is left that nothing names
    named = {layout.SVC_VALUE.unpack(v)["backend_id"] for k, v in after["svc_v4"].items() if k[6:8] != b"\0\0"}
    assert named == {layout.ID_KEY.unpack(k) for k in after["backend_v4"]}
    # unchanged frontends keep their ids, and the change is small
    ids_before = {fe: row["id"] for fe, row in decoded(kernel).items()}
    assert all(ids_before[fe] == row["id"] for fe, row in decoded(after).items() if fe in ids_before)
    assert changes.written + changes.deleted <= 2 * 26  # at most two services of 4 frontends, 12 slots, 6 backends


def test_an_incremental_update_of_maps_not_as_the_plan_left_them_is_refused():
    old = plan_of(_cluster(4))
    node = old.node("node0")
    new_data = _cluster(4)
    new_data["services"][1]["backends"][0]["address"] = "10.0.1.99"
    kernel = empty()  # e.g. pins recreated by hand
    with pytest.raises(P.StaleState):
        P.incremental(old, plan_of(new_data), node, DictKernel(kernel))
