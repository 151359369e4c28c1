"""bpfgen.btf: parsing checked against bpftool's dump of clang-built objects, decoding
checked against hand-packed bytes, and malformed input against hand-built BTF."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from bpfgen import btf as btf_module
from bpfgen.btf import Btf, BtfError, Kind, MapLayout

# The object-building helpers and the objdir/sample_obj/sample_obj_be fixtures, shared
# with test_inspect.py, live in conftest.py.
from conftest import BPFTOOL, DATA, compile_bpf


# --- building test objects -------------------------------------------------------------


@pytest.fixture(scope="session")
def kinds_obj(objdir) -> Path:
    return compile_bpf(DATA / "kinds.c", objdir)


def btf_of(obj: Path) -> Btf:
    with open(obj, "rb") as f:
        return Btf.parse(ELFFile(f).get_section_by_name(".BTF").data())


@pytest.fixture(scope="session")
def sample(sample_obj) -> Btf:
    return btf_of(sample_obj)


@pytest.fixture(scope="session")
def kinds(kinds_obj) -> Btf:
    return btf_of(kinds_obj)


# --- parsing, against bpftool -------------------------------------------------------

_LINKAGE = {0: "static", 1: "global", 2: "extern"}


def as_bpftool_json(btf: Btf, t: btf_module.BtfType) -> dict:
    """Our parse of one type, spelled like an entry of `bpftool -j btf dump file`."""
    out = {"id": t.id, "kind": t.kind.name, "name": t.name or "(anon)"}
    k = t.kind
    if k == Kind.INT:
        encoding = {0: "(none)", 1: "SIGNED", 2: "CHAR", 4: "BOOL"}[t.encoding]
        out |= {"size": t.size, "bits_offset": t.int_offset, "nr_bits": t.bits, "encoding": encoding}
    elif k in (Kind.PTR, Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG):
        out["type_id"] = t.type
    elif k == Kind.ARRAY:
        out |= {"type_id": t.type, "index_type_id": t.index_type, "nr_elems": t.nelems}
    elif k in (Kind.STRUCT, Kind.UNION):
        members = []
        for m in t.members:
            member = {"name": m.name or "(anon)", "type_id": m.type, "bits_offset": m.bit_offset}
            if m.bitfield_size:
                member["bitfield_size"] = m.bitfield_size
            members.append(member)
        out |= {"size": t.size, "vlen": len(t.members), "members": members}
    elif k == Kind.ENUM:
        values = [{"name": n, "val": v} for n, v in t.enumerators]
        encoding = "SIGNED" if t.signed else "UNSIGNED"
        out |= {"encoding": encoding, "size": t.size, "vlen": len(values), "values": values}
    elif k == Kind.FWD:
        out["fwd_kind"] = "union" if t.kind_flag else "struct"
    elif k == Kind.FUNC:
        out |= {"type_id": t.type, "linkage": _LINKAGE[t.linkage]}
    elif k == Kind.FUNC_PROTO:
        params = [{"name": p.name or "(anon)", "type_id": p.type} for p in t.params]
        out |= {"ret_type_id": t.type, "vlen": len(params), "params": params}
    elif k == Kind.VAR:
        out |= {"type_id": t.type, "linkage": _LINKAGE[t.linkage]}
    elif k == Kind.DATASEC:
        variables = [{"type_id": s.type, "offset": s.offset, "size": s.size} for s in t.secinfo]
        out |= {"size": t.size, "vlen": len(variables), "vars": variables}
    elif k == Kind.FLOAT:
        out["size"] = t.size
    elif k == Kind.DECL_TAG:
        out |= {"type_id": t.type, "component_idx": t.component_idx}
    return out


@pytest.mark.parametrize("which", ["sample_obj", "sample_obj_be", "kinds_obj"])
def test_parse_matches_bpftool(which, request):
    obj = request.getfixturevalue(which)
    dump = subprocess.run(
        [BPFTOOL, "-j", "btf", "dump", "file", str(obj)], capture_output=True, text=True, check=True
    )
    expected = json.loads(dump.stdout)["types"]
    btf = btf_of(obj)
    assert len(btf.types) == len(expected) + 1
    assert btf.types[0].kind == Kind.VOID
    for entry in expected:
        assert as_bpftool_json(btf, btf.types[entry["id"]]) == entry


def test_byte_order(sample, sample_obj_be):
    be = btf_of(sample_obj_be)
    assert (sample.byteorder, be.byteorder) == ("little", "big")
    assert [(t.kind, t.name, t.size, t.type) for t in be.types] == [
        (t.kind, t.name, t.size, t.type) for t in sample.types
    ]


def test_lookups(sample):
    backend = sample.find("backend", Kind.STRUCT)
    assert sample.type(backend).kind == Kind.STRUCT
    assert sample.find("backend", "struct") == backend
    assert sample.name(backend) == "backend"
    assert sample.size(backend) == 32
    assert sample.find("tc_ingress") == sample.find("tc_ingress", Kind.FUNC)
    with pytest.raises(KeyError):
        sample.find("backend", Kind.UNION)
    with pytest.raises(KeyError):
        sample.find("no_such_type")
    with pytest.raises(BtfError, match="no BTF type with id"):
        sample.type(len(sample.types))

    ip4 = sample.find("bpfgen_ip4_t")
    assert sample.resolve(ip4) == sample.find("unsigned int", Kind.INT)
    node_ip = sample.type(sample.find("cfg_node_ip", Kind.VAR))  # const volatile bpfgen_ip4_t
    assert sample.resolve(node_ip.type) == sample.resolve(ip4)
    assert sample.size(node_ip.id) == 4

    name_member = next(m for m in sample.type(backend).members if m.name == "name")
    assert sample.size(name_member.type) == 8  # char[8]
    assert sample.size(next(t.id for t in sample.types if t.kind == Kind.PTR)) == 8
    with pytest.raises(BtfError, match="has no size"):
        sample.size(sample.find("tc_ingress"))

    assert sample.describe(backend) == "struct backend"
    assert sample.describe(name_member.type) == "char[8]"
    assert sample.describe(node_ip.type) == "const volatile bpfgen_ip4_t"
    assert sample.describe(0) == "void"


def test_map_layout(sample):
    flow_key, backend = sample.find("flow_key", Kind.STRUCT), sample.find("backend", Kind.STRUCT)
    assert sample.map_layout("services") == MapLayout(flow_key, backend)
    key, value = sample.map_layout("conntrack")
    assert (sample.describe(key), value) == ("__u64", flow_key)
    assert sample.map_layout("outer") == MapLayout(sample.find("__u32"), None)
    assert sample.map_layout("events") == MapLayout(None, None)
    assert sample.map_layout("no_such_map") is None
    assert sample.map_layout("cfg_node_ip") is None  # a .rodata variable, not a map


def test_map_definitions(sample):
    defs = sample.map_definitions()
    assert list(defs) == ["services", "conntrack", "stats", "outer", "events"]
    assert defs["conntrack"].fields == {"type": 9, "max_entries": 4096, "map_flags": 2, "pinning": 1}
    assert defs["outer"].values and not defs["services"].values


# --- decoding -----------------------------------------------------------------------

BACKEND = {
    "addr": "10.1.2.3",
    "port": 8080,
    "weight": 300,
    "flags": 5,
    "state": "BACKEND_DRAINING",
    "name": "web-0",
    "delta": -3,
    "hits": 2**40 + 1,
}


def packed_backend(endian: str) -> bytes:
    # weight:12 then flags:4 share a u16: low bits first on little endian, high bits first on big.
    bits = 300 | 5 << 12 if endian == "<" else 300 << 4 | 5
    return (
        bytes([10, 1, 2, 3])  # bpfgen_ip4_t: network order in memory
        + struct.pack(">H", 8080)  # bpfgen_port_t: network order
        + struct.pack(endian + "H", bits)
        + struct.pack(endian + "I", 2)  # BACKEND_DRAINING
        + b"web-0\0\0\0"
        + struct.pack(endian + "iQ", -3, 2**40 + 1)
    )


def test_decode_struct(sample):
    assert sample.decode(sample.find("backend", Kind.STRUCT), packed_backend("<")) == BACKEND


def test_decode_struct_big_endian(sample_obj_be):
    be = btf_of(sample_obj_be)
    assert be.decode(be.find("backend", Kind.STRUCT), packed_backend(">")) == BACKEND


def test_decode_hints_and_padding(sample):
    key = bytes([192, 168, 0, 1]) + struct.pack(">H", 443) + bytes([17, 0xAA])
    assert sample.decode(sample.find("flow_key", Kind.STRUCT), key) == {
        "daddr": "192.168.0.1",
        "dport": 443,
        "proto": "UDP",  # "pad" is left out
    }
    proto = sample.find("bpfgen_proto_t")
    assert [sample.decode(proto, bytes([n])) for n in (6, 1, 99)] == ["TCP", "ICMP", 99]
    # a hint applies through const/volatile, e.g. to a .rodata variable
    assert sample.decode(sample.find("cfg_node_ip", Kind.VAR), bytes([127, 0, 0, 1])) == "127.0.0.1"
    # the underlying types decode plainly
    assert sample.decode(sample.find("__u16"), struct.pack("<H", 8080)) == 8080
    assert sample.decode(sample.find("bpfgen_port_t"), struct.pack("<H", 8080)) == 0x901F


def test_decode_enum_without_match(sample):
    state = sample.find("backend_state", Kind.ENUM)
    assert sample.decode(state, struct.pack("<I", 1)) == "BACKEND_UP"
    assert sample.decode(state, struct.pack("<I", 7)) == 7


def test_decode_hint_table_is_extensible(sample, monkeypatch):
    monkeypatch.setitem(btf_module.DISPLAY_HINTS, "__u64", lambda raw: raw.hex())
    assert sample.decode(sample.find("__u64"), bytes(range(8))) == "0001020304050607"


def test_decode_kinds(kinds):
    value = bytearray(112)
    struct.pack_into("<?bhfd", value, 0, True, 65, -2, 1.5, -2.25)
    value[16:32] = (2**100 + 7).to_bytes(16, "little")
    struct.pack_into("<qQQ", value, 32, -5, 0x1000, 0)
    struct.pack_into(">H", value, 56, 0x1234)  # __be16
    struct.pack_into(">I", value, 60, 0xC0A80001)  # __be32
    struct.pack_into(">Q", value, 64, 2**63 + 5)  # __be64
    value[72:76] = bytes([1, 2, 3, 4])
    struct.pack_into("<6i", value, 76, 1, 2, 3, 4, 5, -6)
    value[100:106] = bytes([0, 0x11, 0x22, 0x33, 0x44, 0x55])
    struct.pack_into("<H", value, 106, 0xFFFF)  # __pad1
    value[108] = 0b10001_101  # small:3 = -3, rest:5 = 17

    assert kinds.decode(kinds.find("kinds", Kind.STRUCT), bytes(value)) == {
        "ok": True,
        "c": 65,
        "neg16": -2,
        "f": 1.5,
        "d": -2.25,
        "big": 2**100 + 7,
        "neg64": -5,
        "uptr": 0x1000,
        "fwd": 0,
        "be16": 0x1234,
        "be32": 0xC0A80001,
        "be64": 2**63 + 5,
        "u": {"word": 0x04030201, "bytes": [1, 2, 3, 4]},
        "matrix": [[1, 2, 3], [4, 5, -6]],
        "mac": [0, 0x11, 0x22, 0x33, 0x44, 0x55],
        "small": -3,
        "rest": 17,
    }


def test_decode_errors(sample):
    backend = sample.find("backend", Kind.STRUCT)
    with pytest.raises(BtfError, match="need 32 bytes"):
        sample.decode(backend, b"\0" * 31)
    with pytest.raises(BtfError, match=r"\(FUNC 'tc_ingress'\) has no size"):
        sample.decode(sample.find("tc_ingress", Kind.FUNC), b"")
    # in a .BTF section straight from clang, DATASEC offsets are not filled in yet
    with pytest.raises(BtfError, match="variable 'cfg_node_ip'.*outside"):
        sample.decode(sample.find(".rodata", Kind.DATASEC), b"\0" * 8)


# --- hand-built BTF: kinds clang 14 does not emit, and malformed input ----------------


class BtfBuilder:
    """Assembles raw BTF: add types in id order, then bytes()."""

    def __init__(self, endian: str = "<"):
        self.endian = endian
        self.strings = b"\0"
        self.types = b""
        self.count = 0

    def string(self, s: str) -> int:
        if not s:
            return 0
        self.strings += s.encode() + b"\0"
        return len(self.strings) - len(s) - 1

    def add(self, kind: Kind, name: str, size_or_type: int, *extra: int, vlen=0, kflag=False) -> int:
        info = kflag << 31 | kind << 24 | vlen
        words = [self.string(name), info, size_or_type, *extra]
        self.types += struct.pack(f"{self.endian}{len(words)}I", *(w & 0xFFFFFFFF for w in words))
        self.count += 1
        return self.count

    def bytes(self, magic: int = 0xEB9F, version: int = 1) -> bytes:
        header = struct.pack(
            self.endian + "HBBIIIII", magic, version, 0, 24, 0, len(self.types),
            len(self.types), len(self.strings),
        )  # fmt: skip
        return header + self.types + self.strings


def test_enum64_and_signed_enums():
    b = BtfBuilder()
    big = 1 << 40
    e64 = b.add(Kind.ENUM64, "wide", 8, b.string("SMALL"), 1, 0, b.string("BIG"), big & 0xFFFFFFFF,
                big >> 32, vlen=2)  # fmt: skip
    s64 = b.add(Kind.ENUM64, "swide", 8, b.string("MINUS"), 0xFFFFFFFF, 0xFFFFFFFF, vlen=1, kflag=True)
    s32 = b.add(Kind.ENUM, "s", 4, b.string("NEG"), -2, vlen=1, kflag=True)
    u8 = b.add(Kind.ENUM, "tiny", 1, b.string("MAXED"), 0xFF, vlen=1)
    btf = Btf.parse(b.bytes())

    assert btf.type(e64).enumerators == [("SMALL", 1), ("BIG", big)]
    assert btf.decode(e64, struct.pack("<Q", big)) == "BIG"
    assert btf.decode(e64, struct.pack("<Q", 3)) == 3
    assert btf.type(s64).enumerators == [("MINUS", -1)]
    assert btf.decode(s64, struct.pack("<q", -1)) == "MINUS"
    assert btf.decode(s64, struct.pack("<q", -7)) == -7
    assert btf.decode(s32, struct.pack("<i", -2)) == "NEG"
    assert btf.decode(s32, struct.pack("<i", -3)) == -3
    assert btf.decode(u8, b"\xff") == "MAXED"
    assert btf.describe(e64) == "enum wide"


def test_int_encodings_and_fixed_up_datasec():
    b = BtfBuilder(">")
    u32 = b.add(Kind.INT, "unsigned int", 4, 32)
    char = b.add(Kind.INT, "uchar", 1, 2 << 24 | 8)  # CHAR encoding, not named "char"
    arr = b.add(Kind.ARRAY, "", 0, char, u32, 6)
    var_a = b.add(Kind.VAR, "a", u32, 1)
    var_s = b.add(Kind.VAR, "s", arr, 1)
    sec = b.add(Kind.DATASEC, ".data", 12, var_a, 0, 4, var_s, 4, 6, vlen=2)
    half = b.add(Kind.FLOAT, "_Float16", 2)
    btf = Btf.parse(b.bytes())

    assert btf.byteorder == "big"
    assert btf.decode(sec, struct.pack(">I", 7) + b"hi\0xyz" + b"\0\0") == {"a": 7, "s": "hi"}
    assert btf.decode(half, struct.pack(">e", 0.5)) == 0.5


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: raw[:10], "too short"),
        (lambda raw: b"\x12\x34" + raw[2:], "bad BTF magic"),
        (lambda raw: raw[:2] + b"\x02" + raw[3:], "unsupported BTF version 2"),
        (lambda raw: raw[:-3], "string section .* runs past the end"),
    ],
)
def test_malformed_header(mutate, message):
    b = BtfBuilder()
    b.add(Kind.INT, "int", 4, 1 << 24 | 32)
    with pytest.raises(BtfError, match=message):
        Btf.parse(mutate(b.bytes()))


def _one_type(*args, **kwargs) -> bytes:
    b = BtfBuilder()
    b.add(*args, **kwargs)
    return b.bytes()


@pytest.mark.parametrize(
    "raw, message",
    [
        (_one_type(Kind.PTR, "", 5), r"type \[1\] refers to type id 5"),
        (_one_type(Kind.TYPEDEF, "loop", 1), r"type \[1\] refers to itself"),
        (_one_type(Kind.INT, "odd", 3, 24), "bad INT size 3"),
        (_one_type(Kind.STRUCT, "s", 8, 0, 1, vlen=2), "truncated"),
        (_one_type(30, "", 0), "unknown kind 30"),
    ],
)
def test_malformed_types(raw, message):
    with pytest.raises(BtfError, match=message):
        Btf.parse(raw)


def test_bad_string_offset():
    raw = bytearray(_one_type(Kind.INT, "int", 4, 32))
    struct.pack_into("<I", raw, 24, 999)  # name_off of type 1
    with pytest.raises(BtfError, match="string offset 999"):
        Btf.parse(bytes(raw))


def test_btf_error_is_a_bpfgen_error():
    from bpfgen.errors import BpfgenError

    assert issubclass(BtfError, BpfgenError)


def test_a_type_nested_too_deeply_or_containing_itself_is_a_btf_error():
    b = BtfBuilder()
    u32 = b.add(Kind.INT, "unsigned int", 4, 32)
    deep = u32
    for _ in range(3000):
        deep = b.add(Kind.ARRAY, "", 0, deep, u32, 1)
    loop_array = b.add(Kind.ARRAY, "", 0, b.count + 2, u32, 1)  # struct s { struct s a[1]; }
    itself = b.add(Kind.STRUCT, "s", 4, b.string("a"), loop_array, 0, vlen=1)
    btf = Btf.parse(b.bytes())
    for walk in (lambda: btf.size(deep), lambda: btf.describe(deep), lambda: btf.decode(deep, b"\0" * 4),
                 lambda: btf.decode(itself, b"\0" * 4)):
        with pytest.raises(BtfError, match=r"type \[\d+\] is nested too deeply, or contains itself"):
            walk()
    assert btf.size(itself) == 4  # (its own size is stated, not walked)
