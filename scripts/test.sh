#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, then runs every test.
#   - Debian packages: curl, nghttp2-client, openssl; for eBPF capture clang-19, llvm-19,
#     libbpf-dev, bpftool, tcpdump, iproute2, iptables; chromium and chromium-driver for the web UI
#     test, kubernetes-client (kubectl) when no kubectl is installed (installed when running as root)
#   - a Python venv in .venv with conformance/requirements.txt
#   - the eastguard binary built once with a fresh, empty CARGO_HOME, as on a new machine (the
#     README's first command must work right after a clone; a warm cache hides what it needs)
#   - cargo build, clippy, cargo deny (licences, duplicate versions, sources; deny.toml),
#     cargo test, a bounded run of each fuzz target on its corpus, then the cross-process
#     conformance suite (pytest)
set -euo pipefail
cd "$(dirname "$0")/.."

# Disk: a fresh CI machine may have little free. Say how much there is at each stage, and build
# without incremental state (one build, nothing to reuse; it doubled target/ in size).
export CARGO_INCREMENTAL=0
disk() { echo "-- disk: $(df -h --output=avail . | tail -n 1 | tr -d ' ') free (target/: $(du -sh target 2>/dev/null | cut -f1))"; }
disk

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
command -v chromium >/dev/null || need_pkgs+=(chromium)
command -v chromedriver >/dev/null || need_pkgs+=(chromium-driver)
# kubectl parses deploy/ (--dry-run=client against the API stand-in); Debian's is enough for that.
command -v kubectl >/dev/null || need_pkgs+=(kubernetes-client)
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

# Skipped only on request (EASTGUARD_SKIP_FRESH_BUILD=1), never under CI.
if [[ -n "${CI:-}" || -z "${EASTGUARD_SKIP_FRESH_BUILD:-}" ]]; then
  fresh_home=$(mktemp -d "${TMPDIR:-/tmp}/eastguard-cargo-home.XXXXXX")
  fresh_target=$(mktemp -d "${TMPDIR:-/tmp}/eastguard-fresh-target.XXXXXX")
  trap 'rm -rf "$fresh_home" "$fresh_target"' EXIT
  echo "== cargo build --bin eastguard with an empty CARGO_HOME ($fresh_home)"
  CARGO_HOME="$fresh_home" cargo build --locked --bin eastguard --target-dir "$fresh_target"
  "$fresh_target/debug/eastguard" --version
  rm -rf "$fresh_home" "$fresh_target"
fi

echo "== cargo build"
cargo build --workspace --all-targets --locked
if cargo clippy --version >/dev/null 2>&1; then
  echo "== cargo clippy"
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi
if ! command -v cargo-deny >/dev/null; then
  echo "== installing cargo-deny"
  cargo install --locked cargo-deny
fi
echo "== cargo deny (licenses, bans, sources; advisories need GitHub, see README)"
# cargo deny reads the whole lock file through `cargo metadata`, other platforms' packages
# included, which no build on this one downloads: fetch them all first (a warm cache hides this).
cargo fetch --locked
cargo deny --offline check licenses bans sources
# RustSec advisories: the database is a git repository on GitHub, which this project's machines
# cannot reach. Given a local checkout of it (EASTGUARD_ADVISORY_DB=/path/to/advisory-db), check
# against it; otherwise say loudly that advisories were not checked.
if [ -n "${EASTGUARD_ADVISORY_DB:-}" ]; then
  echo "== cargo deny check advisories (database: $EASTGUARD_ADVISORY_DB)"
  adv_root=$(mktemp -d)
  git clone -q "$EASTGUARD_ADVISORY_DB" "$adv_root/advisory-db-3157b0e258782691"
  touch "$adv_root/advisory-db-3157b0e258782691/FETCH_HEAD"
  printf '[advisories]\ndb-path = "%s"\ndb-urls = ["https://github.com/rustsec/advisory-db"]\n' "$adv_root" > "$adv_root/deny.toml"
  cargo deny --offline --config "$adv_root/deny.toml" check advisories
  rm -rf "$adv_root"
else
  echo "!!! NOT CHECKED: RustSec advisories (set EASTGUARD_ADVISORY_DB to a local advisory-db checkout)"
fi
disk
echo "== cargo test"
# Tests that need ../shared/conformance or clang are #[ignore]d for a plain `cargo test` (listed as
# ignored there); here they run, and fail if what they need is missing.
cargo test --workspace --locked -- --include-ignored
# Each fuzz target for a bounded time, from its committed corpus (new inputs go to a temporary
# directory, so the committed corpus is not changed). Stable toolchain, no sanitizer.
if ! command -v cargo-fuzz >/dev/null; then
  echo "== installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
fuzz_secs="${EASTGUARD_FUZZ_SECONDS:-20}"
for target in policy:normalize policy:compile_evaluate proxy:translate; do
  crate="${target%%:*}" name="${target#*:}"
  echo "== fuzz $crate/$name for ${fuzz_secs}s"
  fuzz_out=$(mktemp -d "${TMPDIR:-/tmp}/eastguard-fuzz.XXXXXX")
  if ! (cd "$crate" && cargo fuzz run "$name" --sanitizer none "$fuzz_out" "fuzz/corpus/$name" -- \
    -max_total_time="$fuzz_secs" -timeout=10 -rss_limit_mb=2048 >"$fuzz_out.log" 2>&1); then
    cat "$fuzz_out.log"
    echo "!! fuzz target $crate/$name failed (the crashing input is in $crate/fuzz/artifacts/$name)" >&2
    exit 1
  fi
  tail -n 1 "$fuzz_out.log"
  rm -rf "$fuzz_out" "$fuzz_out.log"
done
# Under CI the fuzz builds (a target directory per crate, 1.5 GB) are not needed past this point.
[[ -n "${CI:-}" ]] && rm -rf policy/fuzz/target proxy/fuzz/target
disk

echo "== conformance (pytest)"
EASTGUARD_BIN="$PWD/target/debug/eastguard" .venv/bin/python -m pytest conformance -v -rs -p no:cacheprovider "$@"
