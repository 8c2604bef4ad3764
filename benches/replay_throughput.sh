#!/usr/bin/env bash
# The replay throughput run of docs/benchmarks.md: 1M events, 100k users, 20 segments.
#
# Generates the e-commerce data set, then runs `replay-throughput` twice:
#   A. --until just after the last event: facts inside 1-day..30-day windows are live;
#   B. --until 40 days later: every window has lapsed, only per-user state remains.
# State is counted from the state structures at --until (bytes per user, per in-window entry).
#
#   benches/replay_throughput.sh [USERS] [EVENTS] [WORKERS]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/herald-target}"
USERS="${1:-100000}"; EVENTS="${2:-1000000}"; WORKERS="${3:-2}"
DATA="${HERALD_BENCH_DIR:-${TMPDIR:-/tmp}/herald-bench-$USERS-$EVENTS}"

cargo build --release --quiet -p herald-examples -p herald-benches
BIN="$CARGO_TARGET_DIR/release"
if [ ! -f "$DATA/events.jsonl" ]; then
  "$BIN/ecommerce-gen" --users "$USERS" --events "$EVENTS" --seed 7 \
    --start 2026-03-01T00:00:00Z --days 30 --out "$DATA" >/dev/null
fi
run() {
  "$BIN/replay-throughput" --segments benches/segments20.sql --events "$DATA/events.jsonl" \
    --profiles "$DATA/profiles.parquet@2026-03-16T00:00:00Z" --until "$1" --workers "$WORKERS"
}
echo "== A: --until 2026-03-31T00:00:00Z (windows live)"; run 2026-03-31T00:00:00Z | tee "$DATA/a.txt"
echo "== B: --until 2026-05-10T00:00:00Z (windows lapsed)"; run 2026-05-10T00:00:00Z | tee "$DATA/b.txt"
python3 - "$DATA/a.txt" "$DATA/b.txt" <<'PY'
import re, sys
def metrics(p):
    line = [l for l in open(p) if l.startswith("METRICS")][0]
    return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}
a, b = metrics(sys.argv[1]), metrics(sys.argv[2])
# Counted from the state structures (replay-throughput sums them at --until).
print(f"state per user (counted, A):        {a['per_user_bytes'] / a['state_users']:.0f} bytes")
print(f"state per user (counted, B):        {b['per_user_bytes'] / b['state_users']:.0f} bytes")
print(f"state per in-window entry (A):      {a['window_bytes'] / max(a['in_window'], 1):.1f} bytes ({a['in_window']:.0f} entries)")
print(f"events/s (A, B):                    {a['events'] / a['seconds']:.0f}, {b['events'] / b['seconds']:.0f}")
PY
