#!/usr/bin/env bash
# Herald's main job on its embedded default, no services needed: generate the e-commerce
# example (users, events with some malformed lines and duplicates, a profile snapshot, a
# static list), replay it through the segment dataflow, and show what came out.
#
#   scripts/demo.sh [USERS] [EVENTS] [WORKERS]     (defaults: 10000 users, 200000 events, 2)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/herald-target}"
USERS="${1:-10000}"; EVENTS="${2:-200000}"; WORKERS="${3:-2}"
OUT="${HERALD_DEMO_DIR:-${TMPDIR:-/tmp}/herald-demo}"

cargo build --release --quiet -p herald-engine --no-default-features -p herald-examples
BIN="$CARGO_TARGET_DIR/release"
rm -rf "$OUT"; mkdir -p "$OUT"
cp examples/ecommerce/segments.sql "$OUT/segments.sql"

echo "==> generating $USERS users, $EVENTS events into $OUT"
"$BIN/ecommerce-gen" --users "$USERS" --events "$EVENTS" --seed 7 \
  --start 2026-03-01T00:00:00Z --days 30 --out "$OUT"

echo "==> herald check $OUT/segments.sql"
"$BIN/herald" check "$OUT/segments.sql"

echo "==> herald replay ($WORKERS workers)"
"$BIN/herald" replay --segments "$OUT/segments.sql" --events "$OUT/events.jsonl" \
  --profiles "$OUT/profiles.parquet@2026-03-16T00:00:00Z" \
  --until 2026-03-31T00:00:00Z --out "$OUT/out" --workers "$WORKERS"

echo "==> first changes ($OUT/out/segment_changes.jsonl)"
head -n 5 "$OUT/out/segment_changes.jsonl"
echo "==> first dead letters ($OUT/out/dead_letters.jsonl)"
head -n 3 "$OUT/out/dead_letters.jsonl" | cut -c1-200
