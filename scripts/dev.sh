#!/usr/bin/env bash
# bpfgen's set-up and its two everyday jobs, on a fresh Debian-based machine, as root:
#
#   scripts/dev.sh demo   install what is needed, then run the NodePort walk in the lab
#   scripts/dev.sh test   install what is needed, then run the whole test suite
#
# Installing is idempotent: packages already present are not fetched again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/dev.sh: run as root (BPF, tc and network namespaces need it)" >&2
  exit 2
fi

# System packages: clang/llvm build the datapath, libbpf-dev has bpf_helpers.h,
# libbpf1 is the libbpf.so.1 bpfgen loads through ctypes, bpftool/iproute2 are the
# tests' independent oracles and the lab's tools.
missing=()
command -v clang >/dev/null || missing+=(clang)
command -v llvm-objdump >/dev/null || missing+=(llvm)
[ -f /usr/include/bpf/bpf_helpers.h ] || missing+=(libbpf-dev)
ldconfig -p | grep -q 'libbpf\.so\.1 ' || missing+=(libbpf1)
command -v bpftool >/dev/null || missing+=(bpftool)
command -v ip >/dev/null && command -v tc >/dev/null || missing+=(iproute2)
command -v nsenter >/dev/null && command -v setpriv >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The package itself (editable, so templates and examples come from this checkout).
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'

case "${1:-}" in
  demo) shift; exec python3 -m bpfgen.cli lab demo "$@" ;;
  test) shift; exec python3 -m pytest -q "$@" ;;
  *) echo "usage: scripts/dev.sh demo|test [args]" >&2; exit 2 ;;
esac
