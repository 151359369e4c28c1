"""Look inside a BPF ELF object: its programs, maps, license and BTF.

Works on any clang-built BPF object (libbpf-bootstrap, selftests, ours), following the
conventions libbpf uses when it opens an object, without loading anything.
"""

from __future__ import annotations

import io
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.construct.core import ConstructError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from bpfgen.btf import Btf, BtfError, MapDef
from bpfgen.errors import UsageError

EM_BPF = 247

# What pyelftools may raise on a damaged file (it does not wrap all of it in ELFError).
_ELF_READ_ERRORS = (ELFError, ConstructError, struct.error, ValueError, IndexError, KeyError, OverflowError)

# Map type numbers (enum bpf_map_type) -> the names bpftool prints.
MAP_TYPE_NAMES = (
    "unspec", "hash", "array", "prog_array", "perf_event_array", "percpu_hash",
    "percpu_array", "stack_trace", "cgroup_array", "lru_hash", "lru_percpu_hash",
    "lpm_trie", "array_of_maps", "hash_of_maps", "devmap", "sockmap", "cpumap",
    "xskmap", "sockhash", "cgroup_storage", "reuseport_sockarray",
    "percpu_cgroup_storage", "queue", "stack", "sk_storage", "devmap_hash",
    "struct_ops", "ringbuf", "inode_storage", "task_storage", "bloom_filter",
    "user_ringbuf", "cgrp_storage", "arena",
)  # fmt: skip
MAP_TYPE_ARRAY = 2
BPF_F_RDONLY_PROG = 1 << 7

PINNING_NAMES = {0: "none", 1: "by_name"}

# Legacy SEC("maps") records: struct bpf_map_def's leading u32 fields, in order.
LEGACY_MAP_FIELDS = ("type", "key_size", "value_size", "max_entries", "map_flags")


def map_type_name(map_type: int) -> str:
    """The bpftool name of a map type number ("hash", "lru_hash", ... or "unknown(N)")."""
    if 0 <= map_type < len(MAP_TYPE_NAMES):
        return MAP_TYPE_NAMES[map_type]
    return f"unknown({map_type})"


def pinning_name(pinning: int) -> str | int:
    return PINNING_NAMES.get(pinning, pinning)


class InspectError(UsageError):
    """The file is missing, not an ELF, not BPF, or too broken to read."""


@dataclass
class ProgramInfo:
    section: str
    name: str
    insns: int  # 8-byte instruction slots (an ld_imm64 takes two)
    subprog: bool = False  # a function in .text, called by programs rather than attached


@dataclass
class MapInfo:
    name: str
    type: str
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int = 0
    pinning: str | int = "none"
    key_type: str | None = None
    value_type: str | None = None
    section: str = ".maps"  # ".maps" (BTF-defined), "maps" (legacy) or the data section
    internal: bool = False  # a global data section (.rodata, .data, .bss) libbpf turns into a map


@dataclass
class ObjectInfo:
    path: str
    byteorder: str  # "little" or "big"
    programs: list[ProgramInfo] = field(default_factory=list)
    maps: list[MapInfo] = field(default_factory=list)
    license: str | None = None
    kern_version: int | None = None  # from a "version" section, if any
    btf: bool = False
    btf_ext: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_OBJECT_BYTES = 64 << 20  # a BPF object of bpfgen is about 100 KiB


