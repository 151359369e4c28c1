"""Where bpfgen keeps a node's state, and the checks before touching the kernel.

- pins: /sys/fs/bpf/bpfgen/<node>/<map> (bpffs, shared by every emulated node, so
  everything is kept per node);
- records: /run/bpfgen/nodes/<node>.json, what `bpfgen status` shows (interface, program
  ids, spec, when loaded), since bpffs holds only pinned objects;
- locks: /run/bpfgen/<node>.lock, so two loads of one node cannot race.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import BpfgenError, UsageError
from .files import write_file
from .netns import enter_netns, mounts, under_ip_netns_exec

BPFFS = Path(os.environ.get("BPFGEN_BPFFS", "/sys/fs/bpf"))


def pin_root() -> Path:
    """Where nodes' pins live (BPFGEN_PIN_ROOT moves it, e.g. for tests; it must be on bpffs)."""
    return Path(os.environ.get("BPFGEN_PIN_ROOT", BPFFS / "bpfgen"))


def run_dir() -> Path:
    """Records, locks and lab files (BPFGEN_RUN_DIR moves it)."""
    return Path(os.environ.get("BPFGEN_RUN_DIR", "/run/bpfgen"))


def record_dir() -> Path:
    return run_dir() / "nodes"


CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39


class PrivilegeError(BpfgenError):
    """Missing root or a capability."""


class UnreadableRecord(BpfgenError):
    """A node record that cannot be parsed."""


def pin_dir(node: str) -> Path:
    """Where node's maps are pinned; the name is checked (it becomes a path) and the
    directory, when it exists, must be a directory of bpfgen's, not a link elsewhere."""
    check_node_name(node)
    d = pin_root() / node
    if d.is_symlink():
        raise BpfgenError(f"{d} is a symbolic link, not bpfgen's pin directory; remove it")
    return d


def check_privileges() -> None:
    """CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN, named when missing."""
    caps = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
    missing = []
    if not caps & (1 << CAP_BPF | 1 << CAP_SYS_ADMIN):
        missing.append("CAP_BPF")
    if not caps & (1 << CAP_NET_ADMIN):
        missing.append("CAP_NET_ADMIN")
    if missing:
        who = "not root" if os.geteuid() != 0 else "root without them"
        raise PrivilegeError(f"missing capability {' and '.join(missing)} ({who}); run bpfgen as root")


def is_bpffs(path: Path) -> bool:
    return any(point == str(path) and fstype == "bpf" for point, fstype, _ in mounts())


def require_host_bpffs() -> None:
    """Refuse to work on a throwaway bpffs: `ip netns exec` hides the host's."""
    if not is_bpffs(BPFFS) and under_ip_netns_exec():
        raise UsageError(
            "started under `ip netns exec`, whose private /sys hides the host's bpffs; "
            "run `bpfgen ... --netns NAME` or `nsenter --net=/run/netns/NAME bpfgen ...` instead"
        )


