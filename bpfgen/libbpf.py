"""The one ctypes binding to libbpf 1.x (libbpf.so.1) that bpfgen uses.

Layout of this file: constants, opaque handle types, the C structs (layouts copied
from /usr/include/bpf/*.h and /usr/include/linux/bpf.h), the symbol table (every
libbpf function used, declared once), the library and its log capture, the error,
then small classes: BpfObject / BpfMap / BpfProgram (libbpf's object API), Fd /
MapFd (file descriptors of loaded maps and programs), and functions for the rest
(pins, ids, info, BTF, tc attachment, BPF_PROG_TEST_RUN).

Every call goes through `_call`, which captures what libbpf prints during it and turns
a negative return (libbpf 1.x returns -errno) or a NULL pointer (errno read right
after) into a LibbpfError. libbpf's messages never go to stderr unless
BPFGEN_LIBBPF_DEBUG=1 is set.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import logging
import mmap
import os
import platform
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    byref,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
    sizeof,
)
from dataclasses import dataclass
from typing import Any

from bpfgen.errors import BpfgenError

LIBBPF_SONAME = "libbpf.so.1"
DEBUG_ENV = "BPFGEN_LIBBPF_DEBUG"

# ---------------------------------------------------------------- constants

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE = 21
BPF_MAP_TYPE_RINGBUF = 27
PERCPU_TYPES = frozenset(
    {
        BPF_MAP_TYPE_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        BPF_MAP_TYPE_LRU_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE,
    }
)
LOOKUP_BATCH = 4096  # entries per bpf_map_lookup_batch call, by default
ARRAY_TYPES = frozenset({BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY})
LRU_TYPES = frozenset({BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_LRU_PERCPU_HASH})

BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_SCHED_ACT = 4
BPF_PROG_TYPE_XDP = 6
BPF_PROG_TYPE_SYSCALL = 31

BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_TC_F_REPLACE = 1

LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2

ENOTSUPP = 524  # kernel-internal "operation not supported" that leaks to user space

VERIFIER_LOG_SIZE = 16 << 20  # what libbpf itself allocates; lazily backed (mmap)

# ---------------------------------------------------------------- opaque handles


class _BpfObject(Structure):
    pass


class _BpfMap(Structure):
    pass


class _BpfProgram(Structure):
    pass


class _BpfLink(Structure):
    pass


class _Btf(Structure):
    pass


ObjectHandle = POINTER(_BpfObject)
MapHandle = POINTER(_BpfMap)
ProgramHandle = POINTER(_BpfProgram)
LinkHandle = POINTER(_BpfLink)
BtfHandle = POINTER(_Btf)

# ---------------------------------------------------------------- structs
# Options structs start with `size_t sz`, set to sizeof(struct) by _opts(); the
# trailing `size_t :0` of the C headers is the natural 8-byte alignment here.


class BpfObjectOpenOpts(Structure):  # bpf/libbpf.h
    _fields_ = [
        ("sz", c_size_t),
        ("object_name", c_char_p),
        ("relaxed_maps", c_bool),
        ("pin_root_path", c_char_p),
        ("_attach_prog_fd", c_uint32),  # `__u32 :32`, removed field
        ("kconfig", c_char_p),
        ("btf_custom_path", c_char_p),
        ("kernel_log_buf", c_void_p),
        ("kernel_log_size", c_size_t),
        ("kernel_log_level", c_uint32),
    ]


class BpfTcHook(Structure):  # bpf/libbpf.h
    _fields_ = [
        ("sz", c_size_t),
        ("ifindex", c_int),
        ("attach_point", c_int),  # enum bpf_tc_attach_point
        ("parent", c_uint32),
    ]


class BpfTcOpts(Structure):  # bpf/libbpf.h
    _fields_ = [
        ("sz", c_size_t),
        ("prog_fd", c_int),
        ("flags", c_uint32),
        ("prog_id", c_uint32),
        ("handle", c_uint32),
        ("priority", c_uint32),
    ]


class BpfMapBatchOpts(Structure):  # bpf/bpf.h
    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


class BpfTestRunOpts(Structure):  # bpf/bpf.h
    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8


class BpfMapInfoStruct(Structure):  # linux/bpf.h struct bpf_map_info
    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("btf_id", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("_pad", c_uint32),
        ("map_extra", c_uint64),
    ]


class BpfProgInfoStruct(Structure):  # linux/bpf.h struct bpf_prog_info
    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("tag", c_uint8 * BPF_TAG_SIZE),
        ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64),
        ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64),
        ("name", c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", c_uint32),
        ("gpl_compatible", c_uint32, 1),
        ("_pad1", c_uint32, 31),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("nr_jited_ksyms", c_uint32),
        ("nr_jited_func_lens", c_uint32),
        ("jited_ksyms", c_uint64),
        ("jited_func_lens", c_uint64),
        ("btf_id", c_uint32),
        ("func_info_rec_size", c_uint32),
        ("func_info", c_uint64),
        ("nr_func_info", c_uint32),
        ("nr_line_info", c_uint32),
        ("line_info", c_uint64),
        ("jited_line_info", c_uint64),
        ("nr_jited_line_info", c_uint32),
        ("line_info_rec_size", c_uint32),
        ("jited_line_info_rec_size", c_uint32),
        ("nr_prog_tags", c_uint32),
        ("prog_tags", c_uint64),
        ("run_time_ns", c_uint64),
        ("run_cnt", c_uint64),
        ("recursion_misses", c_uint64),
        ("verified_insns", c_uint32),
        ("attach_btf_obj_id", c_uint32),
        ("attach_btf_id", c_uint32),
        ("_pad2", c_uint32),
    ]


def _opts(cls: type[Structure], **fields: Any) -> Structure:
    """An options struct with sz set, as LIBBPF_OPTS() does."""
    return cls(sz=sizeof(cls), **fields)


# ---------------------------------------------------------------- symbol table

# int (*libbpf_print_fn_t)(enum libbpf_print_level, const char *fmt, va_list ap);
# va_list is an array type on x86_64 (and passed by reference on aarch64): a pointer.
_PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
_U32P = POINTER(c_uint32)

_SYMBOLS: dict[str, tuple[Any, list[Any]]] = {
    # library
    "libbpf_set_print": (c_void_p, [_PRINT_FN]),
    "libbpf_num_possible_cpus": (c_int, []),
    # bpf_object
    "bpf_object__open_file": (ObjectHandle, [c_char_p, POINTER(BpfObjectOpenOpts)]),
    "bpf_object__load": (c_int, [ObjectHandle]),
    "bpf_object__close": (None, [ObjectHandle]),
    "bpf_object__next_map": (MapHandle, [ObjectHandle, MapHandle]),
    "bpf_object__next_program": (ProgramHandle, [ObjectHandle, ProgramHandle]),
    "bpf_object__find_map_by_name": (MapHandle, [ObjectHandle, c_char_p]),
    "bpf_object__find_program_by_name": (ProgramHandle, [ObjectHandle, c_char_p]),
    # bpf_map (of an object)
    "bpf_map__name": (c_char_p, [MapHandle]),
    "bpf_map__type": (c_int, [MapHandle]),
    "bpf_map__key_size": (c_uint32, [MapHandle]),
    "bpf_map__value_size": (c_uint32, [MapHandle]),
    "bpf_map__max_entries": (c_uint32, [MapHandle]),
    "bpf_map__map_flags": (c_uint32, [MapHandle]),
    "bpf_map__set_max_entries": (c_int, [MapHandle, c_uint32]),
    "bpf_map__set_initial_value": (c_int, [MapHandle, c_void_p, c_size_t]),
    "bpf_map__pin_path": (c_char_p, [MapHandle]),
    "bpf_map__set_pin_path": (c_int, [MapHandle, c_char_p]),
    "bpf_map__is_pinned": (c_bool, [MapHandle]),
    "bpf_map__fd": (c_int, [MapHandle]),
    "bpf_map__reuse_fd": (c_int, [MapHandle, c_int]),
    # bpf_program (of an object)
    "bpf_program__name": (c_char_p, [ProgramHandle]),
    "bpf_program__section_name": (c_char_p, [ProgramHandle]),
    "bpf_program__fd": (c_int, [ProgramHandle]),
    "bpf_program__type": (c_int, [ProgramHandle]),
    # btf
    "btf__load_from_kernel_by_id": (BtfHandle, [c_uint32]),
    "btf__raw_data": (c_void_p, [BtfHandle, _U32P]),
    "btf__free": (None, [BtfHandle]),
    # low-level syscall wrappers (bpf/bpf.h)
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_lookup_batch": (
        c_int,
        [c_int, c_void_p, c_void_p, c_void_p, c_void_p, _U32P, POINTER(BpfMapBatchOpts)],
    ),
    "bpf_map_update_batch": (c_int, [c_int, c_void_p, c_void_p, _U32P, POINTER(BpfMapBatchOpts)]),
    "bpf_map_delete_batch": (c_int, [c_int, c_void_p, _U32P, POINTER(BpfMapBatchOpts)]),
    "bpf_map_freeze": (c_int, [c_int]),
    "bpf_obj_pin": (c_int, [c_int, c_char_p]),
    "bpf_obj_get": (c_int, [c_char_p]),
    "bpf_map_get_fd_by_id": (c_int, [c_uint32]),
    "bpf_prog_get_fd_by_id": (c_int, [c_uint32]),
    "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, _U32P]),
    "bpf_prog_test_run_opts": (c_int, [c_int, POINTER(BpfTestRunOpts)]),
    # tc (netlink)
    "bpf_tc_hook_create": (c_int, [POINTER(BpfTcHook)]),
    "bpf_tc_hook_destroy": (c_int, [POINTER(BpfTcHook)]),
    "bpf_tc_attach": (c_int, [POINTER(BpfTcHook), POINTER(BpfTcOpts)]),
    "bpf_tc_detach": (c_int, [POINTER(BpfTcHook), POINTER(BpfTcOpts)]),
    "bpf_tc_query": (c_int, [POINTER(BpfTcHook), POINTER(BpfTcOpts)]),
}


def declared_symbols() -> list[str]:
    """Every libbpf function this module calls."""
    return sorted(_SYMBOLS)


def missing_symbols() -> list[str]:
    """Declared functions that the installed libbpf.so.1 does not export."""
    lib = _lib()
    return sorted(name for name in _SYMBOLS if not hasattr(lib, name))


# ---------------------------------------------------------------- the library + log capture

_lib_lock = threading.Lock()
_lib_handle: ctypes.CDLL | None = None
_libc_vsnprintf: Any = None
_log = logging.getLogger("bpfgen.libbpf")
_tls = threading.local()  # .captures: this thread's active _Capture objects, innermost last


class _Capture:
    """libbpf messages printed during one operation: (level, text) pairs."""

    def __init__(self) -> None:
        self.messages: list[tuple[int, str]] = []

    def text(self, max_level: int = LIBBPF_INFO) -> str:
        return "".join(msg for level, msg in self.messages if level <= max_level)


# On x86_64 va_list is __va_list_tag[1] (24 bytes): copying those bytes is what va_copy
# does, which lets a message longer than the first buffer be formatted a second time.
_VA_LIST_BYTES = 24 if platform.machine() == "x86_64" else None


def _format(fmt: bytes, va_list: int) -> str:
    """Format one libbpf message with libc's vsnprintf."""
    if _VA_LIST_BYTES is None:
        buf = ctypes.create_string_buffer(1 << 16)
        _libc_vsnprintf(buf, len(buf), fmt, va_list)
        return buf.value.decode(errors="replace")
    saved = (c_char * _VA_LIST_BYTES).from_buffer_copy(ctypes.string_at(va_list, _VA_LIST_BYTES))
    buf = ctypes.create_string_buffer(4096)
    n = _libc_vsnprintf(buf, len(buf), fmt, va_list)
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        _libc_vsnprintf(buf, len(buf), fmt, ctypes.addressof(saved))
    return buf.value.decode(errors="replace")


