#!/usr/bin/env bash
# The durable-state run of docs/benchmarks.md: a live embedded Herald fed USERS users over
# HTTP (one order and one identify each, benches/segments20.sql), then: checkpoint bytes
# per user, the graceful stop (final checkpoint), and the restart to serving (restore of
# every user, then the HTTP listener up), by wall clock.
#
#   benches/checkpoint.sh [USERS]      # default 1000000
#
# Checkpoints on object storage: CHECKPOINT_DIR=s3://bucket/prefix (AWS_* variables as
# for Herald), and CHECKPOINT_FS=the local directory where that prefix's objects live (an
# S3-compatible server on this machine, e.g. scripts/services.sh's s3s-fs) for the sizes.
#
# REBUILD=1: with the events archive on ([export] parquet in the run's directory), then a
# last restart with a segment that reads a new aggregate: its history rebuilt from the
# archive before serving (the time to serving, and the rebuild's own line of the log).
set -euo pipefail
cd "$(dirname "$0")/.."
USERS="${1:-1000000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/herald-target}"
cargo build --release --quiet -p herald-engine --bin herald
BIN="$CARGO_TARGET_DIR/release/herald"
DIR="$(mktemp -d /tmp/herald-checkpoint-XXXXXX)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT
cp benches/segments20.sql "$DIR/segments.sql"
CK_LINE=""
if [ -n "${CHECKPOINT_DIR:-}" ]; then CK_LINE="dir = \"$CHECKPOINT_DIR\""; fi
cat > "$DIR/herald.toml" <<EOF
[engine]
segments = "segments.sql"
workers = 2
dedup_horizon = "1 hour"
[http]
listen = "127.0.0.1:0"
write_keys = ["bench"]
max_batch_bytes = 8000000
[admin]
listen = "127.0.0.1:0"
read_keys = ["bench-read"]
[checkpoint]
every = "5 seconds"
$CK_LINE
EOF
if [ -n "${REBUILD:-}" ]; then
  printf '[export]\nparquet = "archive"\nflush_every = "5 seconds"\n' >> "$DIR/herald.toml"
fi
CKS="${CHECKPOINT_FS:-$DIR/herald-state}/checkpoints"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

start() {
  : > "$DIR/stdout"
  RUST_LOG=info "$BIN" run --config "$DIR/herald.toml" > "$DIR/stdout" 2>> "$DIR/stderr" &
  PID=$!
  until grep -q "listening on" "$DIR/stdout"; do sleep 0.01; done
  ADDR=$(sed -n 's/^herald: listening on \([^ ]*\).*/\1/p' "$DIR/stdout")
  ADMIN=$(sed -n 's/^herald: listening on .*admin on \([^ )]*\).*/\1/p' "$DIR/stdout")
}
query() { curl -s -H "Authorization: Bearer bench-read" "$ADMIN$1"; }
metric() { query /metrics | awk -v m="$1" '$1 == m {print $2}'; }

start
python3 - "$ADDR" "$USERS" <<'EOF'
import json, sys, urllib.request, base64, time
addr, users = sys.argv[1], int(sys.argv[2])
auth = "Basic " + base64.b64encode(b"bench:").decode()
t0 = 1_780_000_000_000
def batch(lo, hi):
    items = []
    for u in range(lo, hi):
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((t0 + u) // 1000)) + ".%03dZ" % ((t0 + u) % 1000)
        items.append({"type": "track", "userId": f"u{u}", "event": "Order Completed",
                      "properties": {"revenue": u % 500}, "messageId": f"o{u}", "timestamp": ts})
        items.append({"type": "identify", "userId": f"u{u}", "traits": {"plan": ["pro", "free"][u % 2], "country": "IN"},
                      "messageId": f"i{u}", "timestamp": ts})
    return json.dumps({"batch": items}).encode()
started = time.time()
step = 5000
for lo in range(0, users, step):
    req = urllib.request.Request(f"{addr}/v1/batch", data=batch(lo, min(users, lo + step)),
                                 headers={"Authorization": auth, "Content-Type": "application/json"})
    while True:
        try:
            urllib.request.urlopen(req).read()
            break
        except urllib.error.HTTPError as e:
            if e.code != 503:
                raise
            time.sleep(0.05)
print(f"posted {2 * users} events in {time.time() - started:.1f} s")
EOF
# Wait until every event is in and a checkpoint after it is complete.
want=$((2 * USERS))
until [ "$(metric 'herald_events_in_total{source="http"}')" = "$want" ]; do sleep 0.2; done
in_at=$(date +%s%3N)
until [ "$(metric herald_checkpoint_at_ms)" -gt "$in_at" ] 2>/dev/null; do sleep 0.2; done
rss=$(awk '/VmHWM/ {printf "%.2f", $2/1048576}' /proc/$PID/status)
echo "checkpoints so far: $(metric herald_checkpoints_total), part bytes written: $(metric herald_checkpoint_bytes_total), peak RSS ${rss} GiB"
stop_t0=$(date +%s%3N)
kill -TERM $PID; wait $PID
stop_ms=$(( $(date +%s%3N) - stop_t0 ))
latest=$(dirname "$(ls "$CKS"/*/MANIFEST | tail -1)")
chain=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['chain']))" "$latest/MANIFEST")
bytes=$(du -sb "$CKS" | cut -f1)
echo "graceful stop (final checkpoint): ${stop_ms} ms"
echo "checkpoint directory: $bytes bytes for $USERS users (chain of $chain): $(( bytes / USERS )) B/user"
echo "full part sizes:"; ls -l "$(dirname "$(ls "$CKS"/*/MANIFEST | head -1)")" | awk 'NR>1 {print "  " $9 ": " $5}'
restart_t0=$(date +%s%3N)
start
restart_ms=$(( $(date +%s%3N) - restart_t0 ))
echo "restart to serving: ${restart_ms} ms ($(grep -o 'restored the checkpoint.*' "$DIR/stderr" | tail -1))"
size=$(query /v1/segments | python3 -c "import json,sys; print({s['name']: s['size'] for s in json.load(sys.stdin)['segments']}['buyers'])")
echo "buyers after the restart: $size (want $USERS)"
kill -TERM $PID; wait $PID
if [ -n "${REBUILD:-}" ]; then
  # A segment over an aggregate no segment read: rebuilt from the archive at the start.
  echo "CREATE SEGMENT rebuilt_top AS max(properties.revenue) >= 400;" >> "$DIR/segments.sql"
  rebuild_t0=$(date +%s%3N)
  start
  rebuild_ms=$(( $(date +%s%3N) - rebuild_t0 ))
  echo "restart with a new aggregate, to serving: ${rebuild_ms} ms"
  echo "  $(grep -o 'rebuilt a new aggregate.*' "$DIR/stderr" | tail -1)"
  # The changes at the restart's instant reach the query API once the sink releases them.
  top=0
  for _ in $(seq 300); do
    top=$(query /v1/segments | python3 -c "import json,sys; print({s['name']: s['size'] for s in json.load(sys.stdin)['segments']}['rebuilt_top'])")
    [ "$top" = "$(( USERS / 5 ))" ] && break
    sleep 0.2
  done
  echo "rebuilt_top after the restart: $top (want $(( USERS / 5 ))), $(( $(date +%s%3N) - rebuild_t0 )) ms after the start"
  kill -TERM $PID; wait $PID
fi
