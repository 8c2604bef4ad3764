#!/usr/bin/env bash
# How replay scales with input size: for each EVENTS (10 events per user, 20 segments,
# 2 workers) generate the e-commerce data, run `replay-throughput` (dataflow events/s and
# state counted from the state structures) and the whole `herald replay` (wall clock,
# peak RSS), then plot events/s and state against input size.
#
#   benches/replay_scaling.sh [EVENTS...]      (default: 200000 1000000 2000000 5000000)
#
# Writes docs/img/replay_scaling.png and prints a table (also in $OUT/scaling.tsv).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/herald-target}"
SIZES=("$@"); [ ${#SIZES[@]} -gt 0 ] || SIZES=(200000 1000000 2000000 5000000)
OUT="${HERALD_BENCH_DIR:-${TMPDIR:-/tmp}/herald-scaling}"; mkdir -p "$OUT"
cargo build --release --quiet -p herald-examples -p herald-benches -p herald-engine
BIN="$CARGO_TARGET_DIR/release"
TSV="$OUT/scaling.tsv"
printf 'events\tusers\tdataflow_events_per_s\tend_to_end_events_per_s\tpeak_rss_mib\tbytes_per_user\tbytes_per_window_entry\n' > "$TSV"
for EVENTS in "${SIZES[@]}"; do
  USERS=$((EVENTS / 10)); DATA="$OUT/$EVENTS"
  if [ ! -f "$DATA/events.jsonl" ]; then
    "$BIN/ecommerce-gen" --users "$USERS" --events "$EVENTS" --seed 7 \
      --start 2026-03-01T00:00:00Z --days 30 --out "$DATA" >/dev/null
  fi
  "$BIN/replay-throughput" --segments benches/segments20.sql --events "$DATA/events.jsonl" \
    --profiles "$DATA/profiles.parquet@2026-03-16T00:00:00Z" --until 2026-03-31T00:00:00Z \
    --workers 2 > "$DATA/throughput.txt"
  /usr/bin/time -f '%e %M' -o "$DATA/time.txt" "$BIN/herald" replay \
    --segments benches/segments20.sql --events "$DATA/events.jsonl" \
    --profiles "$DATA/profiles.parquet@2026-03-16T00:00:00Z" --until 2026-03-31T00:00:00Z \
    --out "$DATA/out" --workers 2 > "$DATA/replay.txt"
  python3 - "$DATA" "$EVENTS" "$USERS" >> "$TSV" <<'PY'
import re, sys
d, events, users = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
line = [l for l in open(f"{d}/throughput.txt") if l.startswith("METRICS")][0]
m = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}
wall, rss_kb = open(f"{d}/time.txt").read().split()
print("\t".join(str(x) for x in [
    events, users, round(m["events"] / m["seconds"]), round(events / float(wall)),
    round(int(rss_kb) / 1024), round(m["per_user_bytes"] / m["state_users"]),
    round(m["window_bytes"] / max(m["in_window"], 1), 1)]))
PY
done
column -t "$TSV"
python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install --quiet matplotlib
mkdir -p docs/img
python3 - "$TSV" docs/img/replay_scaling.png <<'PY'
import sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
ev = [int(r[0]) / 1e6 for r in rows]
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
a.plot(ev, [int(r[2]) / 1e3 for r in rows], "o-", label="dataflow")
a.plot(ev, [int(r[3]) / 1e3 for r in rows], "s-", label="herald replay, end to end")
from matplotlib.ticker import NullFormatter
def ticks(ax):
    ax.set_xscale("log"); ax.set_xticks(ev); ax.set_xticklabels([f"{x:g}" for x in ev])
    ax.xaxis.set_minor_formatter(NullFormatter())
ticks(a); a.set_xlabel("input events (millions)"); a.set_ylabel("thousand events/s")
a.set_ylim(bottom=0); a.legend(); a.set_title("throughput, 2 workers, 20 segments")
b.plot(ev, [int(r[5]) for r in rows], "o-", label="bytes per user (counted)")
b.plot(ev, [int(r[4]) for r in rows], "s-", label="peak RSS, MiB")
ticks(b); b.set_xlabel("input events (millions)"); b.set_ylim(bottom=0)
b.legend(); b.set_title("state and memory")
fig.tight_layout(); fig.savefig(sys.argv[2], dpi=100)
print(f"plot: {sys.argv[2]}")
PY