def ensure_bpffs() -> str | None:
    """Make sure the host's bpffs is at BPFFS; returns a message when it mounted it."""
    require_host_bpffs()
    if is_bpffs(BPFFS):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    BPFFS.mkdir(parents=True, exist_ok=True)
    if libc.mount(b"bpf", str(BPFFS).encode(), b"bpf", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise BpfgenError(f"cannot mount bpffs at {BPFFS}: {os.strerror(err)}")
    return f"mounted bpffs at {BPFFS}"


def netns_inode() -> int:
    """The inode of the calling thread's network namespace (identifies it)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


@dataclass
class NodeRecord:
    """What is loaded for one node."""

    node: str
    iface: str
    netns: str | None
    netns_inode: int
    pin_dir: str
    spec: str
    build: str
    loaded_at: str
    updated_at: str
    programs: dict[str, dict] = field(default_factory=dict)  # ingress/egress -> name, id, tag
    created_qdisc: bool = False
    object_sha256: str = ""  # the object the programs came from
    config: str = ""  # the node's .rodata.config, hex
    maps: dict[str, int] = field(default_factory=dict)  # max_entries of every map
    map_ids: dict[str, int] = field(default_factory=dict)  # the pinned maps the plan was written into
    plan_sha256: str = ""  # the plan last applied, kept beside the record (<node>.applied-plan)
    reserved_ports: str = ""  # what bpfgen added to net.ipv4.ip_local_reserved_ports ("30000-32767,...")
    collector_id: int = 0  # the collector_arm program whose callbacks ct_v4's collector runs

    @property
    def path(self) -> Path:
        return record_dir() / f"{self.node}.json"

    def save(self, plan: bytes | None = None) -> None:
        """Write the record (and the plan it applied, when given), readable by root alone."""
        record_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
        if plan is not None:
            write_file(self.plan_path, plan, 0o600)
        write_file(self.path, json.dumps(asdict(self), indent=2) + "\n", 0o600)

    @property
    def plan_path(self) -> Path:
        return record_dir() / f"{self.node}.applied-plan"  # (not *.json: that is a record)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.plan_path.unlink(missing_ok=True)

    @classmethod
    def load(cls, node: str) -> NodeRecord | None:
        path = record_dir() / f"{node}.json"
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            raise UnreadableRecord(
                f"{path}: unreadable record ({e}); `bpfgen unload --iface IFACE --node {node}` clears it") from None

    @classmethod
    def all(cls) -> list[NodeRecord]:
        """Every readable record (an unreadable one is left to `unload --node`)."""
        records = []
        for path in sorted(record_dir().glob("*.json")) if record_dir().is_dir() else []:
            try:
                record = cls.load(path.stem)
            except UnreadableRecord:
                continue
            if record is not None:
                records.append(record)
        return records

    def stale(self) -> bool:
        """None of the programs the record names exists any more: the kernel dropped them
        (their interface or namespace was removed), and the record speaks of nothing."""
        from . import libbpf as bpf

        for prog in self.programs.values():
            try:
                with bpf.prog_get_fd_by_id(prog["id"]) as fd:
                    info = bpf.prog_info(fd)
                if info.tag == prog.get("tag", info.tag):  # (not an id the kernel gave another program)
                    return False
            except bpf.LibbpfError:
                continue
        return bool(self.programs)

    def namespace_gone(self) -> bool:
        """The named namespace the node was loaded in no longer exists (or is another one
        by now): nothing of it is left in the kernel but the pins."""
        if self.netns is None:
            return False
        try:
            return os.stat(f"/run/netns/{self.netns}").st_ino != self.netns_inode
        except OSError:
            return True

    def where(self) -> str:
        ns = f"network namespace '{self.netns}'" if self.netns else "another network namespace"
        return f"interface '{self.iface}' in {ns}" + (f" (--netns {self.netns})" if self.netns else "")


def pinned_nodes() -> list[str]:
    root = pin_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink() and _NODE_NAME.fullmatch(p.name))


def resolve_loaded_node(node: str | None, netns: str | None = None) -> str:
    """The node whose state a read command shows: --node, else the node loaded in the
    current (or --netns) network namespace, else the only node loaded."""
    check_privileges()
    require_host_bpffs()
    if node:
        check_node_name(node)
        if netns:
            with enter_netns(netns):  # (a namespace that does not exist is an error, not ignored)
                pass
        if node not in pinned_nodes():
            raise UsageError(f"nothing of bpfgen is loaded for node '{node}' (no pins in {pin_dir(node)})")
        return node
    loaded = pinned_nodes()
    with enter_netns(netns):
        here = netns_inode()
    matches = [r.node for r in NodeRecord.all() if r.netns_inode == here and r.node in loaded]
    if len(matches) == 1:
        return matches[0]
    if netns:
        raise UsageError(f"no bpfgen node is loaded in network namespace '{netns}'")
    if len(loaded) == 1:
        return loaded[0]
    if not loaded:
        raise UsageError("nothing of bpfgen is loaded (no pins under " f"{pin_root()}); run `bpfgen load` first")
    raise UsageError(f"several nodes are loaded ({', '.join(loaded)}); choose one with --node")


_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?")


def check_node_name(node: str) -> None:
    """A node name becomes a path (pins, records, locks): a DNS label of at most 15
    characters, nothing else, whatever the command."""
    if not _NODE_NAME.fullmatch(node):
        raise UsageError(f"invalid node name {node!r}: use at most 15 lowercase letters, digits or '-', "
                         "starting and ending with a letter or digit")


@contextmanager
def _lock(name: str, what: str) -> Iterator[None]:
    """An exclusive lock; a second one fails at once. The lock file goes when the lock is
    released (so locks do not accumulate): a lock counts only while its file is still the
    one at the path, which the holder checks after taking it."""
    run_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
    path = run_dir() / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BpfgenError(f"another bpfgen command is changing {what} right now; try again") from None
            raise
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it as we opened it: take the new one
    try:
        yield
    finally:
        try:
            path.unlink()
        finally:
            os.close(fd)


def node_lock(node: str):
    """The lock for changing a node (taken after its interface's)."""
    check_node_name(node)
    return _lock(f"{node}.lock", f"node '{node}'")


def iface_lock(ns_inode: int, ifindex: int, iface: str):
    """The lock for changing what an interface carries (taken first): two commands never
    put two nodes on one interface."""
    return _lock(f"iface-{ns_inode}-{ifindex}.lock", f"interface '{iface}'")


def remove_pins(node: str) -> list[str]:
    """Unpin everything of node; returns what was removed."""
    removed = []
    d = pin_dir(node)
    if d.is_dir():
        for p in sorted(d.iterdir()):
            p.unlink()
            removed.append(str(p))
        d.rmdir()
    try:
        pin_root().rmdir()  # only when no other node is left
    except OSError:
        pass
    return removed
