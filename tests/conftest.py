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


# ---------------------------------------------------------------- shared fixtures

import secrets
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "examples" / "seed.yaml"


def _ensure_bpffs() -> None:
    """bpffs at /sys/fs/bpf, mounted by bpfgen's own code when it is not there yet."""
    from bpfgen.state import ensure_bpffs

    ensure_bpffs()


@pytest.fixture
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pins under a private dir of bpffs and records in tmp_path, so tests never meet a
    real node's state or each other's; everything is removed afterwards."""
    _ensure_bpffs()
    pins = Path("/sys/fs/bpf") / f"bpfgen-test-{secrets.token_hex(4)}"
    monkeypatch.setenv("BPFGEN_PIN_ROOT", str(pins))
    monkeypatch.setenv("BPFGEN_RUN_DIR", str(tmp_path / "run"))
    yield pins
    subprocess.run(["rm", "-rf", str(pins)], check=False)


class Netns:
    """A network namespace holding a veth pair eth0 <-> peer0 (both ends inside it)."""

    def __init__(self, address: str | None = "172.26.50.101/24"):
        self.name = f"bgt-{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            self.ip("link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
            if address:
                self.ip("addr", "add", address, "dev", "eth0")
            for dev in ("eth0", "peer0", "lo"):
                self.ip("link", "set", dev, "up")
        except BaseException:
            self.remove()
            raise

    def ip(self, *args: str) -> str:
        return subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True, text=True).stdout

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A command inside the namespace via nsenter (which keeps the host's bpffs)."""
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.name}", *args], check=check,
                              capture_output=True, text=True)

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)


@pytest.fixture
def netns():
    """A fresh namespace with eth0 carrying node0's address (172.26.50.101/24)."""
    ns = Netns()
    yield ns
    ns.remove()


@pytest.fixture(scope="session")
def seed_build(tmp_path_factory: pytest.TempPathFactory):
    """examples/seed.yaml compiled once per session."""
    from bpfgen.build import compile_spec

    return compile_spec(SEED, tmp_path_factory.mktemp("seed-build"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="Rewrite tests/golden from the current output.")


# ------------------------------------------------- clang-built test objects (tests/data)

DATA = Path(__file__).parent / "data"
BPFTOOL = shutil.which("bpftool") or "/usr/sbin/bpftool"


def _asm_include_dirs() -> list[str]:
    """<linux/types.h> needs <asm/types.h>, which lives in a multiarch dir on Debian."""
    return [f"-I{p.parent.parent}" for p in sorted(Path("/usr/include").glob("*/asm/types.h"))[:1]]


def compile_bpf(source: Path, out_dir: Path, target: str = "bpf", debug: bool = True) -> Path:
    """clang -O2 [-g] -target <target> -c source -o out_dir/<stem>[.<target>].o

    Without clang the test is skipped on a developer machine, but FAILS when the CI
    environment variable is set (CI must never go green by skipping)."""
    if shutil.which("clang") is None:
        if os.environ.get("CI"):
            pytest.fail("clang is not installed (CI: tests that build BPF objects must run)", pytrace=False)
        pytest.skip("clang not installed")
    suffix = "" if target == "bpf" else f".{target}"
    out = out_dir / f"{source.stem}{suffix}.o"
    cmd = ["clang", "-O2", *(["-g"] if debug else []), "-target", target, *_asm_include_dirs()]
    subprocess.run([*cmd, "-c", str(source), "-o", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def objdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bpfobj")


@pytest.fixture(scope="session")
def sample_obj(objdir: Path) -> Path:
    return compile_bpf(DATA / "sample.c", objdir)


@pytest.fixture(scope="session")
def sample_obj_be(objdir: Path) -> Path:
    return compile_bpf(DATA / "sample.c", objdir, target="bpfeb")


# ------------------------------------------------------------------------- lab fixtures


def namespaces() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


def load_every_node(the_lab, spec: Path, tmp: Path) -> None:
    """spec compiled into tmp/build and loaded on every node of the lab."""
    from bpfgen.build import compile_spec
    from bpfgen.loader import load

    build = compile_spec(spec, tmp / "build")
    for name in the_lab.nodes:
        load("eth0", build=build.dir, netns=the_lab.node_ns(name))


from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402


@contextmanager
def lab_up(spec: Path, tmp: Path, letter: str, prepare: Callable = load_every_node) -> Iterator:
    """spec's lab (namespace prefix: letter + random hex) with private pins and records,
    prepared (by default: loaded on every node); afterwards everything is removed, the
    environment restored, and no namespace of the lab may be left."""
    from bpfgen import lab as labmod

    if os.geteuid() != 0:
        pytest.skip("needs root")  # pytest_runtest_setup turns this into a failure under CI
    env = {"BPFGEN_PIN_ROOT": f"/sys/fs/bpf/bpfgen-test-{secrets.token_hex(4)}", "BPFGEN_RUN_DIR": str(tmp / "run")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    prefix = f"{letter}{secrets.token_hex(3)}"
    try:
        the_lab = labmod.up(spec, prefix)
        try:
            prepare(the_lab, spec, tmp)
            yield the_lab
        finally:
            labmod.down(prefix)
            assert not any(ns.startswith(prefix + "-") for ns in namespaces())
    finally:
        subprocess.run(["rm", "-rf", env["BPFGEN_PIN_ROOT"]])
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tuple_key(flow: tuple[str, int, str, int], direction: str, proto: int = 6) -> bytes:
    """A conntrack or SNAT key: flow (saddr, sport, daddr, dport), direction a tuple.dir
    name (CT_SERVICE, CT_OUT, ..., NAT_IN), proto TCP unless given."""
    from bpfgen import layout

    saddr, sport, daddr, dport = flow
    return layout.TUPLE.pack(saddr=saddr, daddr=daddr, sport=sport, dport=dport, proto=proto,
                             dir=layout.FLAGS[direction])


def filter_sharer(addr: str, avoid: frozenset[str] = frozenset(), within: str = "10.96.0.0/12",
                  port: int | None = None) -> str:
    """An address of the network within (the service range by default), neither addr nor
    one of avoid, whose bit in the frontend address filter (fe_addr_v4) is addr's; with
    port, whose endpoint at that port has addr:port's bit in the local backend filter
    (be_addr_v4)."""
    import ipaddress

    from bpfgen import layout

    net = ipaddress.IPv4Network(within)
    offset = 0 if port is None else port * layout.ENDPOINT_PORT_MIX
    want = layout.addr_filter_bit((int(ipaddress.IPv4Address(addr)) + offset) & 0xFFFFFFFF)
    # (the filter's hash is a multiplication by an odd number: every index it gives has
    # 2^12 preimages, one for each low 12 bits of the product)
    inverse = pow(layout.ADDR_FILTER_HASH, -1, 1 << 32)
    index = want[0] << 6 | want[1]
    for low in range(1 << (32 - layout.ADDR_FILTER_BITS_LOG2)):
        n = (((index << (32 - layout.ADDR_FILTER_BITS_LOG2) | low) * inverse) - offset) & 0xFFFFFFFF
        other = ipaddress.IPv4Address(n)
        if other in net and str(other) != addr and str(other) not in avoid:
            assert (layout.addr_filter_bit(n) if port is None else layout.endpoint_filter_bit(n, port)) == want
            return str(other)
    raise AssertionError(f"no address of {within} shares {addr}'s filter bit")
