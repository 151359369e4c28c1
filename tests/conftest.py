"""Shared pytest setup.

Tests marked `kernel` need root, BPF (bpffs) and network namespaces. Without them they
are skipped on a developer machine but FAIL when the CI environment variable is set, so
CI can never go green by skipping them.
"""

from __future__ import annotations

import os
import shutil

import pytest


def kernel_unavailable_reason() -> str | None:
    """Why kernel tests cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.isdir("/sys/fs/bpf"):
        return "the kernel has no bpffs (/sys/fs/bpf)"
    if not os.path.exists("/proc/self/ns/net"):
        return "no network namespaces"
    for tool in ("ip", "tc", "clang"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is None:
        return
    reason = kernel_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"kernel test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"kernel test: {reason}")
