#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, then runs every test.
#   - Debian packages: curl, nghttp2-client, openssl; for eBPF capture clang-19, llvm-19,
#     libbpf-dev, bpftool, tcpdump, iproute2, iptables (installed when running as root)
#   - a Python venv in .venv with conformance/requirements.txt
#   - cargo build, clippy, cargo test, then the cross-process conformance suite (pytest)
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v curl >/dev/null || need_pkgs+=(curl)
command -v nghttp >/dev/null || need_pkgs+=(nghttp2-client)
command -v openssl >/dev/null || need_pkgs+=(openssl)
command -v clang-19 >/dev/null || need_pkgs+=(clang-19)
command -v llvm-objdump-19 >/dev/null || need_pkgs+=(llvm-19)
[[ -e /usr/include/bpf/bpf_helpers.h ]] || need_pkgs+=(libbpf-dev)
command -v bpftool >/dev/null || need_pkgs+=(bpftool)
command -v tcpdump >/dev/null || need_pkgs+=(tcpdump)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v iptables >/dev/null || need_pkgs+=(iptables)
if ((${#need_pkgs[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    echo "== installing ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "!! missing ${need_pkgs[*]} and not root: conformance tests needing them will skip" >&2
  fi
fi

if [[ ! -x .venv/bin/python ]] || ! cmp -s conformance/requirements.txt .venv/.requirements; then
  echo "== creating .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r conformance/requirements.txt
  cp conformance/requirements.txt .venv/.requirements
fi

echo "== cargo build"
cargo build --workspace --all-targets --locked
if cargo clippy --version >/dev/null 2>&1; then
  echo "== cargo clippy"
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi
echo "== cargo test"
cargo test --workspace --locked
echo "== conformance (pytest)"
EASTGUARD_BIN="$PWD/target/debug/eastguard" .venv/bin/python -m pytest conformance -v -p no:cacheprovider "$@"
