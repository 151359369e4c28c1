"""bpfgen.inspect on clang-built objects, checked against readelf, llvm-objdump and
`bpftool gen skeleton` (which opens the object with libbpf) where they can tell."""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from bpfgen.errors import UsageError
from bpfgen.inspect import (
    InspectError,
    MapInfo,
    ProgramInfo,
    inspect_object,
    map_type_name,
)
from bpfgen.text import format_inspect

# The object-building helpers live in conftest.py, with the objdir/sample_obj/sample_obj_be fixtures.
from conftest import BPFTOOL, DATA, compile_bpf

OBJDUMP = shutil.which("llvm-objdump") or shutil.which("llvm-objdump-14") or "llvm-objdump"


@pytest.fixture(scope="session")
def legacy_obj(objdir) -> Path:
    return compile_bpf(DATA / "legacy.c", objdir, debug=False)


@pytest.fixture(scope="session")
def asm_obj(objdir) -> Path:
    return compile_bpf(DATA / "asm_prog.s", objdir)


def section_sizes(obj: Path) -> dict[int, tuple[str, int]]:
    """Section index -> (name, size), from `llvm-objdump -h`."""
    out = subprocess.run([OBJDUMP, "-h", str(obj)], capture_output=True, text=True, check=True).stdout
    rows = re.findall(r"^\s*(\d+) (\S+)\s+([0-9a-f]{8}) ", out, re.MULTILINE)
    return {int(idx): (name, int(size, 16)) for idx, name, size in rows}


def func_symbols(obj: Path) -> set[tuple[str, str, int]]:
    """(section, name, size) of each FUNC symbol, from `readelf -sW`."""
    out = subprocess.run(["readelf", "-sW", str(obj)], capture_output=True, text=True, check=True).stdout
    sections = section_sizes(obj)
    rows = re.findall(r"^\s*\d+: [0-9a-f]+\s+(\d+) FUNC\s+\S+\s+\S+\s+(\d+) (\S+)$", out, re.MULTILINE)
    return {(sections[int(ndx)][0], name, int(size)) for size, ndx, name in rows}


def skeleton_names(obj: Path) -> tuple[set[str], set[str]]:
    """Map and program names as libbpf sees them, from the skeleton bpftool generates."""
    out = subprocess.run([BPFTOOL, "gen", "skeleton", str(obj)], capture_output=True, text=True, check=True)
    maps = set(re.findall(r"struct bpf_map \*(\w+);", out.stdout))
    progs = set(re.findall(r"struct bpf_program \*(\w+);", out.stdout))
    return maps, progs


EXPECTED_SAMPLE_MAPS = [
    MapInfo("services", "hash", 8, 32, 1024, 0, "none", "struct flow_key", "struct backend"),
    MapInfo("conntrack", "lru_hash", 8, 8, 4096, 2, "by_name", "__u64", "struct flow_key"),
    MapInfo("stats", "percpu_array", 4, 8, 4, 0, "none", "__u32", "__u64"),
    MapInfo("outer", "array_of_maps", 4, 4, 2, 0, "none", "__u32", None),
    MapInfo("events", "ringbuf", 0, 0, 4096, 0, "none", None, None),
    MapInfo(".rodata", "array", 4, 8, 1, 0x80, section=".rodata", internal=True),
    MapInfo(".bss", "array", 4, 8, 1, 0, section=".bss", internal=True),
    MapInfo(".data", "array", 4, 4, 1, 0, section=".data", internal=True),
]


def test_sample_object(sample_obj):
    info = inspect_object(sample_obj)
    assert info.path == str(sample_obj)
    assert (info.byteorder, info.license, info.kern_version) == ("little", "GPL", None)
    assert info.btf and info.btf_ext
    assert info.maps == EXPECTED_SAMPLE_MAPS
    assert [(p.section, p.name, p.subprog) for p in info.programs] == [
        (".text", "count", True),
        ("tc", "tc_ingress", False),
    ]


def test_programs_match_readelf(sample_obj):
    info = inspect_object(sample_obj)
    assert {(p.section, p.name, p.insns * 8) for p in info.programs} == func_symbols(sample_obj)


def test_internal_map_sizes_match_objdump(sample_obj):
    sizes = {name: size for name, size in section_sizes(sample_obj).values()}
    for m in inspect_object(sample_obj).maps:
        if m.internal:
            assert m.value_size == sizes[m.section]


def test_names_match_libbpf(sample_obj):
    maps, progs = skeleton_names(sample_obj)
    info = inspect_object(sample_obj)
    assert {m.name.lstrip(".") for m in info.maps} == maps  # skeletons call .rodata "rodata"
    assert {p.name for p in info.programs if not p.subprog} == progs


def test_big_endian_object(sample_obj_be):
    info = inspect_object(sample_obj_be)
    assert info.byteorder == "big"
    assert info.maps == EXPECTED_SAMPLE_MAPS
    assert {(p.section, p.name, p.insns * 8) for p in info.programs} == func_symbols(sample_obj_be)


