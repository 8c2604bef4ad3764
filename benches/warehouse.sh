#!/usr/bin/env bash
# The warehouse run of docs/benchmarks.md: a 1M-profile snapshot from file landing to
# diff applied (first load, then 1% of rows changed), and the warehouse sinks' rows/s
# (Parquet on disk and on the local S3-compatible server, PostgreSQL loads).
# Usage: benches/warehouse.sh [PROFILES] [SINK_ROWS]   (defaults: 1000000 1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/herald-target}"
eval "$(scripts/services.sh start)"
cargo build --release --quiet -p herald-benches --bin warehouse
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
"$CARGO_TARGET_DIR/release/warehouse" --profiles "${1:-1000000}" --sink-rows "${2:-1000000}" \
    --s3 "s3://$HERALD_TEST_S3_BUCKET/bench-warehouse" --postgres "$HERALD_TEST_POSTGRES"