def _on_print(level: int, fmt: bytes, va_list: int) -> int:
    try:
        msg = _format(fmt, va_list)
        if os.environ.get(DEBUG_ENV) == "1":
            sys.stderr.write(msg)
        captures = getattr(_tls, "captures", None)
        for cap in captures or ():  # nested captures all see the message
            cap.messages.append((level, msg))
        if not captures:
            _log.debug("%s", msg.rstrip("\n"))
    except Exception:  # never let an exception cross into C
        pass
    return 0


_print_callback = _PRINT_FN(_on_print)  # referenced for the life of the process


def _lib() -> ctypes.CDLL:
    """libbpf.so.1, opened on first use, with every symbol of _SYMBOLS declared."""
    global _lib_handle, _libc_vsnprintf
    if _lib_handle is not None:
        return _lib_handle
    with _lib_lock:
        if _lib_handle is None:
            try:
                lib = ctypes.CDLL(LIBBPF_SONAME, use_errno=True)
            except OSError as e:
                raise BpfgenError(f"cannot load {LIBBPF_SONAME} (install libbpf 1.x): {e}") from None
            for name, (restype, argtypes) in _SYMBOLS.items():
                fn = getattr(lib, name, None)
                if fn is not None:
                    fn.restype, fn.argtypes = restype, argtypes
            libc = ctypes.CDLL("libc.so.6")
            _libc_vsnprintf = libc.vsnprintf
            _libc_vsnprintf.restype = c_int
            _libc_vsnprintf.argtypes = [c_void_p, c_size_t, c_char_p, c_void_p]
            lib.libbpf_set_print(_print_callback)
            _lib_handle = lib
    return _lib_handle


