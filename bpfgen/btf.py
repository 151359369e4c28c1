"""A pure-Python reader for BTF, the BPF Type Format, and a decoder for values it describes.

Parses raw BTF as found in the ``.BTF`` section of a BPF object or as returned by the
kernel for a BTF id (either byte order; the magic tells which), and turns the bytes of
a map key or value into plain Python values (ints, strs, dicts, lists).

Format reference: https://docs.kernel.org/bpf/btf.html

Note: in a ``.BTF`` section straight out of clang, DATASEC sizes and variable offsets
are still 0; libbpf fills them in from the ELF symbols when it loads the object. BTF
read back from the kernel has them set, so decoding a DATASEC is only meaningful there.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, NamedTuple

from bpfgen.errors import BpfgenError

BTF_MAGIC = 0xEB9F
_HEADER = "HBBIIIII"  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
_HEADER_SIZE = struct.calcsize("<" + _HEADER)  # 24

# INT encoding bits
INT_SIGNED = 1 << 0
INT_CHAR = 1 << 1
INT_BOOL = 1 << 2


class BtfError(BpfgenError):
    """Malformed BTF, or a request the BTF cannot answer (unknown id, undecodable type)."""


class Kind(IntEnum):
    VOID = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Kinds whose u32 after `info` is a size; for the others it is a type id.
_SIZED_KINDS = {Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.DATASEC, Kind.FLOAT, Kind.ENUM64}
# Kinds that only qualify or rename another type.
_MODIFIER_KINDS = {Kind.TYPEDEF, Kind.CONST, Kind.VOLATILE, Kind.RESTRICT, Kind.TYPE_TAG}


@dataclass(frozen=True)
class Member:
    """A struct/union member. bitfield_size is 0 for ordinary members."""

    name: str
    type: int
    bit_offset: int
    bitfield_size: int = 0


@dataclass(frozen=True)
class Param:
    """A FUNC_PROTO parameter (name may be empty)."""

    name: str
    type: int


@dataclass(frozen=True)
class VarSecinfo:
    """One variable of a DATASEC: its VAR type id and place in the section."""

    type: int
    offset: int
    size: int


@dataclass
class BtfType:
    """One BTF type. Which fields matter depends on `kind`:

    INT: size, encoding, bits, int_offset.  PTR/TYPEDEF/CONST/VOLATILE/RESTRICT/TYPE_TAG: type.
    ARRAY: type (element), index_type, nelems.  STRUCT/UNION: size, members.
    ENUM/ENUM64: size, enumerators (name, value), signed.  FWD: kind_flag (True: union).
    FUNC: type (proto), linkage.  FUNC_PROTO: type (return), params.
    VAR: type, linkage.  DATASEC: size, secinfo.  FLOAT: size.
    DECL_TAG: type, component_idx (-1: the type itself).
    """

    id: int
    kind: Kind
    name: str = ""
    kind_flag: bool = False
    size: int = 0
    type: int = 0
    encoding: int = 0
    bits: int = 0
    int_offset: int = 0
    index_type: int = 0
    nelems: int = 0
    members: list[Member] = field(default_factory=list)
    enumerators: list[tuple[str, int]] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    secinfo: list[VarSecinfo] = field(default_factory=list)
    linkage: int = 0
    component_idx: int = -1

    @property
    def signed(self) -> bool:
        """For INT: the SIGNED encoding bit; for ENUM/ENUM64: kind_flag."""
        if self.kind == Kind.INT:
            return bool(self.encoding & INT_SIGNED)
        return self.kind in (Kind.ENUM, Kind.ENUM64) and self.kind_flag


# --- display hints ------------------------------------------------------------------

IP_PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}


def _ip4(raw: bytes) -> str:
    if len(raw) < 4:
        raise ValueError(f"{len(raw)} bytes are no IPv4 address")
    return socket.inet_ntoa(raw[:4])


def _network_int(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def _proto(raw: bytes) -> str | int:
    return IP_PROTOCOLS.get(raw[0], raw[0])


# Typedef name -> function from the value's raw bytes (exactly sizeof the type) to its
# display value. decode() applies these wherever it meets such a typedef. Extend freely.
DISPLAY_HINTS: dict[str, Callable[[bytes], Any]] = {
    "bpfgen_ip4_t": _ip4,
    "bpfgen_port_t": _network_int,
    "bpfgen_proto_t": _proto,
    "__be16": _network_int,
    "__be32": _network_int,
    "__be64": _network_int,
}


class _Raiser:
    """A decoder (or part cutter) that fails when called: a part of a value that cannot be
    decoded fails where the value's decoding reaches it, after the parts before it."""

    def __init__(self, fail: Callable[[bytes], Any]):
        self.fail = fail

    def __call__(self, data: bytes) -> Any:
        return self.fail(data)


