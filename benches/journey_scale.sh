#!/usr/bin/env bash
# The journey-scale run of docs/benchmarks.md: N users inside a journey with pending
# timers. Prints memory per instance and timers fired per second.
# Usage: benches/journey_scale.sh [USERS] [WORKERS]   (defaults: 1000000 2)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/herald-target}"
USERS="${1:-1000000}"
WORKERS="${2:-2}"
cargo build --release --quiet -p herald-benches --bin journey-scale
BIN="$CARGO_TARGET_DIR/release/journey-scale"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
base=$("$BIN" --users "$USERS" --workers "$WORKERS" --phase segments); echo "$base"
wait=$("$BIN" --users "$USERS" --workers "$WORKERS" --phase waiting); echo "$wait"
fired=$("$BIN" --users "$USERS" --workers "$WORKERS" --phase fired); echo "$fired"
python3 - "$USERS" "$(echo "$base" | field rss_bytes)" "$(echo "$wait" | field rss_bytes)" \
  "$(echo "$wait" | field seconds)" "$(echo "$fired" | field seconds)" \
  "$(echo "$wait" | field journey_state_bytes)" "$(echo "$wait" | field timer_bytes)" \
  "$(echo "$wait" | field instances)" <<'PY'
import sys
users, base, wait, t_wait, t_fired = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
state, timers, instances = int(sys.argv[6]), int(sys.argv[7]), max(int(sys.argv[8]), 1)
print(f"journey state per waiting instance (counted): {(state + timers) / instances:.0f} bytes "
      f"({state / instances:.0f} state + {timers / instances:.0f} timer wheel; {instances} instances)")
print(f"memory per waiting instance: {(wait - base) / users:.0f} bytes (RSS {wait/2**20:.0f} MiB vs {base/2**20:.0f} MiB without journeys)")
print(f"timers fired: {users} in {t_fired - t_wait:.2f} s extra = {users / max(t_fired - t_wait, 1e-9):.0f} timers/s (each sends and arms the next timer)")
PY