def _fn(name: str) -> Any:
    assert name in _SYMBOLS, f"{name} is not declared in _SYMBOLS"
    try:
        return getattr(_lib(), name)
    except AttributeError:
        raise BpfgenError(f"{LIBBPF_SONAME} has no {name}: libbpf is too old") from None


@contextmanager
def capture_libbpf_log() -> Iterator[_Capture]:
    """Collect what libbpf prints in this thread while the body runs."""
    _lib()
    captures = _tls.__dict__.setdefault("captures", [])
    cap = _Capture()
    captures.append(cap)
    try:
        yield cap
    finally:
        captures.pop()


# ---------------------------------------------------------------- the error

_GENERIC_LINES = re.compile(
    r"^(failed to load object '.*'|prog '.*': failed to load: -?\d+|failed to load BPF skeleton.*)$"
)
_VERIFIER_NOISE = re.compile(
    r"^(processed \d+ insns|verification time|stack depth|-- (BEGIN|END) PROG LOAD LOG --)"
)


def _strip_prefix(line: str) -> str:
    return line[len("libbpf: ") :] if line.startswith("libbpf: ") else line


def _libbpf_lines(libbpf_log: str) -> list[str]:
    """libbpf's message lines without the prefix, verifier log blocks left out."""
    lines, in_block = [], False
    for raw in libbpf_log.splitlines():
        line = _strip_prefix(raw).strip()
        if "-- BEGIN PROG LOAD LOG --" in line:
            in_block = True
            continue
        if "-- END PROG LOAD LOG --" in line:
            in_block = False
            continue
        if line and not in_block:
            lines.append(line)
    return lines


def _extract_verifier_block(libbpf_log: str) -> str | None:
    """The verifier log libbpf prints when it used its own buffer (libbpf 1.1)."""
    m = re.search(r"-- BEGIN PROG LOAD LOG --\n(.*?)-- END PROG LOAD LOG --", libbpf_log, re.S)
    return m.group(1) if m else None


class LibbpfError(BpfgenError):
    """A libbpf call or bpf() syscall that failed.

    errno: positive errno; op: what was being done; libbpf_log: what libbpf printed
    during the call; verifier_log: the kernel verifier's log for a failed program load.
    """

    def __init__(
        self,
        op: str,
        errno: int,
        libbpf_log: str = "",
        verifier_log: str | None = None,
        detail: str | None = None,
    ):
        self.op = op
        self.errno = abs(errno) or errno_mod.EINVAL
        self.libbpf_log = libbpf_log
        self.verifier_log = verifier_log or None
        self.detail = detail if detail is not None else self._relevant_line()
        super().__init__(self._message())

    @staticmethod
    def _strerror(err: int) -> str:
        return "Operation not supported (ENOTSUPP)" if err == ENOTSUPP else os.strerror(err)

    def _relevant_line(self) -> str | None:
        tail = self.verifier_tail(1)
        if tail:
            return tail[-1]
        lines = [line for line in _libbpf_lines(self.libbpf_log) if not _GENERIC_LINES.match(line)]
        return lines[-1] if lines else None

    def _message(self) -> str:
        msg = f"{self.op}: {self._strerror(self.errno)} (errno {self.errno})"
        return f"{msg}: {self.detail}" if self.detail else msg

    def verifier_tail(self, n: int = 20) -> list[str]:
        """The last n lines of the verifier log that say something (no blanks, no stats)."""
        if not self.verifier_log:
            return []
        lines = [
            line.rstrip()
            for line in self.verifier_log.splitlines()
            if line.strip() and not _VERIFIER_NOISE.match(line.strip())
        ]
        return lines[-n:] if n > 0 else []

    def lines(self) -> list[str]:
        tail = self.verifier_tail(20)
        if not tail:
            return [str(self)]
        return [str(self), "verifier log (last lines):"] + ["  " + line for line in tail]


class VerifierError(LibbpfError):
    """The kernel's verifier rejected a program; verifier_log holds its whole log."""


