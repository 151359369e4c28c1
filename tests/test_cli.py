"""The command line through click's CliRunner: exit codes, stdout/stderr, clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bpfgen.cli import cli

REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "examples" / "seed.yaml"
BAD = REPO / "tests" / "specs" / "bad"
EXPECTED = json.loads((BAD / "expected.json").read_text())


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_compile_writes_the_build_and_lists_it(tmp_path: Path) -> None:
    r = run("compile", SEED, "-o", tmp_path)
    assert r.exit_code == 0, r.stderr
    listed = r.stdout.split()
    assert str(tmp_path / "datapath.bpf.o") in listed and str(tmp_path / "plan.json") in listed
    assert "compiled seed-lab: one object for 2 node(s)" in r.stderr


def test_compile_defaults_to_out_metadata_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = run("compile", SEED)
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "out" / "seed-lab" / "datapath.bpf.o").is_file()


@pytest.mark.parametrize("name", sorted(EXPECTED), ids=str)
def test_bad_specs_exit_2_with_the_path_and_no_traceback(name: str) -> None:
    want = EXPECTED[name]
    r = run("compile", BAD / name, "-o", "/nonexistent-never-written")
    assert r.exit_code == 2
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines and all(line.startswith("bpfgen: ") for line in lines)
    match = [line for line in lines if want["contains"] in line]
    assert match, r.stderr
    if want["path"]:
        assert any(f": {want['path']}: " in line for line in match), r.stderr
    if want.get("line"):
        assert any(f"{name}:{want['line']}:" in line for line in match), r.stderr


def test_validate_reports_ok() -> None:
    r = run("validate", SEED)
    assert r.exit_code == 0 and "ok" in r.stderr


def test_schema_prints_the_committed_schema() -> None:
    r = run("schema")
    assert r.exit_code == 0
    assert json.loads(r.stdout) == json.loads((REPO / "schemas" / "bpfgen-v1.schema.json").read_text())


def test_inspect_json_is_stdout_alone(seed_build) -> None:
    r = run("inspect", seed_build.object_path, "-o", "json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert {p["name"] for p in data["programs"]} >= {"from_netdev", "to_netdev"}
    assert {m["name"] for m in data["maps"]} >= {"svc_v4", "ct_v4", "snat_v4"}
    assert data["license"] == "GPL" and data["btf"] is True


def test_inspect_text(seed_build) -> None:
    r = run("inspect", seed_build.object_path)
    assert r.exit_code == 0 and "from_netdev" in r.stdout and "lru_hash" in r.stdout


@pytest.mark.parametrize("content", [b"not an object\n", None], ids=["text-file", "missing"])
def test_inspect_bad_input_is_one_clean_line(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "x.o"
    if content is not None:
        path.write_bytes(content)
    r = run("inspect", path)
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert str(path) in r.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["--debug", "inspect", str(tmp_path / "missing.o")])
    assert r.exit_code != 0 and r.exception is not None and not isinstance(r.exception, SystemExit)


def test_load_without_a_build_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = run("load", "--iface", "eth0")
    assert r.exit_code in (1, 2)
    assert "Traceback" not in r.stderr
    assert "no build found" in r.stderr or "missing capability" in r.stderr


def test_usage_errors_exit_2() -> None:
    r = run("load")
    assert r.exit_code == 2 and "--iface" in r.stderr


@pytest.mark.parametrize("value", [
    {}, [], (), "", 0, -7, 2**70, True, False, None, 1.5, float("inf"), float("nan"),
    "naïve \"quoted\" \\ tab\t nl\n é ☃ \U0001f600",
    {"a": 1, "b": "x", "c": None, "d": [True, False], "e": {}, "f": [], "g": {"h": [1, {"i": (2, 3)}]}},
    [{"key": {"saddr": "10.0.0.1", "sport": 80}, "values": [{"cpu": 0, "value": {"packets": 3}}]}, [], [[], {}]],
    {"1": 1, "float": -0.0, "big": 10**30},
    {1: "int keys", None: "go to json.dumps"},
    [{2: "nested int keys"}],
])
def test_the_dump_writer_writes_what_json_dumps_writes(value: object) -> None:
    from bpfgen.cli import _json_indented

    assert _json_indented(value) == json.dumps(value, indent=2)
    # (an item of a list nested in a dump: every line after the first indented)
    assert _json_indented(value, "    ") == json.dumps(value, indent=2).replace("\n", "\n    ")