def inspect_object(path: str | Path) -> ObjectInfo:
    """Read the BPF object at `path`. Raises InspectError for anything that is not one."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_OBJECT_BYTES + 1)
    except OSError as e:
        raise InspectError(f"{path}: {e.strerror or e}") from None
    if len(raw) > MAX_OBJECT_BYTES:
        raise InspectError(f"{path}: larger than {MAX_OBJECT_BYTES >> 20} MiB, not a bpfgen-sized BPF object")
    if raw[:4] != b"\x7fELF":
        raise InspectError(f"{path}: not an ELF file")
    try:
        elf = ELFFile(io.BytesIO(raw))
        machine = elf["e_machine"]
        if machine not in ("EM_BPF", EM_BPF):
            raise InspectError(f"{path}: ELF for {_machine_name(machine)}, not BPF")
        return _inspect(path, elf)
    except _ELF_READ_ERRORS as e:
        raise InspectError(f"{path}: malformed ELF: {e}") from None
    except BtfError as e:
        raise InspectError(f"{path}: bad .BTF: {e}") from None


def _machine_name(machine: str | int) -> str:
    if isinstance(machine, int):
        return f"machine {machine}"
    return machine.removeprefix("EM_").lower().replace("_", "-")


def _inspect(path: str, elf: ELFFile) -> ObjectInfo:
    endian = "<" if elf.little_endian else ">"
    info = ObjectInfo(path, "little" if elf.little_endian else "big")
    btf_section = elf.get_section_by_name(".BTF")
    btf = Btf.parse(btf_section.data()) if btf_section is not None else None
    info.btf = btf is not None
    info.btf_ext = elf.get_section_by_name(".BTF.ext") is not None

    license_section = elf.get_section_by_name("license")
    if license_section is not None:
        info.license = license_section.data().split(b"\0", 1)[0].decode("utf-8", "replace")
    version_section = elf.get_section_by_name("version")
    if version_section is not None and version_section.data_size >= 4:
        info.kern_version = struct.unpack_from(endian + "I", version_section.data())[0]

    symbols = _symbols_by_section(elf)
    info.programs = _programs(elf, symbols)
    if btf is not None:
        info.maps += [_btf_map(btf, d) for d in btf.map_definitions().values()]
    info.maps += _legacy_maps(elf, symbols, endian)
    info.maps += _internal_maps(elf)
    return info


def _symbols_by_section(elf: ELFFile) -> dict[int, list]:
    """Symbols (other than section and file symbols) by section index, sorted by address."""
    by_section: dict[int, list] = {}
    symtab = next((s for s in elf.iter_sections() if isinstance(s, SymbolTableSection)), None)
    for sym in symtab.iter_symbols() if symtab is not None else ():
        shndx = sym["st_shndx"]
        if isinstance(shndx, int) and sym["st_info"]["type"] not in ("STT_SECTION", "STT_FILE"):
            by_section.setdefault(shndx, []).append(sym)
    for syms in by_section.values():
        syms.sort(key=lambda s: s["st_value"])
    return by_section


def _programs(elf: ELFFile, symbols: dict[int, list]) -> list[ProgramInfo]:
    programs = []
    for index, section in enumerate(elf.iter_sections()):
        if not section["sh_flags"] & SH_FLAGS.SHF_EXECINSTR:
            continue
        funcs = [s for s in symbols.get(index, []) if s["st_info"]["type"] == "STT_FUNC"]
        for sym in funcs:
            size = sym["st_size"]
            if size == 0 and len(funcs) == 1:
                size = section["sh_size"]
            programs.append(
                ProgramInfo(section.name, sym.name, size // 8, subprog=section.name == ".text")
            )
    return programs


def _btf_map(btf: Btf, definition: MapDef) -> MapInfo:
    fields = definition.fields

    def size_of(type_id: int | None, explicit: str) -> int:
        if explicit in fields:
            return fields[explicit]
        return btf.size(type_id) if type_id is not None else 0

    def type_name(type_id: int | None) -> str | None:
        return btf.describe(type_id) if type_id is not None else None

    return MapInfo(
        name=definition.name,
        type=map_type_name(fields.get("type", 0)),
        key_size=size_of(definition.key, "key_size"),
        # __array(values, ...) holds map or program fds: libbpf makes the value 4 bytes.
        value_size=4 if definition.values else size_of(definition.value, "value_size"),
        max_entries=fields.get("max_entries", 0),
        map_flags=fields.get("map_flags", 0),
        pinning=pinning_name(fields.get("pinning", 0)),
        key_type=type_name(definition.key),
        value_type=type_name(definition.value),
    )


def _legacy_maps(elf: ELFFile, symbols: dict[int, list], endian: str) -> list[MapInfo]:
    """struct bpf_map_def records in SEC("maps"), named by the symbols that point at them."""
    index = elf.get_section_index("maps")
    if index is None:
        return []
    section = elf.get_section(index)
    syms = symbols.get(index, [])
    if not syms:
        return []
    data = section.data()
    record_size = len(data) // len(syms)  # as libbpf does: the section holds equal records
    nfields = min(len(LEGACY_MAP_FIELDS), record_size // 4)
    maps = []
    for sym in syms:
        record = data[sym["st_value"] : sym["st_value"] + record_size]
        values = dict(zip(LEGACY_MAP_FIELDS, struct.unpack_from(f"{endian}{nfields}I", record)))
        maps.append(
            MapInfo(
                name=sym.name,
                type=map_type_name(values.get("type", 0)),
                key_size=values.get("key_size", 0),
                value_size=values.get("value_size", 0),
                max_entries=values.get("max_entries", 0),
                map_flags=values.get("map_flags", 0),
                section="maps",
            )
        )
    return maps


def _is_data_section(name: str) -> bool:
    return any(name == base or name.startswith(base + ".") for base in (".rodata", ".data", ".bss"))


def _internal_maps(elf: ELFFile) -> list[MapInfo]:
    """The one-element array maps libbpf makes for global data sections."""
    maps = []
    for section in elf.iter_sections():
        if _is_data_section(section.name) and section["sh_size"] > 0:
            maps.append(
                MapInfo(
                    name=section.name,
                    type=map_type_name(MAP_TYPE_ARRAY),
                    key_size=4,
                    value_size=section["sh_size"],
                    max_entries=1,
                    map_flags=BPF_F_RDONLY_PROG if section.name.startswith(".rodata") else 0,
                    section=section.name,
                    internal=True,
                )
            )
    return maps


# --- text output --------------------------------------------------------------------