def test_legacy_object(legacy_obj):
    info = inspect_object(legacy_obj)
    assert not info.btf and not info.btf_ext
    assert info.license == "GPL"
    assert info.kern_version == 0x050A00
    assert info.maps == [
        MapInfo("counters", "array", 4, 8, 256, 0, section="maps"),
        MapInfo("sessions", "lru_hash", 16, 32, 65536, 2, section="maps"),
    ]
    assert info.programs == [ProgramInfo("socket", "count_packets", func_symbols(legacy_obj).pop()[2] // 8)]
    assert "kernel version: 5.10.0" in format_inspect(info)


def test_function_without_size_uses_section_size(asm_obj):
    info = inspect_object(asm_obj)
    assert info.programs == [ProgramInfo("xdp", "xdp_pass", 2)]
    assert info.maps == [] and info.license == "GPL"


def test_to_dict_is_json(sample_obj):
    data = json.loads(json.dumps(inspect_object(sample_obj).to_dict()))
    assert data["license"] == "GPL"
    assert data["programs"][1] == {"section": "tc", "name": "tc_ingress", "insns": data["programs"][1]["insns"],
                                   "subprog": False}  # fmt: skip
    conntrack = next(m for m in data["maps"] if m["name"] == "conntrack")
    assert conntrack["pinning"] == "by_name" and conntrack["internal"] is False


def test_format_text(sample_obj):
    text = format_inspect(inspect_object(sample_obj))
    lines = text.splitlines()
    assert lines[0] == f"{sample_obj}: BPF object (little-endian)"
    assert "  license: GPL" in lines
    assert "  BTF: yes, BTF.ext: yes" in lines
    assert re.search(r"^\s+\.text\s+count\s+\d+\s+subprog$", text, re.MULTILINE)
    assert re.search(r"^\s+tc\s+tc_ingress\s+\d+\s+prog$", text, re.MULTILINE)
    assert re.search(r"^\s+conntrack\s+lru_hash\s+8\s+8\s+4096\s+0x2\s+by_name\s+__u64\s+struct flow_key$",
                     text, re.MULTILINE)  # fmt: skip
    assert re.search(r"^\s+\.rodata \(internal\)\s+array\s+4\s+8\s+1\s+0x80\s+none\s+-\s+-$", text, re.MULTILINE)


def test_map_type_names():
    assert [map_type_name(n) for n in (1, 9, 12, 27, 32)] == [
        "hash", "lru_hash", "array_of_maps", "ringbuf", "cgrp_storage",
    ]  # fmt: skip
    assert map_type_name(999) == "unknown(999)"


# --- errors -------------------------------------------------------------------------


def inspect_error(path) -> str:
    with pytest.raises(InspectError) as excinfo:
        inspect_object(path)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.o"
    assert inspect_error(path) == f"{path}: No such file or directory"


def test_text_file(tmp_path):
    path = tmp_path / "x.o"
    path.write_text("not an object\n")
    assert inspect_error(path) == f"{path}: not an ELF file"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.o"
    path.write_bytes(b"")
    assert inspect_error(path) == f"{path}: not an ELF file"


def test_native_elf():
    true = Path(shutil.which("true") or "/bin/true").resolve()
    message = inspect_error(true)
    assert message.startswith(f"{true}: ELF for ") and message.endswith(", not BPF")
    if platform.machine() == "x86_64":
        assert message == f"{true}: ELF for x86-64, not BPF"


def test_truncated_object(sample_obj, tmp_path):
    path = tmp_path / "cut.o"
    path.write_bytes(sample_obj.read_bytes()[:100])
    assert inspect_error(path).startswith(f"{path}: malformed ELF: ")


def test_corrupt_btf(sample_obj, tmp_path):
    raw = bytearray(sample_obj.read_bytes())
    with open(sample_obj, "rb") as f:
        offset = ELFFile(f).get_section_by_name(".BTF")["sh_offset"]
    raw[offset : offset + 2] = b"\0\0"
    path = tmp_path / "badbtf.o"
    path.write_bytes(bytes(raw))
    assert inspect_error(path).startswith(f"{path}: bad .BTF: bad BTF magic")


def test_inspect_error_is_a_usage_error():
    assert issubclass(InspectError, UsageError)


def test_a_file_larger_than_any_bpf_object_is_refused_without_reading_it_whole(tmp_path):
    from bpfgen.inspect import MAX_OBJECT_BYTES, InspectError, inspect_object

    big = tmp_path / "big.o"
    with open(big, "wb") as f:
        f.write(b"\x7fELF")
        f.truncate(MAX_OBJECT_BYTES + 4096)  # sparse
    with pytest.raises(InspectError, match="larger than 64 MiB"):
        inspect_object(big)


def test_a_map_type_nested_too_deeply_is_one_line_and_exit_2(tmp_path):
    """A crafted object whose map value is an array nested 1,500 deep (clang emits it as
    asked) walked the BTF past Python's stack: a RecursionError traceback, exit 1."""
    from click.testing import CliRunner

    from bpfgen.cli import cli

    source = tmp_path / "deep.bpf.c"
    source.write_text(
        "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n"
        "struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, __u32);"
        f" __type(value, int{'[1]' * 1500}); }} deep SEC(\".maps\");\n"
        'char LICENSE[] SEC("license") = "GPL";\n'
    )
    obj = compile_bpf(source, tmp_path)
    assert re.fullmatch(rf"{re.escape(str(obj))}: bad \.BTF: type \[\d+\] is nested too deeply, or contains itself",
                        inspect_error(obj))
    result = CliRunner().invoke(cli, ["inspect", str(obj)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "nested too deeply" in result.output
