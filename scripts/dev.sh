#!/usr/bin/env bash
# bpfgen's set-up and its two everyday jobs, on a fresh Debian-based machine, as root:
#
#   scripts/dev.sh demo   install what is needed, then run the NodePort walk in the lab
#   scripts/dev.sh test   install what is needed, then run the whole test suite
#
# bpfgen is installed (editable) into a virtual environment at .venv/ in this checkout:
# Debian 12's python3 is "externally managed" (PEP 668), so pip refuses to install
# into it. Other commands: .venv/bin/bpfgen ..., .venv/bin/python -m pytest ...
#
# Installing is idempotent: packages already present are not fetched again, and the
# venv is left alone while it imports bpfgen from this checkout with its test deps.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd -P)
VENV=.venv
PY=$VENV/bin/python

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/dev.sh: run as root (BPF, tc and network namespaces need it)" >&2
  exit 2
fi

# A usable venv: its interpreter runs and is new enough for bpfgen (>= 3.11).
venv_usable() {
  [ -x "$PY" ] && "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

# Can python3 create a venv with pip in it? Debian splits venv/ensurepip into python3-venv.
can_make_venv() {
  command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null
}

# System packages: clang/llvm build the datapath, libbpf-dev has bpf_helpers.h,
# libbpf1 is the libbpf.so.1 bpfgen loads through ctypes, bpftool/iproute2 are the
# tests' independent oracles and the lab's tools, python3-venv makes .venv/, iptables
# and nftables are kube-proxy's two backends that bench/controlplane.py compares against.
missing=()
command -v clang >/dev/null || missing+=(clang)
command -v llvm-objdump >/dev/null || missing+=(llvm)
[ -f /usr/include/bpf/bpf_helpers.h ] || missing+=(libbpf-dev)
ldconfig -p | grep -q 'libbpf\.so\.1 ' || missing+=(libbpf1)
command -v bpftool >/dev/null || missing+=(bpftool)
command -v ip >/dev/null && command -v tc >/dev/null || missing+=(iproute2)
command -v nsenter >/dev/null && command -v setpriv >/dev/null || missing+=(util-linux)
command -v iptables-restore >/dev/null || missing+=(iptables)
command -v nft >/dev/null || missing+=(nftables)
if ! venv_usable && ! can_make_venv; then
  missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The virtual environment.
if ! venv_usable; then
  if ! can_make_venv; then
    echo "scripts/dev.sh: $(command -v python3 || echo python3) cannot create a virtual environment" \
      "(no venv/ensurepip module; on Debian: apt-get install python3-venv)" >&2
    exit 1
  fi
  echo "creating $VENV" >&2
  python3 -m venv --clear "$VENV"
fi
"$PY" -m pip --version >/dev/null 2>&1 || "$PY" -m ensurepip --upgrade >/dev/null

# The package itself (editable, so templates and examples come from this checkout).
# Skipped when the venv already imports bpfgen from here, with the test deps, and
# pyproject.toml has not changed since the last install (a new dependency reinstalls).
stamp=$VENV/.bpfgen-pyproject.sha256
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
installed() {
  [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] || return 1
  # From / so that the checkout's own bpfgen/ dir (the cwd) cannot mask a missing install.
  (cd / && "$REPO/$PY" -c '
import os, sys
import bpfgen, pytest, jsonschema
sys.exit(os.path.dirname(os.path.realpath(bpfgen.__file__)) != os.path.join(sys.argv[1], "bpfgen"))
' "$REPO") >/dev/null 2>&1
}
if ! installed; then
  echo "installing bpfgen (editable) into $VENV" >&2
  "$PY" -m pip install -q --disable-pip-version-check -e '.[test]'
  echo "$want" >"$stamp"
fi

case "${1:-}" in
  demo) shift; exec "$PY" -m bpfgen.cli lab demo "$@" ;;
  test) shift; exec "$PY" -m pytest -q "$@" ;;
  *) echo "usage: scripts/dev.sh demo|test [args]" >&2; exit 2 ;;
esac
