"""`bpfgen compile`: validate a spec, render its C, compile one BPF object per node.

A build directory holds everything `bpfgen load` needs later without the original
spec file: the resolved spec (spec.json), the generated sources, the objects, and a
manifest naming them.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import BpfgenError, UsageError
from .render import map_sizes, object_name, render, source_name
from .spec import Spec, load_spec, parse_spec, spec_to_dict

MANIFEST = "manifest.json"
SPEC_JSON = "spec.json"
DEFAULT_OUT = Path("out")
CLANG_CANDIDATES = ("clang", "clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14")


class CompileError(BpfgenError):
    """clang is missing, libbpf headers are missing, or clang rejected the source."""


@dataclass(frozen=True)
class Build:
    """A build directory on disk."""

    dir: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def nodes(self) -> list[str]:
        return list(self.manifest["nodes"])

    def object_path(self, node: str) -> Path:
        if node not in self.manifest["nodes"]:
            known = ", ".join(self.nodes)
            raise UsageError(f"build {self.dir}: no node '{node}' (nodes: {known})")
        return self.dir / self.manifest["nodes"][node]["object"]

    def spec(self) -> Spec:
        path = self.dir / SPEC_JSON
        try:
            text = path.read_text()
        except OSError as e:
            raise UsageError(f"build {self.dir}: cannot read {SPEC_JSON} ({e.strerror}); compile the spec again") from None
        return parse_spec(text, str(path))


def find_clang() -> str:
    env = os.environ.get("BPFGEN_CLANG")
    for name in ((env,) if env else CLANG_CANDIDATES):
        found = shutil.which(name)
        if found:
            return found
    raise CompileError(
        "clang not found (looked for " + ", ".join((env,) if env else CLANG_CANDIDATES) + "); "
        "install it (Debian: apt-get install clang) or set BPFGEN_CLANG"
    )


def include_dirs() -> list[str]:
    """Where the kernel UAPI and libbpf headers are. Debian keeps asm/ in a multiarch dir
    that clang -target bpf does not search by itself."""
    dirs = []
    multiarch = Path(f"/usr/include/{platform.machine()}-linux-gnu")
    if multiarch.is_dir():
        dirs.append(str(multiarch))
    return dirs


def check_headers() -> None:
    for header in ("bpf/bpf_helpers.h", "linux/bpf.h"):
        if not any((Path(d) / header).is_file() for d in ("/usr/include", "/usr/local/include", *include_dirs())):
            raise CompileError(f"{header} not found; install the libbpf headers (Debian: apt-get install libbpf-dev)")


def compile_object(source: Path, output: Path) -> None:
    clang = find_clang()
    check_headers()
    # -mcpu=v3: atomic compare-and-swap (SNAT port takeover) and 32-bit jumps.
    cmd = [clang, "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror", "-c", source.name, "-o", output.name]
    for d in include_dirs():
        cmd[1:1] = ["-I", d]
    proc = subprocess.run(cmd, cwd=source.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        diagnostics = proc.stderr.strip() or proc.stdout.strip()
        # clang names files relative to the build dir: make them paths the user can open.
        diagnostics = re.sub(r"^(\S+\.[ch]):", lambda m: f"{source.parent / m.group(1)}:", diagnostics, flags=re.M)
        raise CompileError(f"clang failed on {source}:\n{diagnostics}")


def _write_if_changed(path: Path, data: str) -> None:
    if not path.exists() or path.read_text() != data:
        path.write_text(data)


def compile_spec(spec_path: str | Path, out_dir: str | Path | None = None) -> Build:
    """Validate, render and compile. Returns the build; raises SpecError/CompileError."""
    spec = load_spec(spec_path)
    build_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT / spec.metadata.name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create build directory {build_dir}: {e.strerror}") from e
    files = render(spec, Path(spec_path).name)
    # The manifest goes first and comes back last: a build that fails half-way is no
    # build at all, never old objects beside a new spec.
    (build_dir / MANIFEST).unlink(missing_ok=True)
    for name, text in files.items():
        _write_if_changed(build_dir / name, text)

    nodes = {}
    for node in spec.nodes:
        src, obj = build_dir / source_name(node.name), build_dir / object_name(node.name)
        compile_object(src, obj)
        nodes[node.name] = {"source": src.name, "object": obj.name}
    files[SPEC_JSON] = json.dumps(spec_to_dict(spec), indent=2) + "\n"
    _write_if_changed(build_dir / SPEC_JSON, files[SPEC_JSON])
    manifest = {
        "bpfgen": __version__,
        "name": spec.metadata.name,
        "spec": SPEC_JSON,
        "source": str(spec_path),
        "nodes": nodes,
        "maps": map_sizes(spec),
        "files": sorted(files),
    }
    tmp = build_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(build_dir / MANIFEST)
    return Build(build_dir, manifest)


def open_build(path: str | Path) -> Build:
    build_dir = Path(path)
    try:
        manifest = json.loads((build_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise UsageError(f"{build_dir} is not a bpfgen build (no {MANIFEST}); run `bpfgen compile SPEC` first") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{build_dir / MANIFEST}: unreadable manifest ({e})") from None
    return Build(build_dir, manifest)


def find_build(out_root: str | Path = DEFAULT_OUT) -> Build:
    """The single build under out/ (an error if there are none or several)."""
    root = Path(out_root)
    builds = sorted(p.parent for p in root.glob(f"*/{MANIFEST}")) if root.is_dir() else []
    if not builds:
        raise UsageError(f"no build found under {root}/; run `bpfgen compile SPEC` or pass --build/--spec")
    if len(builds) > 1:
        names = ", ".join(str(b) for b in builds)
        raise UsageError(f"several builds under {root}/ ({names}); choose one with --build DIR")
    return open_build(builds[0])
