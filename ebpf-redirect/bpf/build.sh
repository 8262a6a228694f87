#!/usr/bin/env bash
# Rebuilds the committed eBPF objects from their sources (needs clang with the BPF target and
# libbpf's headers: Debian clang-19, libbpf-dev). `ebpf-redirect/tests/objects.rs` runs this into
# a scratch directory and checks the result matches the committed objects.
#   usage: bpf/build.sh [OUT_DIR]   (default: next to the sources)
set -euo pipefail
cd "$(dirname "$0")"
out="${1:-.}"
clang="${CLANG:-$(command -v clang-19 || command -v clang)}"
for src in *.bpf.c; do
  "$clang" -target bpf -O2 -g -Wall -Werror \
    -I/usr/include/"$(uname -m)"-linux-gnu \
    -fdebug-prefix-map="$PWD"=. -fdebug-compilation-dir=. \
    -c "$src" -o "$out/${src%.c}.o"
done
