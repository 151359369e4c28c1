"""`bpfgen compile`: validate a spec, plan it, render the datapath's C, compile one object.

A build directory holds everything `bpfgen load` needs later without the original spec
file: the plan (plan.json, what the maps of each node hold, read by `load` without
validating again), the resolved spec (spec.json, for people and tools), the generated
sources, the one object for every node, and a manifest naming them with their digests.

clang runs once per build, whatever the number of nodes, and not at all when the
sources and the compiler are those of the object already in the directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from . import __version__
from .errors import BpfgenError, UsageError
from .files import write_file
from .plan import Plan, map_sizes
from .render import OBJECT, SOURCE, render, sources_digest

MANIFEST = "manifest.json"
SPEC_JSON = "spec.json"
PLAN_JSON = "plan.json"
BUILD_FORMAT = 2
DEFAULT_OUT = Path("out")
CLANG_CANDIDATES = ("clang", "clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14")


class CompileError(BpfgenError):
    """clang is missing, libbpf headers are missing, or clang rejected the source."""


class BuildError(UsageError):
    """A build directory that is not one, is damaged, or was made by another bpfgen."""


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

    @property
    def object_path(self) -> Path:
        return self.dir / self.manifest["object"]

    @property
    def object_sha256(self) -> str:
        return self.manifest["object_sha256"]

    def plan_bytes(self) -> bytes:
        """plan.json as compiled (its digest checked against the manifest), read once."""
        return self._plan_data

    @functools.cached_property
    def _plan_data(self) -> bytes:
        path = self.dir / self.manifest["plan"]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BuildError(f"build {self.dir}: cannot read {path.name} ({e.strerror}); compile the spec again") from None
        if hashlib.sha256(data).hexdigest() != self.manifest["plan_sha256"]:
            raise BuildError(f"build {self.dir}: {path.name} does not match the manifest; compile the spec again")
        return data

    def plan(self) -> Plan:
        return Plan.from_json(self.plan_bytes().decode(), str(self.dir / self.manifest["plan"]))

    def spec(self):
        """The resolved spec, validated again (for tools and tests; `load` reads the plan)."""
        from .spec import parse_spec

        path = self.dir / SPEC_JSON
        try:
            text = path.read_text()
        except OSError as e:
            raise BuildError(f"build {self.dir}: cannot read {SPEC_JSON} ({e.strerror}); compile the spec again") from None
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


def _uapi_has_bpf_wq() -> bool:
    """Whether the installed linux/bpf.h declares struct bpf_wq (UAPI of kernel 6.10 on);
    the generated layout header declares it otherwise."""
    for d in ("/usr/local/include", "/usr/include"):
        try:
            return "struct bpf_wq {" in (Path(d) / "linux" / "bpf.h").read_text(errors="replace")
        except OSError:
            continue
    return False


def clang_command(clang: str) -> list[str]:
    # -mcpu=v3: atomic compare-and-swap (SNAT port takeover) and 32-bit jumps.
    # -fdebug-compilation-dir: the object does not depend on where the build directory is.
    cmd = [clang, "-O2", "-g", "-fdebug-compilation-dir=.", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror"]
    if _uapi_has_bpf_wq():
        cmd.append("-DBPFGEN_UAPI_HAS_BPF_WQ")
    for d in include_dirs():
        cmd += ["-I", d]
    return cmd


@cache
def _clang_version(clang: str) -> str:
    proc = subprocess.run([clang, "--version"], capture_output=True, text=True)
    return proc.stdout.splitlines()[0] if proc.returncode == 0 and proc.stdout else clang


def compile_object(source: Path, output: Path) -> None:
    clang = find_clang()
    check_headers()
    cmd = [*clang_command(clang), "-c", source.name, "-o", output.name]
    proc = subprocess.run(cmd, cwd=source.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        diagnostics = proc.stderr.strip() or proc.stdout.strip()
        # clang names files relative to the build dir: make them paths the user can open.
        diagnostics = re.sub(r"^(\S+\.[ch]):", lambda m: f"{source.parent / m.group(1)}:", diagnostics, flags=re.M)
        raise CompileError(f"clang failed on {source}:\n{diagnostics}")


def _file_is(path: Path, data: bytes) -> bool:
    """path is a regular file (not a link) holding data."""
    try:
        if not path.is_file() or path.is_symlink():
            return False
        return path.read_bytes() == data
    except OSError:
        return False


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _previous_manifest(build_dir: Path) -> dict:
    try:
        return json.loads((build_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def compile_spec(spec_path: str | Path, out_dir: str | Path | None = None, *,
                 settings: str | Path | None = None) -> Build:
    """Validate, plan, render and compile (clang only when the object is not up to date).
    settings: beside Kubernetes objects, a file with their bpfgen/v1 Settings document.
    Returns the build; raises SpecError/CompileError."""
    from .spec import load_spec, spec_to_dict  # (pydantic: only where a spec is read)

    spec = load_spec(spec_path, settings)
    build_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT / spec.metadata.name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create build directory {build_dir}: {e.strerror}") from e
    if build_dir.is_symlink() or not build_dir.is_dir():
        raise UsageError(f"build directory {build_dir} is not a directory")

    plan = Plan.from_spec(spec)
    files = {name: text.encode() for name, text in render().items()}
    clang = find_clang()
    digest = sources_digest({k: v.decode() for k, v in files.items()}, [*clang_command(clang), _clang_version(clang)])
    previous = _previous_manifest(build_dir)
    # The manifest goes first and comes back last: a build that fails half-way is no
    # build at all, never an old object beside a new plan.
    (build_dir / MANIFEST).unlink(missing_ok=True)
    files[PLAN_JSON] = plan.to_json().encode()
    files[SPEC_JSON] = (json.dumps(spec_to_dict(spec), separators=(",", ":")) + "\n").encode()
    for name, data in files.items():
        if not _file_is(build_dir / name, data):
            write_file(build_dir / name, data)

    obj = build_dir / OBJECT
    object_sha = _sha256(obj) if not obj.is_symlink() else None
    if not (previous.get("sources_sha256") == digest and object_sha and previous.get("object_sha256") == object_sha):
        check_headers()
        tmp_name = f".{OBJECT}.{secrets.token_hex(4)}.tmp"
        try:
            compile_object(build_dir / SOURCE, build_dir / tmp_name)
            os.replace(build_dir / tmp_name, obj)
        finally:
            (build_dir / tmp_name).unlink(missing_ok=True)
        object_sha = _sha256(obj)

    manifest = {
        "bpfgen": __version__,
        "format": BUILD_FORMAT,
        "name": spec.metadata.name,
        "source": str(spec_path),
        "nodes": [n.name for n in spec.nodes],
        "object": OBJECT,
        "object_sha256": object_sha,
        "sources_sha256": digest,
        "plan": PLAN_JSON,
        "plan_sha256": hashlib.sha256(files[PLAN_JSON]).hexdigest(),
        "spec": SPEC_JSON,
        "maps": map_sizes(plan),
        "files": sorted([*files, OBJECT]),
    }
    write_file(build_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return Build(build_dir, manifest)


_MANIFEST_KEYS = {"bpfgen": str, "format": int, "name": str, "nodes": list, "object": str, "object_sha256": str,
                  "plan": str, "plan_sha256": str}


def open_build(path: str | Path) -> Build:
    """The build at path, its manifest checked; BuildError (exit 2) if it is not one."""
    build_dir = Path(path)
    try:
        manifest = json.loads((build_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise BuildError(f"{build_dir} is not a bpfgen build (no {MANIFEST}); run `bpfgen compile SPEC` first") from None
    except (OSError, ValueError) as e:
        raise BuildError(f"{build_dir / MANIFEST}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUILD_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise BuildError(f"{build_dir}: a build of another bpfgen (format {got!r}, this one reads {BUILD_FORMAT}); "
                         "compile the spec again")
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise BuildError(f"{build_dir / MANIFEST}: damaged manifest ('{key}' missing or not a {kind.__name__}); "
                             "compile the spec again")
    for key in ("object", "plan"):
        if "/" in manifest[key] or manifest[key].startswith("."):
            raise BuildError(f"{build_dir / MANIFEST}: damaged manifest ('{key}' is not a file of the build)")
    return Build(build_dir, manifest)


def check_object(build: Build) -> None:
    """The build's object is the one it was compiled to (not truncated, replaced or gone)."""
    got = _sha256(build.object_path)
    if got is None:
        raise BuildError(f"build {build.dir}: cannot read {build.object_path.name}; compile the spec again")
    if got != build.object_sha256:
        raise BuildError(f"build {build.dir}: {build.object_path.name} is damaged or was replaced "
                         "(its digest is not the manifest's); compile the spec again")


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
