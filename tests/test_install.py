"""bpfgen installed as a user would: `pip install .` into a fresh virtual environment, run
from another directory, with nothing of the checkout on its path."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.kernel


def test_a_wheel_install_runs_the_lab_demo_from_anywhere(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(REPO)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(BPFGEN_PIN_ROOT=f"/sys/fs/bpf/bpfgen-test-{secrets.token_hex(4)}", BPFGEN_RUN_DIR=str(tmp_path / "run"))

    where = subprocess.run([str(py), "-c", "import bpfgen, bpfgen.lab; print(bpfgen.__file__); "
                            "print(bpfgen.lab.DEFAULT_SPEC)"], cwd=elsewhere, env=env, capture_output=True,
                           text=True, check=True).stdout.split()
    assert all(p.startswith(str(venv)) for p in where), where  # the installed copy, not the checkout

    prefix = f"w{secrets.token_hex(3)}"
    demo = subprocess.run([str(venv / "bin" / "bpfgen"), "lab", "demo", "--prefix", prefix, "-o", "json"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert demo.returncode == 0, demo.stderr
        report = json.loads(demo.stdout)
        assert {r["reply_from"] for r in report["requests"]} == {"172.26.50.101:30645"}
        assert (elsewhere / "out" / "seed-lab" / "datapath.bpf.o").is_file()
    finally:
        subprocess.run([str(venv / "bin" / "bpfgen"), "lab", "down", "--prefix", prefix], cwd=elsewhere, env=env,
                       capture_output=True)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix + "-" not in left
