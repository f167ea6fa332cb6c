#!/usr/bin/env bash
# Starts a private redis-server and two wsfan instances, then drives two Chromium chat
# pages against them (chat.test.mjs). Needs chromium (Debian package) and Node.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
if ! command -v node >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  # Exit 3 = skipped (tests/run-all.sh reports it); under CI a skipped stage fails.
  echo "browser: SKIPPED - needs node and chromium"
  [ "${CI:-}" = true ] && { echo "browser: CI=true, so a skipped stage fails the run"; exit 1; }
  exit 3
fi
[ -d "$here/node_modules/playwright-core" ] || (cd "$here" && npm install --no-audit --no-fund --silent)

freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rport=$(freeport); pa=$(freeport); pb=$(freeport)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
pids+=($!)
# Redis first, so wsfan's first connect succeeds (no alarming "Connection refused").
for i in $(seq 200); do
  [ "$(redis-cli -p "$rport" ping 2>/dev/null)" = PONG ] && break
  [ "$i" = 200 ] && { echo "browser: redis-server never answered"; exit 1; }
  sleep 0.05
done
bin="$root/target/release/wsfan"
[ -x "$bin" ] || (cd "$root" && cargo build --release --bin wsfan)
"$bin" --listen "127.0.0.1:$pa" --redis "redis://127.0.0.1:$rport" --log-level warn & pids+=($!)
pida=$!
"$bin" --listen "127.0.0.1:$pb" --redis "redis://127.0.0.1:$rport" --log-level warn & pids+=($!)
for port in $pa $pb; do
  for i in $(seq 200); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz")" = 200 ]; then break; fi
    [ "$i" = 200 ] && { echo "browser: instance on $port never became ready"; exit 1; }
    sleep 0.05
  done
done
# The test kills instance A (its pid) and starts it again on the same address with
# the same flags: the page on A must reconnect and recover what B's page sent meanwhile.
node "$here/chat.test.mjs" "http://127.0.0.1:$pa/?channel=browser" "http://127.0.0.1:$pb/?channel=browser" \
  "$pida" "$bin" --listen "127.0.0.1:$pa" --redis "redis://127.0.0.1:$rport" --log-level warn