def _too_deep(type_id: int) -> BtfError:
    """The error of a type whose walk ran out of Python's stack: one that contains itself
    (by value, through an array) or is nested hundreds of levels deep (no compiler emits
    either; a crafted object may)."""
    return BtfError(f"type [{type_id}] is nested too deeply, or contains itself")


def _raiser(error: BtfError) -> _Raiser:
    def fail(data: bytes) -> Any:
        raise error
    return _Raiser(fail)


class MapLayout(NamedTuple):
    """Key and value type ids of a BTF-defined map (None when the map gives only a size)."""

    key: int | None
    value: int | None


@dataclass(frozen=True)
class MapDef:
    """A BTF-defined map as declared in SEC(".maps").

    fields: the integer attributes (`type`, `max_entries`, `map_flags`, `pinning`,
    `key_size`, `value_size`, `numa_node`, `map_extra`, ...) that were given.
    key/value: type ids from __type(key, ...)/__type(value, ...).
    values: True if declared with __array(values, ...) (map-in-map, prog array).
    """

    name: str
    fields: dict[str, int]
    key: int | None = None
    value: int | None = None
    values: bool = False


# --- the parser ---------------------------------------------------------------------


class _Reader:
    """Reads u32s (and friends) from the type section, with bounds checks."""

    def __init__(self, data: bytes, endian: str):
        self.data = data
        self.endian = endian
        self.pos = 0

    def read(self, fmt: str) -> tuple:
        size = struct.calcsize(self.endian + fmt)
        if self.pos + size > len(self.data):
            raise BtfError(f"type section truncated at byte {self.pos}")
        values = struct.unpack_from(self.endian + fmt, self.data, self.pos)
        self.pos += size
        return values


