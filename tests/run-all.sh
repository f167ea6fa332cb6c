#!/usr/bin/env bash
# Installs what the tests need (only what is missing) and runs every test:
# fmt, clippy, unit + integration tests (real redis-server processes on free ports),
# the chaos soak,
# the Autobahn|Testsuite conformance run and the real-browser test.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo build --release --bin wsfan
log="$(mktemp)"
cargo test --all-targets 2>&1 | tee "$log"

# The chaos soak (tests/soak.rs): three instances, one Redis, faults injected; 60 s
# here, WSFAN_SOAK_SECS=1800 for a long run. Alone, so it has the CPU to itself.
WSFAN_SOAK_SECS="${WSFAN_SOAK_SECS:-60}" cargo test --test soak -- --ignored --nocapture 2>&1 | tee -a "$log"
passed=$(grep -Eo '^test result: .*' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .*' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
rm -f "$log"

# Conformance (needs Python 2.7; says so and skips where there is none).
bash tests/autobahn/run.sh

# Real browsers: two chat pages on two instances sharing one Redis.
bash tests/browser/run.sh

echo "cargo: ${passed} passed, ${failed} failed"