class IncompatiblePinError(LibbpfError):
    """A pinned map's layout (type, key, value, size, flags) differs from the object's."""


def _check(op: str, ret: Any, err: int, cap: _Capture | None, allow: frozenset[int] = frozenset()) -> Any:
    """The one errno check: ret < 0 means -errno; a NULL pointer means errno is `err`.

    Returns ret on success, or -errno when that errno is in `allow`.
    """
    if isinstance(ret, int):
        if ret >= 0:
            return ret
        code = -ret
    elif ret:  # a non-NULL pointer
        return ret
    else:
        code = err or errno_mod.EINVAL
    if code in allow:
        return -code
    raise LibbpfError(op, code, cap.text() if cap else "")


def _call(op: str, name: str, *args: Any, allow: frozenset[int] = frozenset()) -> Any:
    """Call libbpf function `name`, raising LibbpfError(op, ...) when it fails."""
    fn = _fn(name)
    with capture_libbpf_log() as cap:
        ctypes.set_errno(0)
        ret = fn(*args)
        err = ctypes.get_errno()
    return _check(op, ret, err, cap, allow)


_ENOENT = frozenset({errno_mod.ENOENT})


# ---------------------------------------------------------------- file descriptors


class Fd:
    """An owned file descriptor of a BPF object (map, program, ...); closes once."""

    def __init__(self, fd: int):
        self._fd = fd

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError("file descriptor is closed")
        return self._fd

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership: return the fd, which the caller must close."""
        fd, self._fd = self.fd, -1
        return fd

    def dup(self) -> Fd:
        return Fd(os.dup(self.fd))

    def __enter__(self) -> Fd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._fd})"


def obj_get(path: str | os.PathLike[str]) -> Fd:
    """Open a pinned BPF object (bpf_obj_get)."""
    return Fd(_call(f"open pin {os.fspath(path)}", "bpf_obj_get", os.fsencode(path)))


def obj_pin(fd: int | Fd, path: str | os.PathLike[str]) -> None:
    """Pin the object behind fd at path (bpf_obj_pin); the parent must be on bpffs."""
    fd = fd.fd if isinstance(fd, Fd) else fd
    _call(f"pin fd {fd} at {os.fspath(path)}", "bpf_obj_pin", fd, os.fsencode(path))


def map_get_fd_by_id(map_id: int) -> MapFd:
    fd = _call(f"open map id {map_id}", "bpf_map_get_fd_by_id", map_id)
    return MapFd(fd, label=f"id {map_id}")


def prog_get_fd_by_id(prog_id: int) -> Fd:
    return Fd(_call(f"open program id {prog_id}", "bpf_prog_get_fd_by_id", prog_id))


def _obj_info(fd: int, struct: Structure, op: str) -> None:
    size = c_uint32(sizeof(struct))
    _call(op, "bpf_obj_get_info_by_fd", fd, byref(struct), byref(size))


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str
    btf_id: int
    btf_key_type_id: int
    btf_value_type_id: int


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    tag: str  # hex
    xlated_prog_len: int
    jited_prog_len: int
    btf_id: int
    nr_map_ids: int
    verified_insns: int  # the instructions the verifier processed (its limit: a million)


def map_info(fd: int) -> MapInfo:
    raw = BpfMapInfoStruct()
    _obj_info(fd, raw, f"get info of map fd {fd}")
    return MapInfo(
        type=raw.type,
        id=raw.id,
        key_size=raw.key_size,
        value_size=raw.value_size,
        max_entries=raw.max_entries,
        map_flags=raw.map_flags,
        name=raw.name.decode(errors="replace"),
        btf_id=raw.btf_id,
        btf_key_type_id=raw.btf_key_type_id,
        btf_value_type_id=raw.btf_value_type_id,
    )


def prog_info(fd: int | Fd) -> ProgInfo:
    fd = fd.fd if isinstance(fd, Fd) else fd
    raw = BpfProgInfoStruct()  # zeroed: the kernel writes no arrays
    _obj_info(fd, raw, f"get info of program fd {fd}")
    return ProgInfo(
        id=raw.id,
        type=raw.type,
        name=raw.name.decode(errors="replace"),
        tag=bytes(raw.tag).hex(),
        xlated_prog_len=raw.xlated_prog_len,
        jited_prog_len=raw.jited_prog_len,
        btf_id=raw.btf_id,
        nr_map_ids=raw.nr_map_ids,
        verified_insns=raw.verified_insns,
    )


def prog_map_ids(fd: int | Fd) -> list[int]:
    """The ids of the maps a loaded program uses."""
    fd = fd.fd if isinstance(fd, Fd) else fd
    count = prog_info(fd).nr_map_ids
    ids = (c_uint32 * max(count, 1))()
    raw = BpfProgInfoStruct()
    raw.nr_map_ids = count
    raw.map_ids = ctypes.addressof(ids)
    _obj_info(fd, raw, f"get map ids of program fd {fd}")
    return sorted(ids[: min(count, raw.nr_map_ids)])


def _fd_kind(fd: int) -> str | None:
    """'map' or 'prog' from /proc/self/fdinfo, None when it is neither."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            text = f.read()
    except OSError:
        return None
    if "\nmap_type:" in text:
        return "map"
    if "\nprog_type:" in text:
        return "prog"
    return None


_num_cpus: int | None = None


def num_possible_cpus() -> int:
    """libbpf_num_possible_cpus(): the per-CPU value count of per-CPU maps."""
    global _num_cpus
    if _num_cpus is None:
        _num_cpus = _call("count possible CPUs", "libbpf_num_possible_cpus")
    return _num_cpus


def _round8(n: int) -> int:
    return (n + 7) & ~7


