"""Tests of bpfgen.libbpf (the ctypes binding) and bpfgen.netns.

Unmarked tests need no privileges. `kernel` tests load real objects, pin under
/sys/fs/bpf/bpfgen-test-<random>/ and attach tc programs only to a veth inside a
network namespace they create; every fixture removes what it made.
"""

from __future__ import annotations

import errno
import os
import platform
import secrets
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bpfgen import libbpf as L
from bpfgen.errors import BpfgenError, UsageError
from bpfgen.netns import enter_netns, ifindex, under_ip_netns_exec

DATA = Path(__file__).parent / "data"
BPF_SOURCES = ["libbpf_maps", "libbpf_pinned_v2", "libbpf_reject"]


# ---------------------------------------------------------------- fixtures


def _bpffs_mounted() -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1:3] == ["/sys/fs/bpf", "bpf"] for line in f)


@pytest.fixture(scope="session")
def bpffs() -> None:
    """bpffs on /sys/fs/bpf (mounted if needed; left mounted, other users may rely on it)."""
    if not _bpffs_mounted():
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)


@pytest.fixture
def pin_dir(bpffs: None):
    path = Path("/sys/fs/bpf") / f"bpfgen-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        assert not path.exists(), f"could not remove {path}"


@pytest.fixture(scope="session")
def objs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tests/data/libbpf_*.bpf.c programs compiled for BPF."""
    out = tmp_path_factory.mktemp("bpf")
    arch_include = f"/usr/include/{platform.machine()}-linux-gnu"
    result = {}
    for name in BPF_SOURCES:
        obj = out / f"{name}.bpf.o"
        subprocess.run(
            ["clang", "-O2", "-g", "-target", "bpf", f"-I{arch_include}", "-c", str(DATA / f"{name}.bpf.c"), "-o", str(obj)],
            check=True,
        )
        result[name] = obj
    return result


@pytest.fixture
def netns():
    """A fresh network namespace holding veth pair (veth0, veth1), both up."""
    name = f"bpfgen-t-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"], check=True)
        for dev in ("veth0", "veth1"):
            subprocess.run(["ip", "-n", name, "link", "set", dev, "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _open_maps(objs: dict[str, Path], pin_dir: Path) -> L.BpfObject:
    # Always give a pin root: without one libbpf 1.1 pins t_pinned at /sys/fs/bpf/t_pinned.
    return L.BpfObject.open(objs["libbpf_maps"], pin_root_path=pin_dir)


def u32(n: int) -> bytes:
    return struct.pack("<I", n)


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


# ---------------------------------------------------------------- unprivileged


def test_every_declared_symbol_resolves():
    declared = L.declared_symbols()
    assert "bpf_object__open_file" in declared and "bpf_tc_attach" in declared
    assert L.missing_symbols() == []


def test_error_is_one_readable_line():
    e = L.LibbpfError("bpf_map_update_elem on map svc", -errno.E2BIG)
    assert isinstance(e, BpfgenError) and e.exit_code == 1
    assert e.errno == errno.E2BIG
    assert str(e) == "bpf_map_update_elem on map svc: Argument list too long (errno 7)"

    log = (
        "libbpf: map 'svc': failed to create: Invalid argument(-22)\n"
        "libbpf: failed to load object 'out/x.o'\n"
    )
    e = L.LibbpfError("load object out/x.o", errno.EINVAL, libbpf_log=log)
    assert str(e) == "load object out/x.o: Invalid argument (errno 22): map 'svc': failed to create: Invalid argument(-22)"
    assert e.libbpf_log == log and e.verifier_log is None and e.lines() == [str(e)]

    verifier = "0: R1=ctx() R10=fp0\ninvalid access to packet\nR1 offset is outside of the packet\nprocessed 2 insns (limit 1000000)\n\n"
    e = L.LibbpfError("load object x.o", errno.EACCES, verifier_log=verifier)
    assert str(e).endswith("(errno 13): R1 offset is outside of the packet")
    assert e.verifier_tail(2) == ["invalid access to packet", "R1 offset is outside of the packet"]
    assert e.lines()[1:] == ["verifier log (last lines):"] + ["  " + line for line in e.verifier_tail()]


def test_long_libbpf_messages_are_formatted_whole():
    path = "/nonexistent/" + "x" * 6000 + ".o"
    with L.capture_libbpf_log() as cap:
        with pytest.raises(L.LibbpfError) as info:
            L.BpfObject.open(path)
    assert info.value.errno == errno.ENAMETOOLONG
    assert any(path in msg for _, msg in cap.messages)  # > 4096 bytes: formatted twice


def test_struct_layouts_match_the_c_headers(tmp_path: Path):
    cc = shutil.which("cc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    structs = {
        "bpf_object_open_opts": L.BpfObjectOpenOpts,
        "bpf_tc_hook": L.BpfTcHook,
        "bpf_tc_opts": L.BpfTcOpts,
        "bpf_map_batch_opts": L.BpfMapBatchOpts,
        "bpf_test_run_opts": L.BpfTestRunOpts,
        "bpf_map_info": L.BpfMapInfoStruct,
        "bpf_prog_info": L.BpfProgInfoStruct,
    }
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <bpf/libbpf.h>", "#include <bpf/bpf.h>", "int main(void) {"]
    expected = []
    for cname, cls in structs.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        expected.append(f"{cname} {L.sizeof(cls)}")
        for field in cls._fields_:
            if field[0].startswith("_") or len(field) == 3:  # padding, bit fields
                continue
            lines.append(f'printf("{cname}.{field[0]} %zu\\n", offsetof(struct {cname}, {field[0]}));')
            expected.append(f"{cname}.{field[0]} {getattr(cls, field[0]).offset}")
    lines.append("return 0; }")
    src, exe = tmp_path / "layout.c", tmp_path / "layout"
    src.write_text("\n".join(lines))
    subprocess.run([cc, str(src), "-o", str(exe)], check=True)
    actual = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    assert actual[:-1] == expected


def test_enter_unknown_netns_is_a_usage_error():
    with pytest.raises(UsageError, match="network namespace 'bpfgen-no-such-ns' does not exist"):
        with enter_netns("bpfgen-no-such-ns"):
            pass
    with enter_netns(None):
        pass


def test_unknown_interface_is_a_usage_error():
    with pytest.raises(UsageError, match="interface 'bpfgen-nope0' does not exist$"):
        ifindex("bpfgen-nope0")


def test_open_missing_object(monkeypatch, capsys):
    monkeypatch.delenv(L.DEBUG_ENV, raising=False)
    with pytest.raises(L.LibbpfError) as info:
        L.BpfObject.open("/nonexistent/x.bpf.o")
    e = info.value
    assert e.errno == errno.ENOENT
    assert str(e).startswith("open object /nonexistent/x.bpf.o: No such file or directory (errno 2)")
    assert "failed to open /nonexistent/x.bpf.o" in e.libbpf_log
    assert capsys.readouterr().err == ""  # captured, not printed

    monkeypatch.setenv(L.DEBUG_ENV, "1")
    with pytest.raises(L.LibbpfError):
        L.BpfObject.open("/nonexistent/x.bpf.o")
    assert "libbpf: elf: failed to open /nonexistent/x.bpf.o" in capsys.readouterr().err


# ---------------------------------------------------------------- kernel


@pytest.mark.kernel
def test_map_round_trips(objs, pin_dir):
    with _open_maps(objs, pin_dir) as obj:
        names = {m.name for m in obj.maps}
        assert {"t_hash", "t_lru", "t_pcpu", "t_pinned"} <= names
        h = obj.map("t_hash")
        assert (h.type, h.key_size, h.value_size, h.max_entries) == (L.BPF_MAP_TYPE_HASH, 4, 8, 1024)
        assert {p.name: p.section_name for p in obj.programs} == {"tc_ret": "tc", "tc_other": "tc"}
        with pytest.raises(BpfgenError, match="has no map 'nope'"):
            obj.map("nope")
        obj.load()

        with obj.map("t_hash").map_fd() as m:
            assert m.info.name == "t_hash" and m.info.type == L.BPF_MAP_TYPE_HASH
            assert m.lookup(u32(1)) is None
            m.update(u32(1), u64(100))
            assert m.lookup(u32(1)) == u64(100)
            with pytest.raises(L.LibbpfError) as info:
                m.update(u32(1), u64(5), L.BPF_NOEXIST)
            assert info.value.errno == errno.EEXIST
            assert str(info.value).startswith("bpf_map_update_elem on map t_hash: File exists (errno 17)")
            with pytest.raises(ValueError, match="key has 8 bytes"):
                m.lookup(u64(1))
            assert m.delete(u32(1)) is True
            assert m.delete(u32(1)) is False
            assert list(m.keys()) == []

            keys = [u32(i) for i in range(300)]
            m.update_batch(keys, [u64(i * 10) for i in range(300)])
            assert sorted(m.keys()) == sorted(keys)
            assert dict(m.items()) == {u32(i): u64(i * 10) for i in range(300)}
            assert dict(m.lookup_batch(chunk=16)) == dict(m.items())

            # the same map through its id and through a pin of our own
            with L.map_get_fd_by_id(m.info.id) as by_id:
                assert by_id.lookup(u32(7)) == u64(70)
            L.obj_pin(m, pin_dir / "hash")
            with L.MapFd.from_pin(pin_dir / "hash") as pinned:
                assert pinned.info.id == m.info.id and pinned.label == str(pin_dir / "hash")
            with L.obj_get(pin_dir / "hash") as raw:
                assert raw.fd >= 0
            assert L.btf_raw_by_id(m.info.btf_id)[:2] == b"\x9f\xeb"  # BTF magic 0xeB9F

        with obj.map("t_lru").map_fd() as m:
            m.update_batch([u64(i) for i in range(10)], [u32(i) for i in range(10)])
            assert m.lookup(u64(3)) == u32(3)
            assert len(list(m.keys())) == 10
            assert sorted(m.lookup_batch(chunk=4)) == sorted(m.items())

        with obj.map("t_lpm").map_fd() as m:
            keys = [struct.pack("<I4s", 24, bytes([10, 0, i, 0])) for i in range(3)]
            m.update_batch(keys, [u32(i) for i in range(3)])
            assert m.lookup(keys[2]) == u32(2)
            assert sorted(m.lookup_batch()) == sorted(zip(keys, [u32(i) for i in range(3)]))

        ncpu = L.num_possible_cpus()
        assert ncpu >= 1
        with obj.map("t_pcpu").map_fd() as m:
            assert m.percpu and m.value_buf_size == 8 * ncpu
            assert m.lookup_percpu(u32(0)) == [u32(0)] * ncpu
            m.update(u32(1), b"".join(u32(c + 1) + b"\0" * 4 for c in range(ncpu)))
            assert m.lookup_percpu(u32(1)) == [u32(c + 1) for c in range(ncpu)]
            m.update_batch([u32(2), u32(3)], [u64(5) * ncpu, u64(6) * ncpu])
            assert m.lookup_percpu(u32(3)) == [u32(6)] * ncpu
            assert m.lookup_percpu(u32(9)) is None  # out of range: ENOENT
            assert [k for k, _ in m.lookup_batch(chunk=3)] == [u32(i) for i in range(4)]
            with pytest.raises(ValueError, match="per-CPU buffer size"):
                m.update(u32(0), u32(1))


@pytest.mark.kernel
def test_pinned_map_is_reused(objs, pin_dir):
    with _open_maps(objs, pin_dir) as obj:
        obj.load()
        pinned = obj.map("t_pinned")
        assert pinned.is_pinned and pinned.pin_path == str(pin_dir / "t_pinned")
        with pinned.map_fd() as m:
            m.update(u32(42), u64(4242))
        first_id = L.map_info(pinned.fd).id
    assert (pin_dir / "t_pinned").exists()  # the pin outlives the object

    with _open_maps(objs, pin_dir) as obj:
        obj.load()
        with obj.map("t_pinned").map_fd() as m:
            assert m.info.id == first_id
            assert m.lookup(u32(42)) == u64(4242)


@pytest.mark.kernel
def test_configure_before_load(objs, pin_dir):
    with _open_maps(objs, pin_dir) as first:
        first.map("t_hash").set_max_entries(77)
        first.load()
        with first.map("t_hash").map_fd() as m:
            assert m.info.max_entries == 77
            m.update(u32(5), u64(55))
            with _open_maps(objs, pin_dir) as second:
                second.map("t_hash").reuse_fd(m)  # libbpf dups the fd
                second.load()
                with second.map("t_hash").map_fd() as again:
                    assert again.info.id == m.info.id and again.lookup(u32(5)) == u64(55)
        elsewhere = first.map("t_lru")
    with pytest.raises(BpfgenError, match="is closed"):
        elsewhere.fd


@pytest.mark.kernel
def test_incompatible_pinned_map_is_a_clear_error(objs, pin_dir):
    with _open_maps(objs, pin_dir) as obj:
        obj.load()
    obj = L.BpfObject.open(objs["libbpf_pinned_v2"], pin_root_path=pin_dir)
    with pytest.raises(L.LibbpfError) as info:
        obj.load()
    e = info.value
    pin = pin_dir / "t_pinned"
    assert e.op == f"load object {objs['libbpf_pinned_v2']}"
    assert f"pinned map t_pinned at {pin} has a layout incompatible with this object" in str(e)
    assert "value_size 4 here, 8 pinned" in str(e)
    assert "parameter mismatch" in e.libbpf_log
    with pytest.raises(BpfgenError, match="is closed"):  # a failed load closes the object
        obj.maps
    obj.close()  # idempotent


@pytest.mark.kernel
def test_verifier_rejection_carries_the_log(objs, bpffs):
    with L.BpfObject.open(objs["libbpf_reject"]) as obj:
        with pytest.raises(L.LibbpfError) as info:
            obj.load()
    e = info.value
    assert e.errno == errno.EACCES
    assert e.op == f"load object {objs['libbpf_reject']}"
    assert "invalid access to packet" in e.verifier_log
    assert "invalid access to packet" in "\n".join(e.verifier_tail(5))
    assert str(e).endswith(e.verifier_tail(1)[0])
    assert "BPF program load failed" in e.libbpf_log


@pytest.mark.kernel
def test_prog_test_run_returns_retval(objs, pin_dir):
    with _open_maps(objs, pin_dir) as obj:
        rodata = next(m for m in obj.maps if m.name.endswith(".rodata"))
        rodata.set_initial_value(u32(7))
        obj.load()
        packet = bytes(range(64))
        ret = obj.program("tc_ret")
        result = L.prog_test_run(ret.fd, packet, repeat=5)
        assert result.retval == 7
        assert result.data_out == packet
        assert result.duration_ns >= 0
        assert L.prog_test_run(obj.program("tc_other").fd, packet).retval == 2  # TC_ACT_SHOT
        with obj.map("t_pcpu").map_fd() as m:  # tc_ret counts its runs per CPU
            assert sum(struct.unpack("<I", v)[0] for v in m.lookup_percpu(u32(0))) == 5

        info = L.prog_info(ret.fd)
        assert info.name == "tc_ret" and info.type == L.BPF_PROG_TYPE_SCHED_CLS
        assert len(info.tag) == 16 and info.xlated_prog_len > 0 and info.nr_map_ids >= 1
        with L.prog_get_fd_by_id(info.id) as fd:
            assert L.prog_info(fd).tag == info.tag
            dup = fd.dup()
            raw = dup.detach()
            assert dup.closed and raw != fd.fd
            os.close(raw)


def _tc_filters(ns: str, dev: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", dev, "ingress"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.mark.kernel
def test_tc_attach_query_replace_detach(objs, pin_dir, netns):
    before = os.readlink("/proc/thread-self/ns/net")
    with _open_maps(objs, pin_dir) as obj:
        obj.load()
        first, second = obj.program("tc_ret"), obj.program("tc_other")
        with enter_netns(netns):
            assert os.readlink("/proc/thread-self/ns/net") != before
            idx = ifindex("veth0")
            with obj.map("t_devmap").map_fd() as m:
                # devmaps have no batch operations (ENOTSUPP): update_batch falls back to
                # one update per element; ifindexes resolve in the current netns
                m.update_batch([u32(1)], [u32(idx)])
                assert m.lookup(u32(1)) == u32(idx)
                assert m.lookup_batch() == [(u32(1), u32(idx))]
            with pytest.raises(UsageError, match=f"interface 'eth9' does not exist in network namespace '{netns}'"):
                ifindex("eth9")
            assert L.tc_hook_create(idx, L.BPF_TC_INGRESS) is True
            assert L.tc_hook_create(idx, L.BPF_TC_INGRESS) is False
            assert L.tc_query(idx, L.BPF_TC_INGRESS, 1, 1) is None

            id1 = L.tc_attach(idx, L.BPF_TC_INGRESS, first.fd, handle=1, priority=1)
            assert id1 == L.prog_info(first.fd).id
            assert L.tc_query(idx, L.BPF_TC_INGRESS, 1, 1) == id1
            shown = _tc_filters(netns, "veth0")
            assert f" id {id1} " in shown and "tc_ret" in shown

            with pytest.raises(L.LibbpfError) as info:
                L.tc_attach(idx, L.BPF_TC_INGRESS, second.fd, handle=1, priority=1)
            assert info.value.errno == errno.EEXIST

            id2 = L.tc_attach(idx, L.BPF_TC_INGRESS, second.fd, handle=1, priority=1, replace=True)
            assert id2 == L.prog_info(second.fd).id != id1
            assert L.tc_query(idx, L.BPF_TC_INGRESS, 1, 1) == id2
            shown = _tc_filters(netns, "veth0")
            assert f" id {id2} " in shown and f" id {id1} " not in shown

            L.tc_detach(idx, L.BPF_TC_INGRESS, 1, 1)
            assert L.tc_query(idx, L.BPF_TC_INGRESS, 1, 1) is None
            assert _tc_filters(netns, "veth0").strip() == ""
            assert L.tc_hook_destroy(idx) is True
            assert L.tc_hook_destroy(idx) is False
        assert os.readlink("/proc/thread-self/ns/net") == before
    qdiscs = subprocess.run(
        ["ip", "netns", "exec", netns, "tc", "qdisc", "show", "dev", "veth0"], check=True, capture_output=True, text=True
    ).stdout
    assert "clsact" not in qdiscs


@pytest.mark.kernel
def test_enter_netns_restores_on_error(netns):
    before = os.readlink("/proc/thread-self/ns/net")
    with pytest.raises(RuntimeError):
        with enter_netns(netns):
            raise RuntimeError("boom")
    assert os.readlink("/proc/thread-self/ns/net") == before


@pytest.mark.kernel
def test_under_ip_netns_exec(netns):
    assert under_ip_netns_exec() is False
    code = "from bpfgen.netns import under_ip_netns_exec; print(under_ip_netns_exec())"
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "True"
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "False"