class Btf:
    """Parsed BTF. types[i] is the type with id i; types[0] is void."""

    def __init__(self, types: list[BtfType], byteorder: str):
        self.types = types
        self.byteorder = byteorder  # "little" or "big": the byte order of decoded data
        # (answers of resolve and size, and each struct's members to decode: a dump of a
        # busy map decodes the same few types hundreds of thousands of times)
        self._resolved: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self._decoders: dict[int, Callable[[bytes], Any]] = {}
        self._hints: dict[str, Callable[[bytes], Any]] = {}  # DISPLAY_HINTS as the decoders were made

    # --- parsing ---

    @classmethod
    def parse(cls, raw: bytes) -> Btf:
        raw = bytes(raw)
        if len(raw) < _HEADER_SIZE:
            raise BtfError(f"BTF too short: {len(raw)} bytes, header needs {_HEADER_SIZE}")
        endian = next((e for e in "<>" if struct.unpack_from(e + "H", raw)[0] == BTF_MAGIC), None)
        if endian is None:
            raise BtfError(f"bad BTF magic {raw[:2].hex()} (want eb9f in either byte order)")
        _, version, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            endian + _HEADER, raw
        )
        if version != 1:
            raise BtfError(f"unsupported BTF version {version}")
        if hdr_len < _HEADER_SIZE or hdr_len > len(raw):
            raise BtfError(f"bad BTF header length {hdr_len}")
        body = raw[hdr_len:]
        for what, off, length in (("type", type_off, type_len), ("string", str_off, str_len)):
            if off + length > len(body):
                raise BtfError(
                    f"BTF {what} section [{off}, {off + length}) runs past the end ({len(body)} bytes)"
                )
        strings = body[str_off : str_off + str_len]
        if str_len and strings[0] != 0:
            raise BtfError("BTF string section does not start with an empty string")

        def string(off: int) -> str:
            if off >= len(strings) and off != 0:
                raise BtfError(f"string offset {off} outside string section ({len(strings)} bytes)")
            end = strings.find(b"\0", off)
            return strings[off : end if end >= 0 else len(strings)].decode("utf-8", "replace")

        reader = _Reader(body[type_off : type_off + type_len], endian)
        types = [BtfType(0, Kind.VOID)]
        while reader.pos < len(reader.data):
            types.append(_parse_type(reader, len(types), string))
        btf = cls(types, "little" if endian == "<" else "big")
        btf._check_references()
        return btf

    def _check_references(self) -> None:
        count = len(self.types)
        for t in self.types[1:]:
            refs: list[int] = []
            if t.kind not in _SIZED_KINDS:
                refs.append(t.type)
            if t.kind == Kind.ARRAY:
                refs.append(t.index_type)
            refs += [m.type for m in t.members] + [p.type for p in t.params]
            refs += [s.type for s in t.secinfo]
            bad = next((r for r in refs if not 0 <= r < count), None)
            if bad is not None:
                raise BtfError(f"type [{t.id}] refers to type id {bad}, but there are only {count}")
        # Pointers, arrays, modifiers and variables must not refer back to themselves.
        chained = _MODIFIER_KINDS | {Kind.PTR, Kind.ARRAY, Kind.VAR}
        acyclic = {0}
        for t in self.types:
            path: list[int] = []
            type_id = t.id
            while type_id not in acyclic and self.types[type_id].kind in chained:
                if type_id in path:
                    raise BtfError(f"type [{type_id}] refers to itself")
                path.append(type_id)
                type_id = self.types[type_id].type
            acyclic.update(path)

    # --- lookups ---

    def type(self, type_id: int) -> BtfType:
        if not 0 <= type_id < len(self.types):
            raise BtfError(f"no BTF type with id {type_id} (have {len(self.types)})")
        return self.types[type_id]

    def name(self, type_id: int) -> str:
        """The type's own name ("" for anonymous types and void)."""
        return self.type(type_id).name

    def find(self, name: str, kind: Kind | str | None = None) -> int:
        """The id of the first type called `name` (of `kind`, e.g. Kind.STRUCT or "struct")."""
        if isinstance(kind, str):
            kind = Kind[kind.upper()]
        for t in self.types:
            if t.name == name and (kind is None or t.kind == kind):
                return t.id
        raise KeyError(name if kind is None else f"{kind.name.lower()} {name}")

    def resolve(self, type_id: int) -> int:
        """Skip typedef/const/volatile/restrict/type_tag; return the underlying type id."""
        resolved = self._resolved.get(type_id)
        if resolved is None:
            resolved = self._resolved[type_id] = self._resolve(type_id)
        return resolved

    def _resolve(self, type_id: int) -> int:
        seen = 0
        while self.type(type_id).kind in _MODIFIER_KINDS:
            type_id = self.types[type_id].type
            seen += 1
            if seen > len(self.types):
                raise BtfError(f"type [{type_id}]: modifier loop")
        return type_id

    def size(self, type_id: int) -> int:
        """sizeof the type in bytes (pointers are 8)."""
        size = self._sizes.get(type_id)
        if size is None:
            try:
                size = self._size(type_id)
            except RecursionError:
                raise _too_deep(type_id) from None
            self._sizes[type_id] = size
        return size

    def _size(self, type_id: int) -> int:
        t = self.type(self.resolve(type_id))
        if t.kind in _SIZED_KINDS:
            return t.size
        if t.kind == Kind.PTR:
            return 8
        if t.kind == Kind.ARRAY:
            return self.size(t.type) * t.nelems
        if t.kind == Kind.VAR:
            return self.size(t.type)
        raise BtfError(f"type [{t.id}] ({t.kind.name} {t.name!r}) has no size")

    def describe(self, type_id: int) -> str:
        """A C-like spelling of the type: "struct flow_key", "__u32", "char[8]", "void *"."""
        try:
            return self._describe(type_id)
        except RecursionError:
            raise _too_deep(type_id) from None

    def _describe(self, type_id: int) -> str:
        t = self.type(type_id)
        name = t.name or "(anon)"
        if t.kind == Kind.VOID:
            return "void"
        if t.kind in (Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64):
            keyword = {Kind.STRUCT: "struct", Kind.UNION: "union"}.get(t.kind, "enum")
            return f"{keyword} {name}"
        if t.kind == Kind.FWD:
            return f"{'union' if t.kind_flag else 'struct'} {name}"
        if t.kind == Kind.PTR:
            return f"{self._describe(t.type)} *"
        if t.kind == Kind.ARRAY:
            return f"{self._describe(t.type)}[{t.nelems}]"
        if t.kind in (Kind.CONST, Kind.VOLATILE, Kind.RESTRICT):
            return f"{t.kind.name.lower()} {self._describe(t.type)}"
        if t.kind == Kind.TYPE_TAG:
            return self._describe(t.type)
        if t.kind == Kind.FUNC_PROTO:
            return f"{self._describe(t.type)} (*)({', '.join(self._describe(p.type) for p in t.params)})"
        return name

    # --- maps ---

    def map_definitions(self) -> dict[str, MapDef]:
        """The BTF-defined maps of an object's DATASEC ".maps", by name, in section order."""
        try:
            datasec = self.type(self.find(".maps", Kind.DATASEC))
        except KeyError:
            return {}
        maps = {}
        for info in datasec.secinfo:
            var = self.type(info.type)
            if var.kind == Kind.VAR:
                maps[var.name] = self._map_def(var.name, var.type)
        return maps

    def _map_def(self, name: str, type_id: int) -> MapDef:
        struct_type = self.type(self.resolve(type_id))
        if struct_type.kind != Kind.STRUCT:
            raise BtfError(f"map {name!r}: definition is a {struct_type.kind.name}, not a struct")
        fields: dict[str, int] = {}
        refs: dict[str, int] = {}
        values = False
        for m in struct_type.members:
            member = self.type(self.resolve(m.type))
            if m.name == "values" and member.kind == Kind.ARRAY:  # __array(values, ...)
                values = True
            elif member.kind != Kind.PTR:
                raise BtfError(f"map {name!r}: field {m.name!r} is a {member.kind.name}, not a pointer")
            else:
                target = self.type(self.resolve(member.type))
                if m.name not in ("key", "value") and target.kind == Kind.ARRAY:  # __uint(...)
                    fields[m.name] = target.nelems
                else:  # __type(...)
                    refs[m.name] = member.type
        return MapDef(name, fields, refs.get("key"), refs.get("value"), values)

    def map_layout(self, map_name: str) -> MapLayout | None:
        """Key and value type ids of the BTF-defined map `map_name`, or None if no such map."""
        found = self.map_definitions().get(map_name)
        return None if found is None else MapLayout(found.key, found.value)

    # --- decoding ---

    def decode(self, type_id: int, data: bytes) -> Any:
        """Decode `data` (in this BTF's byte order) as a value of type `type_id`."""
        size = self.size(type_id)
        if len(data) < size:
            raise BtfError(f"need {size} bytes to decode {self.describe(type_id)}, got {len(data)}")
        try:
            return self.decoder(type_id)(bytes(data[:size]))
        except RecursionError:
            raise _too_deep(type_id) from None

    def decoder(self, type_id: int) -> Callable[[bytes], Any]:
        """The function that decodes exactly the bytes of a value of type `type_id`: made
        once per type (a dump of a busy map decodes the same few types 100,000s of times),
        it walks the type's BTF when it is made, not at every value. Raises BtfError for a
        type that cannot be decoded (one nested too deeply, or containing itself, too)."""
        if self._hints != DISPLAY_HINTS:  # (the table is extensible: decoders made before it changed are stale)
            self._decoders.clear()
            self._hints = dict(DISPLAY_HINTS)
        found = self._decoders.get(type_id)
        if found is None:
            try:
                found = self._make_decoder(type_id)
            except RecursionError:
                raise _too_deep(type_id) from None
            self._decoders[type_id] = found
        return found

    def _make_decoder(self, type_id: int) -> Callable[[bytes], Any]:
        t = self.type(type_id)
        while t.kind in _MODIFIER_KINDS:
            hint = DISPLAY_HINTS.get(t.name) if t.kind == Kind.TYPEDEF else None
            if hint is not None:
                return self._hinted(hint, t.type)
            t = self.type(t.type)
        order = self.byteorder
        if t.kind in (Kind.INT, Kind.ENUM, Kind.ENUM64):
            if t.kind == Kind.INT and (t.int_offset or t.bits != t.size * 8):
                return lambda data, t=t: self._scalar(t, self._bits(data, t.int_offset, t.bits), t.bits)
            nbits = t.size * 8
            if t.kind == Kind.INT and not t.encoding & (INT_BOOL | INT_SIGNED):
                return lambda data, n=t.size: int.from_bytes(data[:n], order)
            return lambda data, t=t: self._scalar(t, int.from_bytes(data[: t.size], order), nbits)
        if t.kind == Kind.PTR:
            return lambda data: int.from_bytes(data[:8], order)
        if t.kind == Kind.FLOAT:
            formats = {2: "e", 4: "f", 8: "d"}
            if t.size not in formats:
                raise BtfError(f"cannot decode {t.size}-byte float {t.name!r}")
            unpack = struct.Struct(("<" if order == "little" else ">") + formats[t.size]).unpack_from
            return lambda data: unpack(data)[0]
        if t.kind == Kind.ARRAY:
            return self._array_decoder(t)
        if t.kind in (Kind.STRUCT, Kind.UNION):
            return self._struct_decoder(t)
        if t.kind == Kind.VAR:
            return self.decoder(t.type)
        if t.kind == Kind.DATASEC:
            parts = [(self.name(s.type), self._part_slicer(s.offset, s.type, f"variable {self.name(s.type)!r}"),
                      self._decoder_or_raiser(s.type)) for s in t.secinfo]
            return lambda data: {name: decode(part(data)) for name, part, decode in parts}
        raise BtfError(f"cannot decode a value of type [{t.id}] ({t.kind.name} {t.name!r})")

    def _hinted(self, hint: Callable[[bytes], Any], under: int) -> Callable[[bytes], Any]:
        """A typedef's display hint, and the type under it for values the hint refuses
        (made only when one is: a hint that always answers never needs it)."""
        def decode(data: bytes) -> Any:
            try:
                return hint(data)
            except (ValueError, IndexError):
                return self.decoder(under)(data)  # a typedef of an unexpected size: decoded plainly
        return decode

    def _array_decoder(self, t: BtfType) -> Callable[[bytes], Any]:
        elem = self.type(self.resolve(t.type))
        if elem.kind == Kind.INT and elem.size == 1 and (elem.encoding & INT_CHAR or elem.name == "char"):
            return lambda data, n=t.nelems: data[:n].split(b"\0", 1)[0].decode("utf-8", "replace")
        step = self.size(t.type)
        if not t.nelems:
            return lambda data: []  # (its element type is never decoded)
        parts = [self._part_slicer(i * step, t.type, f"element {i}") for i in range(t.nelems)]
        decode = self._decoder_or_raiser(t.type)
        return lambda data: [decode(part(data)) for part in parts]

    def _decoder_or_raiser(self, type_id: int) -> Callable[[bytes], Any]:
        """decoder(type_id), or, for a type that cannot be decoded, a function raising its
        BtfError when called: a value's parts fail in their order, the first one first."""
        try:
            return self.decoder(type_id)
        except BtfError as e:
            return _raiser(e)

    def _struct_decoder(self, t: BtfType) -> Callable[[bytes], dict[str, Any]]:
        fields: list[tuple[str, Callable[[bytes], Any]]] = []
        plain = True  # (every member decodable, each name once: the one-unpack form may do)
        for m in t.members:
            if not m.name or m.name.startswith(("pad", "__pad")):
                continue
            if m.bitfield_size:
                member = self.type(self.resolve(m.type))
                fields.append((m.name, lambda data, m=m, member=member: self._scalar(
                    member, self._bits(data, m.bit_offset, m.bitfield_size), m.bitfield_size)))
                continue
            part = self._part_slicer(m.bit_offset // 8, m.type, f"member {m.name!r}", t.size)
            # (a member whose bytes are not there fails first: its type is never decoded)
            decode = part if isinstance(part, _Raiser) else self._decoder_or_raiser(m.type)
            plain = plain and not isinstance(part, _Raiser) and not isinstance(decode, _Raiser)
            fields.append((m.name, lambda data, part=part, decode=decode: decode(part(data))))
        if plain and len({name for name, _ in fields}) == len(fields):
            fast = self._unpacked_struct(t)
            if fast is not None:
                return fast
        return lambda data: {name: decode(data) for name, decode in fields}

    def _unpacked_struct(self, t: BtfType) -> Callable[[bytes], dict[str, Any]] | None:
        """The same decoder as a struct's generic one, made of one struct.unpack of all its
        members (plain unsigned integers as they are, the others' bytes given to their own
        decoders): for a struct whose members lie apart, whole bytes, inside it."""
        if t.kind != Kind.STRUCT:
            return None
        fmt, names, converted, at = "", [], [], 0
        for m in t.members:
            if not m.name or m.name.startswith(("pad", "__pad")):
                continue
            if m.bitfield_size or m.bit_offset % 8:
                return None
            size, offset = self.size(m.type), m.bit_offset // 8
            if offset < at or offset + size > t.size:
                return None
            plain = self._plain_uint(m.type)
            fmt += "x" * (offset - at) + (plain or f"{size}s")
            if not plain:
                converted.append((len(names), m.name, self.decoder(m.type)))
            names.append(m.name)
            at = offset + size
        unpack = struct.Struct(("<" if self.byteorder == "little" else ">") + fmt).unpack_from

        def decode(data: bytes) -> dict[str, Any]:
            values = unpack(data)
            out = dict(zip(names, values))
            for i, name, convert in converted:
                out[name] = convert(values[i])
            return out
        return decode

    def _plain_uint(self, type_id: int) -> str:
        """The struct format of a type that decodes as the unsigned integer its bytes hold
        (no display hint on the way to it), or ""."""
        t = self.type(type_id)
        while t.kind in _MODIFIER_KINDS:
            if t.kind == Kind.TYPEDEF and t.name in DISPLAY_HINTS:
                return ""
            t = self.type(t.type)
        if t.kind != Kind.INT or t.int_offset or t.bits != t.size * 8 or t.encoding & (INT_BOOL | INT_SIGNED):
            return ""
        return {1: "B", 2: "H", 4: "I", 8: "Q"}.get(t.size, "")

    def _part_slicer(self, offset: int, type_id: int, what: str, whole: int | None = None) -> Callable[[bytes], bytes]:
        """The function giving the bytes of a value of type `type_id` at `offset` (_part);
        whole: the size of the values it cuts, where known (a part outside them fails when
        called, as _part does, never when made)."""
        try:
            end = offset + self.size(type_id)
        except BtfError as e:
            return _raiser(e)
        if whole is not None and end > whole:
            return _Raiser(lambda data: self._part(data, offset, type_id, what))
        return lambda data: data[offset:end] if end <= len(data) else self._part(data, offset, type_id, what)

    def _part(self, data: bytes, offset: int, type_id: int, what: str) -> bytes:
        """The bytes of a value of type `type_id` at `offset` within `data`."""
        size = self.size(type_id)
        if offset + size > len(data):
            raise BtfError(f"{what} ({size} bytes at offset {offset}) lies outside the {len(data)}-byte value")
        return data[offset : offset + size]

    def _bits(self, data: bytes, bit_offset: int, nbits: int) -> int:
        """The unsigned value of `nbits` bits at `bit_offset` (in the BTF's bit numbering)."""
        start, end = bit_offset // 8, (bit_offset + nbits + 7) // 8
        if end > len(data):
            raise BtfError(f"bitfield at bit {bit_offset} runs past the {len(data)}-byte value")
        chunk = int.from_bytes(data[start:end], self.byteorder)
        if self.byteorder == "little":
            shift = bit_offset % 8
        else:  # big endian numbers bits from the most significant end
            shift = end * 8 - (bit_offset + nbits)
        return (chunk >> shift) & ((1 << nbits) - 1)

    def _scalar(self, t: BtfType, value: int, nbits: int) -> Any:
        """An unsigned `nbits`-bit integer as a value of INT/ENUM type `t`."""
        if t.kind in (Kind.ENUM, Kind.ENUM64):
            mask = (1 << nbits) - 1
            for name, enum_value in t.enumerators:
                if (enum_value & mask) == value:
                    return name
        elif t.kind == Kind.INT and t.encoding & INT_BOOL:
            return bool(value)
        elif t.kind != Kind.INT:
            raise BtfError(f"bitfield of type [{t.id}] ({t.kind.name}) is not an integer")
        if t.signed and value >> (nbits - 1):
            value -= 1 << nbits
        return value


def _parse_type(reader: _Reader, type_id: int, string: Callable[[int], str]) -> BtfType:
    name_off, info, size_or_type = reader.read("III")
    vlen = info & 0xFFFF
    try:
        kind = Kind((info >> 24) & 0x1F)
    except ValueError:
        raise BtfError(f"type [{type_id}] has unknown kind {(info >> 24) & 0x1F}") from None
    if kind == Kind.VOID:
        raise BtfError(f"type [{type_id}] has kind 0 (only id 0 may be void)")
    t = BtfType(type_id, kind, string(name_off), kind_flag=bool(info >> 31))
    if kind in _SIZED_KINDS:
        t.size = size_or_type
    else:
        t.type = size_or_type

    if kind == Kind.INT:
        (word,) = reader.read("I")
        t.encoding, t.int_offset, t.bits = (word >> 24) & 0x0F, (word >> 16) & 0xFF, word & 0xFF
        if t.size not in (1, 2, 4, 8, 16) or not 0 < t.bits <= 128 or t.int_offset + t.bits > t.size * 8:
            raise BtfError(f"type [{type_id}]: bad INT size {t.size}, offset {t.int_offset}, bits {t.bits}")
    elif kind == Kind.ARRAY:
        t.type, t.index_type, t.nelems = reader.read("III")
    elif kind in (Kind.STRUCT, Kind.UNION):
        for _ in range(vlen):
            m_name, m_type, offset = reader.read("III")
            if t.kind_flag:  # high 8 bits: bitfield size, low 24: bit offset
                t.members.append(Member(string(m_name), m_type, offset & 0xFFFFFF, offset >> 24))
            else:
                t.members.append(Member(string(m_name), m_type, offset))
    elif kind == Kind.ENUM:
        for _ in range(vlen):
            e_name, value = reader.read("Ii" if t.kind_flag else "II")
            t.enumerators.append((string(e_name), value))
    elif kind == Kind.ENUM64:
        for _ in range(vlen):
            e_name, lo, hi = reader.read("III")
            value = hi << 32 | lo
            if t.kind_flag and value >> 63:
                value -= 1 << 64
            t.enumerators.append((string(e_name), value))
    elif kind == Kind.FUNC:
        t.linkage = vlen
    elif kind == Kind.FUNC_PROTO:
        t.params = [Param(string(n), ty) for n, ty in (reader.read("II") for _ in range(vlen))]
    elif kind == Kind.VAR:
        (t.linkage,) = reader.read("I")
    elif kind == Kind.DATASEC:
        t.secinfo = [VarSecinfo(*reader.read("III")) for _ in range(vlen)]
    elif kind == Kind.DECL_TAG:
        (t.component_idx,) = reader.read("i")
    return t