class MapFd(Fd):
    """An owned fd of a loaded map, with the map's element operations.

    Keys and values are bytes of exactly key_size / value_size bytes. For per-CPU maps
    a value is the whole buffer: round_up(value_size, 8) * num_possible_cpus() bytes.
    """

    def __init__(self, fd: int, label: str | None = None):
        super().__init__(fd)
        try:
            if _fd_kind(fd) != "map":
                raise LibbpfError(f"open map {label or f'fd {fd}'}", errno_mod.EINVAL, detail="not a BPF map")
            self.info = map_info(fd)
        except BaseException:
            self.close()
            raise
        self.name = self.info.name
        self.label = label or self.name
        self.key_size = self.info.key_size
        self.value_size = self.info.value_size
        self.percpu = self.info.type in PERCPU_TYPES
        self.value_buf_size = (
            _round8(self.value_size) * num_possible_cpus() if self.percpu else self.value_size
        )

    @classmethod
    def from_pin(cls, path: str | os.PathLike[str]) -> MapFd:
        fd = obj_get(path)
        return cls(fd.detach(), label=os.fspath(path))

    def dup(self) -> MapFd:
        return MapFd(os.dup(self.fd), label=self.label)

    def _op(self, what: str) -> str:
        return f"{what} on map {self.label}"

    def _key(self, key: bytes) -> bytes:
        if len(key) != self.key_size:
            raise ValueError(f"map {self.label}: key has {len(key)} bytes, the map's key_size is {self.key_size}")
        return bytes(key)

    def _value(self, value: bytes) -> bytes:
        if len(value) != self.value_buf_size:
            kind = "per-CPU buffer size" if self.percpu else "value_size"
            raise ValueError(
                f"map {self.label}: value has {len(value)} bytes, the map's {kind} is {self.value_buf_size}"
            )
        return bytes(value)

    def lookup(self, key: bytes) -> bytes | None:
        """The value at key (the whole per-CPU buffer for per-CPU maps); None if absent."""
        out = ctypes.create_string_buffer(self.value_buf_size)
        ret = _call(self._op("bpf_map_lookup_elem"), "bpf_map_lookup_elem", self.fd, self._key(key), out, allow=_ENOENT)
        return None if ret < 0 else out.raw

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """The per-CPU values at key, one value_size slice per possible CPU; None if absent."""
        if not self.percpu:
            raise ValueError(f"map {self.label} is not a per-CPU map")
        raw = self.lookup(key)
        return None if raw is None else self.split_percpu(raw)

    def split_percpu(self, raw: bytes) -> list[bytes]:
        """A per-CPU map's whole value buffer as one value_size slice per possible CPU."""
        stride = _round8(self.value_size)
        return [raw[i : i + self.value_size] for i in range(0, len(raw), stride)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        _call(self._op("bpf_map_update_elem"), "bpf_map_update_elem", self.fd, self._key(key), self._value(value), flags)

    def delete(self, key: bytes) -> bool:
        """Delete key; False if it was not there."""
        ret = _call(self._op("bpf_map_delete_elem"), "bpf_map_delete_elem", self.fd, self._key(key), allow=_ENOENT)
        return ret >= 0

    def keys(self) -> Iterator[bytes]:
        """Every key (bpf_map_get_next_key); stops at ENOENT, raises on other errors."""
        prev: bytes | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            ret = _call(self._op("bpf_map_get_next_key"), "bpf_map_get_next_key", self.fd, prev, nxt, allow=_ENOENT)
            if ret < 0:
                return
            prev = nxt.raw
            yield prev

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs; keys deleted while iterating are skipped."""
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def update_batch(self, keys: list[bytes], values: list[bytes], flags: int = BPF_ANY) -> None:
        """Update many elements with one bpf_map_update_batch.

        Falls back to one update per element when the kernel refuses batching for this
        map (EINVAL / ENOTSUPP / EOPNOTSUPP: refused before any element is written).
        """
        if len(keys) != len(values):
            raise ValueError(f"map {self.label}: {len(keys)} keys but {len(values)} values")
        if not keys:
            return
        kbuf = b"".join(self._key(k) for k in keys)
        vbuf = b"".join(self._value(v) for v in values)
        count = c_uint32(len(keys))
        opts = _opts(BpfMapBatchOpts, elem_flags=flags)
        refused = frozenset({errno_mod.EINVAL, ENOTSUPP, errno_mod.EOPNOTSUPP})
        ret = _call(
            self._op(f"bpf_map_update_batch ({len(keys)} elements)"),
            "bpf_map_update_batch",
            self.fd,
            kbuf,
            vbuf,
            byref(count),
            byref(opts),
            allow=refused,
        )
        if ret < 0:
            for key, value in zip(keys, values):
                self.update(key, value, flags)

    def delete_batch(self, keys: list[bytes]) -> None:
        """Delete many elements with one bpf_map_delete_batch (every key must exist);
        one delete per element where the kernel refuses batching for this map."""
        if not keys:
            return
        kbuf = b"".join(self._key(k) for k in keys)
        count = c_uint32(len(keys))
        opts = _opts(BpfMapBatchOpts)
        refused = frozenset({errno_mod.EINVAL, ENOTSUPP, errno_mod.EOPNOTSUPP})
        ret = _call(self._op(f"bpf_map_delete_batch ({len(keys)} elements)"), "bpf_map_delete_batch",
                    self.fd, kbuf, byref(count), byref(opts), allow=refused)
        if ret < 0:
            for key in keys[count.value:]:
                self.delete(key)

    def lookup_batch(self, chunk: int = LOOKUP_BATCH) -> list[tuple[bytes, bytes]]:
        """Every (key, value) with bpf_map_lookup_batch, falling back to items()."""
        ks, vs = self.key_size, self.value_buf_size
        return [(keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs])
                for keys, values in self.scan(chunk) for i in range(len(keys) // ks)]

    def scan(self, chunk: int = LOOKUP_BATCH) -> Iterator[tuple[bytes, bytes]]:
        """Every element, a batch at a time: (keys, values), each batch's keys and values
        packed end to end (key_size and value_buf_size bytes each), for scans of big maps
        that read a few fields of each value (struct.iter_unpack) without a bytes object per
        element. Falls back to items() where the map does not batch."""
        batch_size = max(self.key_size, 8)
        in_batch: Any = None
        out_batch = ctypes.create_string_buffer(batch_size)
        opts = _opts(BpfMapBatchOpts)
        allow = frozenset({errno_mod.ENOENT, errno_mod.ENOSPC, errno_mod.EINVAL, ENOTSUPP, errno_mod.EOPNOTSUPP})
        while True:
            kbuf = ctypes.create_string_buffer(chunk * self.key_size)
            vbuf = ctypes.create_string_buffer(chunk * self.value_buf_size)
            count = c_uint32(chunk)
            ret = _call(
                self._op("bpf_map_lookup_batch"),
                "bpf_map_lookup_batch",
                self.fd,
                in_batch,
                out_batch,
                kbuf,
                vbuf,
                byref(count),
                byref(opts),
                allow=allow,
            )
            if ret == -errno_mod.ENOSPC and count.value == 0:
                chunk *= 2  # a hash bucket holds more elements than one chunk
                continue
            if ret < 0 and ret != -errno_mod.ENOENT and ret != -errno_mod.ENOSPC:
                if in_batch is None:  # batching not supported for this map
                    pairs = list(self.items())
                    yield b"".join(k for k, _ in pairs), b"".join(v for _, v in pairs)
                    return
                raise LibbpfError(self._op("bpf_map_lookup_batch"), -ret)
            if count.value:
                yield kbuf.raw[: count.value * self.key_size], vbuf.raw[: count.value * self.value_buf_size]
            if ret == -errno_mod.ENOENT:
                return
            in_batch = ctypes.create_string_buffer(out_batch.raw, batch_size)


# ---------------------------------------------------------------- libbpf objects


class BpfMap:
    """A map of an open BpfObject (valid while the object is open)."""

    def __init__(self, obj: BpfObject, handle: Any):
        self._obj = obj
        self._handle = handle
        self.name: str = _fn("bpf_map__name")(handle).decode()

    def _h(self) -> Any:
        self._obj._require_open()
        return self._handle

    @property
    def type(self) -> int:
        return _fn("bpf_map__type")(self._h())

    @property
    def key_size(self) -> int:
        return _fn("bpf_map__key_size")(self._h())

    @property
    def value_size(self) -> int:
        return _fn("bpf_map__value_size")(self._h())

    @property
    def max_entries(self) -> int:
        return _fn("bpf_map__max_entries")(self._h())

    @property
    def map_flags(self) -> int:
        return _fn("bpf_map__map_flags")(self._h())

    @property
    def pin_path(self) -> str | None:
        path = _fn("bpf_map__pin_path")(self._h())
        return path.decode() if path else None

    @pin_path.setter
    def pin_path(self, path: str | os.PathLike[str] | None) -> None:
        raw = os.fsencode(path) if path is not None else None
        _call(f"set pin path of map {self.name} to {path}", "bpf_map__set_pin_path", self._h(), raw)

    @property
    def is_pinned(self) -> bool:
        return bool(_fn("bpf_map__is_pinned")(self._h()))

    @property
    def fd(self) -> int:
        """The map's fd, owned by the object (after load)."""
        return _call(f"get fd of map {self.name} (is the object loaded?)", "bpf_map__fd", self._h())

    def map_fd(self) -> MapFd:
        """A MapFd over a duplicate of the map's fd; the caller closes it."""
        return MapFd(os.dup(self.fd), label=self.name)

    def reuse_fd(self, fd: int | Fd) -> None:
        """Use this existing map instead of creating one at load (libbpf dups fd)."""
        fd = fd.fd if isinstance(fd, Fd) else fd
        _call(f"reuse fd {fd} for map {self.name}", "bpf_map__reuse_fd", self._h(), fd)

    def set_max_entries(self, n: int) -> None:
        _call(f"set max_entries of map {self.name} to {n}", "bpf_map__set_max_entries", self._h(), n)

    def set_initial_value(self, data: bytes) -> None:
        """Initial contents of a global-data map (.rodata, .data), before load."""
        _call(
            f"set initial value of map {self.name} ({len(data)} bytes)",
            "bpf_map__set_initial_value",
            self._h(),
            data,
            len(data),
        )

    def __repr__(self) -> str:
        return f"BpfMap({self.name!r})"


class BpfProgram:
    """A program of an open BpfObject (valid while the object is open)."""

    def __init__(self, obj: BpfObject, handle: Any):
        self._obj = obj
        self._handle = handle
        self.name: str = _fn("bpf_program__name")(handle).decode()
        self.section_name: str = _fn("bpf_program__section_name")(handle).decode()

    @property
    def type(self) -> int:
        self._obj._require_open()
        return _fn("bpf_program__type")(self._handle)

    @property
    def fd(self) -> int:
        """The program's fd, owned by the object (after load)."""
        self._obj._require_open()
        return _call(f"get fd of program {self.name} (is the object loaded?)", "bpf_program__fd", self._handle)

    def __repr__(self) -> str:
        return f"BpfProgram({self.name!r})"


_PIN_MISMATCH = re.compile(r"couldn't reuse pinned map at '([^']*)': parameter mismatch")
_PIN_MAP = re.compile(r"map '([^']*)': error reusing pinned map")


class BpfObject:
    """An ELF object opened (and then loaded) by libbpf. Close it, or use `with`."""

    def __init__(self, handle: Any, path: str, log_area: tuple[mmap.mmap, Any]):
        self._handle = handle
        self.path = path
        self._log_area: tuple[mmap.mmap, Any] | None = log_area
        self.loaded = False

    @classmethod
    def open(cls, path: str | os.PathLike[str], pin_root_path: str | os.PathLike[str] | None = None) -> BpfObject:
        """bpf_object__open_file. pin_root_path: where maps declared with
        `__uint(pinning, LIBBPF_PIN_BY_NAME)` are pinned and reused at load.

        Without pin_root_path libbpf uses /sys/fs/bpf itself for such maps.
        """
        spath = os.fspath(path)
        # The verifier log buffer: libbpf loads with log_level 0 and retries a failed
        # program with level 1 into this buffer. Anonymous mmap: untouched pages cost nothing.
        area = mmap.mmap(-1, VERIFIER_LOG_SIZE)
        view = c_char.from_buffer(area)
        opts = _opts(
            BpfObjectOpenOpts,
            pin_root_path=os.fsencode(pin_root_path) if pin_root_path is not None else None,
            kernel_log_buf=ctypes.addressof(view),
            kernel_log_size=VERIFIER_LOG_SIZE,
            kernel_log_level=0,
        )
        try:
            handle = _call(f"open object {spath}", "bpf_object__open_file", os.fsencode(spath), byref(opts))
        except BaseException:
            del view
            area.close()
            raise
        return cls(handle, spath, (area, view))

    def _require_open(self) -> None:
        if self._handle is None:
            raise BpfgenError(f"object {self.path} is closed")

    @property
    def maps(self) -> list[BpfMap]:
        self._require_open()
        result, cur = [], None
        while cur := _fn("bpf_object__next_map")(self._handle, cur):
            result.append(BpfMap(self, cur))
        return result

    @property
    def programs(self) -> list[BpfProgram]:
        self._require_open()
        result, cur = [], None
        while cur := _fn("bpf_object__next_program")(self._handle, cur):
            result.append(BpfProgram(self, cur))
        return result

    def map(self, name: str) -> BpfMap:
        self._require_open()
        handle = _fn("bpf_object__find_map_by_name")(self._handle, name.encode())
        if not handle:
            names = ", ".join(m.name for m in self.maps) or "none"
            raise BpfgenError(f"object {self.path} has no map '{name}' (maps: {names})")
        return BpfMap(self, handle)

    def program(self, name: str) -> BpfProgram:
        self._require_open()
        handle = _fn("bpf_object__find_program_by_name")(self._handle, name.encode())
        if not handle:
            names = ", ".join(p.name for p in self.programs) or "none"
            raise BpfgenError(f"object {self.path} has no program '{name}' (programs: {names})")
        return BpfProgram(self, handle)

    def load(self) -> None:
        """bpf_object__load: create (or reuse pinned) maps, load programs. On failure the
        object is closed and LibbpfError carries libbpf's messages and the verifier log."""
        self._require_open()
        op = f"load object {self.path}"
        try:
            _call(op, "bpf_object__load", self._handle)
        except LibbpfError as e:
            err = self._explain_load_failure(e)
            self.close()
            raise err from None
        self.loaded = True

    def _verifier_log(self) -> str:
        if self._log_area is None:
            return ""
        area = self._log_area[0]
        end = area.find(b"\0")
        return area[: end if end >= 0 else len(area)].decode(errors="replace")

    def _explain_load_failure(self, e: LibbpfError) -> LibbpfError:
        log = e.libbpf_log
        pin = _PIN_MISMATCH.search(log)
        if pin:
            m = _PIN_MAP.search(log)
            name = m.group(1) if m else os.path.basename(pin.group(1))
            detail = f"pinned map {name} at {pin.group(1)} has a layout incompatible with this object"
            diff = self._pin_difference(name, pin.group(1))
            detail += f" ({diff})" if diff else ""
            detail += "; remove the pin or use another pin directory"
            return IncompatiblePinError(e.op, e.errno, log, detail=detail)
        verifier = None
        if "BPF program load failed" in log:
            verifier = self._verifier_log() or _extract_verifier_block(log)
        if verifier and e.errno == errno_mod.ENOSPC:
            verifier += f"\n(verifier log truncated to its last {VERIFIER_LOG_SIZE >> 20} MiB)\n"
        if verifier:
            return VerifierError(e.op, e.errno, log, verifier_log=verifier)
        return LibbpfError(e.op, e.errno, log)

    def _pin_difference(self, name: str, pin_path: str) -> str:
        """What differs between this object's map and the pinned one (best effort)."""
        try:
            ours = self.map(name)
            with MapFd.from_pin(pin_path) as pinned:
                theirs = pinned.info
            diffs = [
                f"{field} {getattr(ours, field)} here, {getattr(theirs, field)} pinned"
                for field in ("type", "key_size", "value_size", "max_entries", "map_flags")
                if getattr(ours, field) != getattr(theirs, field)
            ]
            return ", ".join(diffs)
        except BpfgenError:
            return ""

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            _fn("bpf_object__close")(handle)
        area, self._log_area = self._log_area, None
        if area is not None:
            mm, view = area
            del view, area
            mm.close()

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ---------------------------------------------------------------- BTF


def btf_raw_by_id(btf_id: int) -> bytes:
    """The raw BTF blob the kernel holds under btf_id."""
    btf = _call(f"load BTF id {btf_id} from the kernel", "btf__load_from_kernel_by_id", btf_id)
    try:
        size = c_uint32(0)
        data = _call(f"get raw data of BTF id {btf_id}", "btf__raw_data", btf, byref(size))
        return ctypes.string_at(data, size.value)
    finally:
        _fn("btf__free")(btf)


# ---------------------------------------------------------------- tc (netlink; acts in the calling thread's netns)


def _tc_hook(ifindex: int, attach_point: int) -> BpfTcHook:
    return _opts(BpfTcHook, ifindex=ifindex, attach_point=attach_point)


def _where(ifindex: int, attach_point: int) -> str:
    point = {BPF_TC_INGRESS: "ingress", BPF_TC_EGRESS: "egress"}.get(attach_point, f"attach point {attach_point}")
    return f"ifindex {ifindex} {point}"


def tc_hook_create(ifindex: int, attach_point: int = BPF_TC_INGRESS) -> bool:
    """Create the clsact qdisc on ifindex; False if it already existed."""
    hook = _tc_hook(ifindex, attach_point)
    ret = _call(
        f"create clsact qdisc on ifindex {ifindex}",
        "bpf_tc_hook_create",
        byref(hook),
        allow=frozenset({errno_mod.EEXIST}),
    )
    return ret >= 0


def _kernel_says_absent(e: LibbpfError, message: str) -> bool:
    """Netlink answers some "there is nothing there" cases with EINVAL + a message."""
    return e.errno == errno_mod.EINVAL and f"Kernel error message: {message}" in e.libbpf_log


def tc_hook_destroy(ifindex: int) -> bool:
    """Delete the clsact qdisc (and every tc filter on it); False if there was none.

    Without a clsact qdisc the kernel answers ENOENT or EINVAL "Invalid handle" (the
    device's default ingress queue has handle 0): both mean False.
    """
    hook = _tc_hook(ifindex, BPF_TC_INGRESS | BPF_TC_EGRESS)
    try:
        ret = _call(f"destroy clsact qdisc on ifindex {ifindex}", "bpf_tc_hook_destroy", byref(hook), allow=_ENOENT)
    except LibbpfError as e:
        if _kernel_says_absent(e, "Invalid handle"):
            return False
        raise
    return ret >= 0


def tc_attach(
    ifindex: int, attach_point: int, prog_fd: int | Fd, handle: int, priority: int, replace: bool = False
) -> int:
    """Attach a direct-action bpf filter; returns the attached program's id.

    replace=True swaps the program of an existing (handle, priority) filter atomically
    (BPF_TC_F_REPLACE); without it an existing filter there is an error (EEXIST).
    """
    prog_fd = prog_fd.fd if isinstance(prog_fd, Fd) else prog_fd
    hook = _tc_hook(ifindex, attach_point)
    opts = _opts(
        BpfTcOpts, prog_fd=prog_fd, handle=handle, priority=priority, flags=BPF_TC_F_REPLACE if replace else 0
    )
    verb = "replace" if replace else "attach"
    _call(
        f"tc {verb} program fd {prog_fd} on {_where(ifindex, attach_point)} handle {handle} prio {priority}",
        "bpf_tc_attach",
        byref(hook),
        byref(opts),
    )
    return opts.prog_id


def tc_detach(ifindex: int, attach_point: int, handle: int, priority: int) -> None:
    hook = _tc_hook(ifindex, attach_point)
    opts = _opts(BpfTcOpts, handle=handle, priority=priority)
    _call(
        f"tc detach from {_where(ifindex, attach_point)} handle {handle} prio {priority}",
        "bpf_tc_detach",
        byref(hook),
        byref(opts),
    )


def tc_query(ifindex: int, attach_point: int, handle: int, priority: int) -> int | None:
    """The id of the program attached at (handle, priority); None if no filter is there.

    With no filter at all on the hook the kernel answers EINVAL "Cannot find specified
    filter chain" (chain 0 only exists while it holds a filter), and with no clsact qdisc
    (someone removed it) "Parent Qdisc doesn't exists": also None.
    """
    hook = _tc_hook(ifindex, attach_point)
    opts = _opts(BpfTcOpts, handle=handle, priority=priority)
    try:
        ret = _call(
            f"tc query {_where(ifindex, attach_point)} handle {handle} prio {priority}",
            "bpf_tc_query",
            byref(hook),
            byref(opts),
            allow=_ENOENT,
        )
    except LibbpfError as e:
        if _kernel_says_absent(e, "Cannot find specified filter chain") or _kernel_says_absent(
                e, "Parent Qdisc doesn't exist"):
            return None
        raise
    return None if ret < 0 else opts.prog_id


# ---------------------------------------------------------------- BPF_PROG_TEST_RUN


@dataclass(frozen=True)
class TestRunResult:
    __test__ = False  # not a pytest test class

    retval: int
    data_out: bytes
    duration_ns: int


def prog_test_run(
    prog_fd: int | Fd,
    data: bytes,
    repeat: int = 1,
    data_size_out: int | None = None,
    ctx_in: bytes | None = None,
) -> TestRunResult:
    """Run a program on one packet in the kernel (BPF_PROG_TEST_RUN).

    data_size_out: room for the output packet (default len(data) + 4096).
    duration_ns is the kernel's average per repetition.
    """
    prog_fd = prog_fd.fd if isinstance(prog_fd, Fd) else prog_fd
    out_size = len(data) + 4096 if data_size_out is None else data_size_out
    data_in = ctypes.create_string_buffer(bytes(data), len(data))
    data_out = ctypes.create_string_buffer(out_size)
    ctx = ctypes.create_string_buffer(bytes(ctx_in), len(ctx_in)) if ctx_in is not None else None
    opts = _opts(
        BpfTestRunOpts,
        data_in=ctypes.addressof(data_in),
        data_size_in=len(data),
        data_out=ctypes.addressof(data_out),
        data_size_out=out_size,
        ctx_in=ctypes.addressof(ctx) if ctx is not None else None,
        ctx_size_in=len(ctx_in) if ctx_in is not None else 0,
        repeat=repeat,
    )
    _call(f"test run of program fd {prog_fd} ({len(data)} bytes)", "bpf_prog_test_run_opts", prog_fd, byref(opts))
    return TestRunResult(
        retval=opts.retval, data_out=data_out.raw[: opts.data_size_out], duration_ns=opts.duration
    )


def prog_run_syscall(prog_fd: int | Fd) -> int:
    """Run a syscall program once (BPF_PROG_TEST_RUN with no packet and no context);
    returns its return value."""
    prog_fd = prog_fd.fd if isinstance(prog_fd, Fd) else prog_fd
    opts = _opts(BpfTestRunOpts)
    _call(f"run of program fd {prog_fd}", "bpf_prog_test_run_opts", prog_fd, byref(opts))
    return opts.retval
