"""Entering a named network namespace (the ones `ip netns add` makes) from Python.

Only the network namespace of the calling thread changes (setns with CLONE_NEWNET on
/run/netns/NAME); the mount namespace stays ours, so /sys/fs/bpf is still the host's
bpffs and pins made inside `enter_netns` land where every other tool sees them. That
is the difference with `ip netns exec`, which also gives the command a private mount
namespace with a fresh /sys (see `under_ip_netns_exec`).
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from bpfgen.errors import BpfgenError, UsageError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_current = threading.local()  # .name: the namespace this thread entered with enter_netns


def _setns(fd: int, nstype: int) -> None:
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, nstype)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def current_netns() -> str | None:
    """The name given to the innermost enter_netns of this thread (None: not inside one)."""
    return getattr(_current, "name", None)


@contextmanager
def enter_netns(name: str | None) -> Iterator[None]:
    """Run the body in network namespace `name` (None: stay where we are).

    The calling thread moves; the original namespace is restored on exit, also when the
    body raises. Netlink sockets and interface lookups made inside act on `name`.
    """
    if name is None:
        yield
        return
    if not name or "/" in name or name in (".", ".."):
        raise UsageError(f"invalid network namespace name '{name}'")
    path = os.path.join(NETNS_RUN_DIR, name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"network namespace '{name}' does not exist") from None
    except OSError as e:
        raise BpfgenError(f"cannot open network namespace '{name}': {e.strerror}") from None
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                _setns(target, CLONE_NEWNET)
            except OSError as e:
                raise BpfgenError(f"cannot enter network namespace '{name}': {e.strerror}") from None
            outer = current_netns()
            _current.name = name
            try:
                yield
            finally:
                _current.name = outer
                _setns(original, CLONE_NEWNET)
        finally:
            os.close(original)
    finally:
        os.close(target)


def ifindex(name: str) -> int:
    """The index of interface `name` in the current thread's network namespace."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        where = f" in network namespace '{current_netns()}'" if current_netns() else ""
        raise UsageError(f"interface '{name}' does not exist{where}") from None


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, source) for each line of /proc/self/mountinfo."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) >= 5 and len(rest) >= 2:
                result.append((fields[4], rest[0], rest[1]))
    return result


def under_ip_netns_exec() -> bool:
    """True when this process looks like it runs under `ip netns exec NS`.

    `ip netns exec` unshares the mount namespace and mounts a fresh sysfs on /sys whose
    source is the namespace's name, so /sys/fs/bpf there is an empty directory, not the
    host's bpffs. We report True when:
      - our mount namespace differs from PID 1's (skipped when /proc/1/ns/mnt cannot be
        read, e.g. inside a PID namespace), and
      - the last mount on /sys is a sysfs whose source names an entry of /run/netns, and
      - nothing of type bpf is mounted on /sys/fs/bpf.
    """
    try:
        if os.readlink("/proc/1/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            return False
    except OSError:
        pass
    try:
        table = mounts()
        netns_names = set(os.listdir(NETNS_RUN_DIR))
    except OSError:
        return False
    sys_mounts = [(fstype, source) for point, fstype, source in table if point == "/sys"]
    if not sys_mounts:
        return False
    fstype, source = sys_mounts[-1]
    if fstype != "sysfs" or source not in netns_names:
        return False
    return not any(point == "/sys/fs/bpf" and fstype == "bpf" for point, fstype, _ in table)
